import { createHash } from 'node:crypto';
import { Readable } from 'node:stream';
import { MedsyncError, throwIfAborted, toMedsyncError } from '../errors/errors.js';
import { normalizePath } from './paths.js';
import type {
  ConnectionReport,
  ListOptions,
  OpOptions,
  ReadOptions,
  Storage,
  StorageCapabilities,
  StorageEntry,
  WriteBody,
  WriteOptions,
} from './types.js';
import { failedReport } from './types.js';
import type { Clock } from '../util/clock.js';
import { systemClock } from '../util/clock.js';

/** Operations of the memory storage that faults can target. */
export type MemoryOp = 'test' | 'list' | 'stat' | 'read' | 'write' | 'remove' | 'rename';

interface MemFile {
  path: string;
  data: Buffer;
  mtimeMs: number;
  md5: string;
  sha256: string;
}

export interface MemoryStorageOptions {
  /** Id reported by the storage (default `memory://<n>`). */
  id?: string;
  /** Clock for latency and mtimes (the fake clock from `@medsync/core/testing` in tests). */
  clock?: Clock;
  /** Pretend to be case-insensitive. Default false. */
  caseInsensitive?: boolean;
}

let counter = 0;

/** Faults queued per operation: each throws its error for its next `remaining` calls. */
type FaultQueue = Map<MemoryOp, Array<{ remaining: number; error: () => Error }>>;

function queueFault(
  q: FaultQueue,
  op: MemoryOp,
  count: number,
  error: Error | (() => Error) | undefined,
  message: string,
): void {
  const make =
    typeof error === 'function'
      ? error
      : () => error ?? new MedsyncError('E_TRANSIENT', message, { adapter: 'memory' });
  const list = q.get(op) ?? [];
  list.push({ remaining: count, error: make });
  q.set(op, list);
}

/** Throws the error of the first fault queued for `op`, if any, using up one of its calls. */
function takeFault(q: FaultQueue, op: MemoryOp): void {
  const list = q.get(op);
  const f = list?.[0];
  if (!f) return;
  f.remaining--;
  if (f.remaining <= 0) list!.shift();
  throw f.error();
}

/**
 * Faults the memory storage can inject, for users' own unit tests: fail the next N calls of an
 * operation with a given error, add latency, cut writes after some bytes, or lose the answer to
 * an operation that took effect.
 */
export class MemoryFaults {
  private failures: FaultQueue = new Map();
  private latencies = new Map<MemoryOp, number>();
  private cut: { afterBytes: number; remaining: number; error: () => Error } | null = null;
  private lost: FaultQueue = new Map();

  /** The next `count` calls of `op` reject with `error` (a MedsyncError E_TRANSIENT by default). */
  failNext(op: MemoryOp, count = 1, error?: Error | (() => Error)): this {
    queueFault(this.failures, op, count, error, `Injected ${op} failure.`);
    return this;
  }

  /** Every call of `op` waits `ms` first (0 removes it). */
  latency(op: MemoryOp, ms: number): this {
    if (ms > 0) this.latencies.set(op, ms);
    else this.latencies.delete(op);
    return this;
  }

  /** The next `count` writes fail after `afterBytes` bytes, leaving nothing under the final name. */
  cutWrites(afterBytes: number, count = 1, error?: Error): this {
    this.cut = {
      afterBytes,
      remaining: count,
      error: () =>
        error ??
        new MedsyncError('E_TRANSIENT', 'Injected write cut: connection dropped.', { adapter: 'memory' }),
    };
    return this;
  }

  /**
   * The next `count` calls of `op` (`write`, `rename` or `remove`) take effect, then reject with
   * `error` (E_TRANSIENT by default): the connection dropped after the server did the work and
   * before its answer arrived, so the caller cannot know the outcome.
   */
  loseReplies(op: 'write' | 'rename' | 'remove', count = 1, error?: Error | (() => Error)): this {
    queueFault(this.lost, op, count, error, `Injected lost reply: the ${op} was done, its answer lost.`);
    return this;
  }

  /** Removes every fault. */
  clear(): this {
    this.lost.clear();
    this.failures.clear();
    this.latencies.clear();
    this.cut = null;
    return this;
  }

