import { randomBytes } from 'node:crypto';
import { Readable } from 'node:stream';
import {
  failedReport,
  isMedsyncError,
  isPartialName,
  joinPath,
  MedsyncError,
  normalizePath,
  partialNameFor,
  throwIfAborted,
  toMedsyncError,
  type CleanupOptions,
  type ConnectionReport,
  type ListOptions,
  type OpOptions,
  type ReadOptions,
  type Storage,
  type StorageCapabilities,
  type StorageEntry,
  type WriteBody,
  type WriteOptions,
} from '@medsync/core';
import type { FileEntry, Stats } from 'ssh2';
import { ConnectionPool, type PoolLease } from '../shared/pool.js';
import { isSftpStatus, SFTP_STATUS, SftpStatusError, toSftpError, type SftpOp } from './errors.js';
import { parseKnownHosts } from './host-keys.js';
import { parseSftpOptions, type ResolvedSftpStorageOptions, type SftpStorageOptions } from './options.js';
import { openSession, type ServerInfo, type SftpSession } from './session.js';
import { rootAccess } from '../shared/report.js';

/** Temporary names: a per-process random prefix and a counter. */
const TMP_PREFIX = randomBytes(4).toString('hex');
let tmpCounter = 0;

/** Bytes per SFTP WRITE/READ request, and how many are in flight per transfer. */
const CHUNK = 64 * 1024;
const WRITE_DEPTH = 16;
const READ_DEPTH = 16;

/** After a refused login, calls fail at once for this long instead of logging in again. */
const AUTH_BACKOFF_MS = 60_000;

const S_IFMT = 0o170000;
const S_IFREG = 0o100000;
const S_IFDIR = 0o040000;
const S_IFLNK = 0o120000;

const noop = () => undefined;

function dirnameAbs(abs: string): string {
  const i = abs.lastIndexOf('/');
  return i <= 0 ? '/' : abs.slice(0, i);
}

const isType = (mode: number | undefined, type: number) => mode !== undefined && (mode & S_IFMT) === type;

/** The body given to `write` failed (not the server): wraps its error. */
class SourceFailure extends Error {
  constructor(readonly error: unknown) {
    super('The data to write failed.');
  }
}

/** True when `e` says the session itself failed (not a STATUS reply, not our own decision). */
function isConnectionFailure(e: unknown): boolean {
  const raw = isMedsyncError(e) && e.cause !== undefined ? e.cause : e;
  return !(raw instanceof SftpStatusError) && !(raw instanceof SourceFailure) && !isMedsyncError(raw);
}

/**
 * Storage on an SFTP server (ssh2), through a pool of up to `maxConnections` SSH connections with
 * one SFTP session each.
 *
 * Writes go to a hidden `.name.<unique>.medsync-part` sibling (opened with O_EXCL), stream with
 * up to 16 WRITE requests in flight, are checked against the expected size and the server's
 * fstat, get their mtime (whole seconds: SFTP v3), are fsynced where the server offers
 * fsync@openssh.com, and are renamed into place with posix-rename@openssh.com (atomic, replaces
 * the target); a server without it gets remove + rename (then `atomicRename` reads false).
 */
export class SftpStorage implements Storage {
  readonly kind = 'sftp';
  readonly id: string;
  /** The validated options, without the password, key and passphrase. */
  readonly options: Readonly<Omit<ResolvedSftpStorageOptions, 'password' | 'privateKey' | 'passphrase'>>;
  private readonly pool: ConnectionPool<SftpSession>;
  private readonly rootAbs: string;
  private readonly madeDirs = new Set<string>();
  /** The host key the server showed last, accepted or not (for the connection report). */
  private lastHostKey: ServerInfo['hostKey'] | undefined;
  private authFailure: { error: MedsyncError; at: number } | undefined;
  private closed = false;
  private caps: StorageCapabilities;

  constructor(input: SftpStorageOptions) {
    const o = parseSftpOptions(input);
    const { password, privateKey, passphrase, ...rest } = o;
    this.options = rest;
    this.rootAbs = o.root;
    const host = o.host.includes(':') && !o.host.startsWith('[') ? `[${o.host}]` : o.host;
    const rootPart = o.root === '/' ? '/' : o.root.split('/').map(encodeURIComponent).join('/');
    this.id = `sftp://${encodeURIComponent(o.user)}@${host}:${o.port}${rootPart}`;
    this.caps = {
      hashes: [],
      preservesMtime: true,
      mtimePrecisionMs: 1000,
      atomicRename: true,
      rangeReads: true,
      caseInsensitive: false,
      // The server's file system decides (Windows and macOS servers fold case): SyncJob asks.
      caseInsensitiveVaries: true,
      maxConcurrency: o.maxConnections,
    };
    const hostKeys = {
      fingerprints: o.hostFingerprint,
      knownHosts: o.knownHosts !== undefined ? parseKnownHosts(o.knownHosts) : undefined,
      insecure: o.insecureSkipHostKeyCheck,
    };
    // The secrets live only in this closure: not on the instance, not in `options`.
    const connect = async (): Promise<SftpSession> => {
      const failed = this.authFailure;
      if (failed && performance.now() - failed.at < AUTH_BACKOFF_MS) throw failed.error;
      try {
        const s = await openSession({
          host: o.host,
          port: o.port,
          user: o.user,
          password,
          privateKey,
          passphrase,
          hostKeys,
          timeoutMs: o.timeoutMs,
          keepaliveMs: o.keepaliveMs,
          onHostKey: (k) => {
            this.lastHostKey = k;
          },
        });
        this.authFailure = undefined;
        this.learn(s.info);
        return s;
      } catch (e) {
        if (isMedsyncError(e) && e.code === 'E_AUTH') this.authFailure = { error: e, at: performance.now() };
        throw e;
      }
    };
    this.pool = new ConnectionPool<SftpSession>(
      {
        connect,
        isClosed: (s) => s.closed,
        close: (s) => s.close(),
        closedError: () => new MedsyncError('E_CONFIG', 'This storage was closed.', { adapter: 'sftp' }),
        isFatal: (e) => isMedsyncError(e) && !e.retryable,
      },
      o.maxConnections,
    );
  }

