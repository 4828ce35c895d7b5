import { createHash, hash, type Hash } from 'node:crypto';
import { Transform, type TransformCallback } from 'node:stream';
import type { Clock } from './clock.js';
import { systemClock } from './clock.js';
import { MedsyncError } from '../errors/errors.js';
import type { HashKind } from '../storage/types.js';

/** Hex digests by kind (only the kinds that were asked for). */
export type Digests = Partial<Record<HashKind, string>>;

/** Digests of one buffer. */
export function digestBuffer(buf: Uint8Array, kinds: readonly HashKind[]): Digests {
  const out: Digests = {};
  // One-shot crypto.hash: no Hash object per digest (~130 bytes less garbage and ~2.5 µs less per
  // digest of a small file, measured on Node 20).
  for (const k of kinds) out[k] = hash(k, buf, 'hex');
  return out;
}

/**
 * Hashes a stream's chunks somewhere else (a worker thread: HashPool.stream), in the order given.
 * `update` resolves once the chunk is handed over (the caller may reuse it), `finish` with the
 * digests; `abort` drops the work.
 */
export interface OffThreadHasher {
  update(chunk: Uint8Array): Promise<void>;
  finish(): Promise<Digests>;
  abort(): void;
}

/**
 * A pass-through that computes the asked-for digests (SHA-256, MD5) of the bytes flowing to the
 * destination, counts them, and (with a {@link TokenBucket}) holds them to a bandwidth limit.
 * Digests are read after the stream ended, so hashing costs no second pass over the file. With
 * an `offThread` hasher the hashing runs on another thread while the bytes go on to the
 * destination; the stream ends only once the digests are in, so `result()` is ready at its end
 * either way.
 */
export class HashingStream extends Transform {
  private readonly hashes: Array<[HashKind, Hash]>;
  bytes = 0;
  private digests: Digests | null = null;

  constructor(
    kinds: readonly HashKind[] = ['sha256'],
    private readonly onBytes?: (n: number) => void,
    private readonly bucket?: TokenBucket,
    private readonly signal?: AbortSignal,
    private readonly offThread?: OffThreadHasher,
  ) {
    super({ highWaterMark: 1024 * 1024 });
    this.hashes = offThread ? [] : kinds.map((k) => [k, createHash(k)]);
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    const pass = () => {
      this.bytes += chunk.length;
      this.onBytes?.(chunk.length);
      if (this.bucket) {
        this.bucket.take(chunk.length, this.signal).then(
          () => cb(null, chunk),
          (e: unknown) => cb(e as Error),
        );
      } else cb(null, chunk);
    };
    if (this.offThread) {
      this.offThread.update(chunk).then(pass, (e: unknown) => cb(e as Error));
      return;
    }
    for (const [, h] of this.hashes) h.update(chunk);
    pass();
  }

  override _flush(cb: TransformCallback): void {
    if (!this.offThread) {
      cb();
      return;
    }
    this.offThread.finish().then(
      (d) => {
        this.digests = d;
        cb();
      },
      (e: unknown) => cb(e as Error),
    );
  }

  override _destroy(err: Error | null, cb: (error?: Error | null) => void): void {
    if (this.digests === null) this.offThread?.abort();
    cb(err);
  }

  /** Hex digests; valid once the stream has ended. */
  result(): Digests {
    if (!this.digests) {
      if (this.offThread) throw new Error('The digests are known only once the stream has ended.');
      this.digests = Object.fromEntries(this.hashes.map(([k, h]) => [k, h.digest('hex')]));
    }
    return this.digests;
  }
}

/** A shared token bucket: `take(n)` waits until `n` bytes fit under the rate. */
export class TokenBucket {
  private tokens: number;
  private last: number;
  private readonly burst: number;

  constructor(
    readonly bytesPerSecond: number,
    private readonly clock: Clock = systemClock,
  ) {
    if (!(bytesPerSecond > 0)) throw new MedsyncError('E_CONFIG', 'A bandwidth limit must be above zero.');
    this.burst = Math.max(64 * 1024, bytesPerSecond / 4);
    this.tokens = this.burst;
    this.last = clock.now();
  }

  async take(n: number, signal?: AbortSignal): Promise<void> {
    for (;;) {
      const now = this.clock.now();
      this.tokens = Math.min(this.burst, this.tokens + ((now - this.last) / 1000) * this.bytesPerSecond);
      this.last = now;
      if (this.tokens >= Math.min(n, this.burst)) {
        this.tokens -= n;
        return;
      }
      const need = Math.min(n, this.burst) - this.tokens;
      await this.clock.sleep(Math.max(5, Math.ceil((need / this.bytesPerSecond) * 1000)), signal);
    }
  }
}

/**
 * Parses a rate like `10M`, `512K`, `1.5G` or `1048576` (bytes per second, binary units, rclone's
 * style) into bytes per second. `0`/`off` means unlimited (returns undefined).
 */
export function parseRate(input: string | number): number | undefined {
  if (typeof input === 'number') return input > 0 ? input : undefined;
  const m = /^\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)(i?b)?(?:\/s)?\s*$/i.exec(input);
  if (!m) {
    if (/^\s*off\s*$/i.test(input)) return undefined;
    throw new MedsyncError('E_CONFIG', 'A rate looks like 10M, 512K or 1G (bytes per second).');
  }
  const mult: Record<string, number> = { '': 1, b: 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 };
  const v = Number(m[1]) * mult[(m[2] ?? '').toLowerCase()]!;
  return v > 0 ? Math.floor(v) : undefined;
}

/** Reads a stream to its end, returning MD5 and SHA-256 (for changed-file checks). */
export async function hashStream(
  stream: NodeJS.ReadableStream,
): Promise<{ md5: string; sha256: string; size: number }> {
  const md5 = createHash('md5');
  const sha = createHash('sha256');
  let size = 0;
  for await (const c of stream as AsyncIterable<Buffer>) {
    md5.update(c);
    sha.update(c);
    size += c.length;
  }
  return { md5: md5.digest('hex'), sha256: sha.digest('hex'), size };
}
