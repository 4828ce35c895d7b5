import { execFile, spawn, type ChildProcessByStdio } from 'node:child_process';
import { existsSync } from 'node:fs';
import { release } from 'node:os';
import type { Readable, Writable } from 'node:stream';

/**
 * Makes everything written to one file system durable: resolves true when done, false when this
 * platform cannot (the caller then fsyncs each file), rejects when the file system reports a
 * write-back error.
 */
export type SyncFileSystem = (dir: string) => Promise<boolean>;

const ERRNO_TEXT: Array<[RegExp, string]> = [
  [/no space left/i, 'ENOSPC'],
  [/quota exceeded/i, 'EDQUOT'],
  [/read-only/i, 'EROFS'],
  [/permission denied/i, 'EACCES'],
  [/no such file/i, 'ENOENT'],
];

function kernelAtLeast(major: number, minor: number): boolean {
  const m = /^(\d+)\.(\d+)/.exec(release());
  if (!m) return false;
  const [a, b] = [Number(m[1]), Number(m[2])];
  return a > major || (a === major && b >= minor);
}

// An absolute path: no PATH search per flush, and no other `sync` picked up from the PATH.
// Linux 5.8 and later only: before it, syncfs did not report write-back errors.
// undefined: not looked up yet; null: none usable here (kept, so it is not looked up again, nor a
// `sync` without -f tried again at every flush).
let syncBin: string | undefined | null;
const findSync = (): string | null => {
  if (syncBin === undefined) {
    syncBin =
      process.platform === 'linux' && kernelAtLeast(5, 8)
        ? (['/usr/bin/sync', '/bin/sync'].find((p) => existsSync(p)) ?? null)
        : null;
  }
  return syncBin;
};

/** True when {@link syncfs} can flush a whole file system here (as far as is known). */
export function syncfsAvailable(): boolean {
  return findSync() !== null;
}

/** What a failed `sync -f` said (its first line), as the error a flush rejects with. */
function syncError(stderr: string): Error {
  // "sync: error syncing '<dir>': Input/output error": keep the errno text, not the path.
  const reason = stderr.trim().split('\n')[0]?.split(': ').pop() || 'sync -f failed';
  const errno = ERRNO_TEXT.find(([re]) => re.test(reason))?.[1] ?? 'EIO';
  return Object.assign(new Error(`Making written files durable (syncfs) failed: ${reason}`), { code: errno });
}

/** A `sync` that cannot flush one file system (busybox has no -f): fsync file by file from now on. */
const NO_FS_FLAG = /invalid option|unrecognized option|^usage/im;

const FLUSH_TIMEOUT_MS = 120_000;
const HELPER_IDLE_MS = 30_000;

/**
 * Reads folder paths, one per line, and answers each in order with `ok` or `err <what sync said>`.
 * The folder is an argument of `sync`, never part of a command line the shell parses.
 */
const HELPER_SCRIPT = `while IFS= read -r d; do
  if e=$("$0" -f -- "$d" 2>&1 >/dev/null); then echo ok; else printf 'err %s\\n' "$(printf '%s' "$e" | tr '\\n' ' ')"; fi
done`;

interface Pending {
  resolve: (durable: boolean) => void;
  reject: (e: unknown) => void;
  timer: ReturnType<typeof setTimeout>;
}

/**
 * A long-lived `sh` that runs `sync -f` for each request: the Node process forks once, not once
 * per flush (forking a large process held its main thread ~10 ms per flush, and each child
 * brought pipes and sockets to collect). Kept unreferenced while idle, so it never keeps the
 * process alive; it exits when the process does (end of its input).
 */
class SyncHelper {
  private child: ChildProcessByStdio<Writable, Readable, null> | undefined;
  private pending: Pending[] = [];
  private out = '';
  /** Set once the helper could not be started: flushes spawn `sync` each (the old way). */
  broken = false;
  private idle: ReturnType<typeof setTimeout> | undefined;

  constructor(private readonly bin: string) {}

  flush(dir: string): Promise<boolean> {
    return new Promise<boolean>((resolve, reject) => {
      if (this.idle !== undefined) clearTimeout(this.idle);
      this.idle = undefined;
      const child = this.start();
      if (!child) return resolve(false);
      const timer = setTimeout(() => {
        this.fail(
          Object.assign(new Error('Making written files durable (syncfs) timed out.'), { code: 'ETIMEDOUT' }),
        );
      }, FLUSH_TIMEOUT_MS);
      this.pending.push({ resolve, reject, timer });
      this.ref(true);
      child.stdin.write(`${dir}\n`);
    });
  }

