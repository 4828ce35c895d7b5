import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { afterAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { createMemoryStoreData, LocalStorage, MemoryStorage, MemoryStore } from '@medsync/core';
import { describeStorageConformance, describeStoreConformance, writeTree } from '@medsync/core/testing';

const roots: string[] = [];
afterAll(() => {
  for (const r of roots.splice(0)) rmSync(r, { recursive: true, force: true });
});

describeStorageConformance({
  name: 'local',
  create: async () => {
    const root = mkdtempSync(join(tmpdir(), 'medsync-local-'));
    roots.push(root);
    return new LocalStorage({ root });
  },
  cleanup: async (s) => rmSync((s as LocalStorage).root, { recursive: true, force: true }),
});

// Without fsync, files under 64 KiB take the synchronous write path: the same contract applies.
describeStorageConformance({
  name: 'local (fsync off)',
  create: async () => {
    const root = mkdtempSync(join(tmpdir(), 'medsync-local-'));
    roots.push(root);
    return new LocalStorage({ root, fsync: false });
  },
  cleanup: async (s) => rmSync((s as LocalStorage).root, { recursive: true, force: true }),
  largeFileBytes: 16 * 1024 * 1024,
});

// Listing with concurrent asynchronous stats, as on network mounts (tests run on a local disk).
describeStorageConformance({
  name: 'local (async listing)',
  create: async () => {
    const root = mkdtempSync(join(tmpdir(), 'medsync-local-'));
    roots.push(root);
    return new LocalStorage({ root, listMode: 'async' });
  },
  cleanup: async (s) => rmSync((s as LocalStorage).root, { recursive: true, force: true }),
  largeFileBytes: 4 * 1024 * 1024,
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

describe('LocalStorage.flush', () => {
  it('fsyncs the folders that changed, and tolerates one removed since', async () => {
    const root = mkdtempSync(join(tmpdir(), 'medsync-local-'));
    roots.push(root);
    const s = new LocalStorage({ root });
    await s.write('a/b/c.dcm', Buffer.from('x'));
    await s.write('gone/d.dcm', Buffer.from('y'));
    rmSync(join(root, 'gone'), { recursive: true });
    await expect(s.flush()).resolves.toBeUndefined();
    await expect(s.flush()).resolves.toBeUndefined();
    expect(readFileSync(join(root, 'a/b/c.dcm'), 'utf8')).toBe('x');
  });
});

describe('MemoryStorage faults', () => {
  it('cutWrites cuts only writes that pass the limit; smaller ones do not use it up', async () => {
    const m = new MemoryStorage();
    m.faults.cutWrites(1000, 1);
    await m.write('small.dcm', Buffer.alloc(10));
    await expect(m.write('big.dcm', Buffer.alloc(5000))).rejects.toMatchObject({ code: 'E_TRANSIENT' });
    expect(m.peek('big.dcm')).toBeUndefined();
    await m.write('big.dcm', Buffer.alloc(5000));
    expect(m.peek('big.dcm')?.length).toBe(5000);
    m.faults.cutWrites(0, 5).clear();
    await m.write('after-clear.dcm', Buffer.alloc(10));
  });
});

describe('LocalStorage synchronous listing', () => {
  it('lets timers run between batches, so a cancel stops a long listing', async () => {
    const root = mkdtempSync(join(tmpdir(), 'medsync-local-'));
    roots.push(root);
    const files: Record<string, string> = {};
    for (let i = 0; i < 3000; i++) files[`d${i % 10}/f${i}.dcm`] = '';
    writeTree(root, files);
    const s = new LocalStorage({ root, listMode: 'sync' });
    const ac = new AbortController();
    setTimeout(() => ac.abort(), 0);
    let seen = 0;
    await expect(
      (async () => {
        for await (const _ of s.list('', { signal: ac.signal })) seen++;
      })(),
    ).rejects.toMatchObject({ code: 'E_ABORTED' });
    expect(seen).toBeGreaterThan(0);
    expect(seen).toBeLessThan(3000);
  });
});
