import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { release } from 'node:os';

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
let syncBin: string | undefined | null;
const findSync = () =>
  (syncBin ??=
    process.platform === 'linux' && kernelAtLeast(5, 8)
      ? (['/usr/bin/sync', '/bin/sync'].find((p) => existsSync(p)) ?? null)
      : null);

/** True when {@link syncfs} can flush a whole file system here (as far as is known). */
export function syncfsAvailable(): boolean {
  return findSync() !== null;
}

/**
 * syncfs(2) through coreutils' `sync --file-system` (Node has no binding for it): one journal
 * commit and one device flush for every file written since, where an fdatasync per file costs one
 * of each per file.
 */
export const syncfs: SyncFileSystem = (dir) => {
  const bin = findSync();
  if (!bin) return Promise.resolve(false);
  return new Promise((resolve, reject) => {
    execFile(bin, ['-f', dir], { timeout: 120_000, windowsHide: true }, (err, _out, stderr) => {
      if (!err) return resolve(true);
      const code = (err as { code?: unknown }).code;
      // No `sync` binary, or one without -f (busybox): fsync file by file from now on.
      if (code === 'ENOENT' || /invalid option|unrecognized option|^usage/im.test(String(stderr))) {
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
      // "sync: error syncing '<dir>': Input/output error": keep the errno text, not the path.
      const reason = String(stderr).trim().split('\n')[0]?.split(': ').pop() || 'sync -f failed';
      const errno = ERRNO_TEXT.find(([re]) => re.test(reason))?.[1] ?? 'EIO';
      reject(
        Object.assign(new Error(`Making written files durable (syncfs) failed: ${reason}`), { code: errno }),
      );
    });
  });
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

interface Waiter {
  resolve: (durable: boolean) => void;
  reject: (e: unknown) => void;
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
  private idle: ReturnType<typeof setTimeout> | undefined;
  private oldest: ReturnType<typeof setTimeout> | undefined;
  private readonly o: Required<GroupSyncOptions>;
  /** Flushes run so far (for tests and benchmarks). */
  flushes = 0;

  constructor(
    private readonly dir: string,
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

  /** Waits until the bytes written so far (by anyone) on this file system are durable. */
  sync(bytes: number): Promise<boolean> {
    return new Promise<boolean>((resolve, reject) => {
      this.waiting.push({ resolve, reject });
      this.bytes += bytes;
      this.schedule();
    });
  }

  private schedule(): void {
    if (this.running || this.waiting.length === 0) return;
    if (this.bytes >= this.o.maxBytes || this.waiting.length >= this.o.maxFiles) return this.start();
    if (this.idle !== undefined) clearTimeout(this.idle);
    this.idle = setTimeout(() => this.start(), this.o.idleMs);
    this.oldest ??= setTimeout(() => this.start(), this.o.maxWaitMs);
  }

  private start(): void {
    if (this.running || this.waiting.length === 0) return;
    clearTimeout(this.idle);
    clearTimeout(this.oldest);
    this.idle = this.oldest = undefined;
    const batch = this.waiting;
    this.waiting = [];
    this.bytes = 0;
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
          for (const w of batch) w.reject(e);
          this.schedule();
        },
      );
  }
}