  /**
   * What this server can do. Mtimes are kept to the second (SFTP v3). `atomicRename` turns false
   * once a connection finds no posix-rename@openssh.com (writes then remove the target first).
   */
  get capabilities(): StorageCapabilities {
    return this.caps;
  }

  private learn(info: ServerInfo): void {
    const atomic = info.extensions.includes('posix-rename@openssh.com');
    if (atomic !== this.caps.atomicRename) this.caps = { ...this.caps, atomicRename: atomic };
  }

  private abs(rel: string): string {
    if (rel === '') return this.rootAbs;
    return this.rootAbs === '/' ? `/${rel}` : `${this.rootAbs}/${rel}`;
  }

  private check(): void {
    if (this.closed) throw new MedsyncError('E_CONFIG', 'This storage was closed.', { adapter: 'sftp' });
  }

  /**
   * normalizePath. CR and LF are valid in SFTP names and kept: such a file is uploaded and checked
   * by size only (the server digest's line protocol cannot carry its name).
   */
  private path(p: string, opts: { allowRoot?: boolean } = {}): string {
    return normalizePath(p, opts);
  }

  private err(e: unknown, op: SftpOp, path?: string): MedsyncError {
    return toSftpError(e, op, path);
  }

  private aborted(e: unknown, path?: string): MedsyncError {
    return new MedsyncError('E_ABORTED', 'The operation was cancelled.', {
      adapter: 'sftp',
      cause: e,
      ...(path !== undefined ? { path } : {}),
    });
  }

  private closedError(): MedsyncError {
    return new MedsyncError('E_CONFIG', 'This storage was closed.', { adapter: 'sftp' });
  }

  /**
   * Runs `fn` on a pooled session. The signal closes that session (SFTP has no per-request
   * cancel). A session found dead right after leaving the idle list is replaced once, except for
   * a rename (it may have happened before the connection broke).
   */
  private async withSession<T>(
    op: SftpOp,
    path: string | undefined,
    signal: AbortSignal | undefined,
    fn: (s: SftpSession) => Promise<T>,
  ): Promise<T> {
    for (let attempt = 0; ; attempt++) {
      let lease: PoolLease<SftpSession>;
      try {
        lease = await this.pool.acquire(signal);
      } catch (e) {
        throw this.err(e, op, path);
      }
      const s = lease.conn;
      const onAbort = () => s.close();
      signal?.addEventListener('abort', onAbort, { once: true });
      let broken = false;
      try {
        return await fn(s);
      } catch (e) {
        broken = s.closed || isConnectionFailure(e);
        if (signal?.aborted) throw this.aborted(e, path);
        if (this.closed) throw this.closedError();
        if (!(lease.reused && attempt === 0 && broken && op !== 'rename')) throw this.err(e, op, path);
      } finally {
        signal?.removeEventListener('abort', onAbort);
        this.pool.release(s, broken);
      }
    }
  }

  // ---------------------------------------------------------------------------------------------

  async test(opts: OpOptions = {}): Promise<ConnectionReport> {
    const started = performance.now();
    const o = this.options;
    const hostKeyCheck = o.insecureSkipHostKeyCheck
      ? 'off (insecureSkipHostKeyCheck)'
      : o.hostFingerprint.length > 0
        ? 'fingerprint'
        : 'known_hosts';
    try {
      this.check();
      throwIfAborted(opts.signal);
      return await this.withSession('test', undefined, opts.signal, async (s) => {
        let root: Stats;
        try {
          root = await s.stat(this.rootAbs);
        } catch (e) {
          if (isSftpStatus(e, SFTP_STATUS.NO_SUCH_FILE)) {
            throw new MedsyncError('E_NOT_FOUND', 'The root folder does not exist.', {
              adapter: 'sftp',
              cause: e,
            });
          }
          throw e;
        }
        if (!root.isDirectory()) {
          throw new MedsyncError('E_NOT_FOUND', 'The root path is not a folder.', { adapter: 'sftp' });
        }
        // A drop folder (the account may write but not read it) is a working destination: its
        // listing refused leaves the count out.
        let entries: number | undefined = 0;
        try {
          for (const f of await s.readdir(this.rootAbs)) {
            if (f.filename !== '.' && f.filename !== '..' && !isPartialName(f.filename)) entries++;
            if (entries >= 10_000) break;
          }
        } catch (e) {
          if (!isSftpStatus(e, SFTP_STATUS.PERMISSION_DENIED)) throw e;
          entries = undefined;
        }
        let writable = false;
        const probe = this.abs(`.medsync-probe-${randomBytes(6).toString('hex')}`);
        let h: Buffer | undefined;
        try {
          h = await s.open(probe, 'wx');
          await s.write(h, Buffer.from('probe'), 0);
          const opened = h;
          h = undefined;
          await s.closeHandle(opened);
          await s.unlink(probe);
          writable = true;
        } catch (e) {
          if (!isSftpStatus(e)) throw e;
          // A write refused (a full disk): its handle is closed, not left open on the pooled session.
          if (h) await s.closeHandle(h).catch(noop);
          await s.unlink(probe).catch(noop);
        }
        const access = rootAccess(this.kind, entries, writable);
        let freeBytes: number | undefined;
        let totalBytes: number | undefined;
        if (s.has('statvfs@openssh.com')) {
          const vfs = await s.statvfs(this.rootAbs).catch(() => undefined);
          freeBytes = vfs?.freeBytes;
          totalBytes = vfs?.totalBytes;
        }
        const info = s.info;
        return {
          kind: this.kind,
          id: this.id,
          ok: true,
          latencyMs: Math.round(performance.now() - started),
          writable,
          ...(entries !== undefined ? { entries } : {}),
          ...(freeBytes !== undefined ? { freeBytes } : {}),
          details: {
            listable: entries !== undefined,
            ...(info.ident ? { server: info.ident } : {}),
            ...(info.banner ? { banner: info.banner } : {}),
            hostKey: { ...info.hostKey, check: hostKeyCheck },
            ...(o.insecureSkipHostKeyCheck
              ? {
                  warning:
                    'The host key is not verified (insecureSkipHostKeyCheck): anyone in the network path could pose as this server.',
                }
              : {}),
            ...(info.kex ? { kex: info.kex } : {}),
            ...(info.cipher ? { cipher: info.cipher } : {}),
            extensions: info.extensions,
            atomicRename: this.caps.atomicRename,
            fsync: o.fsync && s.has('fsync@openssh.com'),
            serverDigest: o.serverDigest ? await s.digestReport() : 'off',
            ...(totalBytes !== undefined ? { totalBytes } : {}),
          },
          ...access,
        } satisfies ConnectionReport;
      });
    } catch (e) {
      const me = this.err(e, 'test');
      const details: Record<string, unknown> = { hostKeyCheck };
      if (this.lastHostKey) details.hostKey = this.lastHostKey;
      return failedReport(this, started, me, this.advice(me), details);
    }
  }

