import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import type { HashKind } from '../storage/types.js';
import type { Digests } from './streams.js';

// Plain CommonJS evaluated from a string, so it works from the ESM and CJS builds. Each message
// is one whole file copy done with synchronous calls (no thread-pool hand-off per step), except
// O_DIRECT writes, which run on the thread pool while the worker hashes the same bytes.
const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
const fs = require('node:fs');
const { createHash } = require('node:crypto');
const CHUNK = 1024 * 1024;
const BLOCK = 4096;
// O_DIRECT needs block-aligned memory, offsets and lengths. A WebAssembly memory is page-aligned
// (a Buffer's need not be); null where none can be had (--jitless): writes then use the cache.
const DIO = fs.constants.O_DIRECT;
let buf, dbuf;
const alignedBuf = () => {
  if (dbuf === undefined) {
    try {
      dbuf = Buffer.from(new WebAssembly.Memory({ initial: CHUNK / 65536, maximum: CHUNK / 65536 }).buffer);
    } catch {
      dbuf = null;
    }
  }
  return dbuf;
};
const fail = (code, message) => Object.assign(new Error(message), { code });
// An O_DIRECT write runs on the thread pool while this thread hashes the same bytes (both only
// read the buffer): the write waits on the disk, the hashing on the CPU. Only where the pool asks
// (m.overlap): the thread pool is shared by the whole process.
const writeAt = (fd, b, off, len, at) =>
  new Promise((resolve, reject) => fs.write(fd, b, off, len, at, (e, n) => (e ? reject(e) : resolve(n))));
