import { randomBytes } from 'node:crypto';
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  statSync,
  utimesSync,
  writeFileSync,
  renameSync,
  symlinkSync,
} from 'node:fs';
import { getEventListeners } from 'node:events';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { afterEach, describe, expect, it } from 'vitest';
import { FakeClock, readTree, runRecord, writeTree } from '@medsync/core/testing';
import {
  LocalStorage,
  MedsyncError,
  MemoryStorage,
  MemoryStore,
  SyncJob,
  systemClock,
  type Storage,
  type StorageEntry,
  type SyncJobOptions,
  noopLogger,
} from '@medsync/core';

const dirs: string[] = [];
function tmp(): string {
  const d = mkdtempSync(join(tmpdir(), 'medsync-sync-'));
  dirs.push(d);
  return d;
}
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

const fast = { retries: 3, initialDelayMs: 1, jitter: 0 };

function sample(): Record<string, Buffer | string> {
  return {
    'PAT1/STUDY 1/SERIES 1/IM1.dcm': randomBytes(3000),
    'PAT1/STUDY 1/SERIES 1/IM2.dcm': randomBytes(5000),
    'Müller Hans/CT Thorax/画像 1.dcm': randomBytes(700),
    'empty.dcm': '',
    'top level.txt': 'hello',
  };
}

function job(
  o: Partial<SyncJobOptions> & Pick<SyncJobOptions, 'source' | 'destinations'>,
  store = new MemoryStore(),
): SyncJob {
  return new SyncJob({ id: 'job-1', store, retry: fast, scheduledRetry: fast, eventPaths: true, ...o });
}

/** The next run sends a.dcm once, and the manifest says the read-back verified it. */
async function expectSentOnceByReadBack(j: SyncJob, dst: MemoryStorage, store: MemoryStore): Promise<void> {
  const writes = dst.calls.write;
  expect(await j.run()).toMatchObject({ status: 'success', filesSynced: 1 });
  expect(dst.calls.write - writes).toBe(1);
  expect((await store.manifest.get({ jobId: 'job-1', destination: dst.id }, 'a.dcm'))?.verifiedBy).toBe(
    'readback',
  );
}

/** Manifest records of job-1 at `dst`. */
async function recorded(store: MemoryStore, dst: Storage): Promise<number> {
  let n = 0;
  for await (const _ of store.manifest.list({ jobId: 'job-1', destination: dst.id })) n++;
  return n;
}

/** A memory destination whose first flush waits for release(); `onFlush` sees each flush's number. */
class FirstFlushWaits extends MemoryStorage {
  flushes = 0;
  onFlush?: (n: number) => void;
  release!: () => void;
  private readonly gate = new Promise<void>((r) => (this.release = r));
  async flush(): Promise<void> {
    this.flushes++;
    this.onFlush?.(this.flushes);
    if (this.flushes === 1) await this.gate;
  }
}

/** Releases `dst`'s first flush once `files` files are done. */
function releaseAfter(j: SyncJob, dst: FirstFlushWaits, files: number): void {
  let done = 0;
  j.on('file:done', () => {
    if (++done === files) dst.release();
  });
}

