import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import type { HashKind } from '../storage/types.js';
import { digestBuffer, type Digests } from './streams.js';

// The worker is plain CommonJS evaluated from a string, so it works from the ESM and CJS builds.
const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
const { createHash } = require('node:crypto');
parentPort.on('message', (m) => {
  const view = new Uint8Array(m.buffer, m.offset, m.length);
  const out = {};
  for (const k of m.kinds) out[k] = createHash(k).update(view).digest('hex');
  parentPort.postMessage({ id: m.id, out, buffer: m.buffer }, m.transferred ? [m.buffer] : []);
});
`;

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
  private broken = false;

  constructor(
    /** Worker threads; 0 hashes inline. Default: cores − 1 (at least 1, at most 4), or MEDSYNC_HASH_WORKERS. */
    private readonly size = defaultSize(),
    /** Buffers smaller than this are hashed inline (a round trip costs more). */
    private readonly inlineBelow = 64 * 1024,
  ) {}

  private worker(): Worker {
    if (this.workers.length < this.size) {
      const w = new Worker(WORKER_SOURCE, { eval: true });
      w.unref();
      w.on('message', (m: { id: number; out: Digests; buffer: ArrayBuffer }) => {
        const p = this.pending.get(m.id);
        this.pending.delete(m.id);
        p?.resolve({ digests: m.out, buffer: m.buffer });
      });
      const fail = (e: unknown) => {
        this.broken = true;
        for (const p of this.pending.values()) p.reject(e);
        this.pending.clear();
      };
      w.on('error', fail);
      // A worker that exits on its own (killed, out of memory) must not leave digests waiting.
      w.on('exit', (code) => {
        if (this.workers.includes(w)) fail(new Error(`A hashing worker exited (code ${code}).`));
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
      if (this.pending.size === 0) for (const x of this.workers) x.unref();
    }
  }

  /** Stops the workers. */
  async close(): Promise<void> {
    const ws = this.workers;
    this.workers = [];
    await Promise.all(ws.map((w) => w.terminate()));
  }
}

function defaultSize(): number {
  const env = Number(process.env.MEDSYNC_HASH_WORKERS);
  if (process.env.MEDSYNC_HASH_WORKERS !== undefined && Number.isInteger(env) && env >= 0)
    return Math.min(env, 16);
  return Math.max(1, Math.min(4, availableParallelism() - 1));
}

/** One pool per process: hashing is CPU work, shared by every job. */
let shared: HashPool | undefined;
export function sharedHashPool(): HashPool {
  return (shared ??= new HashPool());
}