  private start(): ChildProcessByStdio<Writable, Readable, null> | undefined {
    if (this.child) return this.child;
    let child: ChildProcessByStdio<Writable, Readable, null>;
    try {
      child = spawn('/bin/sh', ['-c', HELPER_SCRIPT, this.bin], {
        stdio: ['pipe', 'pipe', 'ignore'],
        windowsHide: true,
      });
    } catch {
      this.broken = true;
      return undefined;
    }
    this.child = child;
    child.stdout.setEncoding('utf8');
    // Events of a helper already replaced (killed after a timeout) are ignored.
    child.stdout.on('data', (chunk: string) => {
      if (this.child === child) this.read(chunk);
    });
    child.stdin.on('error', () => undefined);
    child.on('error', () => {
      // Not started (no /bin/sh, EAGAIN): these flushes fall back to an fsync per file.
      if (this.child !== child) return;
      this.broken = true;
      this.fail(undefined);
    });
    child.on('exit', () => {
      if (this.child === child) this.fail(undefined);
    });
    return child;
  }

  private read(chunk: string): void {
    this.out += chunk;
    for (let nl = this.out.indexOf('\n'); nl >= 0; nl = this.out.indexOf('\n')) {
      const line = this.out.slice(0, nl);
      this.out = this.out.slice(nl + 1);
      const p = this.pending.shift();
      if (!p) continue;
      clearTimeout(p.timer);
      if (line === 'ok') p.resolve(true);
      else if (NO_FS_FLAG.test(line)) {
        syncBin = null;
        p.resolve(false);
      } else p.reject(syncError(line.replace(/^err /, '')));
    }
    if (this.pending.length === 0) {
      this.ref(false);
      // Not kept between runs: a helper idle for a while ends (the next flush starts another).
      this.idle = setTimeout(() => this.close(), HELPER_IDLE_MS);
      this.idle.unref?.();
    }
  }

  /** Ends the helper once it has answered what it was sent (end of its input). */
  close(): void {
    const child = this.child;
    if (!child) return;
    if (this.pending.length === 0) this.child = undefined;
    child.stdin.end();
  }

  /**
   * Ends the helper and settles what waits on it: with `e` (a timeout), or, when the helper went
   * away by itself, false (those files are fsynced one by one).
   */
  private fail(e: unknown): void {
    const child = this.child;
    this.child = undefined;
    this.out = '';
    if (child && child.exitCode === null) child.kill();
    const waiting = this.pending;
    this.pending = [];
    for (const p of waiting) {
      clearTimeout(p.timer);
      if (e === undefined) p.resolve(false);
      else p.reject(e);
    }
  }

  private ref(on: boolean): void {
    const c = this.child;
    if (!c) return;
    const streams = [c.stdin, c.stdout] as unknown as Array<{ ref?: () => void; unref?: () => void }>;
    if (on) {
      c.ref();
      for (const s of streams) s.ref?.();
    } else {
      c.unref();
      for (const s of streams) s.unref?.();
    }
  }
}

/**
 * One helper per folder flushed, i.e. per file system (GroupSync flushes one device through one
 * folder, one flush at a time): a slow disk's flush never queues another disk's behind it, and
 * its timeout fails only its own files.
 */
const helpers = new Map<string, SyncHelper>();

/** `sync -f` in a process of its own, for a folder the helper's line protocol cannot carry. */
function syncOnce(bin: string, dir: string): Promise<boolean> {
  return new Promise((resolve, reject) => {
    execFile(bin, ['-f', dir], { timeout: FLUSH_TIMEOUT_MS, windowsHide: true }, (err, _out, stderr) => {
      if (!err) return resolve(true);
      const code = (err as { code?: unknown }).code;
      // No `sync` binary, or one without -f (busybox): fsync file by file from now on.
      if (code === 'ENOENT' || NO_FS_FLAG.test(String(stderr))) {
        syncBin = null;
        return resolve(false);
      }
      // It could not be started this time (EAGAIN, EMFILE, ENOMEM): fsync these files one by one.
      if (typeof code === 'string') return resolve(false);
      if ((err as { killed?: boolean }).killed) {
        return reject(
          Object.assign(new Error('Making written files durable (syncfs) timed out.'), { code: 'ETIMEDOUT' }),
        );
      }
      reject(syncError(String(stderr)));
    });
  });
}

/**
 * syncfs(2) through coreutils' `sync --file-system` (Node has no binding for it): one journal
 * commit and one device flush for every file written since, where an fdatasync per file costs one
 * of each per file. Requests go to one long-lived helper shell.
 */
export const syncfs: SyncFileSystem = (dir) => {
  const bin = findSync();
  if (!bin) return Promise.resolve(false);
  if (dir.includes('\n')) return syncOnce(bin, dir);
  let helper = helpers.get(dir);
  if (helper?.broken) return syncOnce(bin, dir);
  if (!helper) {
    helper = new SyncHelper(bin);
    // Folders are few (one per device); a caller flushing many (tests) starts over past a bound.
    if (helpers.size >= 64) {
      for (const h of helpers.values()) h.close();
      helpers.clear();
    }
    helpers.set(dir, helper);
  }
  return helper.flush(dir);
};

