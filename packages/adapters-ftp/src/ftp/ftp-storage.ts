import { createHash, randomBytes } from 'node:crypto';
import { PassThrough, Readable, Writable } from 'node:stream';
import {
  failedReport,
  MedsyncError,
  isMedsyncError,
  isPartialName,
  joinPath,
  normalizePath,
  partialNameFor,
  throwIfAborted,
  type CleanupOptions,
  type HashKind,
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
import { Client, enterPassiveModeIPv6, FileType, FTPError, type FileInfo, type FTPResponse } from 'basic-ftp';
import type { Socket } from 'node:net';
import type { ConnectionOptions } from 'node:tls';
import { isFtpReply, toFtpError, type FtpOp } from './errors.js';
import { handleTypedAhead, storeBuffer } from './store-buffer.js';
import { parseFtpOptions, type FtpStorageOptions, type ResolvedFtpStorageOptions } from './options.js';
import { digestTimeoutMs } from '../shared/digest.js';
import { ConnectionPool, type PoolLease } from '../shared/pool.js';
import { rootAccess } from '../shared/report.js';

type Lease = PoolLease<Client>;

/** Temporary names: a per-process random prefix and a counter. */
const TMP_PREFIX = randomBytes(4).toString('hex');
let tmpCounter = 0;
const tmpUnique = (): string => `${TMP_PREFIX}${(++tmpCounter).toString(36)}`;

/** A STOR answered 425 (no data connection) before any byte was sent is tried again this often. */
const MAX_425_RETRIES = 2;

/** How long {@link FtpStorage.transferVerdict} waits for the server's reply to a failed transfer. */
const VERDICT_WAIT_MS = 5000;

/** Uploads of at least this size resume after a dropped connection (see the `resume` option). */
const RESUME_MIN_BYTES = 8 * 1024 * 1024;

/** Storage ids whose disabled certificate verification was already reported in this process. */
const warnedInsecure = new Set<string>();

/** A range read stops the transfer (closing that connection) once this much past `end` was skipped. */
const RANGE_DRAIN_LIMIT = 1024 * 1024;

/** What the server announced in FEAT, reduced to what the adapter uses. */
interface ServerFeatures {
  names: string[];
  mlst: boolean;
  mfmt: boolean;
  size: boolean;
  mdtm: boolean;
  /** The digest command the server offers, best first: HASH (RFC draft), then XSHA256, XMD5. */
  digest: { via: 'HASH' | 'XSHA256' | 'XMD5'; kind: HashKind } | undefined;
}

const noop = () => undefined;

function dirnameAbs(abs: string): string {
  const i = abs.lastIndexOf('/');
  return i <= 0 ? '/' : abs.slice(0, i);
}

/** `YYYYMMDDHHMMSS` in UTC, as MFMT takes it. */
function mfmtTime(ms: number): string {
  return new Date(ms).toISOString().replace(/[-:T]/g, '').slice(0, 14);
}

/** Parses an RFC 3659 time-val (`YYYYMMDDHHMMSS[.sss]`, UTC). */
function parseTimeVal(v: string): number | undefined {
  const m = /^(\d{4})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})(?:\.(\d{1,3}))?/.exec(v.trim());
  if (!m) return undefined;
  const [, y, mo, d, h, mi, s, frac] = m;
  return Date.UTC(+y!, +mo! - 1, +d!, +h!, +mi!, +s!, frac ? Math.floor(+`0.${frac}` * 1000) : 0);
}

/** Parses the facts line of an MLST reply (` type=file;size=12;modify=20240517103015; /path`). */
function parseMlst(message: string): { type?: string; size?: number; mtimeMs?: number } | undefined {
  const line = message.split(/\r?\n/).find((l) => /^\s*\S*=\S*;/.test(l) && !/^\d{3}[ -]/.test(l));
  if (!line) return undefined;
  const trimmed = line.trimStart();
  const facts = trimmed.slice(0, trimmed.indexOf(' ') >= 0 ? trimmed.indexOf(' ') : undefined);
  const out: { type?: string; size?: number; mtimeMs?: number } = {};
  for (const f of facts.split(';')) {
    const eq = f.indexOf('=');
    if (eq < 0) continue;
    const key = f.slice(0, eq).toLowerCase();
    const value = f.slice(eq + 1);
    if (key === 'type') out.type = value.toLowerCase();
    else if (key === 'size') out.size = Number(value);
    else if (key === 'modify') out.mtimeMs = parseTimeVal(value);
  }
  return out;
}

/**
 * SIZE of a file; undefined when the 213 reply carries no number (ftp-srv 4.6.3 answers
 * "213 File status" for an empty file). Rejects with the server's reply otherwise.
 */
async function sizeOf(c: Client, abs: string): Promise<number | undefined> {
  const res = await c.send(`SIZE ${abs}`);
  const n = parseInt(res.message.slice(4), 10);
  return Number.isNaN(n) ? undefined : n;
}

/**
 * basic-ftp 6 closes the whole session when the data connection fails (the default error handler
 * it puts on every data socket). Servers often reset the data connection and say why on the
 * control connection: pure-ftpd answers an upload over quota with 552 and a reset. This keeps the
 * session open on a data-socket error, so the adapter can read that reply
 * ({@link FtpStorage.transferVerdict}); the transfer itself still fails with the socket error,
 * through basic-ftp's own stream pipeline. Timeouts still close the session. Relies on a private
 * method of basic-ftp (pinned at 6.2.6); on a version without it, nothing changes.
 */
function keepSessionOnDataErrors(client: Client): void {
  type Ctx = { _setupDefaultErrorHandlers?: (socket: Socket, identifier: string) => void };
  const ctx = client.ftp as unknown as Ctx;
  const original = ctx._setupDefaultErrorHandlers;
  if (typeof original !== 'function') return;
  ctx._setupDefaultErrorHandlers = function (this: unknown, socket: Socket, identifier: string) {
    if (identifier !== 'data socket') {
      original.call(this, socket, identifier);
      return;
    }
    socket.on('error', noop);
    socket.once('timeout', () => {
      socket.destroy();
      client.ftp.closeWithError(new Error('Timeout (data socket)'));
    });
  };
}

/**
 * basic-ftp records the caller's stack (`new Error().stack`) for every command it sends, to add
 * it to a later error; formatting that stack is ~15 µs, about 5 % of the CPU of a sync of small
 * files. The adapter never shows stacks (its errors carry the FTP reply, not a trace), so this
 * client's commands are sent with stack capture off. Per client, like keepSessionOnDataErrors.
 */
function skipTaskStacks(client: Client): void {
  type Ctx = { handle?: (...args: unknown[]) => unknown };
  const ctx = client.ftp as unknown as Ctx;
  const original = ctx.handle;
  if (typeof original !== 'function') return;
  ctx.handle = function (this: unknown, ...args: unknown[]) {
    const limit = Error.stackTraceLimit;
    Error.stackTraceLimit = 0;
    try {
      return original.apply(this, args);
    } finally {
      Error.stackTraceLimit = limit;
    }
  };
}

/** The final reply of each client's last listing command (see {@link recordListReplies}). */
const lastListReply = new WeakMap<Client, FTPResponse>();

/**
 * basic-ftp's `list()` drops the final reply of a listing, but vsftpd says there that it could
 * not read the folder ("226 Transfer done (but failed to open directory)."), with an empty
 * listing, for a folder the account may enter and not read. The reply is kept per client.
 */
function recordListReplies(client: Client): void {
  type Ctx = { handle?: (command: unknown, ...rest: unknown[]) => unknown };
  const ctx = client.ftp as unknown as Ctx;
  const original = ctx.handle;
  if (typeof original !== 'function') return;
  ctx.handle = function (this: unknown, command: unknown, ...rest: unknown[]) {
    const p = original.call(this, command, ...rest);
    if (typeof command === 'string' && /^(LIST|MLSD)\b/.test(command) && p instanceof Promise) {
      lastListReply.delete(client);
      p.then((res: FTPResponse) => lastListReply.set(client, res), noop);
    }
    return p;
  };
}

/** A listing whose final reply says it failed though its code says complete (vsftpd). */
const LISTING_FAILED_TEXT = /fail|denied|not permitted|cannot|can't|could not|unable/i;

/** Internal: a pooled connection was found dead before a read got its first byte. */
class StaleConnection extends Error {}

/**
 * Sends several commands in one write and resolves to their final replies, in order (a refusal
 * is a reply too, not a rejection). Servers read the control connection one command at a time,
 * so this only saves round trips; callers pipeline only commands whose later ones are harmless
 * when an earlier one fails (RNTO after a refused RNFR is answered 503). A dropped connection
 * rejects.
 */
