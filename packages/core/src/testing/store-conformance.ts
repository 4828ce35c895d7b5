import { randomUUID } from 'node:crypto';
import { resolveTestApi, type TestApi } from './test-api.js';
import type { ManifestEntry, RunRecord, Store } from '../store/types.js';

export interface StoreFixture {
  store: Store;
  /** Closes nothing; opens the same durable state again (after `store.close()`). */
  reopen?(): Promise<Store>;
  /** A second, independent handle on the same state (another process's view), for concurrency. */
  openAnother?(): Promise<Store>;
  cleanup?(): Promise<void>;
}

export interface StoreConformanceOptions {
  /** Test-runner functions; default: the runner's globals (see {@link TestApi}). */
  api?: TestApi;
  name: string;
  create(): Promise<StoreFixture>;
  timeoutMs?: number;
}

/** A manifest entry for tests. */
export function manifestEntry(path: string, over: Partial<ManifestEntry> = {}): ManifestEntry {
  return {
    jobId: 'job-a',
    destination: 'file:///dest',
    path,
    size: 100,
    mtimeMs: 1_700_000_000_123,
    md5: 'd41d8cd98f00b204e9800998ecf8427e',
    sha256: 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855',
    verifiedBy: 'size',
    deliveredAt: 1_700_000_100_000,
    ...over,
  };
}

/** A run record for tests. */
export function runRecord(over: Partial<RunRecord> = {}): RunRecord {
  return {
    id: randomUUID(),
    jobId: 'job-a',
    trigger: 'manual',
    status: 'running',
    owner: 'test',
    startedAt: 1_700_000_000_000,
    filesSynced: 0,
    filesSkipped: 0,
    filesFailed: 0,
    filesDeleted: 0,
    filesMoved: 0,
    bytes: 0,
    errors: [],
    errorCount: 0,
    dryRun: false,
    ...over,
  };
}

const scope = { jobId: 'job-a', destination: 'file:///dest' };

async function collect<T>(it: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const x of it) out.push(x);
  return out;
}

