import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import * as fs from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { LocalStorage } from '../src/storage/local.js';

// Counts LocalStorage's synchronous calls: on a network mount each would hold the event loop for
// a round trip to the server, one file at a time.
vi.mock('node:fs', async (importOriginal) => {
  const real = await importOriginal<typeof import('node:fs')>();
  return { ...real, openSync: vi.fn(real.openSync) };
});

const dirs: string[] = [];
function tmp(): string {
  const d = mkdtempSync(join(tmpdir(), 'medsync-netio-'));
  dirs.push(d);
  return d;
}
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
  vi.mocked(fs.openSync).mockClear();
});

const under = (root: string, calls: unknown[][]) => calls.filter((c) => String(c[0]).startsWith(root)).length;

describe('LocalStorage: small files on a network mount go through the thread pool', () => {
  // listMode 'async' is what `auto` picks on NFS, SMB or FUSE mounts (and 'sync' on local disks).
  for (const [mode, syncExpected] of [
    ['sync', true],
    ['async', false],
  ] as const) {
    it(`listMode ${mode}: small reads and unsynced small writes ${syncExpected ? 'use' : 'avoid'} synchronous calls`, async () => {
      const root = tmp();
      writeFileSync(join(root, 'a.dcm'), 'tiny');
      const s = new LocalStorage({ root, listMode: mode, fsync: false });
      expect((await s.readBuffer('a.dcm')).toString()).toBe('tiny');
      expect(under(root, vi.mocked(fs.openSync).mock.calls) > 0).toBe(syncExpected);
      vi.mocked(fs.openSync).mockClear();
      await s.write('sub/b.dcm', Buffer.from('small'));
      expect(under(root, vi.mocked(fs.openSync).mock.calls) > 0).toBe(syncExpected);
      expect((await s.readBuffer('sub/b.dcm')).toString()).toBe('small');
    });
  }

  it('listMode async: small staged writes (fsync on) are fdatasynced one by one, not written synchronously', async () => {
    const root = tmp();
    const s = new LocalStorage({
      root,
      listMode: 'async',
      groupSync: { syncFs: () => Promise.resolve(true) },
    });
    let staged = 0;
    await s.write('c.dcm', Buffer.from('x'), { onStaged: () => staged++ });
    expect(under(root, vi.mocked(fs.openSync).mock.calls)).toBe(0);
    expect(staged).toBe(0);
    expect((await s.readBuffer('c.dcm')).toString()).toBe('x');
  });

  it('copies between local folders on worker threads only when both are on local disks', async () => {
    const a = tmp();
    const b = tmp();
    writeFileSync(join(a, 'big.dcm'), Buffer.alloc(200 * 1024, 7));
    const copy = (src: 'sync' | 'async', dst: 'sync' | 'async') =>
      new LocalStorage({ root: b, listMode: dst }).copyFrom(
        new LocalStorage({ root: a, listMode: src }),
        'big.dcm',
        {
          size: 200 * 1024,
        },
      );
    expect(await copy('async', 'sync')).toBeUndefined();
    expect(await copy('sync', 'async')).toBeUndefined();
    expect(await copy('sync', 'sync')).toMatchObject({ entry: { path: 'big.dcm', size: 200 * 1024 } });
  });
});

describe('LocalStorage: synchronous small reads', () => {
  it.runIf(fs.existsSync('/proc/self/status'))(
    'a file that reports size 0 but holds bytes (procfs) is read to its end',
    async () => {
      const s = new LocalStorage({ root: '/proc/self', listMode: 'sync', fsync: false });
      expect(fs.statSync('/proc/self/status').size).toBe(0);
      const got = (await s.readBuffer('status')).toString();
      expect(got.startsWith('Name:')).toBe(true);
      expect(got.length).toBeGreaterThan(100);
    },
  );

  it('reads small, empty and larger files whole', async () => {
    const root = tmp();
    const small = Buffer.from('tiny file');
    const large = Buffer.alloc(100 * 1024, 3);
    writeFileSync(join(root, 'small.dcm'), small);
    writeFileSync(join(root, 'empty.dcm'), '');
    writeFileSync(join(root, 'large.dcm'), large);
    const s = new LocalStorage({ root, listMode: 'sync', fsync: false });
    expect((await s.readBuffer('small.dcm')).equals(small)).toBe(true);
    expect((await s.readBuffer('empty.dcm')).length).toBe(0);
    expect((await s.readBuffer('large.dcm')).equals(large)).toBe(true);
    await expect(s.readBuffer('missing.dcm')).rejects.toMatchObject({ code: 'E_NOT_FOUND' });
  });

  it.runIf(fs.existsSync('/proc/self/fd'))(
    'files at and past the synchronous limit are read whole through the descriptor that sized them, and none is left open',
    async () => {
      const root = tmp();
      const sizes = [64 * 1024 - 1, 64 * 1024, 64 * 1024 + 1, 1024 * 1024 + 3, 5 * 1024 * 1024];
      const bodies = sizes.map((n, i) => Buffer.alloc(n, i + 1));
      bodies.forEach((b, i) => writeFileSync(join(root, `f${i}.dcm`), b));
      const s = new LocalStorage({ root, listMode: 'sync', fsync: false });
      const open = () => fs.readdirSync('/proc/self/fd').length;
      const before = open();
      for (let round = 0; round < 20; round++) {
        const got = await Promise.all(bodies.map((_, i) => s.readBuffer(`f${i}.dcm`)));
        got.forEach((g, i) => expect(g.equals(bodies[i]!)).toBe(true));
      }
      expect(open()).toBe(before);
      expect(under(root, vi.mocked(fs.openSync).mock.calls)).toBe(20 * sizes.length);
      const aborted = AbortSignal.abort();
      await expect(s.readBuffer('f4.dcm', { signal: aborted })).rejects.toMatchObject({ code: 'E_ABORTED' });
    },
  );
});
