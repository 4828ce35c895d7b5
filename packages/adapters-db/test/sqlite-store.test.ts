import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { describeStoreConformance, manifestEntry } from '@medsync/core/testing';
import { openSqliteStore } from '@medsync/adapters-db';

describeStoreConformance({
  name: 'sqlite',
  create: async () => {
    const dir = mkdtempSync(join(tmpdir(), 'medsync-sqlite-'));
    const path = join(dir, 'state.db');
    return {
      store: await openSqliteStore({ path }),
      reopen: () => openSqliteStore({ path }),
      openAnother: () => openSqliteStore({ path }),
      cleanup: async () => rmSync(dir, { recursive: true, force: true }),
    };
  },
});

describe('sqlite store specifics', () => {
  it('refuses a file that is not a database with E_INTEGRITY', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'medsync-sqlite-'));
    const path = join(dir, 'not-a-db.db');
    writeFileSync(path, 'this is a text file, not SQLite, and long enough to have a header'.repeat(20));
    await expect(openSqliteStore({ path })).rejects.toMatchObject({ code: 'E_INTEGRITY' });
    rmSync(dir, { recursive: true, force: true });
  });

  it.runIf(process.platform === 'linux')(
    'reads through a memory map by default; mmapBytes 0 turns it off; a bad value is E_CONFIG',
    async () => {
      const dir = mkdtempSync(join(tmpdir(), 'medsync-sqlite-'));
      const file = join(dir, 'm.db');
      /** Whether this process maps the database file while the store is open (after a read). */
      const mapped = async (o: { mmapBytes?: number }) => {
        const s = await openSqliteStore({ path: file, ...o });
        await s.manifest.put(manifestEntry('a.dcm'));
        const got: string[] = [];
        for await (const e of s.manifest.list({ jobId: 'job-a', destination: 'file:///dest' }))
          got.push(e.path);
        // The database file itself (its -shm sibling is always mapped).
        const maps = readFileSync('/proc/self/maps', 'utf8')
          .split('\n')
          .some((l) => l.endsWith(` ${file}`));
        await s.close();
        return { maps, got };
      };
      expect(await mapped({})).toEqual({ maps: true, got: ['a.dcm'] });
      expect(await mapped({ mmapBytes: 0 })).toEqual({ maps: false, got: ['a.dcm'] });
      await expect(openSqliteStore({ path: file, mmapBytes: -1 })).rejects.toMatchObject({
        code: 'E_CONFIG',
      });
      rmSync(dir, { recursive: true, force: true });
    },
  );

  it('several processes opening a new database at once all find one migrated schema', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'medsync-sqlite-'));
    const path = join(dir, 'race.db');
    const stores = await Promise.all(Array.from({ length: 4 }, () => openSqliteStore({ path })));
    await stores[0]!.settings.set('k', 1);
    for (const s of stores) expect(await s.settings.get('k')).toBe(1);
    await Promise.all(stores.map((s) => s.close()));
    rmSync(dir, { recursive: true, force: true });
  });

  it('migrations are idempotent across opens and keep data', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'medsync-sqlite-'));
    const path = join(dir, 'nested', 'state.db');
    const a = await openSqliteStore({ path });
    await a.manifest.put(manifestEntry('x.dcm'));
    await a.close();
    const b = await openSqliteStore({ path });
    await b.migrate();
    expect((await b.manifest.summary({ jobId: 'job-a', destination: 'file:///dest' })).files).toBe(1);
    await b.close();
    rmSync(dir, { recursive: true, force: true });
  });
});