  private advice(me: MedsyncError): string {
    const o = this.options;
    const cause = me.cause as { code?: unknown; level?: unknown; message?: unknown } | undefined;
    switch (me.code) {
      case 'E_AUTH':
        return `The server refused the login: check \`user\`, and \`password\` or \`privateKey\` (is its public half in the account's authorized_keys?), and that the account may log in over SSH.`;
      case 'E_NOT_FOUND':
        return `The root folder ${o.root} does not exist on the server, or this account cannot see it: create it or fix \`root\` (an absolute path; SFTP sessions often start in the home folder, which is not "/").`;
      case 'E_PERMISSION':
        return 'The account may not read the root folder: check its rights on the server.';
      case 'E_CONFIG':
        return /host key/i.test(me.message)
          ? "Verify the server's host key fingerprint with its administrator (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub on the server), then pin it with `hostFingerprint` or add it to `knownHosts`."
          : 'Check the SFTP options.';
      case 'E_UNSUPPORTED':
        return 'The SSH login works but the server offers no SFTP to this account: ask its administrator for the sftp subsystem (OpenSSH: Subsystem sftp …, no ForceCommand that blocks it).';
      case 'E_ABORTED':
        return 'The test was cancelled before it finished.';
      default:
        if (cause?.code === 'ECONNREFUSED') {
          return `Nothing accepts connections at ${o.host}:${o.port}: check \`host\` and \`port\`, the firewall, and that the SSH server is running.`;
        }
        if (cause?.level === 'client-timeout' || /timed out|timeout/i.test(String(cause?.message))) {
          return `${o.host}:${o.port} did not answer in time: check the firewall, that the port speaks SSH, or raise \`timeoutMs\`.`;
        }
        return `The SFTP server at ${o.host}:${o.port} could not be used: check that it is reachable and running, then retry.`;
    }
  }

  // ---------------------------------------------------------------------------------------------

  /** The entries of one folder, without `.` and `..`. */
  private listDir(relDir: string, signal: AbortSignal | undefined): Promise<FileEntry[]> {
    return this.withSession('list', relDir, signal, async (s) => {
      const files = await s.readdir(this.abs(relDir));
      return files.filter((f) => f.filename !== '.' && f.filename !== '..' && !/[/\0]/.test(f.filename));
    });
  }

  /** stat (following symlinks) of an absolute path; undefined when it does not exist. */
  private statAbs(abs: string, rel: string, signal: AbortSignal | undefined): Promise<Stats | undefined> {
    return this.withSession('stat', rel, signal, async (s) => {
      try {
        return await s.stat(abs);
      } catch (e) {
        if (isSftpStatus(e, SFTP_STATUS.NO_SUCH_FILE)) return undefined;
        throw e;
      }
    });
  }

  private static entry(path: string, st: { size?: number; mtime?: number }): StorageEntry {
    return { path, size: st.size ?? 0, ...(st.mtime !== undefined ? { mtimeMs: st.mtime * 1000 } : {}) };
  }

