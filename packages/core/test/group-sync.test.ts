import { createHash, randomBytes } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { afterEach, describe, expect, it, vi } from 'vitest';
import {
  createMemoryStore,
  LocalStorage,
  MedsyncError,
  SyncJob,
  type GroupSyncOptions,
  type SyncFileSystem,
  type SyncJobOptions,
} from '@medsync/core';
import { readTree, writeTree } from '@medsync/core/testing';
import { flushFailures, GroupSync, syncfs, syncfsAvailable } from '../src/util/group-sync.js';

const dirs: string[] = [];
function tmp(): string {
  const d = mkdtempSync(join(tmpdir(), 'medsync-group-'));
  dirs.push(d);
  return d;
}
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

/** Every file name under `root`, temporary ones included. */
function allNames(root: string): string[] {
  return readdirSync(root, { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile())
    .map((e) => e.name);
}

/** A local-to-local SyncJob (concurrency 2) whose destination groups flushes with `groupSync`. */
function groupJob(
  a: string,
  b: string,
  groupSync: GroupSyncOptions,
  more: { syncIoBelow?: number } & Pick<SyncJobOptions, 'retry'> = {},
) {
  const io = more.syncIoBelow !== undefined ? { syncIoBelow: more.syncIoBelow } : {};
  return new SyncJob({
    id: 'g',
    source: new LocalStorage({ root: a, ...io }),
    destinations: [new LocalStorage({ root: b, ...io, groupSync })],
    store: createMemoryStore(),
    concurrency: 2,
    ...(more.retry ? { retry: more.retry } : {}),
  });
}

/** The error a failed flush rejects with (as `sync -f`'s answer is mapped). */
const errno = (code: string) => Object.assign(new Error(code), { code });

/** A syncFs that counts its calls and runs the real one (or `impl`). */
function counting(impl: SyncFileSystem = syncfs) {
  const spy = Object.assign(
    (dir: string) => {
      spy.calls++;
      return impl(dir);
    },
    { calls: 0 },
  );
  return spy;
}

describe('GroupSync', () => {
  it('covers every file that joined before a flush with one flush; later ones wait for the next', async () => {
    let release!: () => void;
    const flushes: number[] = [];
    const g = new GroupSync('/x', {
      idleMs: 1,
      syncFs: () => {
        flushes.push(Date.now());
        return new Promise<boolean>((r) => (release = () => r(true)));
      },
    });
    const first = Array.from({ length: 10 }, () => g.sync(100));
    await new Promise((r) => setTimeout(r, 20));
    expect(flushes).toHaveLength(1);
    // Joined during the flush: not covered by it.
    let laterDone = false;
    const later = g.sync(100).then(() => (laterDone = true));
    release();
    expect(await Promise.all(first)).toEqual(Array(10).fill(true));
    expect(laterDone).toBe(false);
    await new Promise((r) => setTimeout(r, 20));
    expect(flushes).toHaveLength(2);
    release();
    await later;
    expect(g.flushes).toBe(2);
  });

  it('starts at once when the byte or file threshold is reached', async () => {
    const spy = counting(() => Promise.resolve(true));
    const g = new GroupSync('/x', { maxFiles: 3, idleMs: 10_000, maxWaitMs: 10_000, syncFs: spy });
    await Promise.all([g.sync(1), g.sync(1), g.sync(1)]);
    expect(spy.calls).toBe(1);
    const h = new GroupSync('/x', { maxBytes: 10, idleMs: 10_000, maxWaitMs: 10_000, syncFs: spy });
    await h.sync(11);
    expect(spy.calls).toBe(2);
  });

  it('a failed flush fails its own batch only', async () => {
    let n = 0;
    const g = new GroupSync('/x', {
      idleMs: 1,
      syncFs: () => (++n === 1 ? Promise.reject(errno('EIO')) : Promise.resolve(true)),
    });
    const bad = await Promise.allSettled([g.sync(1), g.sync(1)]);
    expect(bad.map((r) => r.status)).toEqual(['rejected', 'rejected']);
    expect(await g.sync(1)).toBe(true);
  });

  it('a syncFs that throws instead of rejecting fails its batch and the next flush still runs', async () => {
    let n = 0;
    const g = new GroupSync('/x', {
      idleMs: 1,
      syncFs: () => {
        if (++n === 1) throw new Error('boom');
        return Promise.resolve(true);
      },
    });
    await expect(g.sync(1)).rejects.toThrow('boom');
    expect(await g.sync(1)).toBe(true);
  });

  it.runIf(process.platform === 'linux')('the real syncfs runs on Linux', async () => {
    expect(await syncfs(tmp())).toBe(true);
  });

  it.runIf(process.platform === 'linux')(
    'the syncfs helper answers requests in order, reports errors without the path, and stays usable',
    async () => {
      const dirs = [tmp(), tmp(), tmp()];
      expect(await Promise.all(dirs.map((d) => syncfs(d)))).toEqual([true, true, true]);
      const missing = join(tmp(), 'no such folder');
      const err = await syncfs(missing).then(
        () => undefined,
        (e: unknown) => e as Error & { code?: string },
      );
      expect(err?.code).toBe('ENOENT');
      expect(err?.message).toMatch(/syncfs\) failed: No such file or directory/);
      expect(err?.message).not.toContain('no such folder');
      expect(
        await Promise.all([syncfs(dirs[0]!), syncfs(missing).catch(() => 'rejected'), syncfs(dirs[1]!)]),
      ).toEqual([true, 'rejected', true]);
      // A folder name with a line break cannot go through the helper's line protocol.
      const odd = join(tmp(), 'line\nbreak');
      mkdirSync(odd);
      expect(await syncfs(odd)).toBe(true);
    },
  );

  it.runIf(process.platform === 'linux')(
    'a process that flushed in groups exits by itself (the helper does not hold it)',
    () => {
      const src = tmp();
      const dst = tmp();
      writeTree(src, Object.fromEntries(Array.from({ length: 40 }, (_, i) => [`s/${i}.dcm`, `file ${i}`])));
      const code = `
      import { LocalStorage, SyncJob, createMemoryStore } from '@medsync/core';
      const job = new SyncJob({ id: 'exit', source: new LocalStorage({ root: ${JSON.stringify(src)} }),
        destinations: [new LocalStorage({ root: ${JSON.stringify(dst)} })], store: createMemoryStore() });
      const r = await job.run();
      console.log(r.status, r.filesSynced);`;
      const t0 = Date.now();
      const r = spawnSync(process.execPath, ['--input-type=module', '-e', code], {
        cwd: join(__dirname, '..'),
        encoding: 'utf8',
        timeout: 30_000,
      });
      expect(r.stderr).toBe('');
      expect(r.stdout.trim()).toBe('success 40');
      expect(r.status).toBe(0);
      expect(Date.now() - t0).toBeLessThan(30_000);
      expect(readTree(dst)).toEqual(readTree(src));
    },
  );
});

