/**
 * LocalStorage makes removals durable at the next flush, as it does renames: the folder that lost
 * the file is fsynced. node:fs/promises is wrapped to see which folders are opened and synced.
 */
import { mkdtempSync, rmSync, writeFileSync, mkdirSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it, vi } from 'vitest';

const synced: string[] = [];
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
        return sync();
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
});

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
});