export interface GroupSyncOptions {
  /** Start a flush once this many bytes wait. Default 64 MiB. */
  maxBytes?: number;
  /** Start a flush once this many files wait. Default 200. */
  maxFiles?: number;
  /** Start a flush this long after the latest file joined when no threshold was reached. Default 4 ms. */
  idleMs?: number;
  /** Never let the first waiting file wait longer than this for a flush to start. Default 100 ms. */
  maxWaitMs?: number;
  /** What makes the file system durable (tests inject failures). Default {@link syncfs}. */
  syncFs?: SyncFileSystem;
}

/** Group flushes that reported a write-back error in this process so far (any file system). */
let failedFlushes = 0;

/**
 * Codes of a flush that ran and found data that could not be written (EIO, a full disk or quota
 * for delayed allocations) or did not answer. A folder that could not be opened (ENOENT, EACCES)
 * or a read-only file system says nothing about written data.
 */
const WRITE_BACK_CODES = new Set(['EIO', 'ENOSPC', 'EDQUOT', 'ETIMEDOUT']);

/**
 * How many group flushes have reported a write-back error in this process. A writer reads it
 * before writing and again after its own flush succeeded: syncfs(2) reports a write-back error
 * only to the first flush after it, which may be another group's, so a change means the file may
 * be damaged. Process-wide, so an error on one disk makes the files of other disks in flight at
 * that moment be written again: rare, and safe.
 */
export function flushFailures(): number {
  return failedFlushes;
}

interface Waiter {
  resolve: (durable: boolean) => void;
  reject: (e: unknown) => void;
  dir?: string;
}

/**
 * Group commit for files written to one file system: writers finish their temporary files, call
 * {@link GroupSync.sync}, and rename once it resolves true. One flush covers every file that
 * joined before it started; files that join during a flush wait for the next one. Resolves false
 * when the platform cannot flush a whole file system: the writer fsyncs its own file.
 */
export class GroupSync {
  private waiting: Waiter[] = [];
  private bytes = 0;
  private running = false;
  /**
   * A flush timed out: its `sync -f` may still run and would report a later write-back error to
   * nobody. From then on each writer fsyncs its own file (sync() resolves false), whose own
   * error state that orphan cannot consume.
   */
  private hung = false;
  private idle: ReturnType<typeof setTimeout> | undefined;
  private oldest: ReturnType<typeof setTimeout> | undefined;
  private readonly o: Required<GroupSyncOptions>;
  /** Flushes run so far (for tests and benchmarks). */
  flushes = 0;

  constructor(
    private dir: string,
    opts: GroupSyncOptions = {},
  ) {
    this.o = {
      maxBytes: 64 * 1024 * 1024,
      maxFiles: 200,
      idleMs: 4,
      maxWaitMs: 100,
      syncFs: syncfs,
      ...opts,
    };
  }

  /**
   * Waits until the bytes written so far (by anyone) on this file system are durable. `dir`: a
   * folder of this file system the caller just wrote in, flushed through instead if the folder
   * the group flushes through is gone (a destination removed).
   */
  sync(bytes: number, dir?: string): Promise<boolean> {
    return new Promise<boolean>((resolve, reject) => {
      this.waiting.push({ resolve, reject, ...(dir !== undefined ? { dir } : {}) });
      this.bytes += bytes;
      this.schedule();
    });
  }

  private schedule(): void {
    if (this.running || this.waiting.length === 0) return;
    if (this.hung) return this.start();
    if (this.bytes >= this.o.maxBytes || this.waiting.length >= this.o.maxFiles) return this.start();
    if (this.idle !== undefined) clearTimeout(this.idle);
    this.idle = setTimeout(() => this.start(), this.o.idleMs);
    this.oldest ??= setTimeout(() => this.start(), this.o.maxWaitMs);
  }

  private start(retried = false): void {
    if (this.running || this.waiting.length === 0) return;
    clearTimeout(this.idle);
    clearTimeout(this.oldest);
    this.idle = this.oldest = undefined;
    const batch = this.waiting;
    this.waiting = [];
    this.bytes = 0;
    if (this.hung) {
      for (const w of batch) w.resolve(false);
      return;
    }
    this.running = true;
    this.flushes++;
    // A syncFs that throws instead of rejecting must not leave `running` set for good.
    Promise.resolve()
      .then(() => this.o.syncFs(this.dir))
      .then(
        (ok) => {
          this.running = false;
          for (const w of batch) w.resolve(ok);
          this.schedule();
        },
        (e: unknown) => {
          this.running = false;
          const code = (e as { code?: string }).code;
          const other = batch.find((w) => w.dir !== undefined && w.dir !== this.dir)?.dir;
          if (code === 'ENOENT' && other !== undefined && !retried) {
            // The folder it flushed through was removed: flush again (once) through a waiter's.
            this.dir = other;
            this.waiting.unshift(...batch);
            this.start(true);
            return;
          }
          if (code !== undefined && WRITE_BACK_CODES.has(code)) failedFlushes++;
          if (code === 'ETIMEDOUT') this.hung = true;
          for (const w of batch) w.reject(e);
          this.schedule();
        },
      );
  }
}
