import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createMemoryStoreData, LocalStorage, MemoryStorage, MemoryStore } from '@medsync/core';
import { describeStorageConformance, describeStoreConformance } from '@medsync/core/testing';

const roots: string[] = [];

describeStorageConformance({
  name: 'local',
  create: async () => {
    const root = mkdtempSync(join(tmpdir(), 'medsync-local-'));
    roots.push(root);
    return new LocalStorage({ root });
  },
  cleanup: async (s) => rmSync((s as LocalStorage).root, { recursive: true, force: true }),
});

describeStorageConformance({
  name: 'memory',
  create: async () => new MemoryStorage(),
  buffersWrites: true,
  largeFileBytes: 8 * 1024 * 1024,
});

describeStoreConformance({
  name: 'memory',
  create: async () => {
    const data = createMemoryStoreData();
    return {
      store: new MemoryStore(data),
      reopen: async () => new MemoryStore(data),
      openAnother: async () => new MemoryStore(data),
    };
  },
});
