/**
 * A hashing worker that dies while a large file streams to the destination: the file is sent
 * again (hashed on the main thread this time) and arrives whole, with the right digests in the
 * manifest. Its own file: the process's shared hashing pool stays broken afterwards.
 */
import { createHash, randomBytes } from 'node:crypto';
import { Readable, Transform } from 'node:stream';
import { expect, it } from 'vitest';
import { MemoryStore, SyncJob, type Storage } from '@medsync/core';
import { createMemoryStorage } from '@medsync/core/testing';
import { sharedHashPool } from '../src/util/hash-pool.js';

// Off-thread stream hashing is on by default only with more than 2 cores; this file needs it.
process.env.MEDSYNC_HASH_STREAMS = '1';

it('a hashing worker that dies mid-file: the file is retried, hashed inline, and delivered whole', async () => {
  const body = randomBytes(20_000_000); // over smallFileBytes (8 MiB): streamed, hashed off-thread
  const source = createMemoryStorage();
  await source.write('study/big.dcm', body, { size: body.length });
  let killed = false;
  // The source's stream kills the pool's worker once the first chunk went through.
  const src = new Proxy(source, {
    get(t, k) {
      if (k === 'read') {
        return async (...args: Parameters<Storage['read']>): Promise<Readable> => {
          const r = await t.read(...args);
          return r.pipe(
            new Transform({
              transform(chunk, _e, cb) {
                if (!killed) {
                  killed = true;
                  const pool = sharedHashPool() as unknown as { workers: { terminate(): Promise<number> }[] };
                  expect(pool.workers.length).toBeGreaterThan(0);
                  void pool.workers[0]!.terminate().then(() => cb(null, chunk));
                  return;
                }
                cb(null, chunk);
              },
            }),
          );
        };
      }
      const v = Reflect.get(t, k, t) as unknown;
      return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(t) : v;
    },
  }) as Storage;
  const dest = createMemoryStorage();
  const store = new MemoryStore();
  const fast = { retries: 3, initialDelayMs: 1, jitter: 0 };
  const job = new SyncJob({
    id: 'hw',
    source: src,
    destinations: [dest],
    store,
    retry: fast,
    scheduledRetry: fast,
  });
  const retries: string[] = [];
  job.on('file:retry', (e) => retries.push(e.error.code));
  const r = await job.run();
  expect(killed).toBe(true);
  expect(r).toMatchObject({ status: 'success', filesSynced: 1 });
  expect(retries).toEqual(['E_IO']);
  expect((await dest.readBuffer('study/big.dcm')).equals(body)).toBe(true);
  const m = await store.manifest.get({ jobId: 'hw', destination: dest.id }, 'study/big.dcm');
  expect(m?.sha256).toBe(createHash('sha256').update(body).digest('hex'));
  expect(m?.md5).toBe(createHash('md5').update(body).digest('hex'));
});