  /**
   * Every regular file below `prefix`, folders listed in parallel over the pool. A symlink to a
   * file is listed (with the target's size and mtime); symlinks to folders are not followed (no
   * loops, and the tree stays what the account owns). Sockets, devices and FIFOs are skipped. An
   * entry listed without its type is stat'ed.
   */
  async *list(prefix = '', opts: ListOptions = {}): AsyncGenerator<StorageEntry> {
    this.check();
    const start = this.path(prefix, { allowRoot: true });
    throwIfAborted(opts.signal);
    const top = await this.statAbs(this.abs(start), start, opts.signal);
    if (!top || !top.isDirectory()) {
      if (top?.isFile() && start !== '') {
        yield SftpStorage.entry(start, top);
        return;
      }
      throw new MedsyncError('E_NOT_FOUND', 'The folder does not exist.', { adapter: 'sftp', path: start });
    }
    const width = Math.max(
      1,
      Math.min(opts.concurrency ?? this.options.maxConnections, this.options.maxConnections),
    );
    type Listed = { id: number; dir: string; files?: FileEntry[]; error?: unknown };
    const queue = [start];
    const inflight = new Map<number, Promise<Listed>>();
    let next = 0;
    while (queue.length > 0 || inflight.size > 0) {
      throwIfAborted(opts.signal);
      while (queue.length > 0 && inflight.size < width) {
        const dir = queue.pop()!;
        const id = next++;
        inflight.set(
          id,
          this.listDir(dir, opts.signal).then(
            (files) => ({ id, dir, files }),
            (error: unknown) => ({ id, dir, error }),
          ),
        );
      }
      const r = await Promise.race(inflight.values());
      inflight.delete(r.id);
      if (r.error !== undefined) {
        const me = this.err(r.error, 'list', r.dir);
        // A folder removed while we walk is not an error.
        if (me.code === 'E_NOT_FOUND' && r.dir !== start) continue;
        throw me;
      }
      for (const f of r.files!) {
        const child = joinPath(r.dir, f.filename);
        const mode = f.attrs.mode;
        if (isType(mode, S_IFDIR)) queue.push(child);
        else if (isPartialName(f.filename)) continue;
        else if (isType(mode, S_IFREG)) yield SftpStorage.entry(child, f.attrs);
        else if (mode === undefined || isType(mode, S_IFLNK)) {
          // A link, or an entry the server listed without its type (SFTP attributes are
          // optional): its stat tells. One that cannot be read (a dangling link, a failed stat)
          // is listed with size -1, as the local adapter does: it may stand for files delivered
          // before, and a mirror deletes nothing below an unreadable entry.
          let target: Stats | undefined;
          try {
            target = await this.statAbs(this.abs(child), child, opts.signal);
          } catch (e) {
            throwIfAborted(opts.signal);
            if (this.closed) throw e;
          }
          if (!target) yield { path: child, size: -1 };
          else if (target.isFile()) yield SftpStorage.entry(child, target);
          // Walked only when untyped: links to folders are not followed.
          else if (mode === undefined && target.isDirectory()) queue.push(child);
        }
      }
    }
  }

  async stat(path: string, opts: OpOptions = {}): Promise<StorageEntry> {
    this.check();
    const rel = this.path(path);
    throwIfAborted(opts.signal);
    const st = await this.statAbs(this.abs(rel), rel, opts.signal);
    if (!st || !st.isFile()) {
      throw new MedsyncError('E_NOT_FOUND', 'No such file.', { adapter: 'sftp', path: rel });
    }
    return SftpStorage.entry(rel, st);
  }

  async read(path: string, opts: ReadOptions = {}): Promise<Readable> {
    this.check();
    const rel = this.path(path);
    const signal = opts.signal;
    throwIfAborted(signal);
    const start = Math.max(0, opts.start ?? 0);
    const limit = opts.end === undefined ? Infinity : Math.max(0, opts.end - start + 1);
    for (let attempt = 0; ; attempt++) {
      let lease: PoolLease<SftpSession>;
      try {
        lease = await this.pool.acquire(signal);
      } catch (e) {
        throw this.err(e, 'read', rel);
      }
      const s = lease.conn;
      let handle: Buffer | undefined;
      // SFTP cannot cancel one request: a cancel while opening closes the session, so the call
      // ends at once instead of waiting for a slow server's answer.
      const onAbort = () => s.close();
      signal?.addEventListener('abort', onAbort, { once: true });
      try {
        handle = await s.open(this.abs(rel), 'r');
        const st = await s.fstat(handle);
        if (!st.isFile()) {
          throw new MedsyncError('E_NOT_FOUND', 'No such file (the path is a folder).', {
            adapter: 'sftp',
            path: rel,
          });
        }
        // A cancel that came while opening: the stream's abort listener would never hear it.
        throwIfAborted(signal);
      } catch (e) {
        const broken = s.closed || isConnectionFailure(e);
        if (handle && !broken) await s.closeHandle(handle).catch(noop);
        this.pool.release(s, broken);
        if (signal?.aborted) throw this.aborted(e, rel);
        if (lease.reused && attempt === 0 && broken && !this.closed) continue;
        throw this.err(e, 'read', rel);
      } finally {
        signal?.removeEventListener('abort', onAbort);
      }
      return this.readStream(s, handle, rel, start, limit, signal);
    }
  }

  /**
   * A Readable over an open handle, with up to {@link READ_DEPTH} READ requests in flight. The
   * session is held until the stream ends or is destroyed; then the handle is closed and the
   * session returns to the pool (or is dropped if it broke).
   */
  private readStream(
    s: SftpSession,
    handle: Buffer,
    rel: string,
    start: number,
    limit: number,
    signal: AbortSignal | undefined,
  ): Readable {
    const end = start + limit; // exclusive, may be Infinity
    let nextOffset = start; // next byte to request
    let gen = 0; // bumps when a short read makes the requests in flight useless
    let eof = false;
    let finished = false;
    const queue: { offset: number; gen: number; p: Promise<Buffer> }[] = [];
    let pumping = false;

    const finish = (broken: boolean) => {
      if (finished) return;
      finished = true;
      signal?.removeEventListener('abort', onAbort);
      const inflight = queue.map((q) => q.p.catch(noop));
      queue.length = 0;
      void Promise.all(inflight).then(async () => {
        const dead = broken || s.closed;
        if (!dead) await s.closeHandle(handle).catch(noop);
        this.pool.release(s, dead || s.closed);
      });
    };
    const fill = () => {
      while (!eof && queue.length < READ_DEPTH && nextOffset < end) {
        const len = Math.min(CHUNK, end - nextOffset);
        const offset = nextOffset;
        const p = s.read(handle, len, offset);
        p.catch(noop);
        queue.push({ offset, gen, p });
        nextOffset += len;
      }
    };
    const out = new Readable({
      highWaterMark: CHUNK * 4,
      read() {
        if (pumping) return;
        pumping = true;
        void pump();
      },
      destroy(err, cb) {
        finish(err !== null && isConnectionFailure(err));
        cb(err);
      },
    });
    let position = start;
    const pump = async () => {
      try {
        for (;;) {
          if (finished || out.destroyed) return;
          if (position >= end || (eof && queue.length === 0)) {
            out.push(null);
            finish(false);
            return;
          }
          fill();
          const head = queue.shift();
          if (!head) {
            out.push(null);
            finish(false);
            return;
          }
          const buf = await head.p;
          if (finished || out.destroyed) return;
          if (head.gen !== gen) continue;
          const want = Math.min(CHUNK, end - head.offset);
          position = head.offset + buf.length;
          if (buf.length === 0) {
            eof = true;
            queue.length = 0;
            continue;
          }
          if (buf.length < want) {
            // A short read: the requests in flight left a gap; ask again from here.
            gen++;
            queue.length = 0;
            nextOffset = position;
          }
          if (!out.push(buf)) {
            pumping = false;
            return;
          }
        }
      } catch (e) {
        pumping = false;
        const me = signal?.aborted ? this.aborted(e, rel) : this.err(e, 'read', rel);
        if (!out.destroyed) out.destroy(me);
      }
    };
    const onAbort = () => {
      if (!out.destroyed) out.destroy(this.aborted(signal?.reason, rel));
      s.close();
    };
    signal?.addEventListener('abort', onAbort, { once: true });
    out.on('close', () => finish(false));
    return out;
  }