describe('SyncJob copy', () => {
  it('copies a tree byte-identically, then sends nothing on the second run', async () => {
    const src = tmp();
    const dst = tmp();
    writeTree(src, sample());
    const store = new MemoryStore();
    const j = job(
      { source: new LocalStorage({ root: src }), destinations: [new LocalStorage({ root: dst })] },
      store,
    );
    const done: string[] = [];
    j.on('file:done', (e) => done.push(e.path));
    const r1 = await j.run();
    expect(r1.status).toBe('success');
    expect(r1.filesSynced).toBe(5);
    expect(r1.bytes).toBe(3000 + 5000 + 700 + 5);
    expect(readTree(dst)).toEqual(readTree(src));
    expect(done.sort()).toEqual(Object.keys(sample()).sort());
    // mtimes are kept
    expect(Math.floor(statSync(join(dst, 'top level.txt')).mtimeMs)).toBe(
      Math.floor(statSync(join(src, 'top level.txt')).mtimeMs),
    );
    const r2 = await j.run();
    expect(r2).toMatchObject({ status: 'success', filesSynced: 0, filesSkipped: 5, bytes: 0 });
    const stats = await store.runs.stats('job-1');
    expect(stats).toMatchObject({ totalRuns: 2, success: 2, filesSynced: 5 });
  });

  it('records each file in the manifest with both hashes', async () => {
    const src = new MemoryStorage();
    const dst = new MemoryStorage();
    await src.write('a/b.dcm', Readable.from([Buffer.from('abc')]), { mtimeMs: 1000 });
    const store = new MemoryStore();
    await job({ source: src, destinations: [dst] }, store).run();
    const m = await store.manifest.get({ jobId: 'job-1', destination: dst.id }, 'a/b.dcm');
    expect(m).toMatchObject({
      size: 3,
      mtimeMs: 1000,
      md5: '900150983cd24fb0d6963f7d28e17f72',
      sha256: 'ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad',
      verifiedBy: 'sha256',
    });
  });

  it('resends a changed file, and only hashes (not resends) a file whose mtime alone changed', async () => {
    const src = tmp();
    const dst = new MemoryStorage();
    writeTree(src, { 'a.dcm': 'AAAA', 'b.dcm': 'BBBB' });
    const j = job({ source: new LocalStorage({ root: src }), destinations: [dst] });
    await j.run();
    writeFileSync(join(src, 'a.dcm'), 'XXXX'); // same size, new content
    // File systems stamp mtimes with a coarse clock; make sure the rewrite gets a new one.
    const soon = new Date(Date.now() + 5_000);
    utimesSync(join(src, 'a.dcm'), soon, soon);
    const later = new Date(Date.now() + 60_000);
    utimesSync(join(src, 'b.dcm'), later, later); // touched only
    const writes = dst.calls.write;
    const r = await j.run();
    expect(r).toMatchObject({ status: 'success', filesSynced: 1, filesSkipped: 1 });
    expect(dst.calls.write - writes).toBe(1);
    expect(dst.peek('a.dcm')?.toString()).toBe('XXXX');
    const r3 = await j.run();
    expect(r3.filesSynced).toBe(0);
  });

  it('retries transient failures and a write cut halfway, ending byte-identical', async () => {
    const src = tmp();
    writeTree(src, { 'x/1.dcm': randomBytes(200_000), 'x/2.dcm': randomBytes(10) });
    const dst = new MemoryStorage();
    dst.faults.failNext('write', 2).cutWrites(100_000, 1);
    const j = job({ source: new LocalStorage({ root: src }), destinations: [dst], concurrency: 1 });
    const retries: Array<[number, number]> = [];
    j.on('file:retry', (e) => retries.push([e.attempt, e.retriesLeft]));
    const r = await j.run();
    expect(r.status).toBe('success');
    // Attempt n failed, with 4 − n still allowed (retries: 3, so 4 attempts in all).
    expect(retries).toEqual([
      [1, 3],
      [2, 2],
      [3, 1],
    ]);
    expect(dst.peek('x/1.dcm')?.equals(readFileSync(join(src, 'x/1.dcm')))).toBe(true);
    expect(dst.size).toBe(2);
  });

  it('a logger that throws while a file fails ends the run instead of hanging or crashing it', async () => {
    const src = new MemoryStorage();
    for (const p of ['a.dcm', 'b.dcm', 'c.dcm', 'd.dcm']) await src.write(p, Readable.from([Buffer.from(p)]));
    const dst = new MemoryStorage();
    dst.faults.failNext('write', 1, new MedsyncError('E_PERMISSION', 'Permission denied.'));
    const logger = {
      debug: () => undefined,
      info: () => undefined,
      warn: () => {
        throw new Error('the log sink is gone');
      },
      error: () => undefined,
    };
    const j = job({ source: src, destinations: [dst], concurrency: 1, logger });
    const r = await j.run();
    expect(r.status).not.toBe('success');
    expect(r.errors.map((e) => e.message).join(' ')).toContain('the log sink is gone');
    // The job is not left locked: a second run starts.
    await expect(j.run()).resolves.toMatchObject({ trigger: 'manual' });
  });

  it('does not retry a permanent error; the run is partial and names the file', async () => {
    const src = new MemoryStorage();
    for (const p of ['a.dcm', 'b.dcm', 'c.dcm']) await src.write(p, Readable.from([Buffer.from(p)]));
    const dst = new MemoryStorage();
    dst.faults.failNext('write', 1, new MedsyncError('E_PERMISSION', 'Permission denied.'));
    const j = job({ source: src, destinations: [dst], concurrency: 1 });
    const failed: string[] = [];
    j.on('file:failed', (e) => failed.push(e.error.code));
    const r = await j.run();
    expect(r.status).toBe('partial');
    expect(r.filesSynced).toBe(2);
    expect(r.filesFailed).toBe(1);
    expect(dst.calls.write).toBe(3);
    expect(r.errors).toHaveLength(1);
    expect(r.errors[0]).toMatchObject({ code: 'E_PERMISSION', destination: dst.id });
    expect(['a.dcm', 'b.dcm', 'c.dcm']).toContain(r.errors[0]!.path);
    expect(failed).toEqual(['E_PERMISSION']);
    // retry only the failed file
    const again = await j.retryFailed();
    expect(again).toMatchObject({ status: 'success', filesSynced: 1, trigger: 'retry' });
    expect(dst.size).toBe(3);
  });

  it('stops sending to a destination that refused the login (E_AUTH), other destinations go on', async () => {
    const src = new MemoryStorage();
    const names = Array.from({ length: 12 }, (_, i) => `f${i}.dcm`);
    for (const p of names) await src.write(p, Readable.from([Buffer.from(p)]));
    const refused = new MemoryStorage();
    refused.faults.failNext('write', 1000, () => new MedsyncError('E_AUTH', 'Login refused.'));
    const fine = new MemoryStorage();
    const j = job({ source: src, destinations: [refused, fine], concurrency: 2 });
    const r = await j.run();
    expect(r.status).toBe('partial');
    expect(r.filesSynced).toBe(12);
    expect(r.filesFailed).toBe(12);
    // One login refused per transfer already in flight, not one per file.
    expect(refused.calls.write).toBeLessThanOrEqual(2);
    expect(fine.size).toBe(12);
    expect(
      r.errors
        .filter((e) => e.destination === refused.id)
        .map((e) => e.path)
        .sort(),
    ).toEqual([...names].sort());
    expect(r.errors.every((e) => e.code === 'E_AUTH')).toBe(true);
    expect(r.errors.filter((e) => e.message.startsWith('Not attempted')).length).toBeGreaterThanOrEqual(10);
    // Once the login works again, retryFailed() sends exactly the files that were not delivered.
    refused.faults.clear();
    const again = await j.retryFailed();
    expect(again).toMatchObject({ status: 'success', filesSynced: 12 });
    expect(refused.calls.write).toBeLessThanOrEqual(2 + 12);
    expect(refused.size).toBe(12);
  });

  it('a destination that cannot even be listed is skipped; the other destinations get their files', async () => {
    const src = new MemoryStorage();
    for (const p of ['a.dcm', 'b.dcm']) await src.write(p, Readable.from([Buffer.from(p)]));
    const down = new MemoryStorage();
    down.faults.failNext('list', 1, new MedsyncError('E_AUTH', 'Login refused.'));
    const fine = new MemoryStorage();
    const r = await job({ source: src, destinations: [down, fine] }).run();
    expect(r).toMatchObject({ status: 'partial', filesSynced: 2, filesFailed: 0, errorCount: 1 });
    expect(r.errors).toEqual([{ destination: down.id, code: 'E_AUTH', message: 'Login refused.' }]);
    expect(fine.size).toBe(2);
    expect(down.size).toBe(0);
    const alone = await job({ source: src, destinations: [down] }, new MemoryStore()).run();
    expect(alone.status).toBe('success');
    expect(down.size).toBe(2);
  });

  it('reads back the chosen share of files and resends one that arrived corrupted', async () => {
    const src = new MemoryStorage();
    const names = Array.from({ length: 8 }, (_, i) => `s/IM${i}.dcm`);
    for (const p of names) await src.write(p, Readable.from([randomBytes(2000)]));
    // A destination that reports no digests (like FTP without HASH) and flips one byte of the
    // first file it stores (bad RAM, a broken proxy): only reading it back can tell.
    class Corrupting extends MemoryStorage {
      corrupted = 0;
      override readonly capabilities = { ...new MemoryStorage().capabilities, hashes: [] };
      override async write(
        path: string,
        body: Readable | Uint8Array,
        o?: Parameters<MemoryStorage['write']>[2],
      ): Promise<StorageEntry> {
        let bytes = body;
        if (this.corrupted === 0 && body instanceof Uint8Array) {
          this.corrupted++;
          const bad = Buffer.from(body);
          bad[7] = bad[7]! ^ 0xff;
          bytes = bad;
        }
        const { hashes: _, ...entry } = await super.write(path, bytes, o);
        return entry;
      }
    }
    const dst = new Corrupting();
    const store = new MemoryStore();
    const j = job({ source: src, destinations: [dst], concurrency: 1, readBack: 1 }, store);
    const retries: string[] = [];
    j.on('file:retry', (e) => retries.push(e.error.code));
    const r = await j.run();
    expect(r).toMatchObject({ status: 'success', filesSynced: 8 });
    expect(retries).toEqual(['E_INTEGRITY']);
    expect(dst.calls.read).toBe(9);
    for (const p of names) expect((await dst.readBuffer(p)).equals(await src.readBuffer(p))).toBe(true);
    const scope = { jobId: 'job-1', destination: dst.id };
    for await (const m of store.manifest.list(scope)) expect(m.verifiedBy).toBe('readback');

    // A share of 0.25 reads back exactly two of eight files; the rest are verified by size.
    const dst2 = new MemoryStorage();
    const store2 = new MemoryStore();
    await job({ source: src, destinations: [dst2], readBack: 0.25 }, store2).run();
    expect(dst2.calls.read).toBe(2);
    const by: string[] = [];
    for await (const m of store2.manifest.list({ jobId: 'job-1', destination: dst2.id }))
      by.push(m.verifiedBy);
    expect(by.filter((v) => v === 'readback')).toHaveLength(2);
    expect(() => job({ source: src, destinations: [dst2], readBack: 2 })).toThrow(/readBack/);
  });

  it('runs started in the same millisecond keep their order (the last run is the last started)', async () => {
    const src = new MemoryStorage();
    await src.write('a.dcm', Readable.from([Buffer.from('a')]));
    const store = new MemoryStore();
    // A clock that does not move: every run starts "at the same time".
    const j = job({ source: src, destinations: [new MemoryStorage()], clock: new FakeClock(1_000) }, store);
    const ids: string[] = [];
    for (let i = 0; i < 8; i++) ids.push((await j.run()).id);
    const [last] = await store.runs.list({ jobId: 'job-1', limit: 1 });
    expect(last!.id).toBe(ids[7]);
    expect((await store.runs.list({ jobId: 'job-1' })).map((r) => r.id)).toEqual([...ids].reverse());
  });

  it('sweeps temporary files older than a day from each destination, once a day', async () => {
    const src = tmp();
    const dst = tmp();
    writeTree(src, { 'a.dcm': 'a' });
    const clock = new FakeClock(Date.now());
    const j = job({
      source: new LocalStorage({ root: src }),
      destinations: [new LocalStorage({ root: dst })],
      clock,
    });
    await j.run(); // the first run starts the clock
    const leftover = join(dst, '.big.dcm.r0123456789abcdef.medsync-part');
    writeFileSync(leftover, 'a partial upload nobody resumed');
    await clock.advance(2 * 3600_000);
    await j.run();
    expect(existsSync(leftover)).toBe(true);
    await clock.advance(26 * 3600_000);
    await j.run();
    expect(existsSync(leftover)).toBe(false);
    expect(readFileSync(join(dst, 'a.dcm'), 'utf8')).toBe('a');
  });

  it('is failed when every file fails, and retries run out', async () => {
    const src = new MemoryStorage();
    await src.write('a.dcm', Readable.from([Buffer.from('a')]));
    const dst = new MemoryStorage();
    dst.faults.failNext('write', 10);
    const r = await job({ source: src, destinations: [dst] }).run();
    expect(r.status).toBe('failed');
    expect(dst.calls.write).toBe(4);
    expect(r.errors[0]).toMatchObject({ path: 'a.dcm', code: 'E_TRANSIENT' });
  });

  it('fails clearly when the source folder is missing', async () => {
    const r = await job({
      source: new LocalStorage({ root: join(tmp(), 'not-mounted') }),
      destinations: [new MemoryStorage()],
    }).run();
    expect(r.status).toBe('failed');
    expect(r.errors[0]?.code).toBe('E_NOT_FOUND');
    expect(r.errors[0]?.message).toMatch(/mounted/);
  });

  it('opens the first destination (its presence check) while the source is still being scanned', async () => {
    const src = new MemoryStorage();
    for (const p of ['a.dcm', 'b.dcm']) await src.write(p, Buffer.from(p));
    const dst = new MemoryStorage();
    const j = job({ source: src, destinations: [dst] });
    expect((await j.run()).filesSynced).toBe(2);
    // The scan of the next run waits (up to 5 s) for the destination to be looked at.
    let looked: () => void = () => undefined;
    const lookedAt = new Promise<void>((r) => (looked = r));
    const stat = dst.stat.bind(dst);
    dst.stat = (path, o) => {
      looked();
      return stat(path, o);
    };
    const list = src.list.bind(src);
    let seenDuringScan = false;
    src.list = async function* (prefix, o) {
      yield* list(prefix, o);
      const timer = new Promise<boolean>((r) => setTimeout(() => r(false), 5000));
      seenDuringScan = await Promise.race([lookedAt.then(() => true), timer]);
    };
    expect(await j.run()).toMatchObject({ status: 'success', filesSkipped: 2 });
    expect(seenDuringScan).toBe(true);
  });

  it('a scan that fails while the first destination is being opened fails the run with its own error, at once', async () => {
    const dst = new MemoryStorage();
    const src = tmp();
    writeTree(src, { 'a.dcm': 'a' });
    const j = job({ source: new LocalStorage({ root: src }), destinations: [dst] });
    await j.run();
    // An unreachable destination: its lookup would take a minute; the failed run does not wait.
    dst.faults.latency('stat', 60_000);
    rmSync(src, { recursive: true });
    const r = await j.run();
    expect(r.status).toBe('failed');
    expect(r.errors).toEqual([expect.objectContaining({ code: 'E_NOT_FOUND' })]);
  });

  it('a first destination that fails while the source is still being scanned is reported by its planning', async () => {
    const src = new MemoryStorage();
    await src.write('a.dcm', Buffer.from('a'));
    const dst = new MemoryStorage();
    const j = job({ source: src, destinations: [dst] });
    await j.run();
    const before = { ...dst.calls };
    // Refused at once, while the scan takes a while longer.
    dst.faults.failNext('stat', 1, new MedsyncError('E_AUTH', 'Refused.'));
    const list = src.list.bind(src);
    src.list = async function* (prefix, o) {
      yield* list(prefix, o);
      await new Promise((r) => setTimeout(r, 100));
    };
    const r = await j.run();
    expect(r.status).toBe('failed');
    expect(r.errors).toEqual([expect.objectContaining({ code: 'E_AUTH', destination: dst.id })]);
    // One look, refused: nothing else tries it.
    expect(dst.calls).toEqual({ ...before, stat: before.stat + 1 });
  });

  it('syncs to several destinations, each with its own manifest', async () => {
    const src = tmp();
    writeTree(src, sample());
    const a = tmp();
    const b = new MemoryStorage();
    b.faults.failNext('write', 1, new MedsyncError('E_QUOTA', 'Disk full.'));
    const j = job({
      source: new LocalStorage({ root: src }),
      destinations: [new LocalStorage({ root: a }), b],
      concurrency: 1,
    });
    const r1 = await j.run();
    expect(r1.status).toBe('partial');
    expect(r1.filesSynced).toBe(9);
    expect(readTree(a)).toEqual(readTree(src));
    const r2 = await j.run();
    expect(r2).toMatchObject({ status: 'success', filesSynced: 1, filesSkipped: 9 });
    expect(b.size).toBe(5);
  });

  it('include and exclude globs pick the files', async () => {
    const src = tmp();
    writeTree(src, { 'a/1.dcm': 'x', 'a/2.txt': 'y', 'b/3.dcm': 'z', 'b/tmp/4.dcm': 'w' });
    const dst = new MemoryStorage();
    const r = await job({
      source: new LocalStorage({ root: src }),
      destinations: [dst],
      include: ['**/*.dcm'],
      exclude: ['**/tmp/**'],
    }).run();
    expect(r.filesSynced).toBe(2);
    expect(dst.peek('a/1.dcm')).toBeDefined();
    expect(dst.peek('b/3.dcm')).toBeDefined();
  });

  it('dry run plans and writes nothing', async () => {
    const src = tmp();
    writeTree(src, sample());
    const dst = new MemoryStorage();
    const store = new MemoryStore();
    const r = await job({ source: new LocalStorage({ root: src }), destinations: [dst] }, store).plan();
    expect(r.dryRun).toBe(true);
    expect(r.plan.uploads).toBe(5);
    expect(r.plan.ops?.map((o) => o.path).sort()).toEqual(Object.keys(sample()).sort());
    expect(dst.size).toBe(0);
    expect((await store.manifest.summary({ jobId: 'job-1', destination: dst.id })).files).toBe(0);
    expect((await store.runs.stats('job-1')).totalRuns).toBe(0);
  });

  it('reports honest progress: files, bytes, ETA', async () => {
    const src = tmp();
    writeTree(src, { 'a.bin': randomBytes(300_000), 'b.bin': randomBytes(100_000) });
    const j = job({ source: new LocalStorage({ root: src }), destinations: [new MemoryStorage()] });
    const seen: Array<{ filesDone: number; bytesDone: number; bytesTotal: number }> = [];
    j.on('progress', (p) => seen.push(p));
    await j.run();
    const last = seen[seen.length - 1]!;
    expect(last).toMatchObject({
      filesDone: 2,
      filesTotal: 2,
      bytesDone: 400_000,
      bytesTotal: 400_000,
      etaMs: 0,
    });
  });

  it('shows the counts of a running run in its record every few seconds', async () => {
    const clock = new FakeClock();
    const src = new MemoryStorage();
    for (let i = 0; i < 6; i++) await src.write(`${i}.dcm`, Readable.from([Buffer.from(String(i))]));
    const dst = new MemoryStorage({ clock });
    dst.faults.latency('write', 2000);
    const store = new MemoryStore();
    const j = job({ source: src, destinations: [dst], concurrency: 1, clock }, store);
    const running = j.run();
    await clock.advance(7000);
    const [rec] = await store.runs.list({ jobId: 'job-1' });
    expect(rec?.status).toBe('running');
    expect(rec?.filesSynced).toBeGreaterThanOrEqual(2);
    await clock.advance(20_000);
    const done = await running;
    expect(done.status).toBe('success');
    expect((await store.runs.get(done.id))?.status).toBe('success');
  });

  it('hides paths in events unless eventPaths is set', async () => {
    const src = new MemoryStorage();
    await src.write('Doe John/1.dcm', Readable.from([Buffer.from('x')]));
    const j = new SyncJob({
      id: 'j',
      source: src,
      destinations: [new MemoryStorage()],
      store: new MemoryStore(),
    });
    const paths: string[] = [];
    j.on('file:done', (e) => paths.push(e.path));
    await j.run();
    expect(paths).toHaveLength(1);
    expect(paths[0]).toMatch(/^ref:[0-9a-f]{12}$/);
  });

  it('cancels on abort: nothing half written, and the next run finishes the copy', async () => {
    const src = tmp();
    const files: Record<string, Buffer> = {};
    for (let i = 0; i < 30; i++) files[`s/${i}.bin`] = randomBytes(100_000);
    writeTree(src, files);
    const dst = tmp();
    const store = new MemoryStore();
    const j = job(
      {
        source: new LocalStorage({ root: src }),
        destinations: [new LocalStorage({ root: dst })],
        bwlimit: '2M',
        concurrency: 2,
      },
      store,
    );
    const ac = new AbortController();
    let n = 0;
    j.on('file:done', () => {
      if (++n === 5) ac.abort();
    });
    const r = await j.run({ signal: ac.signal });
    expect(r.status).toBe('cancelled');
    const partial = Object.keys(readTree(dst));
    expect(partial.length).toBeGreaterThanOrEqual(5);
    expect(partial.length).toBeLessThan(30);
    expect(partial.every((p) => !p.includes('.medsync-part'))).toBe(true);
    for (const p of partial) expect(readFileSync(join(dst, p)).equals(files[p]!)).toBe(true);
    const r2 = await j.run();
    expect(r2.status).toBe('success');
    expect(r2.filesSynced).toBe(30 - r.filesSynced);
    expect(readTree(dst)).toEqual(readTree(src));
  });

  it('leaves no listener on the caller signal after runs (long-running hosts reuse one)', async () => {
    const src = new MemoryStorage();
    await src.write('a.dcm', Readable.from([Buffer.from('a')]));
    const j = job({ source: src, destinations: [new MemoryStorage()] });
    const ac = new AbortController();
    for (let i = 0; i < 3; i++) await j.run({ signal: ac.signal, stopSignal: ac.signal });
    expect(getEventListeners(ac.signal, 'abort')).toHaveLength(0);
  });

  it('graceful stop finishes the files in flight and starts no new ones', async () => {
    const src = new MemoryStorage();
    for (let i = 0; i < 20; i++) await src.write(`${i}.dcm`, Readable.from([Buffer.from(String(i))]));
    const dst = new MemoryStorage();
    dst.faults.latency('write', 20);
    const stop = new AbortController();
    const j = job({ source: src, destinations: [dst], concurrency: 2 });
    let started = 0;
    j.on('file:done', () => {
      if (++started === 2) stop.abort();
    });
    const r = await j.run({ stopSignal: stop.signal });
    expect(r.status).toBe('cancelled');
    expect(r.filesFailed).toBe(0);
    expect(r.filesSynced).toBeGreaterThanOrEqual(2);
    expect(r.filesSynced).toBeLessThanOrEqual(4);
    expect(dst.size).toBe(r.filesSynced);
  });

  it('a stop that comes after the last file is done leaves the run a success', async () => {
    const src = new MemoryStorage();
    for (let i = 0; i < 4; i++) await src.write(`${i}.dcm`, Readable.from([Buffer.from(String(i))]));
    const stop = new AbortController();
    const j = job({ source: src, destinations: [new MemoryStorage()], concurrency: 1 });
    let done = 0;
    j.on('file:done', () => {
      if (++done === 4) stop.abort();
    });
    const r = await j.run({ stopSignal: stop.signal });
    expect(r).toMatchObject({ status: 'success', filesSynced: 4 });
  });

  it('a graceful stop during a long scan ends the run at once, cancelled, with nothing sent', async () => {
    const src = new MemoryStorage();
    for (let i = 0; i < 5; i++) await src.write(`${i}.dcm`, Readable.from([Buffer.from(String(i))]));
    // A slow NAS listing: the stop must not wait for it (systemd kills after 90 s).
    src.faults.latency('list', 30_000);
    const dst = new MemoryStorage();
    const stop = new AbortController();
    const j = job({ source: src, destinations: [dst] });
    setTimeout(() => stop.abort(), 50);
    const t0 = Date.now();
    const r = await j.run({ stopSignal: stop.signal });
    expect(Date.now() - t0).toBeLessThan(5_000);
    expect(r.status).toBe('cancelled');
    expect(r.filesSynced).toBe(0);
    expect(dst.size).toBe(0);
  });

  it('only one run of a job at a time (lease in the store)', async () => {
    const src = new MemoryStorage();
    await src.write('a.dcm', Readable.from([Buffer.from('a')]));
    const dst = new MemoryStorage();
    dst.faults.latency('write', 50);
    const store = new MemoryStore();
    const a = job({ source: src, destinations: [dst], owner: 'A' }, store);
    const b = job({ source: src, destinations: [dst], owner: 'B' }, store);
    const first = a.run();
    await new Promise((r) => setTimeout(r, 10));
    await expect(b.run()).rejects.toMatchObject({ code: 'E_LOCKED' });
    expect((await first).status).toBe('success');
    expect((await b.run()).status).toBe('success');
  });

  it('after the Store is lost, rebuilds the manifest from the destination instead of resending', async () => {
    const src = tmp();
    writeTree(src, sample());
    const dst = tmp();
    const mk = (store: MemoryStore) =>
      job(
        { source: new LocalStorage({ root: src }), destinations: [new LocalStorage({ root: dst })] },
        store,
      );
    await mk(new MemoryStore()).run();
    writeFileSync(join(src, 'new.dcm'), 'new file');
    const fresh = new MemoryStore();
    const r = await mk(fresh).run();
    expect(r).toMatchObject({ status: 'success', filesSynced: 1, filesSkipped: 5 });
    const m = await fresh.manifest.get(
      { jobId: 'job-1', destination: new LocalStorage({ root: dst }).id },
      'empty.dcm',
    );
    expect(m?.verifiedBy).toBe('listing');
    // explicit rebuild
    const again = new MemoryStore();
    expect(await mk(again).rebuildManifest()).toBe(6);
  });

  it('without mtimes at the destination, adopts only copies: by digest, or written after the source changed', async () => {
    // Like FTP without MFMT: the destination keeps the upload time, not the source's mtime.
    class NoMtimes extends MemoryStorage {
      constructor(
        readonly listsDigests: boolean,
        skewMs = 0,
      ) {
        // The destination's clock runs skewMs ahead of ours.
        super({ clock: { ...systemClock, now: () => Date.now() + skewMs } });
      }
      override readonly capabilities = {
        ...new MemoryStorage().capabilities,
        preservesMtime: false,
        mtimePrecisionMs: null,
        hashes: [],
      };
      override async write(
        path: string,
        body: Readable | Uint8Array,
        o?: Parameters<MemoryStorage['write']>[2],
      ): Promise<StorageEntry> {
        const {
          hashes: _h,
          mtimeMs: _m,
          ...entry
        } = await super.write(path, body, { ...o, mtimeMs: undefined });
        return entry;
      }
      override async *list(prefix?: string, o?: Parameters<MemoryStorage['list']>[1]) {
        for await (const e of super.list(prefix, o)) {
          const { hashes, ...rest } = e;
          yield this.listsDigests ? { ...rest, hashes: { sha256: hashes!.sha256!.toUpperCase() } } : rest;
        }
      }
    }
    // Two hours ahead: a server whose clock is off, or that reports local time as UTC. Without
    // correcting for it, the copy made before the edit looks newer than the edit.
    for (const [listsDigests, skewMs] of [
      [false, 0],
      [true, 0],
      [false, 2 * 3_600_000],
    ] as const) {
      const src = tmp();
      writeTree(src, { 'a.dcm': 'aaaa', 'b.dcm': 'bbbb', 'c.dcm': 'cccc' });
      const past = new Date(Date.now() - 3_600_000);
      for (const f of ['a.dcm', 'b.dcm', 'c.dcm']) utimesSync(join(src, f), past, past);
      const dst = new NoMtimes(listsDigests, skewMs);
      const mk = (store: MemoryStore) =>
        job({ source: new LocalStorage({ root: src }), destinations: [dst] }, store);
      expect(await mk(new MemoryStore()).run()).toMatchObject({ status: 'success', filesSynced: 3 });
      // The Store is lost; meanwhile b.dcm was corrected in place (same size). With digests the
      // edit is seen whatever its mtime; without, only by an mtime after the upload.
      writeFileSync(join(src, 'b.dcm'), 'BBBB');
      const edited = listsDigests ? past : new Date(Date.now() + 60_000);
      utimesSync(join(src, 'b.dcm'), edited, edited);
      const fresh = new MemoryStore();
      const r = await mk(fresh).run();
      expect(r).toMatchObject({ status: 'success', filesSynced: 1, filesSkipped: 2 });
      expect(dst.peek('b.dcm')?.toString()).toBe('BBBB');
      const a = await fresh.manifest.get({ jobId: 'job-1', destination: dst.id }, 'a.dcm');
      expect(a?.verifiedBy).toBe('listing');
      if (listsDigests) expect(a?.sha256).toMatch(/^[0-9a-f]{64}$/);
      // The clock probe (written only where a time is compared) is gone.
      expect(dst.size).toBe(3);
    }
  });

  it('keeps the recovery pending when the first run after a crash fails early', async () => {
    const src = tmp();
    writeTree(src, { 'a.dcm': 'a' });
    const dst = tmp();
    writeTree(dst, { 'sub/.x.dcm.deadbeef.medsync-part': 'half' });
    const store = new MemoryStore();
    await store.runs.insert(runRecord({ id: 'crashed', jobId: 'job-1', owner: 'gone', startedAt: 1 }));
    await new Promise((r) => setTimeout(r, 300));
    const missing = job(
      {
        source: new LocalStorage({ root: join(src, 'unmounted') }),
        destinations: [new LocalStorage({ root: dst })],
      },
      store,
    );
    expect((await missing.run()).status).toBe('failed');
    const ok = job(
      { source: new LocalStorage({ root: src }), destinations: [new LocalStorage({ root: dst })] },
      store,
    );
    expect((await ok.run()).status).toBe('success');
    expect(Object.keys(readTree(dst))).toEqual(['a.dcm']);
  });

  it('keeps the recovery pending when a graceful stop cuts the leftover cleanup short', async () => {
    const src = tmp();
    writeTree(src, { 'a.dcm': 'a' });
    const dst = tmp();
    writeTree(dst, { 'sub/.x.dcm.deadbeef.medsync-part': 'half' });
    const old = new Date(Date.now() - 3600_000);
    utimesSync(join(dst, 'sub/.x.dcm.deadbeef.medsync-part'), old, old);
    const store = new MemoryStore();
    await store.runs.insert(runRecord({ id: 'crashed', jobId: 'job-1', owner: 'gone', startedAt: 1 }));
    await new Promise((r) => setTimeout(r, 300));
    const stop = new AbortController();
    // The service is told to stop while the leftovers are being removed: the cleanup ends early
    // (its failure only logged), and planning then stops.
    class StoppedDuringCleanup extends LocalStorage {
      override cleanupPartials(prefix: string, o: Parameters<LocalStorage['cleanupPartials']>[1]) {
        stop.abort();
        return super.cleanupPartials(prefix, o);
      }
    }
    const first = await job(
      { source: new LocalStorage({ root: src }), destinations: [new StoppedDuringCleanup({ root: dst })] },
      store,
    ).run({ stopSignal: stop.signal });
    expect(first.status).toBe('cancelled');
    expect(Object.keys(readTree(dst))).toEqual(['sub/.x.dcm.deadbeef.medsync-part']);
    const next = await job(
      { source: new LocalStorage({ root: src }), destinations: [new LocalStorage({ root: dst })] },
      store,
    ).run();
    expect(next.status).toBe('success');
    expect(Object.keys(readTree(dst))).toEqual(['a.dcm']);
  });

  it('marks a run left running by a crash as interrupted and removes its partial files', async () => {
    const src = tmp();
    writeTree(src, { 'a.dcm': 'a' });
    const dst = tmp();
    writeTree(dst, { [`sub/.x.dcm.deadbeef.medsync-part`]: 'half' });
    const old = new Date(Date.now() - 3600_000);
    utimesSync(join(dst, 'sub/.x.dcm.deadbeef.medsync-part'), old, old);
    const store = new MemoryStore();
    await store.runs.insert(runRecord({ id: 'crashed', jobId: 'job-1', owner: 'gone', startedAt: 1 }));
    // Leftovers are recognised by their ctime being older than the run, less a margin of half the
    // clock probe's round trip (tens of ms on a loaded machine): let that much time pass.
    await new Promise((r) => setTimeout(r, 300));
    const r = await job(
      { source: new LocalStorage({ root: src }), destinations: [new LocalStorage({ root: dst })] },
      store,
    ).run();
    expect(r.status).toBe('success');
    expect((await store.runs.get('crashed'))?.status).toBe('interrupted');
    expect(Object.keys(readTree(dst))).toEqual(['a.dcm']);
  });
});

