import { createHash, randomBytes } from 'node:crypto';
import {
  chmodSync,
  existsSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statfsSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { LocalStorage, MemoryStorage } from '@medsync/core';
import { CopyPool, type CopyJob } from '../src/util/copy-pool.js';
import type { HashKind } from '../src/storage/types.js';
import { readTree, writeTree } from '@medsync/core/testing';

const dirs: string[] = [];
function tmp(): string {
  const d = mkdtempSync(join(tmpdir(), 'medsync-copy-'));
  dirs.push(d);
  return d;
}
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

/** ext4 and XFS: O_DIRECT taken at open, a misaligned buffer refused. */
const DIRECT_FS = new Set([0xef53, 0x58465342]);

/**
 * A CopyPool job: `from` in folder `a` to `name` in folder `b` (existing), through the temporary
 * name `.<name>.x.medsync-part`; SHA-256, no fsync unless `more` says otherwise.
 */
function copyJob(
  a: string,
  b: string,
  from: string,
  name: string,
  expected: number,
  more: Partial<CopyJob> = {},
): CopyJob {
  return {
    src: join(a, from),
    dst: join(b, name),
    tmp: join(b, `.${name}.x.medsync-part`),
    dir: b,
    mkdir: false,
    mayMkdir: false,
    expected,
    kinds: ['sha256'],
    fsync: false,
    ...more,
  };
}

const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');
const md5 = (b: Buffer) => createHash('md5').update(b).digest('hex');

describe('LocalStorage.copyFrom (worker-thread copy between local folders)', () => {
  it('copies into new folders with digests, size, mtime and progress; no temporary file stays', async () => {
    const a = tmp();
    const b = tmp();
    const big = randomBytes(9 * 1024 * 1024 + 17);
    writeTree(a, { 'P 1/Ü/x.dcm': big, 'e.dcm': '' });
    const src = new LocalStorage({ root: a });
    const dst = new LocalStorage({ root: join(b, 'deep', 'root'), syncIoBelow: 0 });
    const mtimeMs = Date.UTC(2024, 4, 17, 10, 30, 15, 123);
    let progress = 0;
    const r = await dst.copyFrom(src, 'P 1/Ü/x.dcm', {
      size: big.length,
      mtimeMs,
      hashes: ['md5', 'sha256'],
      onBytes: (n) => (progress += n),
    });
    expect(r).toEqual({
      entry: { path: 'P 1/Ü/x.dcm', size: big.length, mtimeMs },
      digests: { md5: md5(big), sha256: sha256(big) },
    });
    expect(progress).toBe(big.length);
    expect(Math.floor(statSync(join(b, 'deep/root/P 1/Ü/x.dcm')).mtimeMs)).toBe(mtimeMs);
    const empty = await dst.copyFrom(src, 'e.dcm', { size: 0, hashes: ['sha256'] });
    expect(empty!.digests.sha256).toBe(sha256(Buffer.alloc(0)));
    expect(readTree(join(b, 'deep/root'))).toEqual(readTree(a));
    // Other sources are not copied this way: the engine streams them instead. Neither are tiny
    // files (under syncIoBelow, 64 KiB by default): the ordinary path is cheaper for them.
    expect(await dst.copyFrom(new MemoryStorage(), 'e.dcm')).toBeUndefined();
    expect(await new LocalStorage({ root: b }).copyFrom(src, 'e.dcm', { size: 0 })).toBeUndefined();
  });

  it('a missing or unreadable source is a non-retryable error of the source; nothing is written', async () => {
    const a = tmp();
    const b = tmp();
    writeTree(a, { 'locked.dcm': 'secret' });
    const src = new LocalStorage({ root: a });
    const dst = new LocalStorage({ root: b, syncIoBelow: 0 });
    await expect(dst.copyFrom(src, 'gone.dcm', { size: 1 })).rejects.toMatchObject({
      code: 'E_NOT_FOUND',
      retryable: false,
      path: 'gone.dcm',
    });
    if (process.getuid?.() !== 0) {
      chmodSync(join(a, 'locked.dcm'), 0);
      await expect(dst.copyFrom(src, 'locked.dcm', { size: 6 })).rejects.toMatchObject({
        code: 'E_PERMISSION',
        retryable: false,
      });
    }
    expect(readdirSync(b)).toEqual([]);
  });

  it('a source whose size differs from the scan is E_INTEGRITY, not retried, and leaves nothing', async () => {
    const a = tmp();
    const b = tmp();
    writeTree(a, { 'f.dcm': randomBytes(5000) });
    const dst = new LocalStorage({ root: b, syncIoBelow: 0 });
    for (const size of [4999, 5001]) {
      await expect(dst.copyFrom(new LocalStorage({ root: a }), 'f.dcm', { size })).rejects.toMatchObject({
        code: 'E_INTEGRITY',
        retryable: false,
      });
    }
    expect(readdirSync(b)).toEqual([]);
  });

  it('an abort mid-copy is E_ABORTED and leaves neither the file nor a temporary one', async () => {
    const a = tmp();
    const b = tmp();
    writeFileSync(join(a, 'big.bin'), randomBytes(64 * 1024 * 1024));
    const dst = new LocalStorage({ root: b, syncIoBelow: 0 });
    const ac = new AbortController();
    const copy = dst.copyFrom(new LocalStorage({ root: a }), 'big.bin', {
      size: 64 * 1024 * 1024,
      signal: ac.signal,
      hashes: ['sha256', 'md5'],
      onBytes: () => ac.abort(),
    });
    await expect(copy).rejects.toMatchObject({ code: 'E_ABORTED' });
    expect(readdirSync(b)).toEqual([]);
  });

  it('a read cancelled while the file opens rejects with E_ABORTED instead of streaming', async () => {
    const a = tmp();
    writeFileSync(join(a, 'f.bin'), randomBytes(1024));
    const src = new LocalStorage({ root: a });
    const ac = new AbortController();
    const reading = src.read('f.bin', { signal: ac.signal });
    ac.abort();
    await expect(reading).rejects.toMatchObject({ code: 'E_ABORTED' });
  });

  it('a destination folder removed between copies is made again', async () => {
    const a = tmp();
    const b = tmp();
    writeTree(a, { 's/1.dcm': '1', 's/2.dcm': '2' });
    const src = new LocalStorage({ root: a });
    const dst = new LocalStorage({ root: b, syncIoBelow: 0 });
    await dst.copyFrom(src, 's/1.dcm', { size: 1 });
    rmSync(join(b, 's'), { recursive: true });
    await dst.copyFrom(src, 's/2.dcm', { size: 1 });
    expect(readFileSync(join(b, 's/2.dcm'), 'utf8')).toBe('2');
    expect(existsSync(join(b, 's/1.dcm'))).toBe(false);
  });

  it('honours createRoot: false', async () => {
    const a = tmp();
    writeTree(a, { 'x.dcm': 'x' });
    const dst = new LocalStorage({ root: join(tmp(), 'not-mounted'), createRoot: false, syncIoBelow: 0 });
    await expect(dst.copyFrom(new LocalStorage({ root: a }), 'x.dcm', { size: 1 })).rejects.toMatchObject({
      code: 'E_NOT_FOUND',
    });
  });

  it('a copy worker that dies fails only its own copy (no hang); the others finish; the pool retires', async () => {
    const a = tmp();
    const b = tmp();
    writeFileSync(join(a, 'one.bin'), randomBytes(32 * 1024 * 1024));
    writeFileSync(join(a, 'two.bin'), randomBytes(8 * 1024 * 1024));
    const pool = new CopyPool(2);
    const job = (name: string, size: number) => copyJob(a, b, name, name, size);
    const workers = () => (pool as unknown as { workers: Array<{ terminate(): Promise<number> }> }).workers;
    const one = pool.copy(job('one.bin', 32 * 1024 * 1024));
    const two = pool.copy(job('two.bin', 8 * 1024 * 1024));
    // The first worker goes away while its copy runs, as if the OS had killed it. At once, not on
    // a progress message: a main thread slower to read that message than the worker is to copy
    // the rest (~0.1 s) would find the copy done.
    expect(workers()).toHaveLength(2);
    void workers()[0]!.terminate();
    await expect(one).rejects.toThrow(/copy worker exited/);
    const done = await two;
    expect(done.digests.sha256).toBe(sha256(readFileSync(join(a, 'two.bin'))));
    expect(readFileSync(join(b, 'two.bin')).equals(readFileSync(join(a, 'two.bin')))).toBe(true);
    expect(pool.usable).toBe(false);
    expect(workers()).toHaveLength(1);
    await pool.close();
  });

  it('a copy that fails outside its own error handling ends the worker before a copy queued behind it starts', async () => {
    const a = tmp();
    const b = tmp();
    writeFileSync(join(a, 'long.bin'), randomBytes(16 * 1024 * 1024));
    writeFileSync(join(a, 'next.bin'), randomBytes(4096));
    const pool = new CopyPool(1);
    const job = (name: string, size: number, kinds: readonly string[]) =>
      copyJob(a, b, name, name, size, { kinds: kinds as readonly HashKind[] });
    try {
      // All three wait in the one worker: the second asks for a hash that does not exist, which
      // throws before its copy's own error handling; the third must never start.
      const first = pool.copy(job('long.bin', 16 * 1024 * 1024, ['sha256']));
      const bad = pool.copy(job('long.bin', 16 * 1024 * 1024, ['no-such-hash']));
      const third = pool.copy(job('next.bin', 4096, ['sha256']));
      await expect(first).resolves.toMatchObject({ size: 16 * 1024 * 1024 });
      await expect(bad).rejects.toThrow();
      await expect(third).rejects.toThrow();
      expect(existsSync(join(b, '.next.bin.x.medsync-part'))).toBe(false);
      expect(existsSync(join(b, 'next.bin'))).toBe(false);
      expect(pool.usable).toBe(false);
    } finally {
      await pool.close();
    }
  });

  it('with onStaged, a durable copy waits for the group flush before its final name appears', async () => {
    const a = tmp();
    const b = tmp();
    // A whole number of blocks; one chunk plus a partial block; several chunks plus a partial one.
    const files = {
      'x/aligned.dcm': randomBytes(64 * 1024),
      'x/tail.dcm': randomBytes(1024 * 1024 + 4095),
      'y/long.dcm': randomBytes(3 * 1024 * 1024 + 17),
    };
    writeTree(a, files);
    let release!: () => void;
    const flushed = new Promise<void>((r) => (release = r));
    let flushes = 0;
    const dst = new LocalStorage({
      root: b,
      groupSync: {
        idleMs: 0,
        syncFs: async () => {
          flushes++;
          await flushed;
          return true;
        },
      },
    });
    const src = new LocalStorage({ root: a });
    let staged = 0;
    const copies = Object.entries(files).map(([path, body]) =>
      dst.copyFrom(src, path, {
        size: body.length,
        hashes: ['md5', 'sha256'],
        onStaged: () => staged++,
      }),
    );
    await vi.waitFor(() => expect(staged).toBe(3), { timeout: 15_000 });
    await new Promise((r) => setTimeout(r, 20));
    // Written and closed, but not durable yet: nothing under a final name.
    expect(Object.keys(readTree(b)).filter((n) => !n.endsWith('.medsync-part'))).toEqual([]);
    expect(flushes).toBeGreaterThan(0);
    release();
    const done = await Promise.all(copies);
    for (const [i, [path, body]] of Object.entries(files).entries()) {
      expect(done[i]!.digests).toEqual({ md5: md5(body), sha256: sha256(body) });
      expect(readFileSync(join(b, path)).equals(body)).toBe(true);
    }
    expect(readTree(b)).toEqual(readTree(a));
  });

  it('a copy cancelled while it waits for the group flush leaves nothing behind', async () => {
    const a = tmp();
    const b = tmp();
    writeFileSync(join(a, 'f.dcm'), randomBytes(300 * 1024));
    let release!: () => void;
    const flushed = new Promise<void>((r) => (release = r));
    const dst = new LocalStorage({
      root: b,
      groupSync: { idleMs: 0, syncFs: () => flushed.then(() => true) },
    });
    const ac = new AbortController();
    const copy = dst.copyFrom(new LocalStorage({ root: a }), 'f.dcm', {
      size: 300 * 1024,
      signal: ac.signal,
      onStaged: () => ac.abort(),
    });
    const settled = expect(copy).rejects.toMatchObject({ code: 'E_ABORTED' });
    release();
    await settled;
    expect(readdirSync(b)).toEqual([]);
  });

  // Pools of 2 workers or fewer overlap each O_DIRECT write with the hashing (on the shared thread
  // pool); larger pools write on their own threads. Both must give the same file and digests.
  it.runIf(DIRECT_FS.has(statfsSync(tmpdir()).type))(
    'O_DIRECT copies are the same with and without overlapped writes',
    async () => {
      const a = tmp();
      const b = tmp();
      const body = randomBytes(3 * 1024 * 1024 + 4097);
      writeFileSync(join(a, 'f.bin'), body);
      for (const size of [2, 3]) {
        const pool = new CopyPool(size);
        try {
          const done = await pool.copy(
            copyJob(a, b, 'f.bin', `p${size}.bin`, body.length, {
              kinds: ['md5', 'sha256'],
              fsync: true,
              direct: true,
            }),
          );
          expect(done).toMatchObject({ size: body.length, cachedBytes: 1, directRefused: false });
          expect(done.digests.sha256).toBe(sha256(body));
          expect(done.digests.md5).toBe(createHash('md5').update(body).digest('hex'));
          expect(readFileSync(join(b, `p${size}.bin`)).equals(body)).toBe(true);
        } finally {
          await pool.close();
        }
      }
    },
  );

  // ext4 and XFS refuse a misaligned O_DIRECT buffer (EINVAL); tmpfs 6.6+ takes it, older tmpfs
  // and ZFS before 2.3 refuse O_DIRECT at open.
  it.runIf(DIRECT_FS.has(statfsSync(tmpdir()).type))(
    'O_DIRECT writes whole blocks past the page cache; a refusal falls back to cached writes',
    async () => {
      const a = tmp();
      const b = tmp();
      const body = randomBytes(2 * 1024 * 1024 + 5000);
      writeFileSync(join(a, 'f.bin'), body);
      const pool = new CopyPool(1);
      const job = (name: string, more: Partial<CopyJob>) =>
        copyJob(a, b, 'f.bin', name, body.length, { fsync: true, ...more });
      try {
        const direct = await pool.copy(job('direct.bin', { direct: true }));
        // Only the last partial block went through the cache (5000 bytes past the last 4 KiB).
        expect(direct).toMatchObject({ size: body.length, cachedBytes: 5000 % 4096, directRefused: false });
        const refused = await pool.copy(job('refused.bin', { direct: true, misalign: true }));
        expect(refused).toMatchObject({ size: body.length, cachedBytes: body.length, directRefused: true });
        const cached = await pool.copy(job('cached.bin', {}));
        expect(cached).toMatchObject({ cachedBytes: body.length, directRefused: false });
        for (const [name, d] of [
          ['direct.bin', direct],
          ['refused.bin', refused],
          ['cached.bin', cached],
        ] as const) {
          expect(d.digests.sha256).toBe(sha256(body));
          expect(readFileSync(join(b, name)).equals(body)).toBe(true);
        }
        // A staged copy is left under its temporary name for the caller to rename.
        const staged = await pool.copy(job('staged.bin', { direct: true, stage: true }));
        expect(staged.digests.sha256).toBe(sha256(body));
        expect(existsSync(join(b, 'staged.bin'))).toBe(false);
        expect(readFileSync(join(b, '.staged.bin.x.medsync-part')).equals(body)).toBe(true);
      } finally {
        await pool.close();
      }
    },
  );
});