  async readBuffer(path: string, opts: OpOptions = {}): Promise<Buffer> {
    const stream = await this.read(path, opts);
    const parts: Buffer[] = [];
    for await (const c of stream as AsyncIterable<Buffer>) parts.push(c);
    return Buffer.concat(parts);
  }

  // ---------------------------------------------------------------------------------------------

  /** Makes sure a folder exists (absolute path), creating missing parents; known folders are cached. */
  private async ensureDir(s: SftpSession, absDir: string): Promise<void> {
    if (absDir === '/' || this.madeDirs.has(absDir)) return;
    try {
      await s.mkdir(absDir);
      this.madeDirs.add(absDir);
      this.dirty.add(dirnameAbs(absDir));
      return;
    } catch (e) {
      if (!isSftpStatus(e)) throw e;
      // FAILURE: it exists (OpenSSH has no EEXIST status); NO_SUCH_FILE: a parent is missing.
      const st = await s.stat(absDir).catch(() => undefined);
      if (st?.isDirectory()) {
        this.madeDirs.add(absDir);
        return;
      }
      if (st) throw e;
      if (!isSftpStatus(e, SFTP_STATUS.NO_SUCH_FILE)) throw e;
    }
    await this.ensureDir(s, dirnameAbs(absDir));
    try {
      await s.mkdir(absDir);
      this.dirty.add(dirnameAbs(absDir));
    } catch (e) {
      const st = await s.stat(absDir).catch(() => undefined);
      if (!st?.isDirectory()) throw e;
    }
    this.madeDirs.add(absDir);
  }

  /** Folders that gained or lost an entry since the last flush (absolute paths on the server). */
  private readonly dirty = new Set<string>();
  /** The server cannot fsync folders (not supported, or not on its file system). */
  private folderSyncRefused = false;
  /** Flushes run one after another: a second caller waits for the folders of the first. */
  private flushing: Promise<void> = Promise.resolve();

  /**
   * Makes the entries written since the last call durable: each folder that gained one (a rename
   * into place, a new folder) or lost one (a removal) is opened and fsynced (fsync@openssh.com on a folder handle, which
   * OpenSSH's sftp-server allows), up to 32 at a time on one connection. The files' bytes were
   * fsynced before their rename; this covers the renames, so a power cut on the server cannot
   * take back a file the job has recorded. Best effort, never an error of the run: a folder the
   * server will not open or fsync is skipped (a server that cannot fsync folders at all, from then
   * on), and a lost connection leaves the folders for the next call. Skipped with `fsync: false`
   * and on servers without fsync@openssh.com.
   */
  flush(opts: OpOptions = {}): Promise<void> {
    const run = this.flushing.then(() => this.flushFolders(opts));
    this.flushing = run.catch(noop);
    return run;
  }

  private async flushFolders(opts: OpOptions): Promise<void> {
    if (this.dirty.size === 0 || !this.options.fsync || this.folderSyncRefused || this.closed) {
      this.dirty.clear();
      return;
    }
    const dirs = [...this.dirty];
    this.dirty.clear();
    const one = async (s: SftpSession, d: string) => {
      let h: Buffer;
      try {
        h = await s.open(d, 'r');
      } catch (e) {
        // Removed since, or refused (a write-only drop folder): nothing this call can do for it.
        if (isSftpStatus(e)) return;
        throw e;
      }
      try {
        await s.fsync(h);
      } catch (e) {
        if (!isSftpStatus(e)) throw e;
        // Not supported, or a file system that cannot fsync folders (EINVAL: BAD_MESSAGE).
        if (isSftpStatus(e, SFTP_STATUS.OP_UNSUPPORTED) || isSftpStatus(e, SFTP_STATUS.BAD_MESSAGE))
          this.folderSyncRefused = true;
      } finally {
        await s.closeHandle(h).catch(noop);
      }
    };
    try {
      await this.withSession('flush', undefined, opts.signal, async (s) => {
        if (!s.has('fsync@openssh.com')) return;
        for (let i = 0; i < dirs.length && !this.folderSyncRefused; i += 32) {
          await Promise.all(dirs.slice(i, i + 32).map((d) => one(s, d)));
        }
      });
    } catch {
      // The connection failed (or the storage closed): the folders wait for the next call.
      if (!this.closed && !opts.signal?.aborted) for (const d of dirs) this.dirty.add(d);
    }
  }

  /** Forgets cached folders on `absDir`'s branch, after a failure that hints they went. */
  private forgetDirs(absDir: string): void {
    for (let d = absDir; d !== '/'; d = dirnameAbs(d)) this.madeDirs.delete(d);
  }