describe('SyncJob crash recovery and the destination clock', () => {
  /**
   * Recovers from a crashed run onto a destination whose clock is `skewMs` from ours. Its
   * temporary files are dated by its own clock (`by: 'destination'`) or by their writer's (SFTP's
   * access times). Another writer creates a temporary file as the cleanup starts; the crashed
   * run's leftover is from before this run. Returns the destination's files afterwards.
   */
  async function recoverWithClock(skewMs: number, by: 'destination' | 'writer'): Promise<string[]> {
    const dst = tmp();
    class Skewed extends LocalStorage {
      override async stat(path: string, o?: Parameters<LocalStorage['stat']>[1]): Promise<StorageEntry> {
        const e = await super.stat(path, o);
        return { ...e, mtimeMs: e.mtimeMs! + skewMs };
      }
      override async cleanupPartials(prefix = '', o: Parameters<LocalStorage['cleanupPartials']>[1] = {}) {
        writeFileSync(join(dst, 'sub/.y.dcm.cafef00d.medsync-part'), 'another writer, in progress');
        // A cutoff on the destination's clock, compared with files dated by ours (ctime).
        const shift = by === 'destination' && o.olderThanMs !== undefined;
        return super.cleanupPartials(prefix, shift ? { ...o, olderThanMs: o.olderThanMs! - skewMs } : o);
      }
    }
    const src = tmp();
    writeTree(src, { 'a.dcm': 'a' });
    writeTree(dst, { 'sub/.x.dcm.deadbeef.medsync-part': 'half' });
    const store = new MemoryStore();
    await store.runs.insert(runRecord({ id: 'crashed', jobId: 'job-1', owner: 'gone', startedAt: 1 }));
    await new Promise((r) => setTimeout(r, 200));
    const r = await job(
      { source: new LocalStorage({ root: src }), destinations: [new Skewed({ root: dst })] },
      store,
    ).run();
    expect(r.status).toBe('success');
    return Object.keys(readTree(dst)).sort();
  }

  it("removes the crashed run's leftovers by the destination's clock, not another writer's fresh files", async () => {
    // Two hours behind: without the correction, the fresh file looks two hours old.
    expect(await recoverWithClock(-2 * 3_600_000, 'destination')).toEqual([
      'a.dcm',
      'sub/.y.dcm.cafef00d.medsync-part',
    ]);
  });

  it('a destination clock ahead of ours does not move the cutoff later (files dated by the writer)', async () => {
    // SFTP dates a finished temporary file by its writer's clock while the server's clock runs
    // ahead: the cutoff must not follow that clock forward.
    expect(await recoverWithClock(2 * 3_600_000, 'writer')).toEqual([
      'a.dcm',
      'sub/.y.dcm.cafef00d.medsync-part',
    ]);
  });
});