function sendPipelined(
  c: Client,
  commands: readonly string[],
  /**
   * Looks at the replies so far (after each one): a reply returned rejects at once, without
   * waiting for the others (the caller then closes the connection). For the login: a server may
   * drop what was sent after a refused PASS, and waiting for those replies would turn a refusal
   * into a timeout, which is retried.
   */
  failFast?: (replies: readonly FTPResponse[]) => FTPResponse | undefined,
): Promise<FTPResponse[]> {
  const replies: FTPResponse[] = [];
  return handleTypedAhead<FTPResponse[]>(c.ftp, commands, (res, task) => {
    if (isFtpReply(res)) replies.push({ code: res.code, message: res.message });
    else if (res instanceof Error) {
      // A server that said why before it hung up (421: too many connections, shutting down):
      // that reply, not the closed socket, is the error.
      const ended = replies.find((r) => SESSION_ENDED.has(r.code));
      task.reject(ended ? replyError(ended) : res);
      return;
    } else if (res.code < 200)
      return; // a preliminary reply: the final one follows
    else replies.push(res);
    const failed = failFast?.(replies);
    if (failed) task.reject(replyError(failed));
    else if (replies.length === commands.length) task.resolve(replies);
  });
}

/** The features in a FEAT reply, as basic-ftp's `Client.features` reads them (none if refused). */
function parseFeat(res: FTPResponse): Map<string, string> {
  const features = new Map<string, string>();
  const lines = res.message.split('\n');
  // The first and last lines wrap the list (a single line: no features).
  if (res.code < 400 && lines.length > 2) {
    for (const line of lines.slice(1, -1)) {
      const [name, value] = line.trim().split(' ');
      if (name) features.set(name, value ?? '');
    }
  }
  return features;
}

/** A user name or password that needs no OPTS UTF8 ON before the login. */
const PLAIN_ASCII = /^[\x20-\x7e]*$/;

/** A reply turned into basic-ftp's error type, for {@link toFtpError}. */
/**
 * Replies that end a session: 421 (closing), and 530 (not logged in) from a server that logged an
 * idle session out but kept its socket. A pooled session answered one is replaced, and the
 * command tried once on a new one (a 530 there too is the file's own refusal: E_PERMISSION).
 */
const SESSION_ENDED: ReadonlySet<number> = new Set([421, 530]);

/** basic-ftp's listing commands for servers without MLSD, in the order it tries them. */
const LIST_COMMANDS = ['LIST -a', 'LIST'] as const;

function replyError(res: FTPResponse): FTPError {
  return new FTPError(res);
}

/**
 * Storage on an FTP or explicit-FTPS server (basic-ftp), through a pool of up to `maxConnections`
 * logged-in connections, each running one command or transfer at a time.
 *
 * Writes go to a hidden `.name.<unique>.medsync-part` sibling, are checked against the expected
 * size (and the server's SIZE), get their mtime (MFMT) and are renamed into place (RNFR/RNTO).
 * Capabilities that depend on the server (MFMT, MLST) are learnt from FEAT at the first connection:
 * until then `preservesMtime` reads false.
 */
export class FtpStorage implements Storage {
  readonly kind: 'ftp' | 'ftps';
  readonly id: string;
  /** The validated options, without the password. */
  readonly options: Readonly<Omit<ResolvedFtpStorageOptions, 'password'>>;
  private readonly pool: ConnectionPool<Client>;
  private readonly rootAbs: string;
  private readonly madeDirs = new Set<string>();
  private features: ServerFeatures | undefined;
  private restSupported = true;
  private appendSupported = true;
  /**
   * Whether uploads of buffers send EPSV and STOR in one write (see storeBuffer): unknown until
   * basic-ftp settled on EPSV for a transfer, then on; off for good once a pipelined EPSV was
   * refused or its data connection could not be opened. Otherwise each transfer goes through
   * basic-ftp's own passive mode (EPSV, else PASV, found again on each new session).
   */
  private pipelineEpsv: boolean | undefined;
  /** MLSD announced (MLST in FEAT) but answered "not implemented": folders are listed with LIST. */
  private mlsdBroken = false;
  private closed = false;
  private caps: StorageCapabilities;

  constructor(input: FtpStorageOptions) {
    const o = parseFtpOptions(input);
    const { password, ...rest } = o;
    this.options = rest;
    this.kind = o.secure === 'explicit' ? 'ftps' : 'ftp';
    this.rootAbs = o.root;
    const host = o.host.includes(':') && !o.host.startsWith('[') ? `[${o.host}]` : o.host;
    const rootPart = o.root === '/' ? '/' : o.root.split('/').map(encodeURIComponent).join('/');
    this.id = `${this.kind}://${encodeURIComponent(o.user)}@${host}:${o.port}${rootPart}`;
    this.caps = {
      hashes: [],
      preservesMtime: false,
      mtimePrecisionMs: null,
      atomicRename: true,
      rangeReads: true,
      caseInsensitive: false,
      // The server's file system decides (Windows servers fold case): SyncJob asks.
      caseInsensitiveVaries: true,
      maxConcurrency: o.maxConnections,
    };
    if (o.secure === 'explicit' && !o.tls.rejectUnauthorized && !warnedInsecure.has(this.id)) {
      warnedInsecure.add(this.id);
      process.emitWarning(
        `TLS certificate verification is off for ${this.id} (tls.rejectUnauthorized: false): the connection is encrypted but the server is not authenticated. Pass the server's certificate or CA as tls.ca instead.`,
        { code: 'MEDSYNC_TLS_UNVERIFIED' },
      );
    }
    // The password lives only in this closure: not on the instance, not in `options`.
    const connect = () => this.connectClient(password);
    this.pool = new ConnectionPool<Client>(
      {
        connect,
        isClosed: (c) => c.closed,
        close: (c) => c.close(),
        closedError: () => new MedsyncError('E_CONFIG', 'This storage was closed.', { adapter: this.kind }),
        isFatal: (e) => isMedsyncError(e) && !e.retryable,
      },
      o.maxConnections,
    );
  }

  /**
   * What this server can do. `preservesMtime` is true once the first connection found both MFMT
   * (to set times) and MLST/MLSD (to read them back in listings); mtimes are kept to the second.
   */
  get capabilities(): StorageCapabilities {
    return this.caps;
  }

  private async connectClient(password: string): Promise<Client> {
    try {
      return await this.connectOnce(password);
    } catch (e) {
      // A TLS upgrade garbled once (the server wrapped the socket late: ftp-srv under load, some
      // middleboxes) is tried once more on a new connection; a port that really does not speak
      // explicit FTPS fails the same way again and is reported as before.
      const raw = isMedsyncError(e) ? e.cause : e;
      const code = (raw as { code?: unknown } | undefined)?.code;
      if (typeof code === 'string' && code.startsWith('ERR_SSL_') && !this.closed)
        return this.connectOnce(password);
      throw e;
    }
  }

  private async connectOnce(password: string): Promise<Client> {
    const o = this.options;
    const client = new Client(o.timeoutMs);
    keepSessionOnDataErrors(client);
    skipTaskStacks(client);
    recordListReplies(client);
    let step: FtpOp = 'connect';
    try {
      await client.connect(o.host, o.port);
      if (o.secure === 'explicit') {
        step = 'tls';
        const tls: ConnectionOptions = {
          host: o.host,
          rejectUnauthorized: o.tls.rejectUnauthorized,
          ...(o.tls.ca !== undefined ? { ca: o.tls.ca } : {}),
        };
        await client.useTLS(tls);
      }
      step = 'login';
      // basic-ftp's `access` and `useDefaultSettings` in fewer round trips (most felt on a link
      // with latency): the login, FEAT (on the storage's first connection only: it is learnt once)
      // and the settings leave in one write, so a session is ready one round trip after the
      // greeting (before: 9 on the first connection and 8 on the others, on a server with MLST).
      // Servers read the control connection one command at a time; each of these is harmless
      // when one before it was refused (a refused login answers the rest 530). OPTS UTF8 ON goes
      // first, alone, only for a user name or password that needs it; no STRU F (file structure
      // is the default, RFC 959). Options refuse CR, LF and NUL in the user name and password.
      const utf8First = !PLAIN_ASCII.test(o.user) || !PLAIN_ASCII.test(password);
      const utf8 = utf8First ? await client.sendIgnoringError('OPTS UTF8 ON') : undefined;
      const learn = !this.features;
      const settings = ['TYPE I'];
      if (!utf8 || utf8.code >= 400) settings.push('OPTS UTF8 ON');
      // Listings with every fact the adapter reads (the list of basic-ftp's useDefaultSettings);
      // sent before FEAT is known too (a server without MLST refuses it).
      if (learn || this.features!.mlst) {
        settings.push(
          'OPTS MLST type;size;modify;unique;unix.mode;unix.owner;unix.group;unix.ownername;unix.groupname;',
        );
      }
      if (client.ftp.hasTLS) settings.push('PBSZ 0', 'PROT P');
      // 230 to USER: logged in without a password (PASS is then answered 503 or 202). A refusal
      // fails at once: the replies after it are not waited for.
      const refused = ([user, pass]: readonly FTPResponse[]): FTPResponse | undefined =>
        user && user.code >= 300 && user.code !== 331
          ? user
          : user?.code === 331 && pass && pass.code >= 300
            ? pass
            : undefined;
      const replies = await sendPipelined(
        client,
        [`USER ${o.user}`, `PASS ${password}`, ...(learn ? ['FEAT'] : []), ...settings],
        refused,
      );
      step = 'connect';
      if (learn && !this.features) this.learnFeatures(parseFeat(replies[2]!));
      const type = replies[learn ? 3 : 2]!;
      if (type.code >= 400) throw replyError(type);
      return client;
    } catch (e) {
      client.close();
      const me = toFtpError(e, step, undefined, this.kind);
      // A handshake that already worked with this server is not a configuration problem: a server
      // (ftp-srv, seen here with several connections opening at once) may garble one upgrade.
      if (me.code === 'E_CONFIG' && step === 'tls' && this.features) {
        throw new MedsyncError('E_TRANSIENT', me.message, { adapter: this.kind, cause: e, retryable: true });
      }
      throw me;
    }
  }

