import { createHash, randomBytes } from 'node:crypto';
import { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { describe, expect, it } from 'vitest';
import { HashPool } from '../src/util/hash-pool.js';
import { HashingStream } from '../src/util/streams.js';

const digestsOf = (buf: Buffer) => ({
  md5: createHash('md5').update(buf).digest('hex'),
  sha256: createHash('sha256').update(buf).digest('hex'),
});

/** Sends `chunks` through a HashingStream into a sink that can be slow; returns what arrived. */
async function through(h: HashingStream, chunks: Buffer[], slowSink = false): Promise<Buffer> {
  const got: Buffer[] = [];
  await pipeline(
    Readable.from(chunks),
    h,
    new Writable({
      write(chunk: Buffer, _e, cb) {
        got.push(chunk);
        if (slowSink) setTimeout(cb, 1);
        else cb();
      },
    }),
  );
  return Buffer.concat(got);
}

describe('hashing a stream on a worker thread', () => {
  it('gives the same digests and bytes as hashing inline, for chunks of every size', async () => {
    const pool = new HashPool(1, 64 * 1024, true);
    try {
      // Larger than the ring (16 × 256 KiB), chunks smaller and larger than a slot, and empty ones.
      const sizes = [0, 1, 1000, 512 * 1024, 512 * 1024 + 1, 9 * 1024 * 1024 + 7, 0, 65_536, 2_000_000];
      const chunks = sizes.map((n) => randomBytes(n));
      const all = Buffer.concat(chunks);
      const counted: number[] = [];
      const off = pool.stream(['md5', 'sha256']);
      expect(off).toBeDefined();
      const h = new HashingStream(['md5', 'sha256'], (n) => counted.push(n), undefined, undefined, off);
      const out = await through(h, chunks, true);
      expect(out.equals(all)).toBe(true);
      expect(h.bytes).toBe(all.length);
      expect(counted.reduce((a, b) => a + b, 0)).toBe(all.length);
      expect(h.result()).toEqual(digestsOf(all));
      // Two streams at once on the same worker keep their own state; a third hashes inline.
      const bodies = [randomBytes(9_000_000), randomBytes(1_500_000), randomBytes(10)];
      const hs = bodies.map(
        () => new HashingStream(['sha256'], undefined, undefined, undefined, pool.stream(['sha256'])),
      );
      await Promise.all(
        hs.map((x, i) => through(x, [bodies[i]!.subarray(0, 700_000), bodies[i]!.subarray(700_000)])),
      );
      hs.forEach((x, i) => expect(x.result()).toEqual({ sha256: digestsOf(bodies[i]!).sha256 }));
      expect(pool.stream(['sha256'])).toBeDefined(); // all released: off-thread again
      expect(pool.stream(['sha256'])).toBeDefined();
      expect(pool.stream(['sha256'])).toBeUndefined(); // two at a time
    } finally {
      await pool.close();
    }
  });

  it('a worker that dies fails the streams it was hashing; later streams hash inline', async () => {
    const pool = new HashPool(1, 64 * 1024, true);
    const off = pool.stream(['sha256'])!;
    const h = new HashingStream(['sha256'], undefined, undefined, undefined, off);
    const source = new Readable({ read() {} });
    const failed = pipeline(source, h, new Writable({ write: (_c, _e, cb) => cb() })).then(
      () => undefined,
      (e: unknown) => e,
    );
    source.push(randomBytes(100_000));
    await new Promise((r) => setTimeout(r, 50));
    // The worker dies mid-stream (killed, out of memory).
    await (pool as unknown as { workers: { terminate(): Promise<number> }[] }).workers[0]!.terminate();
    source.push(randomBytes(3_000_000));
    source.push(null);
    expect(await failed).toMatchObject({ code: 'E_IO', retryable: true });
    expect(pool.stream(['sha256'])).toBeUndefined();
    // Inline hashing still gives the right digests.
    const body = randomBytes(1_000_000);
    const inline = new HashingStream(['sha256'], undefined, undefined, undefined, pool.stream(['sha256']));
    await through(inline, [body]);
    expect(inline.result()).toEqual({ sha256: digestsOf(body).sha256 });
    await pool.close();
  });

  it('a stream destroyed half way lets the process exit (its worker is released)', async () => {
    const pool = new HashPool(1, 64 * 1024, true);
    try {
      const h = new HashingStream(['sha256'], undefined, undefined, undefined, pool.stream(['sha256']));
      h.write(randomBytes(100_000));
      h.destroy();
      await new Promise((r) => setTimeout(r, 20));
      const internals = pool as unknown as { streams: Map<number, unknown>; pending: Map<number, unknown> };
      expect(internals.streams.size).toBe(0);
      expect(internals.pending.size).toBe(0);
      expect(() => h.result()).toThrow(/ended/);
    } finally {
      await pool.close();
    }
  });
});

describe('digests of whole buffers on a worker thread', () => {
  it('match inline hashing, for sizes below, at and above the inline limit', async () => {
    const pool = new HashPool(1, 64 * 1024, false);
    try {
      const bufs = [1000, 64 * 1024, 256 * 1024 + 1, 9 * 1024 * 1024 + 7].map((n) => randomBytes(n));
      const copies = bufs.map((b) => Buffer.from(b));
      const got = await Promise.all(bufs.map((b) => pool.digest(b, ['md5', 'sha256'])));
      got.forEach((r, i) => {
        expect(r.digests).toEqual(digestsOf(copies[i]!));
        expect(r.buffer.equals(copies[i]!)).toBe(true);
      });
    } finally {
      await pool.close();
    }
  });

  it('a worker that dies fails the digests waiting on it; later ones hash inline', async () => {
    const pool = new HashPool(1, 64 * 1024, false);
    const waiting = Array.from({ length: 30 }, () =>
      pool.digest(randomBytes(200_000), ['sha256']).then(
        () => undefined,
        (e: unknown) => e,
      ),
    );
    await (pool as unknown as { workers: { terminate(): Promise<number> }[] }).workers[0]!.terminate();
    const outcomes = await Promise.all(waiting);
    // Some may have been hashed before the worker died; none is left hanging or wrong.
    const failed = outcomes.filter((o) => o !== undefined);
    expect(failed.length).toBeGreaterThan(0);
    for (const e of failed) expect(e).toMatchObject({ code: 'E_IO', retryable: true });
    const body = randomBytes(500_000);
    expect((await pool.digest(body, ['sha256'])).digests).toEqual({ sha256: digestsOf(body).sha256 });
    await pool.close();
  });
});

describe('when streams are hashed off-thread', () => {
  it('only where the pool allows it (MEDSYNC_HASH_STREAMS, by default more than 2 cores)', async () => {
    const off = new HashPool(1, 64 * 1024, false);
    expect(off.stream(['sha256'])).toBeUndefined();
    await off.close();
    const none = new HashPool(0, 64 * 1024, true);
    expect(none.stream(['sha256'])).toBeUndefined();
    await none.close();
  });
});