// One copy at a time per worker (the pool may queue several here): they share the buffers.
let queue = Promise.resolve();
// copyOne reports its own failures; anything else ends the worker, as a throw in a synchronous
// handler did (the pool then fails the copies it held), and no copy queued behind it starts.
let dead = false;
parentPort.on('message', (m) => {
  queue = queue
    .then(() => (dead ? undefined : copyOne(m)))
    .catch((e) => {
      dead = true;
      process.nextTick(() => { throw e; });
    });
});
const copyOne = async (m) => {
  const hashes = m.kinds.map((k) => [k, createHash(k)]);
  let src, out, cached, side = 'source', made, total = 0, reported = 0, tmpMade = false;
  let direct = Boolean(m.direct && DIO !== undefined && alignedBuf());
  let directRefused = false, cachedBytes = 0;
  const aborted = () => m.abort !== undefined && Atomics.load(m.abort, 0) === 1;
  const openTmp = () => {
    if (!direct) return fs.openSync(m.tmp, 'wx');
    try {
      return fs.openSync(m.tmp, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL | DIO, 0o666);
    } catch (e) {
      if (e.code !== 'EINVAL') throw e;
      // Refused at open, after the file was made (tmpfs before Linux 6.6): make it again, cached.
      try { fs.unlinkSync(m.tmp); } catch {}
      direct = false;
      directRefused = true;
      return fs.openSync(m.tmp, 'wx');
    }
  };
  // Writes at a position. When O_DIRECT is refused (EINVAL: a file system or device with other
  // rules) the rest of the file goes through the page cache.
  const put = async (b, off, len, at) => {
    while (len > 0) {
      let n;
      if (direct) {
        try {
          n = m.overlap ? await writeAt(out, b, off, len, at) : fs.writeSync(out, b, off, len, at);
        } catch (e) {
          if (e.code !== 'EINVAL') throw e;
          direct = false;
          directRefused = true;
          continue;
        }
      } else {
        if (cached === undefined) cached = fs.openSync(m.tmp, fs.constants.O_WRONLY);
        n = fs.writeSync(cached, b, off, len, at);
        cachedBytes += n;
      }
      off += n;
      len -= n;
      at += n;
    }
  };
  try {
    src = fs.openSync(m.src, 'r');
    if (!fs.fstatSync(src).isFile()) throw fail('EISDIR', 'not a file');
    side = 'dest';
    if (m.mkdir) made = fs.mkdirSync(m.dir, { recursive: true });
    try {
      out = openTmp();
    } catch (e) {
      if (e.code !== 'ENOENT' || !m.mayMkdir) throw e;
      made = fs.mkdirSync(m.dir, { recursive: true }) || made;
      out = openTmp();
    }
    tmpMade = true;
    if (!direct) cached = out;
    // misalign: tests make O_DIRECT fail mid-file.
    const b = direct ? (m.misalign ? dbuf.subarray(1) : dbuf) : (buf = buf || Buffer.allocUnsafe(CHUNK));
    // fill: bytes read into b, not written yet (with O_DIRECT only whole blocks are written before
    // the end); pos: where they go in the file.
    let fill = 0, pos = 0;
    for (;;) {
      if (aborted()) throw fail('ABORT_ERR', 'aborted');
      side = 'source';
      const n = fs.readSync(src, b, fill, b.length - fill, null);
      if (n === 0) break;
      total += n;
      if (m.expected >= 0 && total > m.expected) throw fail('ECHANGED', 'grew');
      side = 'dest';
      const chunk = b.subarray(fill, fill + n);
      fill += n;
      const whole = direct ? fill - (fill % BLOCK) : fill;
      // Started before the hashing, awaited after it (no microtask runs in between, so a failed
      // write is never an unhandled rejection).
      const writing = whole > 0 ? put(b, 0, whole, pos) : undefined;
      try {
        for (const h of hashes) h[1].update(chunk);
      } catch (e) {
        // Never close the file (below) while its write still runs.
        if (writing) await writing.catch(() => undefined);
        throw e;
      }
      if (writing) {
        await writing;
        pos += whole;
        if (whole < fill) b.copyWithin(0, whole, fill);
        fill -= whole;
      }
      if (total - reported >= 4194304) {
        parentPort.postMessage({ id: m.id, progress: total - reported });
        reported = total;
      }
    }
    side = 'source';
    if (m.expected >= 0 && total !== m.expected) throw fail('ECHANGED', 'shrank');
    side = 'dest';
    // The last partial block goes through the page cache: O_DIRECT cannot write it.
    if (fill > 0) {
      direct = false;
      await put(b, 0, fill, pos);
    }
    if (m.mtime !== undefined) fs.futimesSync(out, m.mtime, m.mtime);
    // fdatasync flushes the file, whichever descriptor wrote its pages.
    if (m.fsync && !m.stage) fs.fdatasyncSync(out);
    const mtimeMs = m.mtimeMs !== undefined ? m.mtimeMs : Math.floor(fs.fstatSync(out).mtimeMs);
    // Each descriptor is forgotten before it is closed: a failed close has released it already,
    // and closing its number again could close another worker's file.
    const fds = [cached !== out ? cached : undefined, out, src];
    cached = out = src = undefined;
    for (const fd of fds) if (fd !== undefined) fs.closeSync(fd);
    if (aborted()) throw fail('ABORT_ERR', 'aborted');
    if (!m.stage) fs.renameSync(m.tmp, m.dst);
    const digests = {};
    for (const h of hashes) digests[h[0]] = h[1].digest('hex');
    parentPort.postMessage({
      id: m.id,
      progress: total - reported,
      done: { size: total, mtimeMs, digests, made, cachedBytes, directRefused },
    });
  } catch (e) {
    for (const fd of [cached !== out ? cached : undefined, out, src]) {
      if (fd !== undefined) try { fs.closeSync(fd); } catch {}
    }
    if (tmpMade) try { fs.unlinkSync(m.tmp); } catch {}
    parentPort.postMessage({
      id: m.id,
      progress: total - reported,
      error: { code: e && e.code, syscall: e && e.syscall, message: String(e && e.message), side, made },
    });
  }
};
`;

/** One file copy for {@link CopyPool.copy}; paths are absolute. */
export interface CopyJob {
  src: string;
  dst: string;
  /** The temporary sibling written first and renamed to `dst`. */
  tmp: string;
  /** `dst`'s folder. */
  dir: string;
  /** Create `dir` first (it is not known to exist). */
  mkdir: boolean;
  /** Create `dir` when opening `tmp` finds it missing. */
  mayMkdir: boolean;
  /** Expected size; -1 when unknown. A different size is ECHANGED. */
  expected: number;
  kinds: readonly HashKind[];
  /** Seconds for futimes, and the millisecond value to report. */
  mtime?: number;
  mtimeMs?: number;
  fsync: boolean;
  /**
   * Write whole blocks with O_DIRECT (from the disk's point of view the same writes, without
   * copying them into the page cache first); falls back to the cache where refused.
   */
  direct?: boolean;
  /** Leave the complete, closed temporary file for the caller (no fsync, no rename). */
  stage?: boolean;
  /** Tests: hand O_DIRECT a misaligned buffer so it fails in the middle of the file. */
  misalign?: boolean;
}

export interface CopyDone {
  size: number;
  mtimeMs: number;
  digests: Digests;
  /** The first folder mkdir created, if any (the caller fsyncs new folders). */
  made?: string;
  /** Bytes written through the page cache (all of them unless `direct`), waiting for a flush. */
  cachedBytes: number;
  /** O_DIRECT was asked for and refused by the file system (the file was written cached). */
  directRefused: boolean;
}

/** A failed copy: `side` tells whether reading the source or writing the destination failed. */
export class CopyError extends Error {
  constructor(
    message: string,
    readonly code: string | undefined,
    readonly syscall: string | undefined,
    readonly side: 'source' | 'dest',
    readonly made: string | undefined,
  ) {
    super(message);
    this.name = 'CopyError';
  }
}

interface Pending {
  resolve: (d: CopyDone) => void;
  reject: (e: unknown) => void;
  onBytes: ((n: number) => void) | undefined;
  worker: Worker;
}

/**
 * Copies local files on worker threads with synchronous I/O (O_DIRECT writes excepted: they
 * overlap with the hashing), hashing on the way. On machines where each thread-pool hand-off is
 * costly (a VM, two cores), a whole small-file copy in one worker costs a fraction of the dozen
 * asynchronous steps it takes otherwise. Workers are unref'd
 * and start on first use.
 */
export class CopyPool {
  private workers: Worker[] = [];
  private busy = new Map<Worker, number>();
  private seq = 0;
  private readonly pending = new Map<number, Pending>();
  private broken: unknown;

  constructor(private readonly size = defaultSize()) {}

  /** False when the pool cannot copy (no workers allowed, or a worker died): copy another way. */
  get usable(): boolean {
    return this.size > 0 && this.broken === undefined;
  }

  private worker(): Worker {
    let best: Worker | undefined;
    for (const w of this.workers) if (!best || this.busy.get(w)! < this.busy.get(best)!) best = w;
    if (best && (this.busy.get(best) === 0 || this.workers.length >= this.size)) return best;
    const w = new Worker(WORKER_SOURCE, { eval: true });
    w.unref();
    this.busy.set(w, 0);
    w.on('message', (m: { id: number; progress?: number; done?: CopyDone; error?: CopyErrorData }) => {
      const p = this.pending.get(m.id);
      if (!p) return;
      if (m.progress) p.onBytes?.(m.progress);
      if (!m.done && !m.error) return;
      this.pending.delete(m.id);
      this.release(w);
      if (m.done) p.resolve(m.done);
      else {
        const e = m.error!;
        p.reject(new CopyError(e.message, e.code ?? undefined, e.syscall ?? undefined, e.side, e.made));
      }
    });
    // A worker that fails or exits on its own (killed, out of memory) fails the copies it held,
    // and no new copy is given to the pool; the other workers finish theirs. The copies are failed
    // at 'exit', not at 'error': a result the worker posted before it failed may still be on its
    // way (it travels on another port than the error), and Node delivers it before 'exit'.
    // Failing at 'error' reported a finished copy (renamed into place) as failed now and then.
    let failure: unknown;
    const fail = (e: unknown) => {
      if (!this.workers.includes(w)) return;
      this.broken ??= e;
      this.workers.splice(this.workers.indexOf(w), 1);
      this.busy.delete(w);
      for (const [id, p] of this.pending) {
        if (p.worker !== w) continue;
        this.pending.delete(id);
        p.reject(e);
      }
    };
    w.on('error', (e: unknown) => {
      failure ??= e;
      // No new copy goes to the pool meanwhile.
      this.broken ??= e;
    });
    w.on('exit', (code) => fail(failure ?? new Error(`A copy worker exited (code ${code}).`)));
    this.workers.push(w);
    return w;
  }

  private release(w: Worker): void {
    const n = (this.busy.get(w) ?? 1) - 1;
    this.busy.set(w, n);
    if ([...this.busy.values()].every((b) => b === 0)) for (const x of this.workers) x.unref();
  }

  /** Stops the workers; copies still waiting on them fail. */
  async close(): Promise<void> {
    const ws = this.workers;
    this.workers = [];
    await Promise.all(ws.map((w) => w.terminate()));
    const closed = new Error('The copy pool was closed.');
    for (const p of this.pending.values()) p.reject(closed);
    this.pending.clear();
  }

  /** Copies one file; `onBytes` hears progress (every 4 MiB and at the end). */
  copy(job: CopyJob, signal?: AbortSignal, onBytes?: (n: number) => void): Promise<CopyDone> {
    if (this.broken !== undefined) return Promise.reject(this.broken);
    const id = ++this.seq;
    const w = this.worker();
    this.busy.set(w, this.busy.get(w)! + 1);
    w.ref();
    let flag: Int32Array | undefined;
    let onAbort: (() => void) | undefined;
    if (signal) {
      flag = new Int32Array(new SharedArrayBuffer(4));
      const f = flag;
      onAbort = () => Atomics.store(f, 0, 1);
      if (signal.aborted) onAbort();
      else signal.addEventListener('abort', onAbort, { once: true });
    }
    return new Promise<CopyDone>((resolve, reject) => {
      this.pending.set(id, { resolve, reject, onBytes, worker: w });
      // Overlapped writes use the process's shared thread pool (4 threads unless UV_THREADPOOL_SIZE
      // says otherwise): only a pool of 2 workers (2 cores) uses it, leaving the main thread room;
      // larger pools keep each write on their own thread.
      w.postMessage({ ...job, id, abort: flag, overlap: this.size <= 2 });
    }).finally(() => {
      if (onAbort) signal?.removeEventListener('abort', onAbort);
    });
  }
}

interface CopyErrorData {
  code?: string;
  syscall?: string;
  message: string;
  side: 'source' | 'dest';
  made?: string;
}

function defaultSize(): number {
  const env = Number(process.env.MEDSYNC_COPY_WORKERS);
  if (process.env.MEDSYNC_COPY_WORKERS !== undefined && Number.isInteger(env) && env >= 0)
    return Math.min(env, 16);
  // One per core, 2 to 8. Durable copies to local disks no longer wait in the worker for an
  // fsync (they join a group flush), so twice the cores bought nothing: measured on 2 cores,
  // 2,000 files of 256 KiB in 2.93–2.97 s with 2 workers and 2.83–2.89 s with 4, for a peak RSS
  // of 131–132 MB against 150–151 MB (each worker is an isolate of 6–9 MB).
  return Math.max(2, Math.min(8, availableParallelism()));
}

/** One pool per process, shared by every LocalStorage. */
let shared: CopyPool | undefined;
export function sharedCopyPool(): CopyPool {
  return (shared ??= new CopyPool());
}