/**
 * Keeps what it is sent, with the source's mtime, but while `broken` reads back other bytes (a bad
 * disk) and, with `failRemoves`, loses the connection on removals; lists no digests.
 */
class BadReads extends MemoryStorage {
  broken = true;
  constructor(private readonly bad: { failRemoves?: boolean } = {}) {
    super();
  }
  override async readBuffer(path: string, o?: Parameters<MemoryStorage['readBuffer']>[1]) {
    const b = await super.readBuffer(path, o);
    return this.broken ? Buffer.from(b.toString().toUpperCase()) : b;
  }
  override async read(path: string, o?: Parameters<MemoryStorage['read']>[1]) {
    return Readable.from([await this.readBuffer(path, o)]);
  }
  override async remove(path: string, o?: Parameters<MemoryStorage['remove']>[1]) {
    if (this.broken && this.bad.failRemoves) throw new MedsyncError('E_TRANSIENT', 'Connection lost.');
    return super.remove(path, o);
  }
  override async write(...args: Parameters<MemoryStorage['write']>): Promise<StorageEntry> {
    const { hashes: _, ...entry } = await super.write(...args);
    return entry;
  }
}

describe('SyncJob writes whose answer was lost', () => {
  /** Three source files with fixed mtimes; every attempt at `lost.dcm` takes effect, answer lost. */
  async function lostAnswer(): Promise<{
    src: MemoryStorage;
    dst: MemoryStorage;
    store: MemoryStore;
    j: SyncJob;
  }> {
    const src = new MemoryStorage();
    for (const p of ['a.dcm', 'lost.dcm', 'z.dcm'])
      await src.write(p, Readable.from([Buffer.from(`content of ${p}`)]), { mtimeMs: 1_700_000_000_000 });
    const dst = new MemoryStorage();
    const store = new MemoryStore();
    const j = job({ source: src, destinations: [dst], concurrency: 1 }, store);
    // a.dcm arrives first; then the four attempts at lost.dcm all land, their answers lost.
    const r1 = await j.run({ only: ['a.dcm'] });
    expect(r1.filesSynced).toBe(1);
    dst.faults.loseReplies('write', 4);
    const r2 = await j.run();
    expect(r2).toMatchObject({ status: 'partial', filesSynced: 1, filesFailed: 1 });
    expect(r2.errors).toEqual([expect.objectContaining({ path: 'lost.dcm', code: 'E_TRANSIENT' })]);
    expect(dst.peek('lost.dcm')?.toString()).toBe('content of lost.dcm');
    expect(await store.manifest.get({ jobId: 'job-1', destination: dst.id }, 'lost.dcm')).toBeUndefined();
    return { src, dst, store, j };
  }

  it('the next run finds the file in place and records it without sending it again', async () => {
    const { dst, store, j } = await lostAnswer();
    const writes = dst.calls.write;
    const lists = dst.calls.list;
    const r = await j.run();
    expect(r).toMatchObject({ status: 'success', filesSynced: 0, filesSkipped: 3 });
    expect(dst.calls.write).toBe(writes);
    // Looked up one by one, not by listing the destination.
    expect(dst.calls.list).toBe(lists);
    expect(await store.manifest.get({ jobId: 'job-1', destination: dst.id }, 'lost.dcm')).toMatchObject({
      size: 'content of lost.dcm'.length,
      mtimeMs: 1_700_000_000_000,
      verifiedBy: 'listing',
    });
    // Settled: the run after does not look it up again.
    const stats = dst.calls.stat;
    await j.run();
    expect(dst.calls.stat - stats).toBeLessThanOrEqual(3); // the presence check's sample only
  });

  it('retryFailed() finds it in place too', async () => {
    const { dst, j } = await lostAnswer();
    const writes = dst.calls.write;
    const r = await j.retryFailed();
    expect(r).toMatchObject({ status: 'success', filesSynced: 0, filesSkipped: 1 });
    expect(dst.calls.write).toBe(writes);
  });

  it('a source changed since is sent again', async () => {
    const { src, dst, j } = await lostAnswer();
    await src.write('lost.dcm', Readable.from([Buffer.from('corrected content of lost.dcm')]), {
      mtimeMs: 1_700_000_100_000,
    });
    const writes = dst.calls.write;
    const r = await j.run();
    expect(r).toMatchObject({ status: 'success', filesSynced: 1 });
    expect(dst.calls.write - writes).toBe(1);
    expect(dst.peek('lost.dcm')?.toString()).toBe('corrected content of lost.dcm');
  });

  it('a copy that failed its read-back is sent again, never adopted', async () => {
    const src = new MemoryStorage();
    await src.write('a.dcm', Readable.from([Buffer.from('the real bytes')]), { mtimeMs: 1_700_000_000_000 });
    // Keeps what it is sent, with the source's mtime, but reads back other bytes (a bad disk), and
    // lists no digests: only the read-back can tell.
    const dst = new BadReads();
    const store = new MemoryStore();
    const j = job({ source: src, destinations: [dst], readBack: 1 }, store);
    const r1 = await j.run();
    expect(r1).toMatchObject({ status: 'failed', filesFailed: 1 });
    expect(r1.errors[0]).toMatchObject({ code: 'E_INTEGRITY' });
    // The copy that failed its checks is not left under the final name.
    expect(dst.peek('a.dcm')).toBeUndefined();
    dst.broken = false;
    await expectSentOnceByReadBack(j, dst, store);
  });

  it('a corrupt copy that could not be removed is never adopted: the next run sends it again', async () => {
    const src = new MemoryStorage();
    await src.write('a.dcm', Readable.from([Buffer.from('the real bytes')]), { mtimeMs: 1_700_000_000_000 });
    // Reads back other bytes, and the connection drops on the removal too.
    const dst = new BadReads({ failRemoves: true });
    const store = new MemoryStore();
    const j = job({ source: src, destinations: [dst], readBack: 1 }, store);
    expect((await j.run()).filesFailed).toBe(1);
    // The corrupt copy is still there, with the source's size and mtime.
    expect(dst.peek('a.dcm')?.toString()).toBe('the real bytes');
    dst.broken = false;
    // The next run's upload fails before it replaces the copy (the link is down): still marked.
    dst.faults.failNext('write', 4);
    expect((await j.run()).filesFailed).toBe(1);
    // Rebuilding the manifest from the listing does not take it either.
    expect(await j.rebuildManifest()).toBe(0);
    await expectSentOnceByReadBack(j, dst, store);
  });

  it('rebuildManifest() rejects for a destination it may not list, instead of adopting nothing', async () => {
    const src = new MemoryStorage();
    await src.write('a.dcm', Readable.from([Buffer.from('a')]), { mtimeMs: 1_700_000_000_000 });
    class DropFolder extends MemoryStorage {
      // eslint-disable-next-line require-yield
      override async *list(): AsyncGenerator<StorageEntry> {
        throw new MedsyncError('E_PERMISSION', 'Listing refused.');
      }
    }
    const dst = new DropFolder();
    const j = job({ source: src, destinations: [dst] });
    await expect(j.rebuildManifest()).rejects.toMatchObject({ code: 'E_PERMISSION' });
    // A run (empty manifest: it looks for copies there) sends everything instead.
    expect(await j.run()).toMatchObject({ status: 'success', filesSynced: 1 });
  });

  it('an older copy of a changed file is not taken for the new version by its write time', async () => {
    // A destination without mtimes or digests: a copy is taken by its write time only.
    class Unstamped extends MemoryStorage {
      override readonly capabilities = {
        ...new MemoryStorage().capabilities,
        hashes: [],
        preservesMtime: false,
        mtimePrecisionMs: null,
      };
      override async write(
        path: string,
        body: Parameters<MemoryStorage['write']>[1],
        o: Parameters<MemoryStorage['write']>[2] = {},
      ) {
        const { mtimeMs: _m, ...rest } = o;
        const { hashes: _h, ...entry } = await super.write(path, body, rest);
        return entry;
      }
      override async stat(path: string, o?: Parameters<MemoryStorage['stat']>[1]) {
        const { hashes: _h, ...entry } = await super.stat(path, o);
        return entry;
      }
    }
    const src = new MemoryStorage();
    const now = Date.now();
    await src.write('a.dcm', Readable.from([Buffer.from('version 1')]), { mtimeMs: now - 60_000 });
    const dst = new Unstamped();
    const store = new MemoryStore();
    const j = job({ source: src, destinations: [dst], concurrency: 1 }, store);
    expect((await j.run()).filesSynced).toBe(1);
    // Version 2, same size, restored with an mtime older than version 1's delivery; its upload
    // fails on a dropped connection before it lands.
    await src.write('a.dcm', Readable.from([Buffer.from('version 2')]), { mtimeMs: now - 30_000 });
    dst.faults.failNext('write', 4);
    expect((await j.run()).filesFailed).toBe(1);
    expect(dst.peek('a.dcm')?.toString()).toBe('version 1');
    const r = await j.run();
    expect(r).toMatchObject({ status: 'success', filesSynced: 1 });
    expect(dst.peek('a.dcm')?.toString()).toBe('version 2');
  });

  it('a refused login while looking files up skips the destination and keeps them for the next run', async () => {
    const { dst, j } = await lostAnswer();
    const stat = dst.stat.bind(dst);
    let refuse = true;
    dst.stat = async (path, o) => {
      if (refuse && path === 'lost.dcm') throw new MedsyncError('E_AUTH', 'Login refused.');
      return stat(path, o);
    };
    const writes = dst.calls.write;
    const refused = await j.run();
    expect(refused.status).toBe('failed');
    expect(refused.errors.map((e) => e.code)).toEqual(['E_AUTH']);
    expect(dst.calls.write).toBe(writes);
    refuse = false;
    const r = await j.run();
    expect(r).toMatchObject({ status: 'success', filesSynced: 0, filesSkipped: 3 });
    expect(dst.calls.write).toBe(writes);
  });

  it('mirror: a landed file whose source is gone since is deleted; a file there that is not that write is left', async () => {
    const src = new MemoryStorage();
    const t = 1_700_000_000_000;
    for (const p of ['a.dcm', 'b.dcm', 'lost.dcm', 'other.dcm', 'z.dcm'])
      await src.write(p, Readable.from([Buffer.from(`content of ${p}`)]), { mtimeMs: t });
    const dst = new MemoryStorage();
    // Someone else's file where other.dcm goes, with another time.
    await dst.write('other.dcm', Readable.from([Buffer.from('content of other.dcm')]), {
      mtimeMs: t - 5_000,
    });
    const store = new MemoryStore();
    const j = job({ source: src, destinations: [dst], concurrency: 1, mode: 'mirror' }, store);
    await j.run({ only: ['a.dcm', 'b.dcm', 'z.dcm'] });
    // lost.dcm lands with its answer lost; other.dcm never lands (the connection drops first).
    const write = dst.write.bind(dst);
    dst.write = async (path, body, o) => {
      if (path === 'lost.dcm') {
        await write(path, body, o);
        throw new MedsyncError('E_TRANSIENT', 'Connection lost.');
      }
      if (path === 'other.dcm') {
        if (!(body instanceof Uint8Array)) body.destroy();
        throw new MedsyncError('E_TRANSIENT', 'Connection lost.');
      }
      return write(path, body, o);
    };
    const r1 = await j.run();
    expect(r1).toMatchObject({ status: 'failed', filesFailed: 2 });
    dst.write = write;
    // Both leave the source before the next run.
    await src.remove('lost.dcm');
    await src.remove('other.dcm');
    const r2 = await j.run();
    expect(r2).toMatchObject({ status: 'success', filesDeleted: 1 });
    expect(dst.peek('lost.dcm')).toBeUndefined();
    expect(dst.peek('other.dcm')?.toString()).toBe('content of other.dcm');
    // Settled: nothing more to do, and the foreign file stays.
    const r3 = await j.run();
    expect(r3).toMatchObject({ status: 'success', filesDeleted: 0, filesSynced: 0 });
    expect(dst.peek('other.dcm')).toBeDefined();
  });

  it('mirror: a landed file is not deleted when the source has it under another letter case', async () => {
    const src = new MemoryStorage();
    const t = 1_700_000_000_000;
    for (const p of ['a.dcm', 'b.dcm', 'scan.dcm'])
      await src.write(p, Readable.from([Buffer.from(`content of ${p}`)]), { mtimeMs: t });
    const dst = new MemoryStorage({ caseInsensitive: true });
    const store = new MemoryStore();
    const j = job({ source: src, destinations: [dst], concurrency: 1, mode: 'mirror' }, store);
    await j.run({ only: ['a.dcm', 'b.dcm'] });
    dst.faults.loseReplies('write', 4);
    expect((await j.run()).filesFailed).toBe(1);
    // Renamed at the source to another case, and sent alone (same bytes, same mtime).
    const body = await src.readBuffer('scan.dcm');
    await src.remove('scan.dcm');
    await src.write('SCAN.dcm', Readable.from([body]), { mtimeMs: t });
    expect((await j.run({ only: ['SCAN.dcm'] })).status).toBe('success');
    const r = await j.run();
    expect(r).toMatchObject({ status: 'success', filesDeleted: 0 });
    expect(dst.peek('SCAN.dcm')?.toString()).toBe('content of scan.dcm');
  });

  it('mirror: a landed file whose lookup keeps failing is tried by 5 runs, then left', async () => {
    const src = new MemoryStorage();
    const t = 1_700_000_000_000;
    for (const p of ['a.dcm', 'b.dcm', 'lost.dcm'])
      await src.write(p, Readable.from([Buffer.from(`content of ${p}`)]), { mtimeMs: t });
    const dst = new MemoryStorage();
    const store = new MemoryStore();
    const j = job({ source: src, destinations: [dst], concurrency: 1, mode: 'mirror' }, store);
    await j.run({ only: ['a.dcm', 'b.dcm'] });
    dst.faults.loseReplies('write', 4);
    await j.run();
    await src.remove('lost.dcm');
    // Its folder cannot be searched now (a permission changed at the destination).
    const stat = dst.stat.bind(dst);
    let lookups = 0;
    dst.stat = async (path, o) => {
      if (path === 'lost.dcm') {
        lookups++;
        throw new MedsyncError('E_PERMISSION', 'Permission denied.');
      }
      return stat(path, o);
    };
    const perRun: number[] = [];
    for (let i = 0; i < 7; i++) {
      const before = lookups;
      expect((await j.run()).status).toBe('success');
      perRun.push(lookups - before);
    }
    expect(perRun).toEqual([1, 1, 1, 1, 1, 0, 0]);
    expect(dst.peek('lost.dcm')).toBeDefined();
  });

  it('is still looked up after a run that could not plan the destination', async () => {
    const { dst, j } = await lostAnswer();
    // The next run cannot reach the destination (its presence check fails): nothing is settled.
    dst.faults.failNext('stat', 1, new MedsyncError('E_TRANSIENT', 'Connection refused.'));
    const down = await j.run();
    expect(down.status).toBe('failed');
    const writes = dst.calls.write;
    const r = await j.run();
    expect(r).toMatchObject({ status: 'success', filesSynced: 0, filesSkipped: 3 });
    expect(dst.calls.write).toBe(writes);
  });
});