  /**
   * Renames, replacing the target: posix-rename@openssh.com where offered, else SFTP rename, and
   * when that fails with the target in place, remove + rename. A missing target folder is
   * created; a missing source is E_NOT_FOUND.
   */
  private async renameAbs(
    s: SftpSession,
    fromAbs: string,
    toAbs: string,
    fromRel: string,
    toRel: string,
  ): Promise<void> {
    const posix = s.has('posix-rename@openssh.com');
    const attempt = () => (posix ? s.posixRename(fromAbs, toAbs) : s.rename(fromAbs, toAbs));
    // Plain SFTP rename never replaces a file. The old one is moved aside under a temporary name,
    // the new one renamed in, and only then the old one removed; if the new one still cannot go
    // in, the old one is put back. (Removing the old one first lost both when that rename failed.)
    const replaceAside = async () => {
      const asideAbs = this.abs(partialNameFor(toRel, `old${(++tmpCounter).toString(36)}`));
      await s.rename(toAbs, asideAbs);
      try {
        await s.rename(fromAbs, toAbs);
      } catch (e) {
        // Left hidden if this fails too (cleanupPartials removes it in time).
        await s.rename(asideAbs, toAbs).catch(noop);
        throw e;
      }
      await s.unlink(asideAbs).catch(noop);
    };
    try {
      await attempt();
      return;
    } catch (e) {
      if (!isSftpStatus(e)) throw e;
      const src = await s.lstat(fromAbs).catch(() => undefined);
      if (!src) {
        throw new MedsyncError('E_NOT_FOUND', 'Renaming the file: no such file.', {
          adapter: 'sftp',
          path: fromRel,
          cause: e,
        });
      }
      const parent = dirnameAbs(toAbs);
      const parentSt = await s.stat(parent).catch(() => undefined);
      if (!parentSt) {
        this.forgetDirs(parent);
        await this.ensureDir(s, parent);
      } else if (!posix) {
        const target = await s.lstat(toAbs).catch(() => undefined);
        if (target && !target.isDirectory()) {
          try {
            await replaceAside();
          } catch (e2) {
            throw this.err(e2, 'rename', toRel);
          }
          return;
        }
      } else {
        throw this.err(e, 'rename', toRel);
      }
    }
    try {
      await attempt();
    } catch (e) {
      // Plain rename after the folder was made may still meet an existing target.
      if (!posix && isSftpStatus(e, SFTP_STATUS.FAILURE)) {
        try {
          await replaceAside();
        } catch (e2) {
          throw this.err(e2, 'rename', toRel);
        }
        return;
      }
      throw this.err(e, 'rename', toRel);
    }
  }

  /** Best-effort unlink on a fresh lease (the caller's session may be closed, its signal fired). */
  private async removeQuietly(abs: string): Promise<void> {
    if (this.closed) return;
    try {
      const lease = await this.pool.acquire();
      try {
        await lease.conn.unlink(abs);
        this.pool.release(lease.conn);
      } catch (e) {
        this.pool.release(lease.conn, isConnectionFailure(e));
      }
    } catch {
      // The temporary name stays hidden; cleanupPartials removes it later.
    }
  }

  /**
   * Turns a generic SSH_FX_FAILURE while writing into E_QUOTA when statvfs shows the disk (nearly)
   * full: OpenSSH reports ENOSPC and EDQUOT as plain FAILURE.
   */
  private async classifyWriteFailure(
    s: SftpSession,
    e: unknown,
    rel: string,
    needed: number,
    absDir: string,
  ): Promise<unknown> {
    if (!isSftpStatus(e, SFTP_STATUS.FAILURE) || s.closed || !s.has('statvfs@openssh.com')) return e;
    // The file's own folder: it may be on another file system than the root.
    const vfs = await s.statvfs(absDir).catch(() => undefined);
    if (vfs && vfs.freeBytes < Math.max(needed, 1024 * 1024)) {
      return new MedsyncError(
        'E_QUOTA',
        `Writing the file: the server's disk is full (${vfs.freeBytes} bytes free): free space, then retry.`,
        { adapter: 'sftp', path: rel, cause: e, retryable: false },
      );
    }
    return e;
  }

