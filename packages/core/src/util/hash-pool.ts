import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { MedsyncError } from '../errors/errors.js';
import type { HashKind } from '../storage/types.js';
import { digestBuffer, type Digests, type OffThreadHasher } from './streams.js';

// The worker is plain CommonJS evaluated from a string, so it works from the ESM and CJS builds.
const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
const { createHash } = require('node:crypto');
const streams = new Map();
parentPort.on('message', (m) => {
  if (m.op === 'start') {
    streams.set(m.id, { sab: m.sab, hashes: m.kinds.map((k) => [k, createHash(k)]) });
    return;
  }
  if (m.op === 'chunk') {
    const s = streams.get(m.id);
    if (s) for (const [, h] of s.hashes) h.update(new Uint8Array(s.sab, m.at, m.len));
    parentPort.postMessage({ id: m.id, freed: m.at });
    return;
  }
  if (m.op === 'end' || m.op === 'drop') {
    const s = streams.get(m.id);
    streams.delete(m.id);
    if (m.op === 'drop') return;
    const out = {};
    if (s) for (const [k, h] of s.hashes) out[k] = h.digest('hex');
    parentPort.postMessage({ id: m.id, out });
    return;
  }
  const view = new Uint8Array(m.buffer, m.offset, m.length);
  const out = {};
  for (const k of m.kinds) out[k] = createHash(k).update(view).digest('hex');
  parentPort.postMessage({ id: m.id, out, buffer: m.buffer }, m.transferred ? [m.buffer] : []);
});
`;

/**
 * Slots of a stream's shared ring: chunks are copied in, hashed by the worker, then reused.
 * 4 MiB lets the sender run ahead of the hashing by 4 chunks of 1 MiB. Measured on 2 cores
 * (MEDSYNC_HASH_STREAMS=1), 1 GiB to a loopback FTP server: median 4.47 s instead of 5.24 s
 * inline (8 MiB was no faster); to SFTP no gain there, for ~15 MB more RSS (the worker).
 */
const STREAM_SLOT_BYTES = 256 * 1024;
const STREAM_SLOTS = 16;
/** Streams hashed off-thread at once (4 MiB of shared memory each); more hash inline. */
const MAX_STREAMS = 2;

interface Pending {
  resolve: (d: { digests: Digests; buffer: ArrayBuffer | undefined }) => void;
  reject: (e: unknown) => void;
}

/**
 * Hashes buffers on worker threads, so MD5 and SHA-256 of small files run beside the main
 * thread's I/O instead of blocking it. Buffers that own their memory are moved (not copied) to the
 * worker and back. Workers are unref'd and start on first use.
 */
export class HashPool {
  private workers: Worker[] = [];
  private next = 0;
  private seq = 0;
  private readonly pending = new Map<number, Pending>();
  private readonly streams = new Map<number, StreamHasher>();
  private broken = false;

  constructor(
    /**
     * Worker threads; 0 hashes inline. Default: MEDSYNC_HASH_WORKERS, else cores − 1 (at most 4)
     * with more than 2 cores, else none (one if MEDSYNC_HASH_STREAMS=1 asks for stream hashing).
     */
    private readonly size = defaultSize(),
    /** Buffers smaller than this are hashed inline (a round trip costs more). */
    private readonly inlineBelow = 64 * 1024,
    /**
     * Whether {@link stream} hashes large streams off-thread. Default: with more than 2 cores
     * (or MEDSYNC_HASH_STREAMS=1/0): on 2 cores the sender, the server and the hashing already
     * share both, and the worker's ~15 MB did not pay for itself over SFTP.
     */
    private readonly streamsOffThread = defaultStreams(),
  ) {}

  private worker(): Worker {
    if (this.workers.length < this.size) {
      const w = new Worker(WORKER_SOURCE, { eval: true });
      w.unref();
      w.on('message', (m: { id: number; out: Digests; buffer: ArrayBuffer; freed?: number }) => {
        if (m.freed !== undefined) {
          this.streams.get(m.id)?.freed(m.freed);
          return;
        }
        const p = this.pending.get(m.id);
        this.pending.delete(m.id);
        p?.resolve({ digests: m.out, buffer: m.buffer });
      });
      const fail = (cause: unknown) => {
        // The file whose digests were lost is sent again (the next streams hash inline).
        const e = new MedsyncError('E_IO', 'A hashing worker stopped; the file is sent again.', {
          retryable: true,
          cause,
        });
        this.broken = true;
        this.failAll(e);
      };
      // What waits on the worker fails at its exit, not at its error: digests it posted before
      // failing travel on another port than the error, and Node delivers them before 'exit'
      // (see CopyPool). New work hashes inline from the error on.
      let failure: unknown;
      w.on('error', (e: unknown) => {
        failure ??= e;
        this.broken = true;
      });
      // A worker that exits on its own (killed, out of memory) must not leave digests waiting.
      w.on('exit', (code) => {
        if (this.workers.includes(w)) fail(failure ?? new Error(`A hashing worker exited (code ${code}).`));
      });
      this.workers.push(w);
      return w;
    }
    return this.workers[this.next++ % this.workers.length]!;
  }

  /**
   * Digests of `buf`. May move `buf`'s memory to a worker and back: use the returned buffer
   * afterwards, not `buf`.
   */
  async digest(buf: Buffer, kinds: readonly HashKind[]): Promise<{ digests: Digests; buffer: Buffer }> {
    if (this.broken || this.size === 0 || buf.length < this.inlineBelow || kinds.length === 0) {
      return { digests: digestBuffer(buf, kinds), buffer: buf };
    }
    const owns =
      buf.byteOffset === 0 && buf.byteLength === buf.buffer.byteLength && buf.buffer instanceof ArrayBuffer;
    const id = ++this.seq;
    const w = this.worker();
    const result = new Promise<{ digests: Digests; buffer: ArrayBuffer | undefined }>((resolve, reject) =>
      this.pending.set(id, { resolve, reject }),
    );
    w.ref();
    try {
      w.postMessage(
        { id, kinds, buffer: buf.buffer, offset: buf.byteOffset, length: buf.byteLength, transferred: owns },
        owns ? [buf.buffer as ArrayBuffer] : [],
      );
      const r = await result;
      return { digests: r.digests, buffer: owns && r.buffer ? Buffer.from(r.buffer) : buf };
    } finally {
      this.unrefIdle();
    }
  }

  /** Lets the process exit while no digest and no stream is waiting for a worker. */
  private unrefIdle(): void {
    if (this.pending.size === 0 && this.streams.size === 0) for (const x of this.workers) x.unref();
  }

  /**
   * A hasher for one stream whose chunks are hashed on a worker thread while the caller goes on
   * sending them: each chunk is copied into a ring of shared memory (16 × 256 KiB; no message
   * carries the bytes) and hashed there in order. `update` waits while the ring is full.
   * Undefined where hashing stays inline: off (see the constructor), no workers, a worker failed
   * before, no kinds, or two streams already hashed this way (a bound on the shared memory).
   */
  stream(kinds: readonly HashKind[]): OffThreadHasher | undefined {
    if (
      !this.streamsOffThread ||
      this.broken ||
      this.size === 0 ||
      kinds.length === 0 ||
      this.streams.size >= MAX_STREAMS
    ) {
      return undefined;
    }
    const id = ++this.seq;
    const w = this.worker();
    const sab = new SharedArrayBuffer(STREAM_SLOT_BYTES * STREAM_SLOTS);
    const st = new StreamHasher(this, id, w, sab);
    this.streams.set(id, st);
    w.ref();
    w.postMessage({ op: 'start', id, kinds, sab });
    return st;
  }

  /** @internal A stream ended or was dropped: it no longer holds its worker. */
  release(id: number): void {
    this.streams.delete(id);
    this.unrefIdle();
  }

  /** @internal Waits for the final digests of stream `id` (posted by its `finish`). */
  awaitDigests(id: number): Promise<Digests> {
    return new Promise<{ digests: Digests; buffer: ArrayBuffer | undefined }>((resolve, reject) =>
      this.pending.set(id, { resolve, reject }),
    )
      .then((r) => r.digests)
      .finally(() => this.unrefIdle());
  }

  /** Stops the workers. */
  async close(): Promise<void> {
    const ws = this.workers;
    this.workers = [];
    await Promise.all(ws.map((w) => w.terminate()));
    this.failAll(new Error('The hashing pool was closed.'));
  }

  /** Nothing may wait for a worker that is gone: every digest and stream waiting fails with `e`. */
  private failAll(e: unknown): void {
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
    for (const st of this.streams.values()) st.fail(e);
    this.streams.clear();
  }
}

/** One stream's side of the shared ring (see {@link HashPool.stream}). */
class StreamHasher implements OffThreadHasher {
  private readonly free: number[] = [];
  private readonly waiters: (() => void)[] = [];
  private readonly view: Uint8Array;
  private failure: unknown;
  private done = false;

  constructor(
    private readonly pool: HashPool,
    private readonly id: number,
    private readonly worker: Worker,
    sab: SharedArrayBuffer,
  ) {
    this.view = new Uint8Array(sab);
    for (let i = STREAM_SLOTS - 1; i >= 0; i--) this.free.push(i * STREAM_SLOT_BYTES);
  }

  async update(chunk: Uint8Array): Promise<void> {
    for (let off = 0; off < chunk.length;) {
      if (this.failure !== undefined) throw this.failure;
      if (this.done) throw new Error('This hasher has finished.');
      const at = this.free.pop();
      if (at === undefined) {
        await new Promise<void>((resolve) => this.waiters.push(resolve));
        continue;
      }
      const len = Math.min(STREAM_SLOT_BYTES, chunk.length - off);
      this.view.set(chunk.subarray(off, off + len), at);
      this.worker.postMessage({ op: 'chunk', id: this.id, at, len });
      off += len;
    }
  }

  finish(): Promise<Digests> {
    if (this.failure !== undefined) return Promise.reject(this.failure);
    this.done = true;
    const result = this.pool.awaitDigests(this.id);
    this.pool.release(this.id);
    this.worker.postMessage({ op: 'end', id: this.id });
    return result;
  }

  abort(): void {
    if (this.done) return;
    this.done = true;
    this.pool.release(this.id);
    this.worker.postMessage({ op: 'drop', id: this.id });
    this.fail(new Error('This hasher was aborted.'));
  }

  /** @internal The worker is done with the slot at `at`. */
  freed(at: number): void {
    this.free.push(at);
    this.waiters.shift()?.();
  }

  /** @internal The worker failed: updates and the final digests reject with `e`. */
  fail(e: unknown): void {
    this.failure ??= e;
    for (const w of this.waiters.splice(0)) w();
  }
}

/**
 * On 2 cores a worker costs more than it saves: the main thread, the hashing and the server (on
 * loopback) already share both, and each message to the worker and back adds its own work and
 * garbage. Measured on the 2-core test machine, 2,000 files of 256 KiB: to a loopback pure-ftpd
 * 5.6–6.3 s with 5.3–6.4 s of CPU and ~86 MB RSS hashing inline, 6.3–8.2 s with 7.0–8.9 s of CPU
 * and ~122 MB RSS with one worker (3 alternating pairs, inline faster in each); to a loopback
 * OpenSSH sshd 11.2 s and 91 MB inline, 11.4 s and 133 MB with the worker.
 */
function defaultSize(): number {
  const env = Number(process.env.MEDSYNC_HASH_WORKERS);
  if (process.env.MEDSYNC_HASH_WORKERS !== undefined && Number.isInteger(env) && env >= 0)
    return Math.min(env, 16);
  const cores = availableParallelism();
  if (cores <= 2) return process.env.MEDSYNC_HASH_STREAMS === '1' ? 1 : 0;
  return Math.min(4, cores - 1);
}

function defaultStreams(): boolean {
  const env = process.env.MEDSYNC_HASH_STREAMS;
  if (env === '1' || env === '0') return env === '1';
  return availableParallelism() > 2;
}

/** One pool per process: hashing is CPU work, shared by every job. */
let shared: HashPool | undefined;
export function sharedHashPool(): HashPool {
  return (shared ??= new HashPool());
}