  /** @internal */
  async apply(op: MemoryOp, clock: Clock, signal?: AbortSignal): Promise<void> {
    const ms = this.latencies.get(op);
    if (ms) await clock.sleep(ms, signal);
    takeFault(this.failures, op);
  }

  /** @internal Throws the lost-reply error due for an `op` that just took effect, if any. */
  afterEffect(op: MemoryOp): void {
    takeFault(this.lost, op);
  }

  /**
   * @internal The error to cut a write with once it passed `total` bytes, or null. A write that
   * stays under the limit uses up nothing: only writes actually cut count against `count`.
   */
  cutAt(total: number): Error | null {
    const c = this.cut;
    if (!c || total <= c.afterBytes) return null;
    c.remaining--;
    if (c.remaining <= 0) this.cut = null;
    return c.error();
  }
}

/**
 * In-memory Storage: what users' own unit tests use. Reports md5 and sha256 for every file, keeps
 * mtimes, renames atomically, and injects faults through {@link MemoryStorage.faults}.
 */
export class MemoryStorage implements Storage {
  readonly kind = 'memory';
  readonly id: string;
  readonly capabilities: StorageCapabilities;
  readonly faults = new MemoryFaults();
  private readonly files = new Map<string, MemFile>();
  /** Whether names are compared without case; set from the options, whatever `capabilities` says. */
  private readonly foldsCase: boolean;
  private readonly clock: Clock;
  private closed = false;
  /** Number of calls per operation, for assertions in tests. */
  readonly calls: Record<MemoryOp, number> = {
    test: 0,
    list: 0,
    stat: 0,
    read: 0,
    write: 0,
    remove: 0,
    rename: 0,
  };

  constructor(opts: MemoryStorageOptions = {}) {
    this.id = opts.id ?? `memory://${++counter}`;
    this.clock = opts.clock ?? systemClock;
    this.capabilities = {
      hashes: ['md5', 'sha256'],
      preservesMtime: true,
      mtimePrecisionMs: 1,
      atomicRename: true,
      rangeReads: true,
      caseInsensitive: opts.caseInsensitive ?? false,
      maxConcurrency: 64,
    };
    this.foldsCase = opts.caseInsensitive ?? false;
  }

  private key(p: string): string {
    return this.foldsCase ? p.toLowerCase() : p;
  }

  private async enter(op: MemoryOp, signal?: AbortSignal): Promise<void> {
    if (this.closed) throw new MedsyncError('E_CONFIG', 'This storage was closed.', { adapter: 'memory' });
    this.calls[op]++;
    throwIfAborted(signal);
    await this.faults.apply(op, this.clock, signal);
  }

  private entry(path: string, f: MemFile): StorageEntry {
    return { path, size: f.data.length, mtimeMs: f.mtimeMs, hashes: { md5: f.md5, sha256: f.sha256 } };
  }

  async test(opts: OpOptions = {}): Promise<ConnectionReport> {
    const t0 = performance.now();
    try {
      await this.enter('test', opts.signal);
      const top = new Set<string>();
      for (const f of this.files.values()) top.add(f.path.split('/')[0]!);
      return {
        ok: true,
        kind: this.kind,
        id: this.id,
        latencyMs: Math.round(performance.now() - t0),
        writable: true,
        entries: top.size,
      };
    } catch (e) {
      const me = toMedsyncError(e, 'Testing the memory storage', { adapter: 'memory' });
      return failedReport(this, t0, me, 'An injected fault is active.');
    }
  }

  async *list(prefix = '', opts: ListOptions = {}): AsyncGenerator<StorageEntry> {
    const start = normalizePath(prefix, { allowRoot: true });
    await this.enter('list', opts.signal);
    const items = [...this.files.entries()];
    if (start !== '') {
      const exact = this.files.get(this.key(start));
      if (exact) {
        yield this.entry(exact.path, exact);
        return;
      }
      const k = this.key(start) + '/';
      if (!items.some(([p]) => p.startsWith(k))) {
        throw new MedsyncError('E_NOT_FOUND', 'The folder does not exist.', {
          adapter: 'memory',
          path: start,
        });
      }
    }
    const k = start === '' ? '' : this.key(start) + '/';
    for (const [p, f] of items) {
      throwIfAborted(opts.signal);
      if (p.startsWith(k)) yield this.entry(f.path, f);
    }
  }