  async write(path: string, body: WriteBody, opts: WriteOptions = {}): Promise<StorageEntry> {
    const isStream = !(body instanceof Uint8Array);
    const size = opts.size !== undefined && opts.size >= 0 ? opts.size : undefined;
    let rel: string;
    try {
      this.check();
      rel = this.path(path);
      throwIfAborted(opts.signal);
      if (!isStream && size !== undefined && body.length !== size) {
        throw new MedsyncError('E_INTEGRITY', `Got ${body.length} bytes but ${size} were expected.`, {
          adapter: 'sftp',
          path: rel,
        });
      }
    } catch (e) {
      if (isStream) body.destroy();
      throw e;
    }
    const signal = opts.signal;
    const source: AsyncIterable<Buffer | string | Uint8Array> = isStream
      ? (body as AsyncIterable<Buffer | string>)
      : (async function* () {
          yield body;
        })();
    // Errors of the body surface through the loop below; never as an uncaught event.
    if (isStream) body.on('error', noop);
    const finalAbs = this.abs(rel);
    const tmpName = () => this.abs(partialNameFor(rel, `${TMP_PREFIX}${(++tmpCounter).toString(36)}`));
    let tmpAbs = tmpName();
    let lease: PoolLease<SftpSession> | undefined;
    let handle: Buffer | undefined;
    let tempMayExist = false;
    let sent = 0;
    const onAbort = () => {
      if (isStream) body.destroy();
      lease?.conn.close();
    };
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      // Open the temporary file; a pooled session found dead before any byte is swapped once.
      for (let attempt = 0; ; attempt++) {
        lease = await this.pool.acquire(signal);
        throwIfAborted(signal);
        const s = lease.conn;
        try {
          await this.ensureDir(s, dirnameAbs(finalAbs));
          try {
            tempMayExist = true;
            handle = await s.open(tmpAbs, 'wx');
          } catch (e) {
            if (!isSftpStatus(e, SFTP_STATUS.NO_SUCH_FILE)) throw e;
            // The folder went away since it was cached: make it again, once.
            this.forgetDirs(dirnameAbs(finalAbs));
            await this.ensureDir(s, dirnameAbs(finalAbs));
            handle = await s.open(tmpAbs, 'wx');
          }
          break;
        } catch (e) {
          const stale =
            attempt === 0 && lease.reused && !signal?.aborted && (s.closed || isConnectionFailure(e));
          if (!stale) throw e;
          this.pool.release(s, true);
          lease = undefined;
          if (tempMayExist) {
            // The open may have reached the server before the session died: the retry takes a
            // fresh name (an exclusive open of the same one would be refused), and the old one is
            // removed if it is there.
            const old = tmpAbs;
            void this.removeQuietly(old).catch(noop);
            tmpAbs = tmpName();
          }
          tempMayExist = false;
        }
      }
      const s = lease.conn;
      const h = handle;
      // Stream: up to WRITE_DEPTH requests in flight; the body is pulled only as they complete.
      const inflight = new Set<Promise<void>>();
      let writeError: unknown;
      let pending: Buffer[] = [];
      let pendingBytes = 0;
      const issue = (buf: Buffer) => {
        const p = s.write(h, buf, sent).then(
          () => {
            inflight.delete(p);
          },
          (e: unknown) => {
            inflight.delete(p);
            writeError ??= e;
          },
        );
        inflight.add(p);
        sent += buf.length;
      };
      const flushPending = async (all: boolean) => {
        while (pendingBytes >= CHUNK || (all && pendingBytes > 0)) {
          const joined = pending.length === 1 ? pending[0]! : Buffer.concat(pending);
          const part = joined.subarray(0, Math.min(CHUNK, joined.length));
          const rest = joined.subarray(part.length);
          pending = rest.length > 0 ? [rest] : [];
          pendingBytes = rest.length;
          issue(part);
          while (inflight.size >= WRITE_DEPTH) await Promise.race(inflight);
          if (writeError !== undefined) throw writeError;
        }
      };
      const chunks = source[Symbol.asyncIterator]();
      for (;;) {
        let r: IteratorResult<Buffer | string | Uint8Array>;
        try {
          r = await chunks.next();
        } catch (e) {
          throw new SourceFailure(e);
        }
        if (r.done) break;
        const chunk = r.value;
        const buf =
          typeof chunk === 'string'
            ? Buffer.from(chunk)
            : Buffer.isBuffer(chunk)
              ? chunk
              : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
        if (buf.length === 0) continue;
        if (size !== undefined && sent + pendingBytes + buf.length > size) {
          throw new MedsyncError(
            'E_INTEGRITY',
            `Received more than the ${size} bytes expected: the source changed while it was sent.`,
            { adapter: 'sftp', path: rel },
          );
        }
        pending.push(buf);
        pendingBytes += buf.length;
        await flushPending(false);
      }
      await flushPending(true);
      await Promise.all(inflight);
      if (writeError !== undefined) throw writeError;
      throwIfAborted(signal);
      if (size !== undefined && sent !== size) {
        throw new MedsyncError(
          'E_INTEGRITY',
          `Received ${sent} bytes but ${size} were expected: the source changed or the stream was cut.`,
          { adapter: 'sftp', path: rel },
        );
      }
      // fstat and futimes go out together (one round trip): setting times does not change the size.
      // The access time says when this temporary file was written (its mtime is the source's), so
      // cleanupPartials can tell a fresh one from a leftover. A server that refuses to set times
      // (an object-store gateway) still gets the file, without the mtime.
      // SFTP v3 carries times as unsigned 32-bit seconds (1970 to 2106): a time outside that
      // range would wrap to a wrong date, so the file goes without it.
      let secs = opts.mtimeMs !== undefined ? Math.floor(opts.mtimeMs / 1000) : undefined;
      if (secs !== undefined && !(secs >= 0 && secs <= 0xffffffff)) secs = undefined;
      const [st, timesSet] = await Promise.all([
        s.fstat(h),
        secs !== undefined
          ? s.futimes(h, Math.floor(Date.now() / 1000), secs).then(
              () => true,
              (e: unknown) => {
                if (!isSftpStatus(e) || isSftpStatus(e, SFTP_STATUS.NO_SUCH_FILE)) throw e;
                const refused =
                  isSftpStatus(e, SFTP_STATUS.PERMISSION_DENIED) ||
                  isSftpStatus(e, SFTP_STATUS.OP_UNSUPPORTED);
                return refused ? ('refused' as const) : ('failed' as const);
              },
            )
          : false,
      ]);
      if (secs !== undefined && timesSet !== true) {
        secs = undefined;
        // Refused for good (denied, not supported): stop promising mtimes (the sync then compares
        // what it recorded, not the server's times). Another failure costs this file its mtime only.
        if (timesSet === 'refused' && this.caps.preservesMtime)
          this.caps = { ...this.caps, preservesMtime: false, mtimePrecisionMs: null };
      }
      if (st.size !== sent) {
        throw new MedsyncError(
          'E_INTEGRITY',
          `The server stored ${st.size} bytes but ${sent} were sent; resending.`,
          {
            adapter: 'sftp',
            path: rel,
          },
        );
      }
      const mtimeMs = secs !== undefined ? secs * 1000 : undefined;
      if (this.options.fsync && s.has('fsync@openssh.com')) await s.fsync(h);
      handle = undefined;
      await s.closeHandle(h);
      throwIfAborted(signal);
      const sha256 = await this.serverSha256(s, tmpAbs, sent);
      if (sha256 !== undefined) {
        const expected = opts.expectedHashes?.().sha256;
        if (expected !== undefined && expected.toLowerCase() !== sha256) {
          throw new MedsyncError(
            'E_INTEGRITY',
            "The server's sha256 of the uploaded file does not match the bytes sent; resending.",
            { adapter: 'sftp', path: rel },
          );
        }
      }
      throwIfAborted(signal);
      await this.renameAbs(s, tmpAbs, finalAbs, rel, rel);
      this.dirty.add(dirnameAbs(finalAbs));
      tempMayExist = false;
      return {
        path: rel,
        size: sent,
        ...(mtimeMs !== undefined ? { mtimeMs } : {}),
        ...(sha256 !== undefined ? { hashes: { sha256 } } : {}),
      };
    } catch (e) {
      if (isStream) body.destroy();
      let raw = e;
      if (lease && !signal?.aborted && !this.closed) {
        raw = await this.classifyWriteFailure(
          lease.conn,
          e,
          rel,
          Math.max(size ?? 0, sent),
          dirnameAbs(finalAbs),
        );
      }
      let me: MedsyncError;
      if (signal?.aborted) me = this.aborted(e, rel);
      else if (this.closed) me = this.closedError();
      else if (e instanceof SourceFailure) {
        me = toMedsyncError(e.error, 'Reading the data to write', { adapter: 'sftp', path: rel });
      } else me = this.err(raw, 'write', rel);
      if (isSftpStatus(e, SFTP_STATUS.NO_SUCH_FILE)) this.forgetDirs(dirnameAbs(finalAbs));
      if (lease) {
        const l = lease;
        lease = undefined;
        const s = l.conn;
        const broken = s.closed || isConnectionFailure(e) || signal?.aborted === true;
        if (!broken) {
          if (handle) await s.closeHandle(handle).catch(noop);
          if (tempMayExist) {
            await s.unlink(tmpAbs).catch(noop);
            tempMayExist = false;
          }
        }
        this.pool.release(s, broken || s.closed);
      }
      if (tempMayExist) await this.removeQuietly(tmpAbs);
      throw me;
    } finally {
      signal?.removeEventListener('abort', onAbort);
      if (lease) this.pool.release(lease.conn);
    }
  }

  /** False once an account was found unable to hash files on the server (no shell). */
  private digestsUsable = true;

  /**
   * The server's SHA-256 of a file just written (see `serverDigest`), or undefined when digests
   * are off or this account cannot compute them. The first success adds `sha256` to
   * `capabilities.hashes`.
   */
  private async serverSha256(s: SftpSession, abs: string, size: number): Promise<string | undefined> {
    if (!this.options.serverDigest || !this.digestsUsable) return undefined;
    const hex = await s.sha256(abs, size);
    if (hex !== undefined && !this.caps.hashes.includes('sha256')) {
      this.caps = { ...this.caps, hashes: ['sha256'] };
    }
    if (hex === undefined && s.digestsUnavailable) this.digestsUsable = false;
    return hex;
  }

  async remove(path: string, opts: OpOptions = {}): Promise<void> {
    this.check();
    const rel = this.path(path);
    throwIfAborted(opts.signal);
    await this.withSession('remove', rel, opts.signal, async (s) => {
      try {
        await s.unlink(this.abs(rel));
      } catch (e) {
        // Idempotent: a file that is not there is removed already.
        if (!isSftpStatus(e, SFTP_STATUS.NO_SUCH_FILE)) throw e;
        return;
      }
      // Made durable by the next flush, like a rename: a mirror forgets a deleted file after it.
      this.dirty.add(dirnameAbs(this.abs(rel)));
    });
  }

  async rename(from: string, to: string, opts: OpOptions = {}): Promise<void> {
    this.check();
    const a = this.path(from);
    const b = this.path(to);
    throwIfAborted(opts.signal);
    await this.withSession('rename', a, opts.signal, (s) =>
      this.renameAbs(s, this.abs(a), this.abs(b), a, b),
    );
    this.dirty.add(dirnameAbs(this.abs(a))).add(dirnameAbs(this.abs(b)));
  }

  async cleanupPartials(prefix = '', opts: CleanupOptions = {}): Promise<number> {
    this.check();
    const start = this.path(prefix, { allowRoot: true });
    throwIfAborted(opts.signal);
    const top = await this.statAbs(this.abs(start), start, opts.signal);
    if (!top?.isDirectory()) return 0;
    let removed = 0;
    const stack = [start];
    while (stack.length > 0) {
      throwIfAborted(opts.signal);
      const dir = stack.pop()!;
      let files: FileEntry[];
      try {
        files = await this.listDir(dir, opts.signal);
      } catch (e) {
        if (isMedsyncError(e) && e.code === 'E_NOT_FOUND') continue;
        throw e;
      }
      for (const f of files) {
        const child = joinPath(dir, f.filename);
        if (isType(f.attrs.mode, S_IFDIR)) stack.push(child);
        else if (isType(f.attrs.mode, S_IFREG) && isPartialName(f.filename)) {
          // A temporary file gets the source's (old) mtime before its rename, and the time it was
          // written as its access time: the later of the two is its age.
          if (opts.olderThanMs !== undefined) {
            const times = [f.attrs.mtime, f.attrs.atime].filter((t) => typeof t === 'number' && t >= 0);
            // Without a time the file may belong to a write in progress: keep it.
            if (times.length === 0 || Math.max(...times) * 1000 >= opts.olderThanMs) continue;
          }
          const done = await this.withSession('cleanup', child, opts.signal, async (s) => {
            try {
              await s.unlink(this.abs(child));
              return true;
            } catch (e) {
              if (isSftpStatus(e, SFTP_STATUS.NO_SUCH_FILE)) return false;
              throw e;
            }
          });
          if (done) removed++;
        }
      }
    }
    return removed;
  }

  async close(): Promise<void> {
    this.closed = true;
    this.pool.close();
  }
}

/**
 * Creates an {@link SftpStorage}. Throws E_CONFIG (naming the field) for invalid options; connects
 * lazily, on the first call that needs the server.
 */
export function createSftpStorage(options: SftpStorageOptions): SftpStorage {
  return new SftpStorage(options);
}