  private learnFeatures(feat: Map<string, string>): void {
    const names = [...feat.keys()].map((k) => k.toUpperCase());
    const has = (n: string) => names.includes(n);
    const hashAlgos = ([...feat.entries()].find(([k]) => k.toUpperCase() === 'HASH')?.[1] ?? '')
      .toUpperCase()
      .split(';')
      .map((a) => a.replace(/\*$/, '').trim());
    const digest: ServerFeatures['digest'] = hashAlgos.includes('SHA-256')
      ? { via: 'HASH', kind: 'sha256' }
      : has('XSHA256')
        ? { via: 'XSHA256', kind: 'sha256' }
        : has('XMD5')
          ? { via: 'XMD5', kind: 'md5' }
          : undefined;
    this.features = {
      digest,
      names: [...feat.entries()].map(([k, v]) => (v ? `${k} ${v}` : k)).sort(),
      mlst: has('MLST'),
      mfmt: has('MFMT'),
      size: has('SIZE'),
      mdtm: has('MDTM'),
    };
    const keeps = this.features.mfmt && this.features.mlst;
    this.caps = {
      ...this.caps,
      preservesMtime: keeps,
      mtimePrecisionMs: keeps ? 1000 : null,
      hashes: digest && this.options.serverDigest ? [digest.kind] : [],
    };
  }

  private abs(rel: string): string {
    if (rel === '') return this.rootAbs;
    return this.rootAbs === '/' ? `/${rel}` : `${this.rootAbs}/${rel}`;
  }

  private check(): void {
    if (this.closed) throw new MedsyncError('E_CONFIG', 'This storage was closed.', { adapter: this.kind });
  }

  /** normalizePath, plus the characters an FTP command line cannot carry. */
  private path(p: string, opts: { allowRoot?: boolean } = {}): string {
    const rel = normalizePath(p, opts);
    if (/[\r\n]/.test(rel)) {
      throw new MedsyncError('E_INVALID_PATH', 'An FTP path may not contain CR or LF.', {
        adapter: this.kind,
      });
    }
    return rel;
  }

  private err(e: unknown, op: FtpOp, path?: string): MedsyncError {
    return toFtpError(e, op, path, this.kind);
  }

  private aborted(e: unknown, path?: string): MedsyncError {
    return new MedsyncError('E_ABORTED', 'The operation was cancelled.', {
      adapter: this.kind,
      cause: e,
      ...(path !== undefined ? { path } : {}),
    });
  }

  /** A client is broken when the connection itself failed (anything but a server reply). */
  private static broken(e: unknown, client: Client): boolean {
    if (client.closed) return true;
    const raw = isMedsyncError(e) && e.cause !== undefined ? e.cause : e;
    if (isFtpReply(raw)) return SESSION_ENDED.has(raw.code);
    return !isMedsyncError(raw);
  }

  /**
   * True when `e` says the connection was already dead when the command went out (a closed or
   * reset socket, the 421 of a server that timed the session out, or the 530 of one that logged
   * it out and kept the socket): the command never ran.
   */
  private static stale(e: unknown, client: Client): boolean {
    const raw = isMedsyncError(e) ? e.cause : e;
    if (raw === undefined || isMedsyncError(raw)) return false;
    return isFtpReply(raw) ? SESSION_ENDED.has(raw.code) : FtpStorage.broken(raw, client);
  }

  /**
   * Runs `fn` on a pooled client. The signal closes that client (the only way to stop FTP
   * mid-command). A client found dead right after leaving the idle list is replaced once.
   */
  private async withClient<T>(
    op: FtpOp,
    path: string | undefined,
    signal: AbortSignal | undefined,
    fn: (c: Client) => Promise<T>,
  ): Promise<T> {
    for (let attempt = 0; ; attempt++) {
      let lease: Lease;
      try {
        lease = await this.pool.acquire(signal);
      } catch (e) {
        throw this.err(e, op, path);
      }
      const onAbort = () => lease.conn.close();
      signal?.addEventListener('abort', onAbort, { once: true });
      let broken = false;
      try {
        return await fn(lease.conn);
      } catch (e) {
        broken = FtpStorage.broken(e, lease.conn);
        if (signal?.aborted) throw this.aborted(e, path);
        if (this.closed) throw this.err(new MedsyncError('E_CONFIG', 'This storage was closed.'), op, path);
        if (!(lease.reused && attempt === 0 && FtpStorage.stale(e, lease.conn))) throw this.err(e, op, path);
        broken = true;
      } finally {
        signal?.removeEventListener('abort', onAbort);
        this.pool.release(lease.conn, broken);
      }
    }
  }

  /**
   * After a transfer's data connection failed with the session still open: sends NOOP and reads
   * the server's verdict on the transfer (replies come in order), returned as an error when it is
   * one. A server that has not yet noticed the failure refuses the NOOP itself and sends its
   * verdict after (pure-ftpd answers `500 Unknown command` to anything but ABOR and QUIT while it
   * reads an upload): a 500–504 is no verdict, the next reply is. Gives up after
   * {@link VERDICT_WAIT_MS}. The client is closed afterwards either way, since a reply may still
   * be on its way.
   */
  private static async transferVerdict(c: Client): Promise<FTPError | undefined> {
    let timer: NodeJS.Timeout | undefined;
    try {
      const verdict = c.ftp.handle('NOOP', (res, task) => {
        if (isFtpReply(res)) {
          if (res.code < 500 || res.code > 504) task.resolve(res);
        } else if (res instanceof Error) task.resolve(undefined);
        else if (res.code >= 200) task.resolve(undefined);
      }) as Promise<FTPError | undefined>;
      const gaveUp = new Promise<undefined>((resolve) => {
        timer = setTimeout(resolve, VERDICT_WAIT_MS, undefined);
      });
      return await Promise.race([verdict, gaveUp]);
    } catch {
      return undefined;
    } finally {
      clearTimeout(timer);
      c.close();
    }
  }

  private readonly hashSelected = new WeakSet<Client>();

  /**
   * The server's digest of a file, lower-case hex, or undefined when it gave none (a refusal is
   * not an error: the upload is then verified by size only). XSHA256/XMD5 take optional byte
   * ranges after the name, so they are not used for names with white space.
   */
  private async digestOf(
    c: Client,
    abs: string,
    dg: NonNullable<ServerFeatures['digest']>,
    size: number,
  ): Promise<string | undefined> {
    // The server reads the whole file before it answers: give it time in proportion to the size.
    // basic-ftp applies `ftp.timeout` to the control socket when the command is sent (synchronously).
    const sendSlow = (command: string): Promise<FTPResponse> => {
      const ctx = c.ftp as { timeout: number };
      const before = ctx.timeout;
      ctx.timeout = digestTimeoutMs(this.options.timeoutMs, size);
      try {
        return c.sendIgnoringError(command);
      } finally {
        ctx.timeout = before;
      }
    };
    if (dg.via === 'HASH') {
      if (!this.hashSelected.has(c)) {
        const opt = await c.sendIgnoringError('OPTS HASH SHA-256');
        if (opt.code >= 400) {
          // Announced but refused: stop asking (the uploads are checked by size).
          if (this.features) this.features = { ...this.features, digest: undefined };
          this.caps = { ...this.caps, hashes: [] };
          return undefined;
        }
        this.hashSelected.add(c);
      }
      const res = await sendSlow(`HASH ${abs}`);
      const m = /^213 SHA-256 \d+-\d+ ([0-9a-f]{64}) /im.exec(res.message);
      return m ? m[1]!.toLowerCase() : undefined;
    }
    if (/\s/.test(abs)) return undefined;
    const res = await sendSlow(`${dg.via} ${abs}`);
    const len = dg.kind === 'sha256' ? 64 : 32;
    const m = new RegExp(`^2\\d\\d ([0-9a-f]{${len}})\\s*$`, 'im').exec(res.message);
    return m ? m[1]!.toLowerCase() : undefined;
  }