  async stat(path: string, opts: OpOptions = {}): Promise<StorageEntry> {
    const rel = normalizePath(path);
    await this.enter('stat', opts.signal);
    const f = this.findFile(rel);
    return this.entry(f[0], f[1]);
  }

  private findFile(rel: string): [string, MemFile] {
    const f = this.files.get(this.key(rel));
    if (!f) throw new MedsyncError('E_NOT_FOUND', 'No such file.', { adapter: 'memory', path: rel });
    return [f.path, f];
  }

  async read(path: string, opts: ReadOptions = {}): Promise<Readable> {
    const rel = normalizePath(path);
    await this.enter('read', opts.signal);
    const [, f] = this.findFile(rel);
    const start = opts.start ?? 0;
    const end = opts.end !== undefined ? opts.end + 1 : f.data.length;
    const data = f.data.subarray(start, end);
    const chunk = 64 * 1024;
    function* chunks() {
      for (let i = 0; i < data.length; i += chunk) yield data.subarray(i, i + chunk);
    }
    return Readable.from(chunks(), { objectMode: false });
  }

  async readBuffer(path: string, opts: OpOptions = {}): Promise<Buffer> {
    const rel = normalizePath(path);
    await this.enter('read', opts.signal);
    return Buffer.from(this.findFile(rel)[1].data);
  }

  async write(path: string, input: WriteBody, opts: WriteOptions = {}): Promise<StorageEntry> {
    const body = input instanceof Uint8Array ? Readable.from([Buffer.from(input)]) : input;
    let rel: string;
    try {
      rel = normalizePath(path);
      await this.enter('write', opts.signal);
    } catch (e) {
      body.destroy();
      throw e;
    }
    const parts: Buffer[] = [];
    let total = 0;
    try {
      for await (const c of body) {
        throwIfAborted(opts.signal);
        const buf = Buffer.isBuffer(c) ? c : Buffer.from(c as Uint8Array);
        total += buf.length;
        const cut = this.faults.cutAt(total);
        if (cut) throw cut;
        parts.push(buf);
      }
      throwIfAborted(opts.signal);
    } catch (e) {
      body.destroy();
      throw toMedsyncError(e, 'Writing the file', { adapter: 'memory', path: rel });
    }
    if (opts.size !== undefined && opts.size >= 0 && total !== opts.size) {
      throw new MedsyncError('E_INTEGRITY', `Received ${total} bytes but ${opts.size} were expected.`, {
        adapter: 'memory',
        path: rel,
      });
    }
    const data = Buffer.concat(parts);
    const file: MemFile = {
      path: rel,
      data,
      mtimeMs: opts.mtimeMs ?? this.clock.now(),
      md5: createHash('md5').update(data).digest('hex'),
      sha256: createHash('sha256').update(data).digest('hex'),
    };
    this.files.set(this.key(rel), file);
    this.faults.afterEffect('write');
    return this.entry(rel, file);
  }

  async remove(path: string, opts: OpOptions = {}): Promise<void> {
    const rel = normalizePath(path);
    await this.enter('remove', opts.signal);
    this.files.delete(this.key(rel));
    this.faults.afterEffect('remove');
  }

  async rename(from: string, to: string, opts: OpOptions = {}): Promise<void> {
    const a = normalizePath(from);
    const b = normalizePath(to);
    await this.enter('rename', opts.signal);
    const [, f] = this.findFile(a);
    this.files.delete(this.key(a));
    this.files.set(this.key(b), { ...f, path: b });
    this.faults.afterEffect('rename');
  }

  /** The bytes of a file, for assertions (undefined when missing). */
  peek(path: string): Buffer | undefined {
    return this.files.get(this.key(normalizePath(path)))?.data;
  }

  /** Number of files held. */
  get size(): number {
    return this.files.size;
  }

  async close(): Promise<void> {
    this.closed = true;
  }
}

/** Creates a {@link MemoryStorage}. */
export function createMemoryStorage(opts: MemoryStorageOptions = {}): MemoryStorage {
  return new MemoryStorage(opts);
}
