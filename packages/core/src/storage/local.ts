import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import type { Dirent } from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as nodePath from 'node:path';
import { pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import type { Readable } from 'node:stream';
import { MedsyncError, throwIfAborted, toMedsyncError } from '../errors/errors.js';
import { isPartialName, normalizePath, partialNameFor } from './paths.js';
import { CopyError, sharedCopyPool, type CopyDone } from '../util/copy-pool.js';
import { flushFailures, GroupSync, syncfsAvailable, type GroupSyncOptions } from '../util/group-sync.js';
import type {
  CleanupOptions,
  ConnectionReport,
  CopyOptions,
  CopyResult,
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

export interface LocalStorageOptions {
  /** Absolute or relative path of the root folder. */
  root: string;
  /** Create the root folder on first write if missing. Default true. */
  createRoot?: boolean;
  /**
   * fsync each file before renaming it into place and the folder after, so a power cut never
   * leaves a renamed but empty file. Default true.
   */
  fsync?: boolean;
  /**
   * With fsync on, make small files (buffers under `syncIoBelow`) durable in groups for callers
   * that overlap their writes (they pass `onStaged`, as SyncJob does): one syncfs(2) covers every
   * file completed meanwhile, where an fdatasync per small file costs a journal commit and a
   * device flush each. Files are still durable before they are renamed into place. Linux only
   * (through coreutils' `sync -f`); elsewhere each file is fsynced. Larger files copied from
   * another LocalStorage (copyFrom) join the groups too; other large writes keep their own
   * fdatasync. `false` fsyncs each file; an object tunes the groups. Default true.
   */
  groupSync?: boolean | GroupSyncOptions;
  /**
   * With fsync on, files copied from another LocalStorage on a local disk are written with
   * O_DIRECT: the same writes reach the disk, without first copying every byte into the page
   * cache (on a VM that copy costs more CPU than hashing the file) and without pushing other
   * programs' data out of the cache. The last partial block goes through the cache. A file system
   * that refuses O_DIRECT gets cached writes. Default true.
   */
  directIo?: boolean;
  /** Concurrent stat calls while listing (×4 per batch). Default 32. */
  listConcurrency?: number;
  /**
   * Files smaller than this are read (and, with fsync off, written) with synchronous calls where
   * `listMode` picks them (local disks): for tiny files one thread-pool hand-off per step costs
   * more than the step. 0 turns it off. Default 64 KiB.
   */
  syncIoBelow?: number;
  /**
   * How `list` walks the tree, and how small files are read and written: `sync` (synchronous
   * calls, cheapest on local disks), `async` (concurrent calls on the thread pool, which hide the
   * latency of network mounts), or `auto` (default): `sync` on local-disk file systems, `async`
   * elsewhere.
   */
  listMode?: 'auto' | 'sync' | 'async';
}

/** Size and mtime of a file; null when gone or not a file; size -1 when it cannot be stat'ed. */
/**
 * Size and mtime of a listed name. `dir` for a symlink to a folder (followed); null when the file
 * vanished meanwhile; size -1 when it cannot be stat'ed or is a dangling symlink, so the sync
 * reports it and a mirror never deletes what may lie behind it.
 */
function statEntry(abs: string, path: string, isLink: boolean): Promise<StorageEntry | 'dir' | null> {
  return fsp.stat(abs).then(
    (s) =>
      s.isFile()
        ? { path, size: s.size, mtimeMs: Math.floor(s.mtimeMs) }
        : s.isDirectory() && isLink
          ? 'dir'
          : null,
    (e: unknown) => ((e as { code?: string }).code === 'ENOENT' && !isLink ? null : { path, size: -1 }),
  );
}

/**
 * File systems on local disks (statfs f_type), where a listing is faster with synchronous calls
 * than with a thread-pool hand-off per stat: ext2/3/4, XFS, Btrfs, tmpfs, overlayfs, ZFS, F2FS.
 * Network and FUSE mounts (NFS, SMB/CIFS, sshfs…) keep concurrent asynchronous stats, which hide
 * their latency.
 */
const LOCAL_FS_TYPES = new Set([
  0xef53, 0x58465342, 0x9123683e, 0x01021994, 0x794c7630, 0x2fc12fc1, 0xf2f52010,
]);

/**
 * Network, cluster and FUSE file systems (statfs f_type), where a call may wait for a server: NFS,
 * SMB, CIFS, SMB2, FUSE (sshfs, virtiofs, rclone mount…), Ceph, 9p, AFS (two), Coda, NCP, Lustre,
 * GPFS, OCFS2, GFS2. Small files there are read and written on the thread pool, never with
 * synchronous calls; other file systems (local disks, including USB vfat/exFAT/NTFS) use them.
 */
const NETWORK_FS_TYPES = new Set([
  0x6969, 0x517b, 0xff534d42, 0xfe534d42, 0x65735546, 0x00c36400, 0x01021997, 0x6b414653, 0x5346414f,
  0x73757245, 0x564c, 0x0bd00bd0, 0x47504653, 0x7461636f, 0x01161970,
]);

/**
 * fs.rename on a callback: a promise of fs/promises carries a stats array of its own, ~400 bytes
 * more garbage per call, once per file delivered.
 */
const renameFile = promisify(fs.rename);
const closeFd = promisify(fs.close);
/** fs.read at `position`, resolving to the bytes read. */
function readAt(fd: number, buf: Buffer, offset: number, length: number, position: number): Promise<number> {
  return new Promise((resolve, reject) =>
    fs.read(fd, buf, offset, length, position, (e, n) => (e ? reject(e) : resolve(n))),
  );
}

/** How long the root's file system type is trusted before it is asked again (a late mount). */
const FS_TYPE_TTL_MS = 10_000;

/**
 * Group flushes per file system (device), shared by every LocalStorage of the process: flushes of
 * one file system run one at a time, so no flush reports a write-back error that another, running
 * at the same moment, then misses. (Storages with an injected syncFs keep their own.)
 */
const deviceGroups = new Map<number, GroupSync>();

/**
 * Folders fsynced at once by flush(): the thread pool's default size (4), so a flush does not
 * queue ahead of every other file operation of the process.
 */
const FLUSH_CONCURRENCY = 4;
/** Temporary names: a per-process random prefix and a counter (cheaper than random bytes per file). */
const TMP_PREFIX = randomBytes(4).toString('hex');
let tmpCounter = 0;

const CAPABILITIES: StorageCapabilities = {
  hashes: [],
  preservesMtime: true,
  mtimePrecisionMs: 1,
  atomicRename: true,
  rangeReads: true,
  caseInsensitive: false,
  // A folder may be on a FAT or exFAT drive, a CIFS mount, macOS or Windows: SyncJob asks.
  caseInsensitiveVaries: true,
  maxConcurrency: 32,
};

/**
 * Storage on a local (or mounted) folder. Writes go to a hidden `.name.<random>.medsync-part`
 * sibling, are fsynced, get their mtime, and are renamed into place.
 */
export class LocalStorage implements Storage {
  readonly kind = 'local';
  readonly id: string;
  readonly capabilities = CAPABILITIES;
  readonly root: string;
  private readonly opts: Required<LocalStorageOptions>;
  private readonly madeDirs = new Set<string>();
  private closed = false;
  /** Group flushes by folder (null: fsync each file there) and by device. */
  private readonly groups = new Map<string, GroupSync | null>();
  private readonly groupsByDevice = new Map<number, GroupSync>();

  constructor(opts: LocalStorageOptions) {
    if (!opts || typeof opts.root !== 'string' || opts.root === '') {
      throw new MedsyncError('E_CONFIG', 'LocalStorage needs a root folder.', { adapter: 'local' });
    }
    this.root = nodePath.resolve(opts.root);
    this.rootPrefix = this.root.endsWith(nodePath.sep) ? this.root : this.root + nodePath.sep;
    this.id = pathToFileURL(this.root).href;
    this.opts = {
      createRoot: true,
      fsync: true,
      groupSync: true,
      directIo: true,
      listConcurrency: 32,
      syncIoBelow: 64 * 1024,
      listMode: 'auto',
      ...opts,
      root: this.root,
    };
  }

  /** The root with one separator after it. */
  private readonly rootPrefix: string;

  /**
   * The absolute path of a normalised relative one (no empty, `.` or `..` segment): the root and
   * the path concatenated, as `path.join` would give them without its garbage per call.
   */
  private abs(rel: string): string {
    if (rel === '') return this.root;
    return this.rootPrefix + (nodePath.sep === '/' ? rel : rel.replaceAll('/', nodePath.sep));
  }

  private check(): void {
    if (this.closed) throw new MedsyncError('E_CONFIG', 'This storage was closed.', { adapter: 'local' });
  }

  private err(e: unknown, context: string, path?: string): MedsyncError {
    return toMedsyncError(e, context, { adapter: 'local', ...(path !== undefined ? { path } : {}) });
  }

  /** What a failed write rejects with: E_ABORTED once cancelled, else the cause's own code. */
  private writeError(e: unknown, rel: string, signal: AbortSignal | undefined): MedsyncError {
    if (signal?.aborted) {
      return new MedsyncError('E_ABORTED', 'The write was cancelled.', {
        adapter: 'local',
        path: rel,
        cause: e,
      });
    }
    return this.err(e, 'Writing the file', rel);
  }

  async test(opts: OpOptions = {}): Promise<ConnectionReport> {
    const started = performance.now();
    const base = { kind: this.kind, id: this.id };
    try {
      throwIfAborted(opts.signal);
      const st = await fsp.stat(this.root);
      if (!st.isDirectory()) {
        throw new MedsyncError('E_CONFIG', 'The root exists but is not a folder.', { adapter: 'local' });
      }
      let entries = 0;
      const dir = await fsp.opendir(this.root);
      for await (const d of dir) {
        if (!isPartialName(d.name)) entries++;
        if (entries >= 10_000) break;
      }
      let writable = false;
      const probe = nodePath.join(this.root, `.medsync-probe-${randomBytes(6).toString('hex')}`);
      try {
        await fsp.writeFile(probe, 'probe');
        await fsp.unlink(probe);
        writable = true;
      } catch {
        writable = false;
      }
      let freeBytes: number | undefined;
      try {
        const s = await fsp.statfs(this.root);
        freeBytes = s.bavail * s.bsize;
      } catch {
        freeBytes = undefined;
      }
      return {
        ...base,
        ok: true,
        latencyMs: Math.round(performance.now() - started),
        writable,
        entries,
        ...(freeBytes !== undefined ? { freeBytes } : {}),
        ...(writable ? {} : { advice: 'The folder is readable but not writable by this user.' }),
      };
    } catch (e) {
      const me = this.err(e, 'Opening the root folder');
      return failedReport(
        this,
        started,
        me,
        me.code === 'E_NOT_FOUND'
          ? 'The folder does not exist: check the path, and that the share is mounted.'
          : me.code === 'E_PERMISSION'
            ? 'This user may not read the folder: check its owner and mode.'
            : 'Check that the path is a readable folder.',
      );
    }
  }

  /** The root's file system type (statfs f_type) and when it was asked; undefined: not yet. */
  private rootFs: { type: number | undefined; at: number } | undefined;

  /**
   * The root's file system type, asked again at each listing (`fresh`) and every few seconds: a
   * share may be mounted over the folder after the storage was made. A root not made yet is
   * judged by its nearest existing folder (where it will be made); undefined when none answers.
   */
  private rootFsType(fresh = false): number | undefined {
    const now = Date.now();
    if (this.rootFs && !fresh && now - this.rootFs.at < FS_TYPE_TTL_MS) return this.rootFs.type;
    let type: number | undefined;
    let exists = true;
    for (let d = this.root; ; d = nodePath.dirname(d)) {
      try {
        type = fs.statfsSync(d).type;
        break;
      } catch {
        exists = false;
        if (d === nodePath.dirname(d)) break;
      }
    }
    // Kept only once the root exists: it may be made on another file system than its parent's.
    this.rootFs = exists ? { type, at: now } : undefined;
    return type;
  }

  /** True when the root is on a local-disk file system (see LOCAL_FS_TYPES); false when unsure. */
  private onLocalDisk(fresh = false): boolean {
    const type = this.rootFsType(fresh);
    return type !== undefined && LOCAL_FS_TYPES.has(type);
  }

  /**
   * Whether to use synchronous calls (listing, and small files' reads and writes): cheapest on a
   * local disk, but on a network mount each one would hold the event loop for a round trip, one
   * file at a time. `listMode` forces it either way.
   */
  private syncCalls(fresh = false): boolean {
    if (this.opts.listMode !== 'auto') return this.opts.listMode === 'sync';
    const type = this.rootFsType(fresh);
    return type !== undefined && !NETWORK_FS_TYPES.has(type);
  }

  /**
   * Every file below `prefix` with synchronous calls, in batches of a few hundred stats (yielding
   * between them). For local disks, where a synchronous stat costs less than handing it to the
   * thread pool.
   */
  private *listSync(start: string): Generator<StorageEntry[]> {
    const dirs = [start];
    const seenDirs = new Set<string>();
    let out: StorageEntry[] = [];
    while (dirs.length > 0) {
      const rel = dirs.pop()!;
      const absDir = this.abs(rel);
      let entries: Dirent[];
      try {
        entries = fs.readdirSync(absDir, { withFileTypes: true });
      } catch (e) {
        const code = (e as { code?: string }).code;
        if (rel === start) throw e;
        // A folder removed while we walk is not an error; anything else is.
        if (code === 'ENOENT') continue;
        throw this.err(e, 'Listing a folder', rel);
      }
      for (const d of entries) {
        const childRel = rel === '' ? d.name : `${rel}/${d.name}`;
        if (d.isDirectory()) {
          dirs.push(childRel);
          continue;
        }
        const link = d.isSymbolicLink();
        if ((!d.isFile() && !link) || isPartialName(d.name)) continue;
        let st: fs.Stats | undefined;
        try {
          // The folder's path joined once, not per file (names from readdir hold no separator).
          st = fs.statSync(absDir + nodePath.sep + d.name, { throwIfNoEntry: false });
        } catch {
          out.push({ path: childRel, size: -1 });
          continue;
        }
        if (!st) {
          // Gone since the readdir, or a dangling link (which may stand for a whole folder).
          if (link) out.push({ path: childRel, size: -1 });
        } else if (st.isFile()) {
          out.push({ path: childRel, size: st.size, mtimeMs: Math.floor(st.mtimeMs) });
        } else if (st.isDirectory() && link) {
          // A symlinked folder is followed once (a loop of links is not walked twice).
          let real: string;
          try {
            real = fs.realpathSync(this.abs(childRel));
          } catch {
            continue; // gone since the stat
          }
          if (!seenDirs.has(real)) {
            seenDirs.add(real);
            dirs.push(childRel);
          }
        }
        if (out.length >= 512) {
          yield out;
          out = [];
        }
      }
    }
    if (out.length) yield out;
  }

  async *list(prefix = '', opts: ListOptions = {}): AsyncGenerator<StorageEntry> {
    this.check();
    const start = normalizePath(prefix, { allowRoot: true });
    if (this.syncCalls(true)) {
      let batches: Generator<StorageEntry[]>;
      try {
        const st = fs.statSync(this.abs(start));
        if (!st.isDirectory()) {
          yield await this.stat(start, opts);
          return;
        }
        batches = this.listSync(start);
      } catch (e) {
        throw this.err(e, 'Listing the folder', start);
      }
      for (;;) {
        throwIfAborted(opts.signal);
        let next: IteratorResult<StorageEntry[]>;
        try {
          next = batches.next();
        } catch (e) {
          throw this.err(e, 'Listing the folder', start);
        }
        if (next.done) return;
        yield* next.value;
        // Let timers and I/O run between batches: cancels, progress, lease renewals, other jobs.
        await new Promise<void>((r) => setImmediate(r));
      }
    }
    const concurrency = opts.concurrency ?? this.opts.listConcurrency;
    let top: Dirent[];
    try {
      top = await fsp.readdir(this.abs(start), { withFileTypes: true });
    } catch (e) {
      const code = (e as { code?: string }).code;
      if (code === 'ENOTDIR') {
        // The prefix is a file: list just that file.
        yield await this.stat(start, opts);
        return;
      }
      throw this.err(e, 'Listing the folder', start);
    }
    // Folders are read one after another; the stat calls of their files are batched across
    // folders so the thread pool always has work.
    const dirs: string[] = [];
    const pending: string[] = [];
    const links = new Set<string>();
    const seenDirs = new Set<string>();
    const take = (rel: string, entries: Dirent[]) => {
      for (const d of entries) {
        const childRel = rel === '' ? d.name : `${rel}/${d.name}`;
        if (d.isDirectory()) dirs.push(childRel);
        else if ((d.isFile() || d.isSymbolicLink()) && !isPartialName(d.name)) {
          if (d.isSymbolicLink()) links.add(childRel);
          pending.push(childRel);
        }
      }
    };
    take(start, top);
    const batch = Math.max(concurrency, 1) * 4;
    while (dirs.length > 0 || pending.length > 0) {
      throwIfAborted(opts.signal);
      while (pending.length < batch && dirs.length > 0) {
        const rel = dirs.pop()!;
        try {
          take(rel, await fsp.readdir(this.abs(rel), { withFileTypes: true }));
        } catch (e) {
          // A folder removed while we walk is not an error; anything else is.
          if ((e as { code?: string }).code === 'ENOENT') continue;
          throw this.err(e, 'Listing a folder', rel);
        }
      }
      const files = pending.splice(0, batch);
      const stats = await Promise.all(files.map((p) => statEntry(this.abs(p), p, links.has(p))));
      for (let i = 0; i < stats.length; i++) {
        const s = stats[i];
        if (s === 'dir') {
          // A symlinked folder is followed once (a loop of links is not walked twice).
          const real = await fsp.realpath(this.abs(files[i]!)).catch(() => undefined);
          if (real && !seenDirs.has(real)) {
            seenDirs.add(real);
            dirs.push(files[i]!);
          }
        } else if (s) yield s;
      }
    }
  }

  async stat(path: string, opts: OpOptions = {}): Promise<StorageEntry> {
    this.check();
    const rel = normalizePath(path);
    throwIfAborted(opts.signal);
    try {
      const s = await fsp.stat(this.abs(rel));
      if (!s.isFile()) {
        throw new MedsyncError('E_NOT_FOUND', 'The path is a folder, not a file.', {
          adapter: 'local',
          path: rel,
        });
      }
      return { path: rel, size: s.size, mtimeMs: Math.floor(s.mtimeMs) };
    } catch (e) {
      throw this.err(e, 'Reading file metadata', rel);
    }
  }

  async read(path: string, opts: ReadOptions = {}): Promise<Readable> {
    this.check();
    const rel = normalizePath(path);
    throwIfAborted(opts.signal);
    const abs = this.abs(rel);
    let fh: fsp.FileHandle | undefined;
    try {
      fh = await fsp.open(abs, 'r');
      const st = await fh.stat();
      if (!st.isFile()) {
        throw new MedsyncError('E_NOT_FOUND', 'The path is a folder, not a file.', {
          adapter: 'local',
          path: rel,
        });
      }
      throwIfAborted(opts.signal);
    } catch (e) {
      await fh?.close().catch(() => undefined);
      throw this.err(e, 'Opening the file', rel);
    }
    const stream = fh.createReadStream({
      ...(opts.start !== undefined ? { start: opts.start } : {}),
      ...(opts.end !== undefined ? { end: opts.end } : {}),
      highWaterMark: 1024 * 1024,
      ...(opts.signal ? { signal: opts.signal } : {}),
    });
    return stream;
  }

  private async ensureDir(relDir: string): Promise<void> {
    if (relDir === '' && !this.opts.createRoot) return;
    if (this.madeDirs.has(relDir)) return;
    const target = this.abs(relDir);
    const first = await fsp.mkdir(target, { recursive: true });
    // Every folder from the first one created down to the target is new: each one's parent
    // gained an entry that needs an fsync.
    if (first !== undefined && this.opts.fsync) {
      for (let d = target; ; d = nodePath.dirname(d)) {
        this.dirty.add(nodePath.dirname(d));
        if (d === first || d === nodePath.dirname(d)) break;
      }
    }
    this.madeDirs.add(relDir);
  }

  /** Folders whose entries changed (created, renamed, removed) since the last flush (absolute paths). */
  private readonly dirty = new Set<string>();

  async flush(opts: OpOptions = {}): Promise<void> {
    const dirs = [...this.dirty];
    this.dirty.clear();
    // Several folders at once: the file system commits concurrent fsyncs together (one journal
    // commit for many folders), where one after another each waits for its own.
    let next = 0;
    let failure: unknown;
    const worker = async (): Promise<void> => {
      while (next < dirs.length && failure === undefined) {
        try {
          throwIfAborted(opts.signal);
        } catch (e) {
          failure ??= e;
          return;
        }
        const d = dirs[next++]!;
        let fh: fsp.FileHandle | undefined;
        try {
          fh = await fsp.open(d, 'r');
          await fh.sync();
        } catch (e) {
          const code = (e as { code?: string }).code;
          // A folder removed since (retention) has nothing left to make durable.
          if (code !== 'ENOENT' && code !== 'EINVAL' && code !== 'EISDIR') {
            this.dirty.add(d);
            failure ??= this.err(e, 'Making written files durable');
          }
        } finally {
          await fh?.close().catch(() => undefined);
        }
      }
    };
    await Promise.all(Array.from({ length: Math.min(FLUSH_CONCURRENCY, dirs.length) }, worker));
    if (failure !== undefined) {
      // Folders not reached (after a failure or a cancel) stay dirty for the next flush.
      for (const d of dirs.slice(next)) this.dirty.add(d);
      throw failure;
    }
  }

  async readBuffer(path: string, opts: OpOptions = {}): Promise<Buffer> {
    this.check();
    const rel = normalizePath(path);
    throwIfAborted(opts.signal);
    try {
      if (this.opts.syncIoBelow > 0 && this.syncCalls()) {
        // Tiny files: synchronous calls cost less than handing each step to the thread pool.
        const read = await this.readOpened(this.abs(rel), opts.signal);
        if (read) return read;
      }
      return await fsp.readFile(this.abs(rel), opts.signal ? { signal: opts.signal } : {});
    } catch (e) {
      if ((e as { code?: string }).code === 'EISDIR') {
        throw new MedsyncError('E_NOT_FOUND', 'The path is a folder, not a file.', {
          adapter: 'local',
          path: rel,
        });
      }
      throw this.err(e, 'Reading the file', rel);
    }
  }

  /**
   * A regular file opened and sized with synchronous calls (a stat of the path first would be
   * one more call per file), then read whole: under `syncIoBelow` synchronously, larger ones on
   * the thread pool through the same descriptor (opening it again there, as readFile does, cost
   * 2,000 files of 256 KiB ~0.1–0.4 s more CPU). Undefined when it is not a regular file or tells
   * no size (the caller reads it to its end). O_NONBLOCK: opening a FIFO must not hold the main
   * thread; on a regular file it changes nothing.
   */
  private async readOpened(abs: string, signal: AbortSignal | undefined): Promise<Buffer | undefined> {
    const fd = fs.openSync(abs, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
    let pooled = false;
    try {
      const st = fs.fstatSync(fd);
      // Size 0 may be a file that tells no size (procfs, sysfs, some FUSE file systems): the
      // caller's read then goes to the end of the file.
      if (!st.isFile() || st.size === 0) return undefined;
      pooled = st.size >= this.opts.syncIoBelow;
      const buf = Buffer.allocUnsafe(st.size);
      let n = 0;
      while (n < buf.length) {
        if (pooled) throwIfAborted(signal);
        const got = pooled
          ? await readAt(fd, buf, n, buf.length - n, n)
          : fs.readSync(fd, buf, n, buf.length - n, n);
        if (got === 0) break;
        n += got;
      }
      return n === buf.length ? buf : buf.subarray(0, n);
    } finally {
      if (pooled) await closeFd(fd);
      else fs.closeSync(fd);
    }
  }

  async write(path: string, body: WriteBody, opts: WriteOptions = {}): Promise<StorageEntry> {
    this.check();
    const isStream = !(body instanceof Uint8Array);
    let rel: string;
    try {
      rel = normalizePath(path);
      throwIfAborted(opts.signal);
    } catch (e) {
      if (isStream) body.destroy();
      throw e;
    }
    const dirRel = rel.includes('/') ? rel.slice(0, rel.lastIndexOf('/')) : '';
    const tmp = this.abs(partialNameFor(rel, `${TMP_PREFIX}${(++tmpCounter).toString(36)}`));
    // Small buffers on a local disk go in synchronous calls when nothing waits on an fsync, or
    // when the caller overlaps its writes (onStaged) and a group flush makes them durable (an
    // fdatasync per small file costs far more than writing it). Larger files keep an fdatasync
    // each, on the thread pool or a copy worker, which overlaps with the other transfers without
    // stalling them; so does everything on a network mount (see syncCalls).
    const small = !isStream && body.length < this.opts.syncIoBelow && this.syncCalls();
    const staged = small && opts.onStaged !== undefined && this.groupsWanted();
    if (small && (staged || !this.opts.fsync)) {
      const failures = flushFailures();
      const entry = this.writeSmallSync(rel, dirRel, tmp, body, opts, staged);
      if (staged) await this.renameWhenDurable(dirRel, rel, tmp, body.length, opts, failures);
      return entry;
    }
    let fh: fsp.FileHandle | undefined;
    const onAbort = () => {
      if (isStream) body.destroy();
    };
    // Errors of the body surface through the read loop below; never as an uncaught event.
    if (isStream) body.on('error', () => undefined);
    opts.signal?.addEventListener('abort', onAbort, { once: true });
    try {
      try {
        await this.ensureDir(dirRel);
      } catch (e) {
        this.madeDirs.delete(dirRel);
        throw e;
      }
      fh = await fsp.open(tmp, 'wx').catch(async (e: unknown) => {
        if ((e as { code?: string }).code !== 'ENOENT') throw e;
        // The folder was removed since we made it (retention, an admin): make it again.
        this.madeDirs.delete(dirRel);
        await this.ensureDir(dirRel);
        return fsp.open(tmp, 'wx');
      });
      let written = 0;
      if (!isStream) {
        while (written < body.length) {
          const { bytesWritten } = await fh.write(body, written, body.length - written);
          written += bytesWritten;
        }
      } else {
        for await (const chunk of body as AsyncIterable<Buffer | string>) {
          const buf = typeof chunk === 'string' ? Buffer.from(chunk) : chunk;
          let off = 0;
          while (off < buf.length) {
            const { bytesWritten } = await fh.write(buf, off, buf.length - off);
            off += bytesWritten;
          }
          written += buf.length;
        }
      }
      throwIfAborted(opts.signal);
      if (opts.size !== undefined && opts.size >= 0 && written !== opts.size) {
        throw new MedsyncError(
          'E_INTEGRITY',
          `Wrote ${written} bytes but ${opts.size} were expected: the source changed or the stream was cut.`,
          { adapter: 'local', path: rel },
        );
      }
      if (opts.mtimeMs !== undefined) {
        // utimes takes seconds as a double; aim at the middle of the millisecond so the value
        // read back floors to the same millisecond despite rounding.
        const t = (Math.floor(opts.mtimeMs) + 0.5) / 1000;
        await fh.utimes(t, t);
      }
      if (this.opts.fsync) await fh.datasync();
      const mtimeMs =
        opts.mtimeMs === undefined ? Math.floor((await fh.stat()).mtimeMs) : Math.floor(opts.mtimeMs);
      await fh.close();
      fh = undefined;
      throwIfAborted(opts.signal);
      await renameFile(tmp, this.abs(rel));
      if (this.opts.fsync) this.dirty.add(nodePath.dirname(this.abs(rel)));
      return { path: rel, size: written, mtimeMs };
    } catch (e) {
      if (isStream) body.destroy();
      await fh?.close().catch(() => undefined);
      await fsp.rm(tmp, { force: true }).catch(() => undefined);
      throw this.writeError(e, rel, opts.signal);
    } finally {
      opts.signal?.removeEventListener('abort', onAbort);
    }
  }

  /**
   * Copies a file of another LocalStorage on a worker thread (synchronous I/O, hashing on the way),
   * with the same steps as write(). Undefined for other sources, for files under `syncIoBelow`,
   * when either side is on a network mount (see `listMode`), or when MEDSYNC_COPY_WORKERS=0.
   */
  async copyFrom(source: Storage, path: string, opts: CopyOptions = {}): Promise<CopyResult | undefined> {
    const pool = sharedCopyPool();
    if (!(source instanceof LocalStorage) || !pool.usable) return undefined;
    // Tiny files cost less on the ordinary path (synchronous reads) than a worker round trip, and
    // a tree of only tiny files then needs no worker (each costs memory).
    if (opts.size !== undefined && opts.size >= 0 && opts.size < this.opts.syncIoBelow) return undefined;
    // A worker blocks in each call: on a network mount that caps the transfers at one per worker.
    // The streaming path keeps the job's concurrency there.
    if (!this.syncCalls() || !source.syncCalls()) return undefined;
    this.check();
    source.check();
    const rel = normalizePath(path);
    throwIfAborted(opts.signal);
    const dirRel = rel.includes('/') ? rel.slice(0, rel.lastIndexOf('/')) : '';
    const mayMkdir = !(dirRel === '' && !this.opts.createRoot);
    const mtime = opts.mtimeMs !== undefined ? (Math.floor(opts.mtimeMs) + 0.5) / 1000 : undefined;
    const tmp = this.abs(partialNameFor(rel, `${TMP_PREFIX}${(++tmpCounter).toString(36)}`));
    // O_DIRECT on local disks only (a folder whose group flush is known, else the root's file
    // system). A caller that overlaps its writes (onStaged) then has the file made durable by a
    // group flush, like small files, and renamed after it. (Grouping cached large writes gained
    // nothing: their flush stalls the other writers.)
    const known = this.groups.get(dirRel);
    const direct =
      this.opts.fsync &&
      this.opts.directIo &&
      !this.directRefused &&
      (known !== undefined && !this.injectedSyncFs() ? known !== null : this.onLocalDisk());
    const stage = direct && opts.onStaged !== undefined && this.groupsWanted();
    const failures = flushFailures();
    let done: CopyDone;
    try {
      done = await pool.copy(
        {
          src: source.abs(rel),
          dst: this.abs(rel),
          tmp,
          dir: this.abs(dirRel),
          mkdir: mayMkdir && !this.madeDirs.has(dirRel),
          mayMkdir,
          expected: opts.size !== undefined && opts.size >= 0 ? opts.size : -1,
          kinds: opts.hashes ?? [],
          ...(mtime !== undefined ? { mtime, mtimeMs: Math.floor(opts.mtimeMs!) } : {}),
          fsync: this.opts.fsync,
          direct,
          stage,
        },
        opts.signal,
        opts.onBytes,
      );
    } catch (e) {
      if (!(e instanceof CopyError)) {
        // The copy worker died (its temporary file stays behind): the retry takes the ordinary
        // path (the pool is no longer usable).
        await fsp.rm(tmp, { force: true }).catch(() => undefined);
        throw new MedsyncError('E_TRANSIENT', 'The copy worker stopped; retrying without it.', {
          adapter: 'local',
          path: rel,
          cause: e,
          retryable: true,
        });
      }
      if (this.opts.fsync) this.markMade(e.made, this.abs(dirRel));
      if (e.code === 'ENOENT' && e.side === 'dest') this.madeDirs.delete(dirRel);
      const cause = Object.assign(new Error(e.message), { code: e.code, syscall: e.syscall });
      if (e.code === 'ABORT_ERR' || opts.signal?.aborted) {
        throw new MedsyncError('E_ABORTED', 'The copy was cancelled.', {
          adapter: 'local',
          path: rel,
          cause,
        });
      }
      if (e.code === 'ECHANGED') {
        throw new MedsyncError(
          'E_INTEGRITY',
          'The source file changed while it was being copied; it will be copied by the next run.',
          { adapter: 'local', path: rel, retryable: false },
        );
      }
      if (e.side === 'source') {
        const me = toMedsyncError(cause, 'Reading the source file', { adapter: 'local', path: rel });
        throw me.code === 'E_TRANSIENT'
          ? me
          : new MedsyncError(me.code, me.message, { adapter: 'local', path: rel, cause, retryable: false });
      }
      throw this.err(cause, 'Writing the file', rel);
    }
    if (done.directRefused) this.directRefused = true;
    this.madeDirs.add(dirRel);
    if (this.opts.fsync) this.markMade(done.made, this.abs(dirRel));
    if (stage) await this.renameWhenDurable(dirRel, rel, tmp, done.cachedBytes, opts, failures);
    else if (this.opts.fsync) this.dirty.add(this.abs(dirRel));
    return { entry: { path: rel, size: done.size, mtimeMs: done.mtimeMs }, digests: done.digests };
  }

  /** O_DIRECT was refused here once: later copies write through the cache. */
  private directRefused = false;

  /** Whether small files may wait for group flushes at all (fsync on, groupSync on, syncfs here). */
  private groupsWanted(): boolean {
    if (!this.opts.fsync || this.opts.groupSync === false) return false;
    return this.injectedSyncFs() || syncfsAvailable();
  }

  /** A `groupSync.syncFs` of the caller's (tests): used on any file system. */
  private injectedSyncFs(): boolean {
    const g = this.opts.groupSync;
    return typeof g === 'object' && g.syncFs !== undefined;
  }

  /**
   * The group flush for files in `dirRel`: one per file system (device) below the root, for
   * local-disk file systems only. A folder on a network or FUSE mount (whose syncfs need not
   * reach the server) or on an unknown file system gets none: its files are fsynced one by one.
   */
  private groupFor(dirRel: string): GroupSync | undefined {
    if (this.groups.has(dirRel)) return this.groups.get(dirRel) ?? undefined;
    let group: GroupSync | null = null;
    try {
      const dir = this.abs(dirRel);
      if (this.injectedSyncFs() || LOCAL_FS_TYPES.has(fs.statfsSync(dir).type)) {
        const dev = fs.statSync(dir).dev;
        const groups = this.injectedSyncFs() ? this.groupsByDevice : deviceGroups;
        group = groups.get(dev) ?? null;
        if (!group) {
          const g = this.opts.groupSync;
          group = new GroupSync(dir, typeof g === 'object' ? g : {});
          groups.set(dev, group);
        }
      }
    } catch {
      group = null;
    }
    if (this.groups.size > 10_000) this.groups.clear();
    this.groups.set(dirRel, group);
    return group ?? undefined;
  }

  /**
   * A complete, closed temporary file of a caller that overlaps its writes: tell it so, wait for
   * the group flush that makes it durable (or fsync it alone where none can be had), then rename
   * it into place. On failure the temporary file is removed.
   */
  private async renameWhenDurable(
    dirRel: string,
    rel: string,
    tmp: string,
    bytes: number,
    opts: WriteOptions,
    failuresBefore: number,
  ): Promise<void> {
    opts.onStaged?.();
    try {
      if (!(await this.groupDurable(dirRel, rel, tmp, bytes, failuresBefore))) {
        const fh = await fsp.open(tmp, 'r+');
        try {
          await fh.datasync();
        } finally {
          await fh.close();
        }
      }
      throwIfAborted(opts.signal);
      await renameFile(tmp, this.abs(rel));
    } catch (e) {
      await fsp.rm(tmp, { force: true }).catch(() => undefined);
      throw this.writeError(e, rel, opts.signal);
    }
    this.dirty.add(this.abs(dirRel));
  }

  /** Waits for the group flush of `dirRel`'s file system; false when there is none to wait for. */
  private async groupDurable(
    dirRel: string,
    rel: string,
    tmp: string,
    bytes: number,
    failuresBefore: number,
  ): Promise<boolean> {
    const group = this.groupFor(dirRel);
    if (!group) return false;
    const writeBackFailed = (cause?: unknown) =>
      new MedsyncError(
        'E_IO',
        'The file system reported an error while making written files durable; the file will be written again.',
        { adapter: 'local', path: rel, cause, retryable: true },
      );
    let ok: boolean;
    try {
      ok = await group.sync(bytes, nodePath.dirname(tmp));
    } catch (e) {
      const code = (e as { code?: string }).code;
      // A write-back error of the flush (or its timeout) says nothing sure about this file: write
      // it again. A full disk or a read-only file system keeps its own, permanent, code.
      if (code === 'EIO' || code === 'ETIMEDOUT') throw writeBackFailed(e);
      throw e;
    }
    // syncfs reports a write-back error once, to the first flush after it. One that failed since
    // this file was written may have been this file's, reported to another group.
    if (ok && flushFailures() !== failuresBefore) throw writeBackFailed();
    return ok;
  }

  /** Every folder from `first` (made by a recursive mkdir) down to `target` gained an entry. */
  private markMade(first: string | undefined, target: string): void {
    if (first === undefined) return;
    for (let d = target; ; d = nodePath.dirname(d)) {
      this.dirty.add(nodePath.dirname(d));
      if (d === first || d === nodePath.dirname(d)) break;
    }
  }

  /**
   * The whole write of a tiny buffer in synchronous calls (same steps as the async path), fsync
   * excepted. `staged`: stop before the rename (the caller makes the file durable, then renames).
   */
  private writeSmallSync(
    rel: string,
    dirRel: string,
    tmp: string,
    body: Uint8Array,
    opts: WriteOptions,
    staged = false,
  ): StorageEntry {
    let fd: number | undefined;
    try {
      if (!this.madeDirs.has(dirRel) && !(dirRel === '' && !this.opts.createRoot)) {
        const made = fs.mkdirSync(this.abs(dirRel), { recursive: true });
        if (this.opts.fsync) this.markMade(made, this.abs(dirRel));
        this.madeDirs.add(dirRel);
      }
      if (opts.size !== undefined && opts.size >= 0 && body.length !== opts.size) {
        throw new MedsyncError('E_INTEGRITY', `Got ${body.length} bytes but ${opts.size} were expected.`, {
          adapter: 'local',
          path: rel,
        });
      }
      try {
        fd = fs.openSync(tmp, 'wx');
      } catch (e) {
        if ((e as { code?: string }).code !== 'ENOENT') throw e;
        const made = fs.mkdirSync(this.abs(dirRel), { recursive: true });
        if (this.opts.fsync) this.markMade(made, this.abs(dirRel));
        fd = fs.openSync(tmp, 'wx');
      }
      let off = 0;
      while (off < body.length) off += fs.writeSync(fd, body, off, body.length - off);
      let mtimeMs: number;
      if (opts.mtimeMs !== undefined) {
        const t = (Math.floor(opts.mtimeMs) + 0.5) / 1000;
        fs.futimesSync(fd, t, t);
        mtimeMs = Math.floor(opts.mtimeMs);
      } else mtimeMs = Math.floor(fs.fstatSync(fd).mtimeMs);
      fs.closeSync(fd);
      fd = undefined;
      throwIfAborted(opts.signal);
      if (!staged) fs.renameSync(tmp, this.abs(rel));
      return { path: rel, size: body.length, mtimeMs };
    } catch (e) {
      if (fd !== undefined) fs.closeSync(fd);
      fs.rmSync(tmp, { force: true });
      this.madeDirs.delete(dirRel);
      throw this.err(e, 'Writing the file', rel);
    }
  }

  async remove(path: string, opts: OpOptions = {}): Promise<void> {
    this.check();
    const rel = normalizePath(path);
    throwIfAborted(opts.signal);
    try {
      await fsp.unlink(this.abs(rel));
    } catch (e) {
      if ((e as { code?: string }).code === 'ENOENT') return;
      throw this.err(e, 'Removing the file', rel);
    }
    // Made durable by the next flush, as a rename is: a mirror forgets a deleted file only after
    // it (a power cut must not bring back a file the job no longer knows, never to delete it).
    if (this.opts.fsync) this.dirty.add(nodePath.dirname(this.abs(rel)));
  }

  async rename(from: string, to: string, opts: OpOptions = {}): Promise<void> {
    this.check();
    const a = normalizePath(from);
    const b = normalizePath(to);
    throwIfAborted(opts.signal);
    try {
      const st = await fsp.stat(this.abs(a));
      if (!st.isFile())
        throw new MedsyncError('E_NOT_FOUND', 'Only files can be renamed.', { adapter: 'local', path: a });
      await this.ensureDir(b.includes('/') ? b.slice(0, b.lastIndexOf('/')) : '');
      await fsp.rename(this.abs(a), this.abs(b));
      if (this.opts.fsync) {
        this.dirty.add(nodePath.dirname(this.abs(a)));
        this.dirty.add(nodePath.dirname(this.abs(b)));
      }
    } catch (e) {
      throw this.err(e, 'Renaming the file', a);
    }
  }

  async cleanupPartials(prefix = '', opts: CleanupOptions = {}): Promise<number> {
    this.check();
    const start = normalizePath(prefix, { allowRoot: true });
    let removed = 0;
    const stack = [start];
    while (stack.length > 0) {
      throwIfAborted(opts.signal);
      const rel = stack.pop()!;
      let entries: Dirent[];
      try {
        entries = await fsp.readdir(this.abs(rel), { withFileTypes: true });
      } catch (e) {
        if ((e as { code?: string }).code === 'ENOENT') continue;
        throw this.err(e, 'Listing a folder', rel);
      }
      for (const d of entries) {
        const childRel = rel === '' ? d.name : `${rel}/${d.name}`;
        if (d.isDirectory()) stack.push(childRel);
        else if (isPartialName(d.name)) {
          const abs = this.abs(childRel);
          if (opts.olderThanMs !== undefined) {
            // ctime, not mtime: a temporary file gets the source's (old) mtime before its rename.
            const s = await fsp.stat(abs).catch(() => null);
            if (!s || s.ctimeMs >= opts.olderThanMs) continue;
          }
          await fsp.rm(abs, { force: true });
          removed++;
        }
      }
    }
    return removed;
  }

  async close(): Promise<void> {
    this.closed = true;
  }
}

/** Creates a {@link LocalStorage}. */
export function createLocalStorage(opts: LocalStorageOptions): LocalStorage {
  return new LocalStorage(opts);
}