describe('LocalStorage groupSync (durable in groups for callers that overlap writes)', () => {
  it('small buffers: onStaged before the final name appears, one flush for many files', async () => {
    const a = tmp();
    const b = tmp();
    const bigA = randomBytes(300 * 1024);
    writeTree(a, { 'c/copied.dcm': bigA });
    const src = new LocalStorage({ root: a });
    const spy = counting();
    const dst = new LocalStorage({ root: b, groupSync: { syncFs: spy, idleMs: 20 } });
    const visibleAtStage: string[] = [];
    const staged = (p: string) => () => {
      if (existsSync(join(b, p))) visibleAtStage.push(p);
    };
    const small = Array.from({ length: 30 }, (_, i) => randomBytes(i * 1000));
    const writes = small.map((body, i) =>
      dst.write(`s/${i}.dcm`, body, { size: body.length, onStaged: staged(`s/${i}.dcm`) }),
    );
    // Larger buffers and streams keep their own fdatasync: they never wait for a group. A larger
    // file copied from another LocalStorage (copyFrom) does.
    const big = randomBytes(200 * 1024);
    let bigStaged = 0;
    writes.push(dst.write('b/big.dcm', big, { onStaged: () => bigStaged++ }));
    writes.push(dst.write('b/stream.dcm', Readable.from([big]), { onStaged: () => bigStaged++ }));
    const copied = await dst.copyFrom(src, 'c/copied.dcm', {
      size: bigA.length,
      hashes: ['sha256'],
      onStaged: staged('c/copied.dcm'),
    });
    await Promise.all(writes);
    expect(copied?.digests.sha256).toBe(createHash('sha256').update(bigA).digest('hex'));
    expect(visibleAtStage).toEqual([]);
    expect(bigStaged).toBe(0);
    expect(spy.calls).toBeGreaterThanOrEqual(1);
    expect(spy.calls).toBeLessThanOrEqual(3);
    const tree = readTree(b);
    small.forEach((body, i) => expect(tree[`s/${i}.dcm`]).toBe(body.toString('base64')));
    expect(tree['b/big.dcm']).toBe(big.toString('base64'));
    expect(tree['b/stream.dcm']).toBe(big.toString('base64'));
    expect(tree['c/copied.dcm']).toBe(bigA.toString('base64'));
    expect(allNames(b).some((n) => n.includes('medsync-part'))).toBe(false);
  });

  it('a failed flush fails the writes it covered: nothing under the final names, no temporary files', async () => {
    const b = tmp();
    const dst = new LocalStorage({
      root: b,
      groupSync: {
        idleMs: 5,
        syncFs: () => Promise.reject(errno('EIO')),
      },
    });
    const results = await Promise.allSettled(
      [0, 1, 2].map((i) =>
        dst.write(`x/${i}.dcm`, randomBytes(10 + i * 10_000), { onStaged: () => undefined }),
      ),
    );
    for (const r of results) {
      expect(r.status).toBe('rejected');
      const e = (r as PromiseRejectedResult).reason as MedsyncError;
      expect(e).toBeInstanceOf(MedsyncError);
      expect(e.code).toBe('E_IO');
    }
    expect(allNames(b)).toEqual([]);
  });

  it('a file written before a failed flush, but flushed by a later one that succeeds, is written again', async () => {
    // syncfs reports a write-back error only to the first flush after it: the file it hit may
    // wait in the next group, whose flush succeeds.
    const b = tmp();
    const flushes: Array<{ settle: (ok: boolean) => void }> = [];
    const dst = new LocalStorage({
      root: b,
      groupSync: {
        idleMs: 0,
        syncFs: () =>
          new Promise<boolean>((resolve, reject) =>
            flushes.push({
              settle: (ok) => (ok ? resolve(true) : reject(errno('EIO'))),
            }),
          ),
      },
    });
    const x = dst.write('x.dcm', Buffer.from('x'), { onStaged: () => undefined });
    await vi.waitFor(() => expect(flushes).toHaveLength(1));
    // Written while the first flush runs: it waits for the second.
    const a = dst.write('a.dcm', Buffer.from('a'), { onStaged: () => undefined });
    await new Promise((r) => setTimeout(r, 10));
    flushes[0]!.settle(false);
    await expect(x).rejects.toMatchObject({ code: 'E_IO', retryable: true });
    await vi.waitFor(() => expect(flushes).toHaveLength(2));
    flushes[1]!.settle(true);
    await expect(a).rejects.toMatchObject({ code: 'E_IO', retryable: true });
    // Written after the failure was reported: nothing to doubt.
    const later = dst.write('b.dcm', Buffer.from('b'), { onStaged: () => undefined });
    await vi.waitFor(() => expect(flushes).toHaveLength(3));
    flushes[2]!.settle(true);
    await expect(later).resolves.toMatchObject({ path: 'b.dcm' });
    expect(allNames(b)).toEqual(['b.dcm']);
  });

  it("only write-back errors count as failed flushes; a removed flush folder is replaced by a waiter's", async () => {
    const seen: string[] = [];
    let answers: Array<string | undefined> = [];
    const g = new GroupSync('/gone', {
      idleMs: 0,
      syncFs: (dir) => {
        seen.push(dir);
        const code = answers.shift();
        return code ? Promise.reject(errno(code)) : Promise.resolve(true);
      },
    });
    // The folder it flushed through was removed: the same files are flushed through theirs.
    answers = ['ENOENT', undefined];
    const before = flushFailures();
    await expect(Promise.all([g.sync(1, '/a'), g.sync(1, '/a')])).resolves.toEqual([true, true]);
    expect(seen).toEqual(['/gone', '/a']);
    // A read-only file system or a refused folder wrote nothing: not a write-back error.
    for (const code of ['EROFS', 'EACCES']) {
      answers = [code];
      await expect(g.sync(1, '/a')).rejects.toMatchObject({ code });
    }
    expect(flushFailures()).toBe(before);
    answers = ['EIO'];
    await expect(g.sync(1, '/a')).rejects.toMatchObject({ code: 'EIO' });
    expect(flushFailures()).toBe(before + 1);
  });

  // Where syncfs exists (Linux 5.8+ with coreutils' sync -f); elsewhere files are fsynced one by one.
  it.runIf(syncfsAvailable())(
    'storages on one file system share its group flush (one flush at a time per disk)',
    () => {
      const root = tmp();
      const a = new LocalStorage({ root: join(root, 'a') });
      const b = new LocalStorage({ root: join(root, 'b') });
      mkdirSync(join(root, 'a'));
      mkdirSync(join(root, 'b'));
      const groupOf = (s: LocalStorage) =>
        (s as unknown as { groupFor(d: string): GroupSync | undefined }).groupFor('');
      expect(groupOf(a)).toBeDefined();
      expect(groupOf(a)).toBe(groupOf(b));
    },
  );

  it('after a flush timed out, writers fsync their own files (a hung sync may swallow a later error)', async () => {
    let calls = 0;
    const g = new GroupSync('/x', {
      idleMs: 0,
      syncFs: () => {
        calls++;
        return Promise.reject(errno('ETIMEDOUT'));
      },
    });
    await expect(g.sync(1)).rejects.toMatchObject({ code: 'ETIMEDOUT' });
    await expect(Promise.all([g.sync(1), g.sync(1)])).resolves.toEqual([false, false]);
    expect(calls).toBe(1);
    // Through LocalStorage: the file is fdatasynced alone and written.
    const b = tmp();
    const dst = new LocalStorage({
      root: b,
      groupSync: {
        idleMs: 0,
        syncFs: () => Promise.reject(errno('ETIMEDOUT')),
      },
    });
    await expect(dst.write('a.dcm', Buffer.from('a'), { onStaged: () => undefined })).rejects.toMatchObject({
      code: 'E_IO',
      retryable: true,
    });
    await expect(dst.write('a.dcm', Buffer.from('a'), { onStaged: () => undefined })).resolves.toMatchObject({
      path: 'a.dcm',
    });
    expect(allNames(b)).toEqual(['a.dcm']);
  });

  it('where no file-system flush exists, each file is fsynced and the writes succeed', async () => {
    const b = tmp();
    const spy = counting(() => Promise.resolve(false));
    const dst = new LocalStorage({ root: b, groupSync: { syncFs: spy, idleMs: 1 } });
    await Promise.all(
      [0, 1].map((i) => dst.write(`${i}.dcm`, Buffer.from(`v${i}`), { onStaged: () => undefined })),
    );
    expect(spy.calls).toBeGreaterThanOrEqual(1);
    expect(readTree(b)).toEqual({ '0.dcm': 'djA=', '1.dcm': 'djE=' }); // base64 of v0, v1
  });

  it('callers without onStaged, groupSync: false or fsync: false never wait for a group flush', async () => {
    const spy = counting();
    const b = tmp();
    await new LocalStorage({ root: b, groupSync: { syncFs: spy } }).write('a', Buffer.from('a'));
    await new LocalStorage({ root: b, groupSync: false }).write('b', Buffer.from('b'), {
      onStaged: () => undefined,
    });
    await new LocalStorage({ root: b, fsync: false }).write('c', Buffer.from('c'), {
      onStaged: () => undefined,
    });
    expect(spy.calls).toBe(0);
    expect(Object.keys(readTree(b)).sort()).toEqual(['a', 'b', 'c']);
  });

  it('a SyncJob retries the files of a failed flush (each retry takes a slot again) and delivers them all', async () => {
    const a = tmp();
    const b = tmp();
    const tree: Record<string, Buffer> = {};
    for (let i = 0; i < 30; i++) tree[`q/${i}.dcm`] = randomBytes(1000 + i);
    writeTree(a, tree);
    let n = 0;
    const spy = counting((dir) => (++n === 1 ? Promise.reject(errno('EIO')) : syncfs(dir)));
    const fast = { retries: 3, initialDelayMs: 1, maxDelayMs: 1 };
    const job = groupJob(a, b, { syncFs: spy, idleMs: 20 }, { retry: fast });
    const r = await job.run();
    expect(r.status).toBe('success');
    expect(r.filesSynced).toBe(30);
    expect(n).toBeGreaterThanOrEqual(2);
    expect(readTree(b)).toEqual(readTree(a));
    expect(allNames(b).some((x) => x.includes('medsync-part'))).toBe(false);
  });

  it('a SyncJob holds at most 32 MiB of small-file buffers waiting for a flush (larger syncIoBelow)', async () => {
    const a = tmp();
    const b = tmp();
    const tree: Record<string, Buffer> = {};
    for (let i = 0; i < 80; i++) tree[`h/${i}.dcm`] = randomBytes(900 * 1024);
    writeTree(a, tree);
    const waitingAtFlush: number[] = [];
    const spy = counting(async (dir) => {
      // Every file waiting for this flush is a temporary file in the destination right now.
      waitingAtFlush.push(allNames(b).filter((n) => n.includes('medsync-part')).length);
      await new Promise((r) => setTimeout(r, 30));
      return syncfs(dir);
    });
    const job = groupJob(a, b, { syncFs: spy, idleMs: 50 }, { syncIoBelow: 1024 * 1024 });
    const r = await job.run();
    expect(r.status).toBe('success');
    expect(readTree(b)).toEqual(readTree(a));
    // 32 MiB / 900 KiB = 36 buffers, plus the transfers that hold their slot.
    expect(Math.max(...waitingAtFlush)).toBeLessThanOrEqual(36 + 2);
    expect(Math.max(...waitingAtFlush)).toBeGreaterThan(2);
  });

  it('a SyncJob keeps transferring while files wait for their flush: fewer flushes than concurrency would allow', async () => {
    const a = tmp();
    const b = tmp();
    const tree: Record<string, Buffer> = {};
    for (let i = 0; i < 60; i++) tree[`p/${i % 4}/${i}.dcm`] = randomBytes(i % 5 === 0 ? 70 * 1024 : 2000);
    // (files of 70 KiB go through a copy worker with their own fdatasync)
    writeTree(a, tree);
    const spy = counting();
    const job = groupJob(a, b, { syncFs: spy, idleMs: 30 });
    const r = await job.run();
    expect(r.status).toBe('success');
    expect(r.filesSynced).toBe(60);
    expect(readTree(b)).toEqual(readTree(a));
    // With a slot held until each file was durable, every flush would cover at most 2 files.
    expect(spy.calls).toBeLessThan(60 / 2);
    expect(allNames(b).some((n) => n.includes('medsync-part'))).toBe(false);
  });
});