describe('SyncJob safety', () => {
  it('refuses to refill a destination whose delivered files are all gone (an unmounted share)', async () => {
    const src = tmp();
    writeTree(src, sample());
    const dst = tmp();
    const j = job({
      source: new LocalStorage({ root: src }),
      destinations: [new LocalStorage({ root: dst })],
    });
    await j.run();
    // The share is unmounted: the mount point is an empty folder.
    rmSync(dst, { recursive: true });
    mkdirSync(dst);
    writeFileSync(join(src, 'new.dcm'), 'new');
    const r = await j.run();
    expect(r.status).toBe('failed');
    expect(r.errors[0]).toMatchObject({ code: 'E_SAFETY' });
    expect(readTree(dst)).toEqual({});
  });

  it('looks up delivered files one at a time until one is there: one lookup when the first is, a refusal only when none of three is', async () => {
    const files: Record<string, string> = {};
    for (let i = 0; i < 9; i++) files[`d/${i}.dcm`] = `file ${i}`;
    const src = new MemoryStorage();
    for (const [p, b] of Object.entries(files)) await src.write(p, Buffer.from(b));
    const dst = new MemoryStorage();
    const j = job({ source: src, destinations: [dst] });
    await j.run();
    const looked: string[] = [];
    const stat = dst.stat.bind(dst);
    dst.stat = (p, o) => {
      looked.push(p);
      return stat(p, o);
    };
    expect(await j.run()).toMatchObject({ status: 'success', filesSkipped: 9 });
    expect(looked).toHaveLength(1);
    // The first sampled file gone: the second is looked up, and found.
    await dst.remove(looked[0]!);
    looked.length = 0;
    expect(await j.run()).toMatchObject({ status: 'success', filesSynced: 0 });
    expect(looked).toHaveLength(2);
    // The first two gone: the third.
    await dst.remove(looked[1]!);
    looked.length = 0;
    expect(await j.run()).toMatchObject({ status: 'success', filesSynced: 0 });
    expect(looked).toHaveLength(3);
    // None of the three: refused, nothing sent.
    await dst.remove(looked[2]!);
    const r = await j.run();
    expect(r).toMatchObject({ status: 'failed', filesSynced: 0 });
    expect(r.errors[0]).toMatchObject({ code: 'E_SAFETY' });
  });

  it('refuses a destination nested in the source, or the reverse', () => {
    const src = tmp();
    expect(() =>
      job({
        source: new LocalStorage({ root: src }),
        destinations: [new LocalStorage({ root: join(src, 'archive') })],
      }),
    ).toThrow(expect.objectContaining({ code: 'E_CONFIG' }));
    expect(() =>
      job({
        source: new LocalStorage({ root: join(src, 'pacs') }),
        destinations: [new LocalStorage({ root: src })],
      }),
    ).toThrow(expect.objectContaining({ code: 'E_CONFIG' }));
  });

  it.each(['sync', 'async'] as const)(
    'follows symlinked source folders; a dangling one blocks mirror deletions below it (%s listing)',
    async (listMode) => {
      const src = tmp();
      const elsewhere = tmp();
      writeTree(src, { 'a.dcm': 'a' });
      writeTree(elsewhere, { '2019/x.dcm': 'x', '2019/y.dcm': 'y' });
      symlinkSync(join(elsewhere, '2019'), join(src, '2019'));
      const dst = new MemoryStorage();
      const j = job({
        source: new LocalStorage({ root: src, listMode }),
        destinations: [dst],
        mode: 'mirror',
        maxDelete: 100,
      });
      const r1 = await j.run();
      expect(r1).toMatchObject({ status: 'success', filesSynced: 3 });
      expect(dst.peek('2019/x.dcm')?.toString()).toBe('x');
      // The disk behind the link is not mounted: the link dangles.
      rmSync(join(elsewhere, '2019'), { recursive: true });
      const r2 = await j.run();
      expect(r2.filesDeleted).toBe(0);
      expect(dst.peek('2019/x.dcm')).toBeDefined();
      expect(r2.status).toBe('failed');
      expect(r2.errors[0]).toMatchObject({ path: '2019', code: 'E_NOT_FOUND' });
    },
  );

  it('a source that changed while being sent fails once (no retries) and is sent next run', async () => {
    class Growing extends MemoryStorage {
      grow = true;
      override async read(path: string, o?: Parameters<MemoryStorage['read']>[1]) {
        const r = await super.read(path, o);
        if (!this.grow) return r;
        const parts: Buffer[] = [];
        for await (const c of r) parts.push(c as Buffer);
        return Readable.from([Buffer.concat([...parts, Buffer.from('appended')])]);
      }
    }
    const src = new Growing();
    await src.write('a.dcm', Readable.from([Buffer.from('original')]));
    const dst = new MemoryStorage();
    const j = job({ source: src, destinations: [dst], smallFileBytes: 0 });
    const r = await j.run();
    expect(r.status).toBe('failed');
    expect(r.errors[0]).toMatchObject({ code: 'E_INTEGRITY', path: 'a.dcm' });
    expect(dst.calls.write).toBe(1);
    expect(dst.size).toBe(0);
    src.grow = false;
    expect((await j.run()).filesSynced).toBe(1);
  });

  it('a listener that throws does not change the outcome', async () => {
    const src = new MemoryStorage();
    await src.write('a.dcm', Readable.from([Buffer.from('a')]));
    const j = job({ source: src, destinations: [new MemoryStorage()] });
    j.on('file:done', () => {
      throw new Error('listener bug');
    });
    j.on('run:done', () => {
      throw new Error('listener bug');
    });
    const r = await j.run();
    expect(r).toMatchObject({ status: 'success', filesSynced: 1, filesFailed: 0 });
  });

  it('events carry neither real paths nor native causes unless eventPaths is set', async () => {
    const src = tmp();
    writeTree(src, { 'Doe John/1.dcm': 'x' });
    const dst = new MemoryStorage();
    dst.faults.failNext(
      'write',
      1,
      new MedsyncError('E_PERMISSION', 'Permission denied.', {
        path: 'Doe John/1.dcm',
        cause: new Error("open '/srv/Doe John/1.dcm'"),
      }),
    );
    const j = new SyncJob({
      id: 'j',
      source: new LocalStorage({ root: src }),
      destinations: [dst],
      store: new MemoryStore(),
    });
    const seen: string[] = [];
    j.on('file:failed', (e) =>
      seen.push(JSON.stringify({ ...e, error: { ...e.error.toJSON(), cause: String(e.error.cause) } })),
    );
    j.on('run:done', (e) => seen.push(JSON.stringify(e.result.errors)));
    const r = await j.run();
    expect(r.errors[0]?.path).toBe('Doe John/1.dcm');
    expect(seen.join('\n')).not.toContain('Doe');
  });
});