/** The Store contract, as named vitest tests; every Store implementation runs it. */
export function describeStoreConformance(o: StoreConformanceOptions): void {
  const timeout = o.timeoutMs ?? 30_000;
  const { describe, it, expect, beforeEach, afterEach } = resolveTestApi(o.api);
  describe(`${o.name} store conformance`, () => {
    let f: StoreFixture;
    let s: Store;
    beforeEach(async () => {
      f = await o.create();
      s = f.store;
    }, timeout);
    afterEach(async () => {
      await s.close().catch(() => undefined);
      await f.cleanup?.();
    }, timeout);

    it(
      'Manifest: put, get, replace, remove, scopes kept apart',
      async () => {
        expect(await s.manifest.get(scope, 'a.dcm')).toBeUndefined();
        const e = manifestEntry('a.dcm', { remoteId: 'r1', md5: undefined });
        await s.manifest.put(e);
        expect(await s.manifest.get(scope, 'a.dcm')).toEqual({ ...e, md5: undefined });
        await s.manifest.put({ ...e, size: 200, verifiedBy: 'sha256' });
        expect((await s.manifest.get(scope, 'a.dcm'))?.size).toBe(200);
        await s.manifest.put(manifestEntry('a.dcm', { destination: 'ftp://h/x' }));
        await s.manifest.put(manifestEntry('a.dcm', { jobId: 'job-b' }));
        expect((await s.manifest.summary(scope)).files).toBe(1);
        await s.manifest.remove(scope, ['a.dcm', 'missing.dcm']);
        expect(await s.manifest.get(scope, 'a.dcm')).toBeUndefined();
        expect(await s.manifest.get({ ...scope, destination: 'ftp://h/x' }, 'a.dcm')).toBeDefined();
        expect(await s.manifest.get({ ...scope, jobId: 'job-b' }, 'a.dcm')).toBeDefined();
      },
      timeout,
    );

    it(
      'ManifestList: sorted by path, paged, by prefix, narrowed to some fields; summary, hash lookup and clear',
      async () => {
        const paths = Array.from({ length: 1234 }, (_, i) => `s${i % 7}/Pätient ${i}/img ${i}.dcm`);
        await s.manifest.put(
          paths.map((p, i) => manifestEntry(p, { size: i, sha256: i === 99 ? 'abc' : `h${i}` })),
        );
        const listed = await collect(s.manifest.list(scope, { pageSize: 100 }));
        expect(listed.map((e) => e.path)).toEqual([...paths].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0)));
        const pre = await collect(s.manifest.list(scope, { prefix: 's3/' }));
        expect(pre.length).toBe(paths.filter((p) => p.startsWith('s3/')).length);
        expect(pre.every((e) => e.path.startsWith('s3/'))).toBe(true);
        // A narrow list reads the named fields (and the path) with the same values.
        const brief = await collect(s.manifest.list(scope, { fields: ['size', 'mtimeMs'], pageSize: 500 }));
        expect(brief.map((e) => [e.path, e.size, e.mtimeMs])).toEqual(
          listed.map((e) => [e.path, e.size, e.mtimeMs]),
        );
        const sum = await s.manifest.summary(scope);
        expect(sum).toEqual({ files: 1234, bytes: (1233 * 1234) / 2 });
        const found = await s.manifest.findBySha256(scope, 'abc');
        expect(found.map((e) => e.path)).toEqual([paths[99]]);
        await s.manifest.clear(scope);
        expect((await s.manifest.summary(scope)).files).toBe(0);
      },
      timeout,
    );

    it(
      'Runs: insert, update, newest first, filters, stats and job ids',
      async () => {
        const r1 = runRecord({ startedAt: 1000, jobId: 'j1' });
        const r2 = runRecord({ startedAt: 2000, jobId: 'j1' });
        const r3 = runRecord({ startedAt: 3000, jobId: 'j2' });
        for (const r of [r1, r2, r3]) await s.runs.insert(r);
        await expect(s.runs.insert(r1)).rejects.toMatchObject({ code: 'E_EXISTS' });
        const errors = [
          {
            path: 'Ä/b c.dcm',
            destination: 'file:///d',
            code: 'E_PERMISSION',
            message: 'Permission denied.',
          },
        ];
        await s.runs.update({
          ...r1,
          status: 'partial',
          filesSynced: 5,
          filesFailed: 1,
          bytes: 5000,
          errors,
          errorCount: 1,
          finishedAt: 1500,
          durationMs: 500,
        });
        await s.runs.update({
          ...r2,
          status: 'success',
          filesSynced: 3,
          bytes: 300,
          finishedAt: 2100,
          durationMs: 100,
        });
        await s.runs.update({ ...r3, status: 'failed', finishedAt: 3100 });
        await expect(s.runs.update(runRecord())).rejects.toMatchObject({ code: 'E_NOT_FOUND' });
        expect((await s.runs.get(r1.id))?.errors).toEqual(errors);
        expect((await s.runs.get(r1.id))?.durationMs).toBe(500);
        expect((await s.runs.list()).map((r) => r.id)).toEqual([r3.id, r2.id, r1.id]);
        expect((await s.runs.list({ jobId: 'j1', limit: 1 })).map((r) => r.id)).toEqual([r2.id]);
        expect((await s.runs.list({ status: 'failed' })).map((r) => r.id)).toEqual([r3.id]);
        const st = await s.runs.stats('j1');
        expect(st).toMatchObject({
          totalRuns: 2,
          success: 1,
          partial: 1,
          failed: 0,
          filesSynced: 8,
          filesFailed: 1,
          bytes: 5300,
          lastRunAt: 2000,
          lastSuccessAt: 2000,
        });
        expect((await s.runs.stats()).totalRuns).toBe(3);
        expect(await s.runs.jobIds()).toEqual(['j1', 'j2']);
        await s.runs.insert(runRecord({ jobId: 'j1', dryRun: true, status: 'success' }));
        expect((await s.runs.stats('j1')).totalRuns).toBe(2);
      },
      timeout,
    );

    it(
      'Locks: one holder at a time, renew, release, expiry',
      async () => {
        expect(await s.locks.acquire('job', 'A', 1000, 10_000)).toBe(true);
        expect(await s.locks.acquire('job', 'B', 1000, 10_500)).toBe(false);
        expect(await s.locks.acquire('job', 'A', 1000, 10_500)).toBe(true);
        expect(await s.locks.get('job', 10_600)).toEqual({ name: 'job', owner: 'A', expiresAt: 11_500 });
        expect(await s.locks.renew('job', 'B', 1000, 10_600)).toBe(false);
        expect(await s.locks.renew('job', 'A', 5000, 10_600)).toBe(true);
        expect(await s.locks.acquire('job', 'B', 1000, 12_000)).toBe(false);
        expect(await s.locks.acquire('job', 'B', 1000, 15_601)).toBe(true);
        expect(await s.locks.renew('job', 'A', 1000, 15_700)).toBe(false);
        await s.locks.release('job', 'A');
        expect((await s.locks.get('job', 15_700))?.owner).toBe('B');
        await s.locks.release('job', 'B');
        expect(await s.locks.get('job', 15_700)).toBeUndefined();
        const wins = await Promise.all(
          Array.from({ length: 10 }, (_, i) => s.locks.acquire('race', `o${i}`, 60_000)),
        );
        expect(wins.filter(Boolean).length).toBe(1);
      },
      timeout,
    );

    it(
      'Settings: JSON values by key, prefix listing, delete',
      async () => {
        const v = {
          enabled: true,
          intervalMinutes: 120,
          nested: { list: [1, 'two', null] },
          secret: 'msenc:v1:x',
        };
        await s.settings.set('job:a', v);
        await s.settings.set('job:b', 42);
        await s.settings.set('other', 'text');
        expect(await s.settings.get('job:a')).toEqual(v);
        expect(await s.settings.get('missing')).toBeUndefined();
        expect((await s.settings.list('job:')).map((e) => e.key)).toEqual(['job:a', 'job:b']);
        await s.settings.set('job:b', false);
        expect(await s.settings.get('job:b')).toBe(false);
        await s.settings.delete('job:a');
        await s.settings.delete('job:a');
        expect(await s.settings.get('job:a')).toBeUndefined();
      },
      timeout,
    );

    it(
      'Audit: append-only, newest first, filters',
      async () => {
        await s.audit.append({
          at: 1,
          actor: 'cli',
          action: 'sync.run',
          subject: 'j1',
          details: { files: 3 },
        });
        await s.audit.append({ at: 2, actor: 'scheduler', action: 'job.disable', subject: 'j1' });
        await s.audit.append({ at: 3, actor: 'cli', action: 'sync.run', subject: 'j2' });
        const all = await s.audit.list();
        expect(all.map((e) => e.at)).toEqual([3, 2, 1]);
        expect(all[2]?.details).toEqual({ files: 3 });
        expect((await s.audit.list({ action: 'sync.run' })).length).toBe(2);
        expect((await s.audit.list({ since: 2 })).length).toBe(2);
        expect((await s.audit.list({ limit: 1 }))[0]?.at).toBe(3);
      },
      timeout,
    );

    it(
      'ConcurrentWriters: parallel writes from one and two handles all land',
      async () => {
        const other = f.openAnother ? await f.openAnother() : s;
        const writers = Array.from({ length: 100 }, (_, i) =>
          (i % 2 ? s : other).manifest.put(manifestEntry(`c/${i}.dcm`, { size: i })),
        );
        const runs = Array.from({ length: 20 }, (_, i) =>
          (i % 2 ? s : other).runs.insert(runRecord({ startedAt: i })),
        );
        const settings = Array.from({ length: 20 }, (_, i) => (i % 2 ? s : other).settings.set(`k${i}`, i));
        await Promise.all([...writers, ...runs, ...settings]);
        expect((await s.manifest.summary(scope)).files).toBe(100);
        expect((await s.runs.list()).length).toBe(20);
        expect((await other.settings.list('k')).length).toBe(20);
        if (other !== s) await other.close();
      },
      timeout,
    );

    it(
      'Reopen: closing and reopening keeps everything',
      async () => {
        if (!f.reopen) return;
        await s.manifest.put(manifestEntry('keep.dcm'));
        const r = runRecord({ status: 'success' });
        await s.runs.insert(r);
        await s.locks.acquire('held', 'A', 3_600_000);
        await s.settings.set('k', { v: 1 });
        await s.audit.append({ at: 5, actor: 'a', action: 'x' });
        await s.close();
        await expect(s.settings.get('k')).rejects.toMatchObject({ name: 'MedsyncError' });
        s = await f.reopen();
        expect(await s.manifest.get(scope, 'keep.dcm')).toEqual(manifestEntry('keep.dcm'));
        expect(await s.runs.get(r.id)).toEqual(r);
        expect((await s.locks.get('held'))?.owner).toBe('A');
        expect(await s.settings.get('k')).toEqual({ v: 1 });
        expect((await s.audit.list()).length).toBe(1);
      },
      timeout,
    );
  });
}