  private async feats(c: Client): Promise<ServerFeatures> {
    if (!this.features) {
      const feat = await c.features();
      // Another connection may have learnt them meanwhile, and corrected them since (MFMT
      // refused, a digest that failed): the first answer stands.
      if (!this.features) this.learnFeatures(feat);
    }
    return this.features!;
  }

  // ---------------------------------------------------------------------------------------------

  async test(opts: OpOptions = {}): Promise<ConnectionReport> {
    const started = performance.now();
    const base = { kind: this.kind, id: this.id };
    const o = this.options;
    try {
      this.check();
      throwIfAborted(opts.signal);
      return await this.withClient('test', undefined, opts.signal, async (c) => {
        const cwd = await c.sendIgnoringError(`CWD ${this.rootAbs}`);
        if (cwd.code >= 400) {
          throw new MedsyncError(
            'E_NOT_FOUND',
            `The root folder is not there or not a folder (${cwd.code}).`,
            {
              adapter: this.kind,
              cause: replyError(cwd),
            },
          );
        }
        // A drop folder (the account may write but not read it) is a working destination: its
        // listing refused leaves the count out.
        let entries: number | undefined = 0;
        try {
          for (const f of await this.listOn(c, this.rootAbs)) {
            if (f.name !== '.' && f.name !== '..' && !isPartialName(f.name)) entries++;
            if (entries >= 10_000) break;
          }
        } catch (e) {
          // Only a refusal (550, also vsftpd's "failed to open directory"); any other reply (a
          // TLS data channel refused, 5xx "not implemented") is the failure it says.
          if (!isFtpReply(e) || e.code !== 550 || c.closed) throw e;
          entries = undefined;
        }
        let writable = false;
        const probe = this.abs(`.medsync-probe-${randomBytes(6).toString('hex')}`);
        try {
          await c.uploadFrom(Readable.from([Buffer.from('probe')]), probe);
          await c.remove(probe);
          writable = true;
        } catch (e) {
          if (!isFtpReply(e)) throw e;
          await c.sendIgnoringError(`DELE ${probe}`);
        }
        const access = rootAccess(this.kind, entries, writable);
        const socket = c.ftp.socket as {
          getProtocol?: () => string | null;
          getCipher?: () => { name: string };
        };
        const feats = await this.feats(c);
        return {
          ...base,
          ok: true,
          latencyMs: Math.round(performance.now() - started),
          writable,
          ...(entries !== undefined ? { entries } : {}),
          details: {
            listable: entries !== undefined,
            tls: o.secure === 'explicit',
            ...(o.secure === 'explicit' ? { tlsVerified: o.tls.rejectUnauthorized } : {}),
            ...(socket.getProtocol
              ? { tlsProtocol: socket.getProtocol(), cipher: socket.getCipher?.().name }
              : {}),
            features: feats.names,
            serverDigest: !o.serverDigest
              ? 'off'
              : feats.digest
                ? `${feats.digest.via} (${feats.digest.kind})`
                : 'none',
            preservesMtime: this.caps.preservesMtime,
          },
          ...access,
        } satisfies ConnectionReport;
      });
    } catch (e) {
      const me = this.err(e, 'test');
      return failedReport(this, started, me, this.advice(me), { tls: o.secure === 'explicit' });
    }
  }

  private advice(me: MedsyncError): string {
    const o = this.options;
    const cause = me.cause as { code?: unknown; message?: unknown } | undefined;
    const text = typeof cause?.message === 'string' ? cause.message : '';
    switch (me.code) {
      case 'E_AUTH':
        return `The server refused the login: check \`user\` and \`password\`, and that the account may use FTP${o.secure ? 'S' : ''}.`;
      case 'E_NOT_FOUND':
        return `The root folder ${o.root} does not exist on the server, or this account cannot see it: create it or fix \`root\`.`;
      case 'E_PERMISSION':
        return 'The account may not read the root folder: check its rights on the server.';
      case 'E_CONFIG':
        return /TLS|certificate/i.test(me.message)
          ? 'Check `secure` and `tls`: pass the server certificate (or its CA) as `tls.ca`; `rejectUnauthorized: false` only on a trusted network.'
          : 'Check the FTP options.';
      case 'E_ABORTED':
        return 'The test was cancelled before it finished.';
      default:
        if (cause?.code === 'ECONNREFUSED') {
          return `Nothing accepts connections at ${o.host}:${o.port}: check \`host\` and \`port\`, the firewall, and that the FTP server is running.`;
        }
        if (/timeout|timed out|ETIMEDOUT/i.test(`${text} ${String(cause?.code)}`)) {
          return `${o.host}:${o.port} did not answer in time: check the firewall (control port and passive data ports) or raise \`timeoutMs\`.`;
        }
        return `The FTP server at ${o.host}:${o.port} could not be used: check that it is reachable and running, then retry.`;
    }
  }

  // ---------------------------------------------------------------------------------------------

  /**
   * The entries of the folder at `abs`, on this connection. MLSD where the server offers it, and
   * then never LIST for one folder MLSD refused (basic-ftp's own fallback): LIST answers a folder
   * it cannot read with an empty listing (pure-ftpd, proftpd) or with the folder itself as its
   * only entry (vsftpd), and a mirror from that server would take its files as removed. Without
   * MLSD, the connection enters the folder (CWD) and lists where it stands, so a folder it cannot
   * enter fails instead of looking empty. A missing folder fails alike (pure-ftpd and vsftpd
   * answer LIST of one with an empty listing). An empty listing whose final reply says the folder
   * could not be read (vsftpd, for a folder it may enter and not read) fails too.
   */
  private async listOn(c: Client, abs: string): Promise<FileInfo[]> {
    if ((await this.feats(c)).mlst && !this.mlsdBroken) {
      c.availableListCommands = ['MLSD'];
      try {
        return await c.list(abs);
      } catch (e) {
        if (!isFtpReply(e) || c.closed || ![500, 501, 502, 504].includes(e.code)) throw e;
        // Announced but not implemented (500, 502, 504): LIST from now on, on every connection.
        // A 501 (this argument refused) falls back for this folder only.
        if (e.code !== 501) this.mlsdBroken = true;
      }
    }
    c.availableListCommands = [...LIST_COMMANDS];
    const cwd = await c.sendIgnoringError(`CWD ${abs}`);
    if (cwd.code >= 400) throw replyError(cwd);
    const files = await c.list();
    const done = lastListReply.get(c);
    if (files.length === 0 && done && LISTING_FAILED_TEXT.test(done.message)) {
      throw replyError({ code: 550, message: done.message });
    }
    return files;
  }

  /**
   * One folder's entries, without `.` and `..`. Servers answer a missing folder with 450, 451 or
   * 550 (ftp-srv: 451); a refused listing is checked with CWD, so a missing folder is always
   * E_NOT_FOUND, and a folder that is there but whose listing the server refuses is E_PERMISSION.
   */
  private async listDir(relDir: string, signal: AbortSignal | undefined): Promise<FileInfo[]> {
    const files = await this.withClient('list', relDir, signal, async (c) => {
      try {
        return await this.listOn(c, this.abs(relDir));
      } catch (e) {
        if (!isFtpReply(e) || c.closed) throw e;
        const cwd = await c.sendIgnoringError(`CWD ${this.abs(relDir)}`);
        if (cwd.code >= 500) {
          throw new MedsyncError('E_NOT_FOUND', 'The folder does not exist.', {
            adapter: this.kind,
            path: relDir,
            cause: e,
          });
        }
        if (cwd.code < 400 && e.code >= 500) {
          throw new MedsyncError(
            'E_PERMISSION',
            `The folder is there but the server refused to list it (${e.code}): check the account's right to read it.`,
            { adapter: this.kind, path: relDir, cause: e, retryable: false },
          );
        }
        throw e;
      }
    });
    return files.filter(
      (f) => f.name !== '' && f.name !== '.' && f.name !== '..' && !/[/\\\0\r\n]/.test(f.name),
    );
  }

  /** Whether the listing of `relDir`'s parent still shows it as a folder. */
  private async folderListed(relDir: string, signal: AbortSignal | undefined): Promise<boolean> {
    const i = relDir.lastIndexOf('/');
    const name = relDir.slice(i + 1);
    try {
      const siblings = await this.listDir(i < 0 ? '' : relDir.slice(0, i), signal);
      return siblings.some((f) => f.name === name && f.type === FileType.Directory);
    } catch (e) {
      // The parent is gone too: so is the folder.
      if (isMedsyncError(e) && e.code === 'E_NOT_FOUND') return false;
      throw this.err(e, 'list', relDir);
    }
  }

  /** True when `relDir` is a folder (CWD succeeds); false on a 5xx "unavailable" reply. */
  private isDir(relDir: string, signal: AbortSignal | undefined): Promise<boolean> {
    return this.withClient('list', relDir, signal, async (c) => {
      const res = await c.sendIgnoringError(`CWD ${this.abs(relDir)}`);
      if (res.code < 400) return true;
      if (res.code === 550 || res.code === 450 || res.code === 553 || res.code === 501) return false;
      throw replyError(res);
    });
  }