describe('SyncJob mirror', () => {
  async function mirrored(files: Record<string, Buffer | string>, extra: Partial<SyncJobOptions> = {}) {
    const src = tmp();
    const dst = tmp();
    writeTree(src, files);
    const store = new MemoryStore();
    const dest: Storage = new LocalStorage({ root: dst });
    const j = job(
      { source: new LocalStorage({ root: src }), destinations: [dest], mode: 'mirror', ...extra },
      store,
    );
    expect((await j.run()).status).toBe('success');
    return { src, dst, j, store, dest };
  }

  const ten = () =>
    Object.fromEntries(Array.from({ length: 10 }, (_, i) => [`d/${i}.dcm`, randomBytes(100 + i)]));

  it('deletes what the source lost, and only what the job delivered', async () => {
    const { src, dst, j } = await mirrored(ten());
    writeTree(dst, { 'not-ours.txt': 'placed by someone else' });
    rmSync(join(src, 'd/3.dcm'));
    rmSync(join(src, 'd/4.dcm'));
    const r = await j.run();
    expect(r).toMatchObject({ status: 'success', filesDeleted: 2 });
    const left = readTree(dst);
    expect(left['not-ours.txt']).toBeDefined();
    delete left['not-ours.txt'];
    expect(left).toEqual(readTree(src));
  });

  it('refuses to delete more than half of what it delivered by default, and more than maxDelete', async () => {
    const { src, dst, j } = await mirrored(ten());
    for (let i = 0; i < 6; i++) rmSync(join(src, `d/${i}.dcm`));
    const r = await j.run();
    expect(r.status).toBe('failed');
    expect(r.filesDeleted).toBe(0);
    expect(r.plan.deletesRefused).toBe(6);
    expect(r.errors[0]).toMatchObject({ code: 'E_SAFETY' });
    expect(Object.keys(readTree(dst))).toHaveLength(10);
    const small = await mirrored(ten(), { maxDelete: 1 });
    rmSync(join(small.src, 'd/0.dcm'));
    rmSync(join(small.src, 'd/1.dcm'));
    writeFileSync(join(small.src, 'd/new.dcm'), 'new');
    const r2 = await small.j.run();
    expect(r2.status).toBe('partial');
    expect(r2.filesSynced).toBe(1);
    expect(r2.filesDeleted).toBe(0);
  });

  it('refuses to run when the source is empty (an unmounted share)', async () => {
    const { src, dst, j } = await mirrored(ten());
    rmSync(src, { recursive: true });
    mkdirSync(src);
    const r = await j.run();
    expect(r.status).toBe('failed');
    expect(r.errors[0]?.code).toBe('E_SAFETY');
    expect(Object.keys(readTree(dst))).toHaveLength(10);
    rmSync(src, { recursive: true });
    const r2 = await j.run();
    expect(r2.status).toBe('failed');
    expect(r2.errors[0]?.code).toBe('E_NOT_FOUND');
    expect(Object.keys(readTree(dst))).toHaveLength(10);
  });

  it('when the moved file is gone at the destination, sends the new path instead', async () => {
    const files = ten();
    const src = tmp();
    writeTree(src, files);
    const dst = new MemoryStorage();
    const j = job({ source: new LocalStorage({ root: src }), destinations: [dst], mode: 'mirror' });
    await j.run();
    renameSync(join(src, 'd/2.dcm'), join(src, 'd/two.dcm'));
    await dst.remove('d/2.dcm');
    const r = await j.run();
    expect(r).toMatchObject({ status: 'success', filesSynced: 1, filesFailed: 0 });
    expect(dst.peek('d/two.dcm')?.equals(files['d/2.dcm'] as Buffer)).toBe(true);
    expect((await j.run()).filesSynced).toBe(0);
  });

  it('a rename in letter case only (file or folder) never deletes the new file at a case-insensitive destination', async () => {
    const cases: Array<[string, string]> = [
      ['d/scan.dcm', 'd/SCAN.dcm'],
      ['STUDY/x.dcm', 'study/x.dcm'],
    ];
    for (const [before, after] of cases) {
      for (const caseInsensitive of [true, false]) {
        const src = tmp();
        writeTree(src, { [before]: 'old bytes', 'other.dcm': 'x' });
        const dst = new MemoryStorage({ caseInsensitive });
        const store = new MemoryStore();
        // Moves off: the new spelling is an upload, and the old one would be a delete.
        const j = job(
          {
            source: new LocalStorage({ root: src }),
            destinations: [dst],
            mode: 'mirror',
            detectMoves: false,
          },
          store,
        );
        await j.run();
        rmSync(join(src, before.split('/')[0]!), { recursive: true });
        writeTree(src, { [after]: 'new bytes!' });
        const r = await j.run();
        expect(r).toMatchObject({ status: 'success', filesSynced: 1, filesFailed: 0, filesDeleted: 0 });
        expect(dst.peek(after)?.toString()).toBe('new bytes!');
        const listed: string[] = [];
        for await (const e of dst.list('')) listed.push(e.path);
        expect(listed.sort()).toEqual([after, 'other.dcm'].sort());
        const known: string[] = [];
        for await (const m of store.manifest.list({ jobId: j.id, destination: dst.id })) known.push(m.path);
        expect(known.sort()).toEqual([after, 'other.dcm'].sort());
        expect(await j.run()).toMatchObject({ status: 'success', filesSynced: 0, filesDeleted: 0 });
        expect(dst.peek(after)?.toString()).toBe('new bytes!');
      }
    }
  });

  it('two source names that differ only in case: a case-insensitive destination keeps the one it had', async () => {
    const src = tmp();
    writeTree(src, { 'p/a.dcm': 'first', 'p/b.dcm': 'b' });
    const dst = new MemoryStorage({ caseInsensitive: true });
    const j = job({ source: new LocalStorage({ root: src }), destinations: [dst] });
    expect((await j.run()).filesSynced).toBe(2);
    // A second file whose name differs only in case: it would overwrite the first there.
    writeTree(src, { 'p/A.dcm': 'second', 'p/c.dcm': 'c' });
    const r = await j.run();
    expect(r).toMatchObject({ status: 'partial', filesSynced: 1, filesFailed: 1 });
    expect(r.errors).toEqual([expect.objectContaining({ code: 'E_EXISTS', path: 'p/A.dcm' })]);
    expect(r.errors[0]!.message).not.toContain('A.dcm');
    expect(dst.peek('p/a.dcm')?.toString()).toBe('first');
    expect(dst.peek('p/c.dcm')?.toString()).toBe('c');
    // A case-sensitive destination takes both.
    const both = new MemoryStorage();
    const k = job({ id: 'k', source: new LocalStorage({ root: src }), destinations: [both] });
    expect(await k.run()).toMatchObject({ status: 'success', filesSynced: 4 });
  });

  /**
   * A MemoryStorage that folds case (like a FAT drive or a Windows server) or not, while declaring
   * `caseInsensitive: false` with `caseInsensitiveVaries`; it records every path written.
   */
  function varyingCase(folds: boolean): MemoryStorage & { written: string[] } {
    const dst = new MemoryStorage({ caseInsensitive: folds });
    Object.assign(dst, {
      capabilities: { ...dst.capabilities, caseInsensitive: false, caseInsensitiveVaries: true },
    });
    const write = dst.write.bind(dst);
    const written: string[] = [];
    dst.write = (path, body, o) => {
      written.push(path);
      return write(path, body, o);
    };
    return Object.assign(dst, { written });
  }
  /** The case probes written to `dst`, after checking that none of them is left there. */
  const probesOf = (dst: MemoryStorage & { written: string[] }): number => {
    const probes = dst.written.filter((p) => /medsync-case-probe/i.test(p));
    for (const p of probes) expect(dst.peek(p)).toBeUndefined();
    return probes.length;
  };

  it('a destination that folds case without declaring it is asked before two such names are sent', async () => {
    const src = tmp();
    writeTree(src, { 'p/a.dcm': 'first', 'p/A.dcm': 'second', 'p/b.dcm': 'b' });
    const dst = varyingCase(true);
    const j = job({ source: new LocalStorage({ root: src }), destinations: [dst] });
    const r = await j.run();
    // One of the two is kept (the first in code-point order: `A` sorts before `a`); the other
    // would have overwritten it there.
    expect(r).toMatchObject({ status: 'partial', filesSynced: 2, filesFailed: 1 });
    expect(r.errors).toEqual([expect.objectContaining({ code: 'E_EXISTS', path: 'p/a.dcm' })]);
    expect(dst.peek('p/A.dcm')?.toString()).toBe('second');
    // Two probe files whose names differ only in case, both removed.
    expect(probesOf(dst)).toBe(2);
    // `p/a.dcm` is still to send, so the next run asks again.
    writeTree(src, { 'p/c.dcm': 'c' });
    const r2 = await j.run();
    expect(r2).toMatchObject({ status: 'partial', filesSynced: 1, filesFailed: 1 });
    expect(r2.errors).toEqual([expect.objectContaining({ code: 'E_EXISTS', path: 'p/a.dcm' })]);
    expect(probesOf(dst)).toBe(4);
    expect(dst.peek('p/A.dcm')?.toString()).toBe('second');
  });

  it('a destination whose kind may fold case but this one does not takes both names; asked only when such names are to be sent', async () => {
    const src = tmp();
    writeTree(src, { 'p/a.dcm': 'first', 'p/A.dcm': 'second' });
    const dst = varyingCase(false);
    const j = job({ source: new LocalStorage({ root: src }), destinations: [dst] });
    expect(await j.run()).toMatchObject({ status: 'success', filesSynced: 2 });
    expect(dst.peek('p/a.dcm')?.toString()).toBe('first');
    expect(dst.peek('p/A.dcm')?.toString()).toBe('second');
    expect(probesOf(dst)).toBe(2);
    // A new file with no twin, then no change: nothing asked.
    writeTree(src, { 'p/b.dcm': 'b' });
    expect(await j.run()).toMatchObject({ status: 'success', filesSynced: 1 });
    expect(await j.run()).toMatchObject({ status: 'success', filesSynced: 0 });
    expect(probesOf(dst)).toBe(2);
    // A new twin of a delivered file: asked again.
    writeTree(src, { 'p/B.dcm': 'B' });
    expect(await j.run()).toMatchObject({ status: 'success', filesSynced: 1 });
    expect(dst.peek('p/b.dcm')?.toString()).toBe('b');
    expect(probesOf(dst)).toBe(4);
  });

  it('a destination that cannot be asked whether it folds case gets only one of two such names, the rest as usual', async () => {
    const src = tmp();
    writeTree(src, { 'p/a.dcm': 'first', 'p/A.dcm': 'second', 'p/b.dcm': 'b' });
    const dst = varyingCase(false);
    // The probe is the first write of a first run (planning comes before the transfers).
    dst.faults.failNext('write', 1, new MedsyncError('E_PERMISSION', 'Refused.'));
    const warned: string[] = [];
    const logger = {
      ...noopLogger,
      warn: (m: string, f?: object) => warned.push(`${m} ${JSON.stringify(f)}`),
    };
    const j = job({ source: new LocalStorage({ root: src }), destinations: [dst], logger });
    const r = await j.run();
    expect(r).toMatchObject({ status: 'partial', filesSynced: 2, filesFailed: 1 });
    expect(r.errors[0]).toMatchObject({ code: 'E_EXISTS', path: 'p/a.dcm' });
    expect(dst.peek('p/A.dcm')?.toString()).toBe('second');
    expect(warned.join('\n')).toContain('letter case');
    expect(warned.join('\n')).not.toContain('a.dcm');
  });

  it('refused credentials while asking end the destination at once: one error, no other call', async () => {
    const src = tmp();
    writeTree(src, { 'p/a.dcm': 'first', 'p/A.dcm': 'second' });
    const dst = varyingCase(false);
    dst.faults.failNext('write', 1, new MedsyncError('E_AUTH', 'The server refused the login.'));
    const j = job({ source: new LocalStorage({ root: src }), destinations: [dst] });
    const r = await j.run();
    expect(r).toMatchObject({ status: 'failed', filesSynced: 0 });
    expect(r.errors).toEqual([expect.objectContaining({ code: 'E_AUTH', destination: dst.id })]);
    expect(dst.calls).toMatchObject({ write: 1, list: 0, stat: 0, remove: 0 });
  });

  it('a dry run writes nothing to ask a destination: the declaration stands', async () => {
    const src = tmp();
    writeTree(src, { 'p/a.dcm': 'first', 'p/A.dcm': 'second' });
    const dst = varyingCase(true);
    const j = job({ source: new LocalStorage({ root: src }), destinations: [dst] });
    const plan = await j.run({ dryRun: true });
    expect(plan.plan.uploads).toBe(2);
    expect(dst.calls).toMatchObject({ write: 0, remove: 0 });
  });

  /**
   * A job whose manifest holds `p/a.dcm` and `p/A.dcm` as two delivered files on a destination
   * that folds case (one file there): sent by a version that took the destination's kind's word
   * (`caseInsensitive: false`, nothing varying), as before the destination was asked.
   */
  async function heldTwins(mode: 'copy' | 'mirror', folds = true, logger = noopLogger) {
    const src = tmp();
    writeTree(src, { 'p/a.dcm': 'first', 'p/A.dcm': 'second!', 'p/b.dcm': 'b' });
    const dst = varyingCase(folds);
    const declared = dst.capabilities;
    Object.assign(dst, { capabilities: { ...declared, caseInsensitiveVaries: false } });
    const store = new MemoryStore();
    const j = job(
      { source: new LocalStorage({ root: src }), destinations: [dst], mode, concurrency: 1, logger },
      store,
    );
    expect(await j.run()).toMatchObject({ status: 'success', filesSynced: 3 });
    Object.assign(dst, { capabilities: declared });
    const held = async () => {
      const known: string[] = [];
      for await (const m of store.manifest.list({ jobId: j.id, destination: dst.id })) known.push(m.path);
      return known.sort();
    };
    expect(await held()).toEqual(['p/A.dcm', 'p/a.dcm', 'p/b.dcm']);
    return { src, dst, store, j, held };
  }

  it('names the manifest holds as two files on a destination that folds case: the one file is sent again, the twin fails E_EXISTS', async () => {
    const warned: string[] = [];
    const { dst, j, held } = await heldTwins('copy', true, {
      ...noopLogger,
      warn: (m: string, f?: object) => warned.push(`${m} ${JSON.stringify(f)}`),
    });
    const r = await j.run();
    // `A` sorts before `a`: `p/A.dcm` is kept (sent again: the file there may hold the other's
    // bytes), `p/a.dcm` fails as a twin sent for the first time would.
    expect(r).toMatchObject({ status: 'partial', filesSynced: 1, filesFailed: 1, filesDeleted: 0 });
    expect(r.errors).toEqual([expect.objectContaining({ code: 'E_EXISTS', path: 'p/a.dcm' })]);
    expect(dst.peek('p/A.dcm')?.toString()).toBe('second!');
    expect(await held()).toEqual(['p/A.dcm', 'p/b.dcm']);
    expect(probesOf(dst)).toBe(2);
    expect(warned.join('\n')).toContain('letter case');
    expect(warned.join('\n')).not.toContain('a.dcm');
    // Then as for any twin still at the source: asked again, nothing sent twice.
    expect(await j.run()).toMatchObject({ status: 'failed', filesSynced: 0, filesFailed: 1 });
    expect(dst.peek('P/A.DCM')?.toString()).toBe('second!');
  });

  it('mirror: removing one of two names the manifest holds as one file there never deletes that file', async () => {
    const { src, dst, j, held } = await heldTwins('mirror');
    rmSync(join(src, 'p/A.dcm'));
    const r = await j.run();
    expect(r).toMatchObject({ status: 'success', filesSynced: 1, filesDeleted: 0 });
    expect(dst.peek('p/a.dcm')?.toString()).toBe('first');
    expect(await held()).toEqual(['p/a.dcm', 'p/b.dcm']);
    expect(await j.run()).toMatchObject({ status: 'success', filesSynced: 0, filesDeleted: 0 });
    // Both gone from the source: the one file is deleted once.
    rmSync(join(src, 'p/a.dcm'));
    expect(await j.run()).toMatchObject({ status: 'success', filesSynced: 0, filesDeleted: 1 });
    expect(dst.peek('p/a.dcm')).toBeUndefined();
    expect(dst.peek('p/b.dcm')?.toString()).toBe('b');
    expect(await held()).toEqual(['p/b.dcm']);
  });

  it('names the manifest holds that differ only in case stay as they are where the destination tells them apart (asked once), and a dry run changes nothing', async () => {
    const { src, dst, j, held } = await heldTwins('mirror', false);
    const plan = await j.run({ dryRun: true });
    expect(plan.plan).toMatchObject({ uploads: 0, deletes: 0 });
    expect(probesOf(dst)).toBe(0);
    expect(await j.run()).toMatchObject({ status: 'success', filesSynced: 0, filesDeleted: 0 });
    expect(probesOf(dst)).toBe(2);
    rmSync(join(src, 'p/A.dcm'));
    expect(await j.run()).toMatchObject({ status: 'success', filesSynced: 0, filesDeleted: 1 });
    expect(dst.peek('p/a.dcm')?.toString()).toBe('first');
    expect(dst.peek('p/A.dcm')).toBeUndefined();
    expect(await held()).toEqual(['p/a.dcm', 'p/b.dcm']);
    // Asked once for the manifest, and once more before deleting a name that has a twin.
    expect(probesOf(dst)).toBe(4);
  });

  it('mirror after a case-only rename recorded in copy mode: the old spelling is not deleted where it is the same file', async () => {
    for (const folds of [true, false]) {
      const src = tmp();
      writeTree(src, { 'p/a.dcm': 'scan', 'p/b.dcm': 'b' });
      const dst = varyingCase(folds);
      const store = new MemoryStore();
      const make = (mode: 'copy' | 'mirror') =>
        job({ id: 'renamed', source: new LocalStorage({ root: src }), destinations: [dst], mode }, store);
      expect(await make('copy').run()).toMatchObject({ status: 'success', filesSynced: 2 });
      renameSync(join(src, 'p/a.dcm'), join(src, 'p/A.dcm'));
      // Copy mode sends the new spelling and deletes nothing: both names are recorded.
      expect(await make('copy').run()).toMatchObject({ status: 'success', filesSynced: 1 });
      const r = await make('mirror').run();
      const known: string[] = [];
      for await (const m of store.manifest.list({ jobId: 'renamed', destination: dst.id }))
        known.push(m.path);
      expect(known.sort()).toEqual(['p/A.dcm', 'p/b.dcm']);
      if (folds) {
        // One file there for both names: it stays, with the new spelling's bytes.
        expect(r).toMatchObject({ status: 'success', filesDeleted: 0 });
        expect(dst.peek('p/A.dcm')?.toString()).toBe('scan');
      } else {
        expect(r).toMatchObject({ status: 'success', filesDeleted: 1 });
        expect(dst.peek('p/a.dcm')).toBeUndefined();
        expect(dst.peek('p/A.dcm')?.toString()).toBe('scan');
      }
      expect(await make('mirror').run()).toMatchObject({
        status: 'success',
        filesSynced: 0,
        filesDeleted: 0,
      });
    }
  });

  it('names the manifest holds as one file there, none left at the source: the file is deleted once, and no move takes its digests', async () => {
    const { src, dst, j, held } = await heldTwins('mirror');
    // The twins move to another folder: without their digests, no rename takes the one file for
    // either of them (it holds whichever was written last).
    mkdirSync(join(src, 'q'));
    renameSync(join(src, 'p/a.dcm'), join(src, 'q/a.dcm'));
    renameSync(join(src, 'p/A.dcm'), join(src, 'q/A.dcm'));
    const r = await j.run();
    expect(r).toMatchObject({ filesFailed: 1, filesDeleted: 1, filesMoved: 0 });
    expect(r.errors).toEqual([expect.objectContaining({ code: 'E_EXISTS', path: 'q/a.dcm' })]);
    expect(dst.peek('p/a.dcm')).toBeUndefined();
    expect(dst.peek('q/A.dcm')?.toString()).toBe('second!');
    expect(await held()).toEqual(['p/b.dcm', 'q/A.dcm']);
  });

  it('a retry of some files does not check the manifest for names that differ only in case, and an unanswered probe is not remembered', async () => {
    const { dst, j, held } = await heldTwins('copy');
    // Only some files: the rest of the source is unknown to this run.
    await j.run({ only: ['p/b.dcm'] });
    expect(probesOf(dst)).toBe(0);
    expect(await held()).toEqual(['p/A.dcm', 'p/a.dcm', 'p/b.dcm']);
    // The probe fails: nothing is forgotten, and the next run asks again.
    dst.faults.failNext('write', 1, new MedsyncError('E_PERMISSION', 'Refused.'));
    expect(await j.run()).toMatchObject({ status: 'success', filesSynced: 0 });
    expect(await held()).toEqual(['p/A.dcm', 'p/a.dcm', 'p/b.dcm']);
    const r = await j.run();
    expect(r).toMatchObject({ status: 'partial', filesSynced: 1, filesFailed: 1 });
  });

  it('a local destination on a case-sensitive file system takes both names, and no probe stays there', async () => {
    const src = tmp();
    const out = tmp();
    writeTree(src, { 'p/a.dcm': 'first', 'p/A.dcm': 'second' });
    // Where the temporary folder itself folds case (macOS, Windows) there is no such source.
    if (Object.keys(readTree(src)).length < 2) return;
    const j = job({
      source: new LocalStorage({ root: src }),
      destinations: [new LocalStorage({ root: out })],
    });
    expect(await j.run()).toMatchObject({ status: 'success', filesSynced: 2 });
    // readTree lists hidden files too.
    expect(readTree(out)).toEqual(readTree(src));
    writeTree(src, { 'p/b.dcm': 'b', 'p/B.dcm': 'B' });
    expect(await j.run()).toMatchObject({ status: 'success', filesSynced: 2 });
    expect(readTree(out)).toEqual(readTree(src));
  });

  it('records delivered files in one waiting batch while a slow flush runs, not one batch per 256 files', async () => {
    const files: Record<string, string> = {};
    for (let i = 0; i < 2600; i++) files[`d${i % 7}/f${i}.dcm`] = `file ${i}`;
    const src = new MemoryStorage();
    for (const [p, b] of Object.entries(files)) await src.write(p, Buffer.from(b));
    const order: string[] = [];
    // The first flush waits until every file has been delivered.
    const dst = new FirstFlushWaits();
    dst.onFlush = (n) => order.push(`flush ${n}`);
    const store = new MemoryStore();
    const put = store.manifest.put.bind(store.manifest);
    const sizes: number[] = [];
    store.manifest.put = async (e) => {
      const n = Array.isArray(e) ? e.length : 1;
      sizes.push(n);
      order.push(`put ${n}`);
      return put(e);
    };
    const j = job({ source: src, destinations: [dst], concurrency: 8 }, store);
    releaseAfter(j, dst, 2600);
    expect(await j.run()).toMatchObject({ status: 'success', filesSynced: 2600 });
    // The first batch of 256 waited on the slow flush; everything delivered meanwhile went in one
    // more batch (before: a chain of 256-record batches, each holding its records in memory),
    // written in parts of at most 1024 records, all covered by one flush.
    expect(sizes).toEqual([256, 1024, 1024, 296]);
    // Each batch was written after a flush that began once its files were written (the run's
    // last flush finds nothing left to record).
    expect(order.slice(0, 6)).toEqual(['flush 1', 'put 256', 'flush 2', 'put 1024', 'put 1024', 'put 296']);
    expect(order.slice(6).every((x) => x.startsWith('flush'))).toBe(true);
    for await (const m of store.manifest.list({ jobId: 'job-1', destination: dst.id }))
      expect(m.size).toBe(Buffer.byteLength(files[m.path]!));
    expect(await recorded(store, dst)).toBe(2600);
  });

  it('a manifest write that fails for good ends the run partial; the next run adopts the unrecorded files instead of resending them', async () => {
    const src = new MemoryStorage();
    for (let i = 0; i < 700; i++) await src.write(`d${i % 5}/f${i}.dcm`, Buffer.from(`file ${i}`));
    const dst = new FirstFlushWaits();
    const store = new MemoryStore();
    const put = store.manifest.put.bind(store.manifest);
    let puts = 0;
    store.manifest.put = async (e) => {
      if (++puts === 2) throw new MedsyncError('E_PERMISSION', 'The state database is read-only.');
      return put(e);
    };
    const j = job({ source: src, destinations: [dst], concurrency: 8 }, store);
    releaseAfter(j, dst, 700);
    const r = await j.run();
    expect(puts).toBe(2);
    expect(r.status).toBe('partial');
    expect(r.errors).toEqual([expect.objectContaining({ code: 'E_PERMISSION' })]);
    expect(await recorded(store, dst)).toBe(256);
    // Every file is at the destination; the next run records the rest from there, sends nothing.
    const writes = dst.calls.write;
    const again = await j.run();
    expect(again).toMatchObject({ status: 'success', filesSynced: 0, filesSkipped: 700 });
    expect(dst.calls.write).toBe(writes);
    expect(await recorded(store, dst)).toBe(700);
    expect(await store.settings.get('sync:job-1:adopt')).toBeUndefined();
  });

  it('after a destination flush that failed for good, the unrecorded files are sent again, not adopted', async () => {
    const src = new MemoryStorage();
    for (let i = 0; i < 100; i++) await src.write(`old/f${i}.dcm`, Buffer.from(`old ${i}`));
    let failFlush = false;
    class BadFlush extends MemoryStorage {
      async flush(): Promise<void> {
        if (failFlush) throw new MedsyncError('E_PERMISSION', 'The folder cannot be synced.');
      }
    }
    const dst = new BadFlush();
    const store = new MemoryStore();
    const j = job({ source: src, destinations: [dst], concurrency: 4 }, store);
    expect(await j.run()).toMatchObject({ status: 'success', filesSynced: 100 });
    for (let i = 0; i < 50; i++) await src.write(`new/f${i}.dcm`, Buffer.from(`new ${i}`));
    failFlush = true;
    const r = await j.run();
    expect(r.errors).toEqual(expect.arrayContaining([expect.objectContaining({ code: 'E_PERMISSION' })]));
    expect(await recorded(store, dst)).toBe(100);
    expect(await store.settings.get('sync:job-1:adopt')).toBeUndefined();
    failFlush = false;
    const writes = dst.calls.write;
    const landed = [...Array(50).keys()].filter((i) => dst.peek(`new/f${i}.dcm`) !== undefined).length;
    expect(landed).toBeGreaterThan(0);
    // Nothing says the landed ones are durable: all 50 are sent (again).
    expect(await j.run()).toMatchObject({ status: 'success', filesSynced: 50, filesSkipped: 100 });
    expect(dst.calls.write - writes).toBe(50);
  });

  it('a move is made durable at the destination before the manifest records it', async () => {
    const src = tmp();
    writeTree(src, { 'a/one.dcm': randomBytes(3000), 'a/two.dcm': randomBytes(3001) });
    const dstRoot = tmp();
    const events: string[] = [];
    class Spy extends LocalStorage {
      override async rename(from: string, to: string, o?: Parameters<LocalStorage['rename']>[2]) {
        await super.rename(from, to, o);
        events.push(`rename ${to}`);
      }
      override async flush(o?: Parameters<LocalStorage['flush']>[0]) {
        events.push('flush');
        await super.flush(o);
      }
    }
    const store = new MemoryStore();
    const put = store.manifest.put.bind(store.manifest);
    store.manifest.put = async (e) => {
      for (const x of Array.isArray(e) ? e : [e]) events.push(`record ${x.path}`);
      return put(e);
    };
    const j = job(
      { source: new LocalStorage({ root: src }), destinations: [new Spy({ root: dstRoot })], mode: 'mirror' },
      store,
    );
    await j.run();
    mkdirSync(join(src, 'b'));
    renameSync(join(src, 'a/one.dcm'), join(src, 'b/one.dcm'));
    events.length = 0;
    expect(await j.run()).toMatchObject({ status: 'success', filesMoved: 1, filesSynced: 0 });
    const renamed = events.indexOf('rename b/one.dcm');
    const recorded = events.indexOf('record b/one.dcm');
    expect(renamed).toBeGreaterThanOrEqual(0);
    expect(recorded).toBeGreaterThan(renamed);
    expect(events.slice(renamed, recorded)).toContain('flush');
  });

  it('detects a move by content hash and renames at the destination instead of re-uploading', async () => {
    const files = ten();
    const src = tmp();
    writeTree(src, files);
    const dst = new MemoryStorage();
    const j = job({ source: new LocalStorage({ root: src }), destinations: [dst], mode: 'mirror' });
    await j.run();
    mkdirSync(join(src, 'moved'));
    renameSync(join(src, 'd/7.dcm'), join(src, 'moved/seven.dcm'));
    const writes = dst.calls.write;
    const r = await j.run();
    expect(r).toMatchObject({ status: 'success', filesMoved: 1, filesSynced: 0, filesDeleted: 0 });
    expect(dst.calls.write).toBe(writes);
    expect(dst.calls.rename).toBe(1);
    expect(dst.peek('moved/seven.dcm')?.equals(files['d/7.dcm'] as Buffer)).toBe(true);
    expect(dst.peek('d/7.dcm')).toBeUndefined();
    expect((await j.run()).filesSynced).toBe(0);
  });
});
