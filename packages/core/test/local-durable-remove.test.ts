/**
 * LocalStorage makes removals durable at the next flush, as it does renames: the folder that lost
 * the file is fsynced. node:fs/promises is wrapped to see which folders are opened and synced.
 */
import { mkdtempSync, rmSync, writeFileSync, mkdirSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it, vi } from 'vitest';

const synced: string[] = [];
/** Folders whose next fsync fails with EIO; concurrent fsyncs seen. */
const failNext = new Set<string>();
const concurrency = { now: 0, max: 0 };
vi.mock('node:fs/promises', async (importOriginal) => {
  const real = await importOriginal<typeof import('node:fs/promises')>();
  return {
    ...real,
    open: async (...args: Parameters<typeof real.open>) => {
      const fh = await real.open(...args);
      const path = String(args[0]);
      const sync = fh.sync.bind(fh);
      fh.sync = async () => {
        synced.push(path);
        concurrency.max = Math.max(concurrency.max, ++concurrency.now);
        try {
          await new Promise((r) => setTimeout(r, 2));
          if (failNext.delete(path)) throw Object.assign(new Error('EIO: i/o error'), { code: 'EIO' });
          return await sync();
        } finally {
          concurrency.now--;
        }
      };
      return fh;
    },
  };
});

const { LocalStorage } = await import('@medsync/core');

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
  synced.length = 0;
  failNext.clear();
  concurrency.max = 0;
});

/** A storage with 40 folders (f0…f39) changed since its last flush. */
async function fortyChangedFolders() {
  const root = mkdtempSync(join(tmpdir(), 'medsync-rm-'));
  dirs.push(root);
  const s = new LocalStorage({ root });
  for (let i = 0; i < 40; i++) await s.write(`f${i}/x.dcm`, Buffer.from(`x${i}`));
  synced.length = 0;
  return { root, s };
}

describe('LocalStorage removals are made durable by flush', () => {
  it('fsyncs the folder a file was removed from, once, and not for a file that was not there', async () => {
    const root = mkdtempSync(join(tmpdir(), 'medsync-rm-'));
    dirs.push(root);
    mkdirSync(join(root, 'a/b'), { recursive: true });
    writeFileSync(join(root, 'a/b/x.dcm'), 'x');
    const s = new LocalStorage({ root });
    await s.remove('a/b/x.dcm');
    await s.remove('a/missing.dcm');
    expect(existsSync(join(root, 'a/b/x.dcm'))).toBe(false);
    await s.flush();
    expect(synced).toEqual([join(root, 'a/b')]);
    await s.flush();
    expect(synced).toEqual([join(root, 'a/b')]);
  });

  it('with fsync off, flush has nothing to do', async () => {
    const root = mkdtempSync(join(tmpdir(), 'medsync-rm-'));
    dirs.push(root);
    writeFileSync(join(root, 'x.dcm'), 'x');
    const s = new LocalStorage({ root, fsync: false });
    await s.remove('x.dcm');
    await s.flush();
    expect(synced).toEqual([]);
  });

  it('fsyncs the changed folders several at a time; a folder whose fsync failed stays for the next flush', async () => {
    const { root, s } = await fortyChangedFolders();
    failNext.add(join(root, 'f7'));
    await expect(s.flush()).rejects.toMatchObject({ name: 'MedsyncError' });
    expect(concurrency.max).toBeGreaterThan(1);
    const first = new Set(synced);
    expect(first.has(join(root, 'f7'))).toBe(true);
    synced.length = 0;
    await s.flush();
    // The failed folder again, plus those the failure stopped before their fsync; none that was
    // made durable already.
    expect(synced.filter((d) => first.has(d))).toEqual([join(root, 'f7')]);
    const all = new Set([...first, ...synced]);
    for (let i = 0; i < 40; i++) expect(all.has(join(root, `f${i}`))).toBe(true);
    synced.length = 0;
    await s.flush();
    expect(synced).toEqual([]);
  });

  it('a cancelled flush stops, and the folders it did not reach stay for the next flush', async () => {
    const { root, s } = await fortyChangedFolders();
    const ac = new AbortController();
    setTimeout(() => ac.abort(), 5);
    await expect(s.flush({ signal: ac.signal })).rejects.toMatchObject({ code: 'E_ABORTED' });
    const first = new Set(synced);
    expect(first.size).toBeLessThan(40);
    synced.length = 0;
    await s.flush();
    expect(synced.filter((d) => first.has(d))).toEqual([]);
    for (let i = 0; i < 40; i++)
      expect(first.has(join(root, `f${i}`)) || synced.includes(join(root, `f${i}`))).toBe(true);
  });
});