  async *list(prefix = '', opts: ListOptions = {}): AsyncGenerator<StorageEntry> {
    this.check();
    const start = this.path(prefix, { allowRoot: true });
    throwIfAborted(opts.signal);
    if (!(await this.isDir(start, opts.signal))) {
      if (start !== '') {
        const file = await this.stat(start, opts).catch(() => null);
        if (file) {
          yield file;
          return;
        }
      }
      // A folder this account may not enter is there all the same (its parent lists it).
      if (start !== '' && (await this.folderListed(start, opts.signal))) {
        throw new MedsyncError(
          'E_PERMISSION',
          "The folder is there but the server refused to open it: check the account's right to enter and read it.",
          { adapter: this.kind, path: start, retryable: false },
        );
      }
      throw new MedsyncError('E_NOT_FOUND', 'The folder does not exist.', {
        adapter: this.kind,
        path: start,
      });
    }
    // Folders are listed in parallel over the pool; files are yielded as each listing arrives.
    const width = Math.max(
      1,
      Math.min(opts.concurrency ?? this.options.maxConnections, this.options.maxConnections),
    );
    type Listed = { id: number; dir: string; files?: FileInfo[]; error?: unknown };
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
        // A folder removed while we walk is not an error. But servers answer 550 alike for a
        // folder that is gone and for one this account may not enter (vsftpd: "Failed to change
        // directory."): a folder its parent still lists is unreadable, and skipping it would
        // hide its files (a mirror from this server would then delete their copies).
        if (me.code === 'E_NOT_FOUND' && r.dir !== start) {
          // Listed as unreadable (size -1), as the local adapter lists what it cannot read: the
          // sync reports it, and a mirror deletes nothing below it. The other folders go on.
          if (await this.folderListed(r.dir, opts.signal)) yield { path: r.dir, size: -1 };
          continue;
        }
        if (me.code === 'E_PERMISSION' && r.dir !== start) {
          yield { path: r.dir, size: -1 };
          continue;
        }
        throw me;
      }
      for (const f of r.files!) {
        const child = joinPath(r.dir, f.name);
        if (f.type === FileType.Directory) queue.push(child);
        else if (f.type === FileType.File && !isPartialName(f.name)) {
          yield {
            path: child,
            size: f.size,
            ...(f.modifiedAt ? { mtimeMs: f.modifiedAt.getTime() } : {}),
          };
        }
      }
    }
  }

  /**
   * Size and mtime of a file on this connection (at `abs`, reported as `rel`); null when it is not
   * there or not a file.
   */
  private async statOn(c: Client, rel: string, abs = this.abs(rel)): Promise<StorageEntry | null> {
    const f = await this.feats(c);
    if (f.mlst) {
      const res = await c.send(`MLST ${abs}`);
      const facts = parseMlst(res.message);
      if (facts && facts.type !== undefined && facts.type !== 'file') return null;
      if (facts && facts.size !== undefined && Number.isFinite(facts.size)) {
        return {
          path: rel,
          size: facts.size,
          ...(facts.mtimeMs !== undefined ? { mtimeMs: facts.mtimeMs } : {}),
        };
      }
    }
    const size = f.size ? await sizeOf(c, abs) : undefined;
    if (size !== undefined) {
      let mtimeMs: number | undefined;
      if (f.mdtm) {
        const res = await c.sendIgnoringError(`MDTM ${abs}`);
        if (res.code === 213) mtimeMs = parseTimeVal(res.message.slice(4));
      }
      return { path: rel, size, ...(mtimeMs !== undefined ? { mtimeMs } : {}) };
    }
    // Neither MLST nor a usable SIZE: find the file in its folder's listing.
    const name = abs.slice(abs.lastIndexOf('/') + 1);
    const hit = (await this.listOn(c, dirnameAbs(abs))).find((x) => x.name === name);
    if (!hit || hit.type !== FileType.File) return null;
    return { path: rel, size: hit.size, ...(hit.modifiedAt ? { mtimeMs: hit.modifiedAt.getTime() } : {}) };
  }

  /**
   * Whether a file the server answered 550 about is there after all. Servers answer 550 for a
   * missing file and for one they refuse to touch alike (vsftpd: "Delete operation failed." on a
   * read-only or retention share), so a delete or rename is only taken as "already gone" once
   * the file is seen missing.
   */
  private async stillThere(c: Client, abs: string): Promise<boolean> {
    try {
      return (await this.statOn(c, '', abs)) !== null;
    } catch (e) {
      if (!(isFtpReply(e) && e.code >= 500)) throw e;
      // MLST/SIZE refused: missing, or a file this account may not read. Its folder's listing
      // tells (a refused DELE of an unreadable file must not pass for "already gone"); a folder
      // that is there but cannot be listed tells nothing, and the file counts as there.
      return (await this.listedIn(c, abs)) ?? true;
    }
  }

  /**
   * Whether `abs` is in its folder's listing: false also when that folder is gone (its parent
   * does not list it), undefined when the folder is there but cannot be listed, or its parent
   * cannot be either. A dropped connection rejects.
   */
  private async listedIn(c: Client, abs: string): Promise<boolean | undefined> {
    // Up from the file's folder to the first one that can be listed: a folder on the way that is
    // not in its parent's listing is gone, and so is the file.
    // Never above the storage's root: a parent may hide it (IIS virtual folders, ProFTPD's
    // HideNoAccess), and the root's being there is not in question.
    for (let target = abs; ; target = dirnameAbs(target)) {
      const dir = dirnameAbs(target);
      let entries: FileInfo[];
      try {
        entries = await this.listOn(c, dir);
      } catch (e) {
        if (!isFtpReply(e) || c.closed) throw e;
        if (dir === '/' || dir === this.rootAbs) return undefined;
        continue;
      }
      const hit = entries.find((f) => f.name === target.slice(target.lastIndexOf('/') + 1));
      if (target === abs) return hit !== undefined;
      // A folder on the way (or a link to one) that is there but could not be listed: the file
      // may be in it.
      return hit === undefined ? false : undefined;
    }
  }

  /** The error for a 550 on a file that is still there: refused, not missing. */
  private refusedButThere(res: FTPResponse, what: string, rel: string): MedsyncError {
    return new MedsyncError(
      'E_PERMISSION',
      `${what}: the server refused (${res.code}) and the file is still there (or its folder cannot be read to tell): check that the account may delete and rename files here (a read-only or retention share refuses it) and that no other program holds the file open.`,
      { adapter: this.kind, path: rel, cause: replyError(res), retryable: false },
    );
  }

  async stat(path: string, opts: OpOptions = {}): Promise<StorageEntry> {
    this.check();
    const rel = this.path(path);
    throwIfAborted(opts.signal);
    const notFound = (cause?: unknown) =>
      new MedsyncError('E_NOT_FOUND', 'No such file.', { adapter: this.kind, path: rel, cause });
    const found = await this.withClient('stat', rel, opts.signal, (c) => this.statOn(c, rel));
    if (!found) throw notFound();
    return found;
  }

  async read(path: string, opts: ReadOptions = {}): Promise<Readable> {
    this.check();
    const rel = this.path(path);
    throwIfAborted(opts.signal);
    const start = Math.max(0, opts.start ?? 0);
    const limit = opts.end === undefined ? Infinity : Math.max(0, opts.end - start + 1);
    for (let attempt = 0; ; attempt++) {
      let lease: Lease;
      try {
        lease = await this.pool.acquire(opts.signal);
      } catch (e) {
        throw this.err(e, 'read', rel);
      }
      try {
        return await this.download(lease, rel, start, limit, opts.signal, attempt === 0 && lease.reused);
      } catch (e) {
        // A pooled connection found dead before the first byte: once more on a fresh one.
        if (e instanceof StaleConnection) continue;
        throw e;
      }
    }
  }

  /**
   * RETR (after REST when `start` > 0) into a PassThrough. Resolves with the stream at the first
   * byte or at the end of an empty file; rejects when the server refuses before any byte. The
   * lease is held until the transfer ends; a consumer that destroys the stream early, or a range
   * satisfied long before the end of the file, closes that connection instead of draining it.
   */
  private download(
    lease: Lease,
    rel: string,
    start: number,
    limit: number,
    signal: AbortSignal | undefined,
    mayBeStale: boolean,
  ): Promise<Readable> {
    const client = lease.conn;
    const out = new PassThrough({ highWaterMark: 256 * 1024 });
    let received = 0;
    let skipped = 0;
    let started = false;
    let finished = false;
    let abandoned = false;
    let released = false;
    const release = (broken: boolean) => {
      if (released) return;
      released = true;
      signal?.removeEventListener('abort', onAbort);
      this.pool.release(client, broken);
    };
    const abandon = () => {
      if (finished || abandoned) return;
      abandoned = true;
      client.close();
    };
    const onAbort = () => {
      abandon();
      if (started && !out.destroyed) out.destroy(this.aborted(signal?.reason, rel));
    };
    out.on('close', () => {
      if (received < limit) abandon();
    });

    return new Promise<Readable>((resolve, reject) => {
      const begin = () => {
        if (!started) {
          started = true;
          resolve(out);
        }
      };
      const run = (restAt: number, discard: number) => {
        let toDiscard = discard;
        const sink = new Writable({
          highWaterMark: 64 * 1024,
          write: (chunk: Buffer, _enc, cb) => {
            begin();
            let buf = chunk;
            if (toDiscard > 0) {
              const n = Math.min(toDiscard, buf.length);
              toDiscard -= n;
              buf = buf.subarray(n);
            }
            if (received >= limit) {
              // The range is served: drain a short tail, but stop a long one by closing.
              skipped += buf.length;
              if (skipped > RANGE_DRAIN_LIMIT) abandon();
              cb();
              return;
            }
            if (out.destroyed) {
              abandon();
              cb();
              return;
            }
            const part = buf.length > limit - received ? buf.subarray(0, limit - received) : buf;
            received += part.length;
            const more = part.length === 0 || out.write(part);
            if (received >= limit) out.end();
            if (more || received >= limit) {
              cb();
              return;
            }
            const go = () => {
              out.off('drain', go);
              out.off('close', go);
              cb();
            };
            out.on('drain', go);
            out.on('close', go);
          },
        });
        client.downloadTo(sink, this.abs(rel), restAt).then(
          () => {
            finished = true;
            release(false);
            begin();
            if (!out.writableEnded) out.end();
          },
          (e: unknown) => {
            // A server without REST: read from the start and skip the bytes before `start`.
            if (!started && restAt > 0 && isFtpReply(e) && e.code >= 500 && e.code <= 504 && !client.closed) {
              this.restSupported = false;
              run(0, restAt);
              return;
            }
            finished = true;
            release(FtpStorage.broken(e, client) || abandoned);
            if (!started && mayBeStale && !abandoned && FtpStorage.stale(e, client)) {
              started = true;
              reject(new StaleConnection());
              return;
            }
            if (abandoned && !signal?.aborted) return; // the consumer is gone or the range was served
            const me = signal?.aborted ? this.aborted(e, rel) : this.err(e, 'read', rel);
            if (!started) {
              started = true;
              out.destroy();
              reject(me);
            } else if (!out.destroyed) {
              out.destroy(me);
            }
          },
        );
      };
      if (signal?.aborted) {
        release(false);
        reject(this.aborted(signal.reason, rel));
        return;
      }
      signal?.addEventListener('abort', onAbort, { once: true });
      if (limit === 0) {
        // Nothing to read (end before start): still report a missing file.
        finished = true;
        release(false);
        this.stat(rel, signal ? { signal } : {}).then(() => {
          started = true;
          out.end();
          resolve(out);
        }, reject);
        return;
      }
      run(this.restSupported ? start : 0, this.restSupported ? 0 : start);
    });
  }

  async readBuffer(path: string, opts: OpOptions = {}): Promise<Buffer> {
    const stream = await this.read(path, opts);
    const parts: Buffer[] = [];
    for await (const c of stream as AsyncIterable<Buffer>) parts.push(c);
    return Buffer.concat(parts);
  }

  // ---------------------------------------------------------------------------------------------

  /**
   * Makes sure a folder exists (absolute path), creating missing parents. Known folders are
   * cached; one MKD is enough for a new folder whose parent exists.
   */
  private async ensureDir(c: Client, absDir: string): Promise<void> {
    if (absDir === '/' || this.madeDirs.has(absDir)) return;
    const made = await c.sendIgnoringError(`MKD ${absDir}`);
    if (made.code < 400) await this.checkMadeName(c, absDir, made);
    if (made.code < 400 || (await c.sendIgnoringError(`CWD ${absDir}`)).code < 400) {
      this.madeDirs.add(absDir);
      return;
    }
    await this.ensureDir(c, dirnameAbs(absDir));
    const again = await c.sendIgnoringError(`MKD ${absDir}`);
    if (again.code < 400) await this.checkMadeName(c, absDir, again);
    if (again.code >= 400 && (await c.sendIgnoringError(`CWD ${absDir}`)).code >= 400) {
      throw replyError(again);
    }
    this.madeDirs.add(absDir);
  }

  /**
   * A server may store a folder under another name than asked: pure-ftpd replaces a trailing space
   * with "_" by design (jedisct1/pure-ftpd#130), and writes into the asked-for name then fail with
   * 553 forever. The 257 reply names the folder made (RFC 959 quoting); when its last segment
   * differs, the odd folder is removed again and the name is refused (not retryable).
   */
  private async checkMadeName(c: Client, absDir: string, res: FTPResponse): Promise<void> {
    const m = /^257 "((?:[^"]|"")*)"/.exec(res.message);
    if (!m) return;
    const madePath = m[1]!.replace(/""/g, '"').replace(/\/+$/, '');
    const made = madePath.slice(madePath.lastIndexOf('/') + 1);
    const asked = absDir.slice(absDir.lastIndexOf('/') + 1);
    if (made === '' || made === asked) return;
    await c.sendIgnoringError(`RMD ${madePath}`);
    throw new MedsyncError(
      'E_UNSUPPORTED',
      'Creating a folder: the server stored it under another name than asked (it rewrites such names, e.g. pure-ftpd replaces a trailing space with "_"), so this name cannot be stored there.',
      { adapter: this.kind, path: absDir, retryable: false },
    );
  }

  /** Forgets cached folders at and below `absDir`'s branch, after a failure that hints they went. */
  private forgetDirs(absDir: string): void {
    for (let d = absDir; d !== '/'; d = dirnameAbs(d)) this.madeDirs.delete(d);
  }

  /**
   * RNFR/RNTO. When RNTO fails, creates the target's folder if it was not known, and when the
   * server refuses to overwrite, removes the target and tries once more.
   */
  private async renameAbs(
    c: Client,
    fromAbs: string,
    toAbs: string,
    fromRel: string,
    toRel: string,
  ): Promise<void> {
    const attempt = async (): Promise<FTPResponse> => {
      const rnfr = await c.sendIgnoringError(`RNFR ${fromAbs}`);
      if (rnfr.code === 500 || rnfr.code === 502 || rnfr.code === 504) {
        throw new MedsyncError(
          'E_UNSUPPORTED',
          `Renaming the file: the server does not support RNFR/RNTO (${rnfr.code}). Set \`atomicUpload: false\` to upload straight to the final name.`,
          { adapter: this.kind, path: fromRel, cause: replyError(rnfr), retryable: false },
        );
      }
      if (rnfr.code >= 400) {
        const me = this.err(replyError(rnfr), 'rename-source', fromRel);
        if (me.code === 'E_NOT_FOUND' && (await this.stillThere(c, fromAbs)))
          throw this.refusedButThere(rnfr, 'Renaming the file', fromRel);
        throw me;
      }
      return c.sendIgnoringError(`RNTO ${toAbs}`);
    };
    let res = await attempt();
    if (res.code < 400) return;
    const parent = dirnameAbs(toAbs);
    if (parent !== '/' && !this.madeDirs.has(parent)) {
      await this.ensureDir(c, parent);
      res = await attempt();
      if (res.code < 400) return;
    }
    if (res.code >= 500) {
      // Some servers (Windows ones) will not replace a file. The old one is moved aside under a
      // temporary name, the new one renamed in, and only then the old one removed; if the new one
      // still cannot go in, the old one is put back. (Deleting the old one first lost both when
      // the second rename failed too: a virus scanner holding the new file, a full folder.)
      // Only a file is moved aside: a folder in the way (with delivered files in it) stays.
      const asideAbs = this.abs(partialNameFor(toRel, `old${(++tmpCounter).toString(36)}`));
      // (CWD tells a folder: some servers answer SIZE for folders too.)
      const folder = (await c.sendIgnoringError(`CWD ${toAbs}`)).code < 400;
      if (
        !folder &&
        (await this.stillThere(c, toAbs)) &&
        (await this.renameOnce(c, toAbs, asideAbs)).code < 400
      ) {
        let placed = false;
        try {
          res = await attempt();
          placed = res.code < 400;
        } finally {
          // The old one goes back whatever stopped the new one (a refusal, a dropped connection:
          // then it stays hidden beside the empty name until the retry puts the new one in).
          if (!placed) await this.renameOnce(c, asideAbs, toAbs).catch(noop);
        }
        if (placed) {
          await c.sendIgnoringError(`DELE ${asideAbs}`);
          return;
        }
      }
    }
    throw this.err(replyError(res), 'rename', toRel);
  }

  /** RNFR then RNTO; the first refusal's reply, or RNTO's. */
  private async renameOnce(c: Client, fromAbs: string, toAbs: string): Promise<FTPResponse> {
    const rnfr = await c.sendIgnoringError(`RNFR ${fromAbs}`);
    return rnfr.code >= 400 ? rnfr : c.sendIgnoringError(`RNTO ${toAbs}`);
  }

  /** Best-effort DELE on a fresh lease (the caller's may be closed, its signal fired). */
  private async removeQuietly(abs: string): Promise<void> {
    if (this.closed) return;
    try {
      const lease = await this.pool.acquire();
      try {
        await lease.conn.sendIgnoringError(`DELE ${abs}`);
        this.pool.release(lease.conn);
      } catch {
        this.pool.release(lease.conn, true);
      }
    } catch {
      // The temporary name stays hidden; cleanupPartials removes it later.
    }
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
          adapter: this.kind,
          path: rel,
        });
      }
    } catch (e) {
      if (isStream) body.destroy();
      throw e;
    }
    const signal = opts.signal;
    const source: Readable | undefined = isStream ? body : undefined;
    // Errors of the body surface through the upload; never as an uncaught event.
    source?.on('error', noop);
    const finalAbs = this.abs(rel);
    // A large upload gets a temporary name derived from what it uploads (path, size, mtime), so
    // the attempt after a dropped connection finds the part already sent and appends the rest.
    const atomic = this.options.atomicUpload;
    // Without the source's mtime the name would not tell two versions of the same size apart:
    // appending an edited file's tail to the old head would pass the size check.
    const resumable =
      atomic &&
      this.options.resume &&
      isStream &&
      size !== undefined &&
      size >= RESUME_MIN_BYTES &&
      opts.mtimeMs !== undefined;
    const unique = resumable
      ? `r${createHash('sha256')
          .update(`${rel}\0${size}\0${opts.mtimeMs ?? ''}`)
          .digest('hex')
          .slice(0, 16)}`
      : tmpUnique();
    let tmpAbs = atomic ? this.abs(partialNameFor(rel, unique)) : finalAbs;
    // Temporary names given up after their session was closed with a STOR sent (see onRetired):
    // removed once this write is over, best effort.
    const abandoned: string[] = [];
    const kind = this.kind;
    // The upload pulls from the body only once the data connection is open, so a connection that
    // turns out dead before that can be swapped for another without losing a byte.
    let sent = 0;
    let pulled = false;
    let streamError: unknown;
    // A stream body (a buffer goes through storeBuffer). `skip` bytes (already on the server) are
    // read from the body but not sent: they still pass through the caller's hashing, so its
    // digests cover the whole file.
    const uploadBody = (skip = 0): Readable => {
      const r = Readable.from(
        (async function* () {
          pulled = true;
          let toSkip = skip;
          // An error thrown in at the yield is the data connection's (the upload's pipeline
          // destroys this stream with it); only the body's own failures are `streamError`.
          let yielding = false;
          try {
            for await (const chunk of source! as AsyncIterable<Buffer | string>) {
              let buf = typeof chunk === 'string' ? Buffer.from(chunk) : chunk;
              sent += buf.length;
              if (size !== undefined && sent > size) {
                throw new MedsyncError(
                  'E_INTEGRITY',
                  `Received more than the ${size} bytes expected: the source changed while it was sent.`,
                  { adapter: kind, path: rel },
                );
              }
              if (toSkip > 0) {
                if (buf.length <= toSkip) {
                  toSkip -= buf.length;
                  continue;
                }
                buf = buf.subarray(toSkip);
                toSkip = 0;
              }
              yielding = true;
              yield buf;
              yielding = false;
            }
          } catch (e) {
            if (!yielding) streamError ??= e;
            throw e;
          }
        })(),
        { objectMode: false, highWaterMark: 64 * 1024 },
      );
      r.on('error', noop);
      return r;
    };
    let lease: Lease | undefined;
    let tempMayExist = false;
    let transferred = false;
    // A complete part from an earlier attempt, taken without sending a byte: only a matching
    // server digest may let it through.
    let wholeReused = false;
    let dataRetries = 0;
    let retired: { error: unknown; pipelineFailed: boolean } | undefined;
    // The destination folder was taken from the mkdir cache and the server refused the upload:
    // the folder may have been removed since (vsftpd: "553 Could not create file."). Once per
    // write, it is forgotten and made again.
    let dirRechecked = false;
    const onAbort = () => {
      source?.destroy();
      lease?.conn.close();
    };
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      for (let attempt = 0; ; attempt++) {
        lease = await this.pool.acquire(signal);
        throwIfAborted(signal);
        const c = lease.conn;
        // Whether this attempt appends (APPE) to a part already on the server.
        let appending = false;
        const dirCached = this.madeDirs.has(dirnameAbs(finalAbs));
        try {
          await this.ensureDir(c, dirnameAbs(finalAbs));
          let offset = 0;
          if (resumable && this.appendSupported) {
            const res = await c.sendIgnoringError(`SIZE ${tmpAbs}`);
            const have = res.code === 213 ? parseInt(res.message.slice(4), 10) : NaN;
            if (size !== undefined && have > 0 && have <= size) offset = have;
          }
          tempMayExist = true;
          // A complete part is only taken as is when the server's digest will check it whole.
          if (offset === size && !(this.options.serverDigest && (await this.feats(c)).digest)) offset = 0;
          if (offset > 0 && offset === size) {
            // Sent completely before; only the checks and the rename were left.
            wholeReused = true;
            for await (const _ of uploadBody(offset)) void _;
          } else if (offset > 0) {
            appending = true;
            await c.appendFrom(uploadBody(offset), tmpAbs);
          } else if (!isStream) {
            const buf = Buffer.from(body.buffer, body.byteOffset, body.byteLength);
            await storeBuffer(c, tmpAbs, buf, {
              pipelined: atomic && this.pipelineEpsv === true,
              onStart: () => {
                pulled = true;
                sent = buf.length;
              },
              onRetired: (error, pipelineFailed) => {
                retired = { error, pipelineFailed };
                if (pipelineFailed) this.pipelineEpsv = false;
              },
            });
            if (this.pipelineEpsv === undefined && c.prepareTransfer === enterPassiveModeIPv6) {
              this.pipelineEpsv = true;
            }
          } else {
            await c.uploadFrom(uploadBody(), tmpAbs);
          }
          transferred = true;
          break;
        } catch (failure) {
          let e = failure;
          // The data connection failed but the session is open: the server's reply says why
          // (552 over quota, 426 aborted, 451 local error). Read it, then retire the session.
          if (
            !isFtpReply(e) &&
            !isMedsyncError(e) &&
            !c.closed &&
            streamError === undefined &&
            !signal?.aborted
          ) {
            e = (await FtpStorage.transferVerdict(c)) ?? e;
          }
          // A 550 once the bytes flowed is the server's account of a broken transfer (ftp-srv:
          // "550 read ECONNRESET"), not a permission: servers check those before they accept the
          // upload (150). Retryable, like the 426 or 451 of other servers.
          if (pulled && isFtpReply(e) && e.code === 550) {
            e = new MedsyncError(
              'E_TRANSIENT',
              'The upload failed after it had started and the server gave up the file (550); resending.',
              { adapter: this.kind, path: rel, cause: e, retryable: true },
            );
          }
          if (streamError !== undefined || pulled || signal?.aborted) throw e;
          // A server without APPE refuses it (500, 502, 504: not implemented) before any byte
          // moves: upload the whole file. Other refusals (501 for a name) are the file's own.
          if (
            isFtpReply(e) &&
            (e.code === 500 || e.code === 502 || e.code === 504) &&
            appending &&
            this.appendSupported
          ) {
            this.appendSupported = false;
            this.pool.release(c);
            lease = undefined;
            continue;
          }
          // No byte has left the body yet, so this file can be tried again at once: on a fresh
          // connection when the pooled one was already dead, and on the same one after a 425
          // (the server could not open the data connection for this transfer).
          if (isFtpReply(e) && e.code === 425 && dataRetries < MAX_425_RETRIES && !c.closed) {
            dataRetries++;
            this.pool.release(c);
            lease = undefined;
            continue;
          }
          if (retired !== undefined && e === retired.error) {
            const { pipelineFailed } = retired;
            retired = undefined;
            // The session was closed with its STOR sent, and its server process may still create
            // or truncate that name: an attempt after it uploads under a new one.
            if (atomic && !resumable) {
              abandoned.push(tmpAbs);
              tmpAbs = this.abs(partialNameFor(rel, tmpUnique()));
            }
            // A refused pipelined EPSV, or its data connection not opened: at once on a new
            // session, through basic-ftp's own passive mode (EPSV, else PASV).
            if (
              pipelineFailed &&
              !(isFtpReply(e) && SESSION_ENDED.has(e.code)) &&
              dataRetries < MAX_425_RETRIES
            ) {
              dataRetries++;
              this.pool.release(c, true);
              lease = undefined;
              continue;
            }
          }
          if (
            isFtpReply(e) &&
            (e.code === 550 || e.code === 553) &&
            dirCached &&
            !dirRechecked &&
            !appending &&
            !c.closed
          ) {
            dirRechecked = true;
            this.forgetDirs(dirnameAbs(finalAbs));
            this.pool.release(c);
            lease = undefined;
            continue;
          }
          if (!(attempt === 0 && lease.reused && FtpStorage.stale(e, c))) throw e;
          this.pool.release(c, true);
          lease = undefined;
          tempMayExist = false;
        }
      }
      const c = lease.conn;
      if (streamError !== undefined) throw streamError;
      if (size !== undefined && sent !== size) {
        throw new MedsyncError(
          'E_INTEGRITY',
          `Received ${sent} bytes but ${size} were expected: the source changed or the stream was cut.`,
          { adapter: this.kind, path: rel },
        );
      }
      const feats = await this.feats(c);
      // The temporary file removed by someone else (another job's sweep) after the transfer: not
      // this file's fault, and not the account's. The retry sends it again.
      const vanished = (cause?: unknown) =>
        new MedsyncError(
          'E_TRANSIENT',
          'The uploaded temporary file disappeared before it was checked and renamed (removed by another program?); resending.',
          { adapter: this.kind, path: rel, cause, retryable: true },
        );
      if (feats.size) {
        const res = await c.sendIgnoringError(`SIZE ${tmpAbs}`);
        let stored: number | undefined;
        if (res.code < 400) stored = parseInt(res.message.slice(4), 10);
        else {
          // SIZE refused: gone, or a server that will not size this file (the listing tells).
          const seen = await this.listedIn(c, tmpAbs);
          if (seen === undefined) throw replyError(res);
          if (!seen) throw vanished(replyError(res));
        }
        if (stored !== undefined && !Number.isNaN(stored) && stored !== sent) {
          throw new MedsyncError(
            'E_INTEGRITY',
            `The server stored ${stored} bytes but ${sent} were sent; resending.`,
            {
              adapter: this.kind,
              path: rel,
            },
          );
        }
      }
      let hashes: Partial<Record<HashKind, string>> | undefined;
      const dg = this.options.serverDigest ? feats.digest : undefined;
      const remote = dg ? await this.digestOf(c, tmpAbs, dg, sent) : undefined;
      if (wholeReused && !(dg && remote && opts.expectedHashes?.()[dg.kind] !== undefined)) {
        // The server gave no digest this time (or there is none to compare with): the old part
        // may be another version of the same size. It is removed, and the retry sends it all.
        throw new MedsyncError(
          'E_INTEGRITY',
          'An earlier complete upload of this file could not be checked against the server digest; sending it again.',
          { adapter: this.kind, path: rel, retryable: true },
        );
      }
      if (dg && remote) {
        const expected = opts.expectedHashes?.()[dg.kind];
        if (expected !== undefined && expected.toLowerCase() !== remote) {
          throw new MedsyncError(
            'E_INTEGRITY',
            `The server's ${dg.kind} of the uploaded file does not match the bytes sent; resending.`,
            { adapter: this.kind, path: rel },
          );
        }
        hashes = { [dg.kind]: remote };
      }
      let mtimeMs: number | undefined;
      const t = opts.mtimeMs !== undefined && feats.mfmt ? Math.floor(opts.mtimeMs / 1000) * 1000 : undefined;
      throwIfAborted(signal);
      // MFMT, RNFR and RNTO go out in one write (the server reads commands in order): two round
      // trips fewer per file. A rename refused there is redone step by step (renameAbs).
      const commands = [
        ...(t !== undefined ? [`MFMT ${mfmtTime(t)} ${tmpAbs}`] : []),
        ...(atomic ? [`RNFR ${tmpAbs}`, `RNTO ${finalAbs}`] : []),
      ];
      const replies = commands.length > 0 ? await sendPipelined(c, commands) : [];
      if (t !== undefined) {
        const res = replies.shift()!;
        if (res.code < 300) mtimeMs = t;
        else if (res.code >= 500 && res.code <= 504) {
          // Announced but not implemented: stop promising mtimes.
          this.features = { ...feats, mfmt: false };
          this.caps = { ...this.caps, preservesMtime: false, mtimePrecisionMs: null };
        }
        // Any other refusal leaves the file without that mtime; the manifest keeps the source's.
      }
      if (atomic && replies.some((r) => r.code >= 400)) {
        await this.renameAbs(c, tmpAbs, finalAbs, rel, rel).catch((e: unknown) => {
          throw isMedsyncError(e) && e.code === 'E_NOT_FOUND' ? vanished(e) : e;
        });
      }
      tempMayExist = false;
      return {
        path: rel,
        size: sent,
        ...(mtimeMs !== undefined ? { mtimeMs } : {}),
        ...(hashes ? { hashes } : {}),
      };
    } catch (e) {
      source?.destroy();
      let me: MedsyncError;
      if (signal?.aborted) me = this.aborted(e, rel);
      else if (this.closed)
        me = new MedsyncError('E_CONFIG', 'This storage was closed.', { adapter: this.kind });
      else me = this.err(streamError ?? e, 'write', rel);
      if (isFtpReply(e)) this.forgetDirs(dirnameAbs(finalAbs));
      // The part of a large upload that reached the server stays (hidden) for the retry to resume.
      if (resumable && me.code === 'E_TRANSIENT' && this.appendSupported) tempMayExist = false;
      // Writing in place, a file whose upload never started is still the old, good version.
      if (!atomic && !pulled) tempMayExist = false;
      if (lease) {
        const l = lease;
        lease = undefined;
        // A transfer that failed on our side (not with a server reply) may still owe its reply:
        // the session is not reused, or its next command would read that reply as its own.
        const midTransfer = pulled && !transferred && !isFtpReply(e);
        const broken = FtpStorage.broken(e, l.conn) || signal?.aborted === true || midTransfer;
        if (tempMayExist && !broken) {
          await l.conn.sendIgnoringError(`DELE ${tmpAbs}`).catch(noop);
          tempMayExist = false;
        }
        this.pool.release(l.conn, broken || l.conn.closed);
      }
      if (tempMayExist) await this.removeQuietly(tmpAbs);
      throw me;
    } finally {
      signal?.removeEventListener('abort', onAbort);
      if (lease) this.pool.release(lease.conn);
      for (const name of abandoned) await this.removeQuietly(name);
    }
  }

  async remove(path: string, opts: OpOptions = {}): Promise<void> {
    this.check();
    const rel = this.path(path);
    throwIfAborted(opts.signal);
    await this.withClient('remove', rel, opts.signal, async (c) => {
      const res = await c.sendIgnoringError(`DELE ${this.abs(rel)}`);
      if (res.code < 400) return;
      const me = this.err(replyError(res), 'remove', rel);
      if (me.code !== 'E_NOT_FOUND') throw me;
      // Idempotent: a file that is not there is removed already; one that is, was refused.
      if (await this.stillThere(c, this.abs(rel))) throw this.refusedButThere(res, 'Removing the file', rel);
    });
  }

  async rename(from: string, to: string, opts: OpOptions = {}): Promise<void> {
    this.check();
    const a = this.path(from);
    const b = this.path(to);
    throwIfAborted(opts.signal);
    await this.withClient('rename', a, opts.signal, (c) => this.renameAbs(c, this.abs(a), this.abs(b), a, b));
  }

  async cleanupPartials(prefix = '', opts: CleanupOptions = {}): Promise<number> {
    this.check();
    const start = this.path(prefix, { allowRoot: true });
    throwIfAborted(opts.signal);
    if (!(await this.isDir(start, opts.signal))) return 0;
    let removed = 0;
    const stack = [start];
    while (stack.length > 0) {
      throwIfAborted(opts.signal);
      const dir = stack.pop()!;
      let files: FileInfo[];
      try {
        files = await this.listDir(dir, opts.signal);
      } catch (e) {
        // Gone, or a folder this account may not read (our temporary files cannot be in it).
        if (isMedsyncError(e) && (e.code === 'E_NOT_FOUND' || (e.code === 'E_PERMISSION' && dir !== start)))
          continue;
        throw e;
      }
      for (const f of files) {
        const child = joinPath(dir, f.name);
        if (f.type === FileType.Directory) stack.push(child);
        else if (f.type === FileType.File && isPartialName(f.name)) {
          const done = await this.withClient('cleanup', child, opts.signal, async (c) => {
            if (opts.olderThanMs !== undefined) {
              let mtime = f.modifiedAt?.getTime();
              if (mtime === undefined && (await this.feats(c)).mdtm) {
                const res = await c.sendIgnoringError(`MDTM ${this.abs(child)}`);
                if (res.code === 213) mtime = parseTimeVal(res.message.slice(4));
              }
              // Without a trustworthy time the file may belong to a write in progress: keep it.
              if (mtime === undefined || mtime >= opts.olderThanMs) return false;
            }
            return (await c.sendIgnoringError(`DELE ${this.abs(child)}`)).code < 400;
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
 * Creates an {@link FtpStorage}. Throws E_CONFIG (naming the field) for invalid options; connects
 * lazily, on the first call that needs the server.
 */
export function createFtpStorage(options: FtpStorageOptions): FtpStorage {
  return new FtpStorage(options);
}
