import { MedsyncError } from '@medsync/core';
import type { Client, Attributes, ClientChannel, ConnectConfig, FileEntry, SFTPWrapper, Stats } from 'ssh2';
import { digestTimeoutMs } from '../shared/digest.js';
import { ssh2 } from './ssh2.js';
import { SftpStatusError, toSftpError } from './errors.js';
import {
  checkHostKey,
  fingerprintOf,
  keyTypeOf,
  preferredHostKeyAlgorithms,
  type HostKeyCheck,
  type HostKeyPolicy,
} from './host-keys.js';

/** What the handshake showed about the server, for the connection report (no secrets). */
export interface ServerInfo {
  /** The server's identification string, e.g. `SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3`. */
  ident?: string;
  /** The login banner, when the server sends one (first 1,000 characters). */
  banner?: string;
  hostKey: { algorithm: string; fingerprint: string; verified: string };
  kex?: string;
  cipher?: string;
  /** SFTP protocol extensions the server announced (`posix-rename@openssh.com` …). */
  extensions: string[];
}

export interface SessionParams {
  host: string;
  port: number;
  user: string;
  password?: string | undefined;
  privateKey?: string | undefined;
  passphrase?: string | undefined;
  hostKeys: HostKeyPolicy;
  timeoutMs: number;
  keepaliveMs: number;
  /** Told the server's host key (and whether it was accepted) before any login. */
  onHostKey?: (key: ServerInfo['hostKey']) => void;
}

/** statvfs@openssh.com, reduced to what the adapter reports. */
export interface FsStats {
  freeBytes: number;
  totalBytes: number;
}

type Cb<T> = (err: Error | undefined | null, value?: T) => void;

/**
 * How long fsync and close may take: they write a whole file out to the server's disks (a few GB
 * on a slow NAS). A dead connection is still noticed sooner, by the SSH keepalive.
 */
const FLUSH_TIMEOUT_MS = 10 * 60_000;

/** From this size on, the Perl program hashes with `openssl dgst` (a process, but 3× faster). */
const DIGEST_OPENSSL_FROM = 4 * 1024 * 1024;
/**
 * The program behind {@link SftpSession.sha256}: says `medsync-digest perl [openssl]` or
 * `medsync-digest sha256sum` when it starts, then reads one path per line and answers
 * `ok <hex>` (SHA-256 of the file) or `err`, in order, never echoing a name. Perl's Digest::SHA
 * where the server has it (one process for every file: ~0.2 ms a small file), with
 * `openssl dgst` for files of 4 MiB or more when openssl is installed (~1 GB/s with the CPU's
 * SHA extensions, where Digest::SHA does ~0.3 GB/s); else a POSIX sh loop running `sha256sum`
 * per file (a process each: ~4 ms a file on a small VM). Started with `sh -c`, whatever the
 * account's login shell is.
 */
const DIGEST_PERL =
  '$|=1; my ($ossl) = grep { -x } map { qq($_/openssl) } split(/:/, $ENV{PATH} // q()); ' +
  'print qq(medsync-digest perl), ($ossl ? q( openssl) : q()), qq(\n); ' +
  'while (defined(my $p = <STDIN>)) { chomp $p; my $hex; ' +
  // Large files: openssl (SHA extensions: ~1 GB/s where Digest::SHA does ~0.3), no shell involved.
  `if ($ossl && -f $p && -s _ >= ${DIGEST_OPENSSL_FROM} && open(my $h, q(-|), $ossl, q(dgst), q(-sha256), q(-r), $p)) ` +
  '{ my $l = <$h>; close $h; ($hex) = (defined $l ? $l : q()) =~ /^([0-9a-f]{64}) /; } ' +
  'if (!defined $hex) { my $d = Digest::SHA->new(256); my $f; ' +
  '$hex = $d->hexdigest if open($f, q(<), $p) && eval { binmode $f; $d->addfile($f); 1 }; } ' +
  'print defined $hex ? qq(ok $hex\n) : qq(err\n) }';
const DIGEST_SH =
  'echo medsync-digest sha256sum; while IFS= read -r p; do if h=$(sha256sum 2>/dev/null < "$p"); then echo "ok ${h%% *}"; else echo err; fi; done';
/** `s` in sh double quotes. */
const dq = (s: string) => `"${s.replace(/[\\$`"]/g, '\\$&')}"`;
/** The whole command (no single quote inside, so it fits in `sh -c '…'`). */
export const DIGEST_COMMAND = `sh -c 'if perl -MDigest::SHA -e 1 2>/dev/null; then exec perl -MDigest::SHA -e ${dq(DIGEST_PERL)}; fi; ${DIGEST_SH}'`;
/** SHA-256 of nothing: the answer to the probe (`/dev/null`) that shows the shell loop works. */
const EMPTY_SHA256 = 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855';

/** A connection-level failure of a request (the session is gone), not a server STATUS reply. */
function connectionLost(): Error {
  return Object.assign(new Error('Not connected: the SSH session was closed.'), { level: 'client-socket' });
}

/**
 * One SSH connection with one SFTP channel, with promise methods. A request never hangs: it
 * fails when the session closes, and after `timeoutMs` without an answer (which closes the
 * session: a server that stops answering one request answers no other either). SFTP STATUS
 * replies become {@link SftpStatusError}; everything else means the session is broken.
 */
export class SftpSession {
  private isClosed = false;
  private corked = false;
  private readonly pending = new Set<(e: Error) => void>();
  private readonly closeHooks: (() => void)[] = [];
  /** The program that hashes files on the server: started at the first digest, then kept. */
  private digester: Promise<Digester | DigesterFailure> | undefined;
  /** Why this session gets no digests (undefined while it may). */
  private noDigests: DigesterFailure | undefined;

  /**
   * True once {@link sha256} found that this account cannot run the digest program (no shell,
   * no sha256sum): the server's setup, the same for every connection. A probe that timed out
   * stops digests on this connection only.
   */
  get digestsUnavailable(): boolean {
    return this.noDigests === 'unavailable';
  }

  constructor(
    private readonly client: Client,
    private readonly sftp: SFTPWrapper,
    readonly info: ServerInfo,
    private readonly timeoutMs: number,
  ) {
    const onGone = () => this.markClosed();
    client.on('close', onGone);
    client.on('end', onGone);
    client.on('error', onGone);
    sftp.on('close', onGone);
    sftp.on('end', onGone);
  }

  get closed(): boolean {
    return this.isClosed;
  }

  /** True when the server announced this SFTP extension. */
  has(extension: string): boolean {
    return this.info.extensions.includes(extension);
  }

  /** Closes the connection; pending requests fail. Never throws. */
  close(): void {
    this.markClosed();
  }

  /** Runs `fn` once the session closes (at once when closed already). */
  onClose(fn: () => void): void {
    if (this.isClosed) fn();
    else this.closeHooks.push(fn);
  }

  private markClosed(): void {
    if (this.isClosed) return;
    this.isClosed = true;
    const err = connectionLost();
    for (const reject of [...this.pending]) reject(err);
    this.pending.clear();
    try {
      this.client.end();
    } catch {
      // already gone
    }
    // end() waits for the server; a dead peer would keep the socket: destroy it soon after.
    setTimeout(() => {
      try {
        this.client.destroy();
      } catch {
        // already gone
      }
    }, 1000).unref();
    for (const fn of this.closeHooks.splice(0)) fn();
  }

  /**
   * SHA-256 of a file on the server, lower-case hex, from one digest program per connection
   * (see DIGEST_COMMAND: one SSH exec channel opened at the first call, then reused; a channel
   * per file would cost ~60 ms on OpenSSH). Resolves undefined when this connection gets no
   * digests: the account cannot run the program (sftp-only, no sha256sum, a non-POSIX shell),
   * or its start-up probe (/dev/null) timed out. `size` stretches the timeout (the server reads
   * the whole file). Rejects as a lost connection when the session closes; a timeout of an
   * answer closes the session.
   */
  async sha256(absPath: string, size: number): Promise<string | undefined> {
    if (/[\r\n]/.test(absPath)) return undefined;
    const d = await this.startDigester();
    if (!d) return undefined;
    const answer = await this.race(d.ask(absPath), digestTimeoutMs(this.timeoutMs, size));
    const m = /^ok ([0-9a-f]{64})$/.exec(answer);
    return m ? m[1] : undefined;
  }

  /** What {@link sha256} uses on this connection, for the connection report. */
  async digestReport(): Promise<string> {
    try {
      const d = await this.startDigester();
      if (d) {
        const how =
          d.program === 'perl+openssl'
            ? "Perl's Digest::SHA, openssl for files of 4 MiB or more,"
            : d.program === 'perl'
              ? "Perl's Digest::SHA"
              : 'sha256sum';
        return `sha256 (${how} on the server)`;
      }
    } catch {
      return 'unknown (the connection closed while checking)';
    }
    return this.noDigests === 'timeout'
      ? 'none on this connection (the digest program did not answer in time): uploads are checked by size'
      : 'none (this account cannot run commands on the server): uploads are checked by size';
  }

  private async startDigester(): Promise<Digester | undefined> {
    if (this.isClosed) throw connectionLost();
    if (this.noDigests) return undefined;
    this.digester ??= Digester.start(this.client, this.timeoutMs);
    // The session closing fails the wait at once (the probe itself gives up after timeoutMs).
    const d = await this.race(this.digester, this.timeoutMs + 1000);
    if (this.isClosed) throw connectionLost();
    if (d instanceof Digester) return d;
    if (d === 'lost') {
      // The connection broke, not the account: a later call (on a new session) tries again.
      this.digester = undefined;
      throw connectionLost();
    }
    this.noDigests = d;
    return undefined;
  }

  /** `p`, or a timeout (which closes the session), or the session's end, whichever comes first. */
  /** When the server last answered any request of this session (ms since the epoch). */
  private lastAnswerAt = 0;

  /**
   * `p`, failed (and the session closed) after `timeoutMs` without an answer. With
   * `whileAnswering`, answers to other requests of the session count as progress: requests
   * pipelined behind a window of writes wait for the bytes ahead of them to cross the link (1 MiB
   * takes 32 s at 256 kbit/s), and only a session that stopped answering altogether is given up.
   */
  private race<T>(p: Promise<T>, timeoutMs: number, whileAnswering = false): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const started = Date.now();
      const fail = (e: Error) => {
        clearTimeout(timer);
        this.pending.delete(fail);
        reject(e);
      };
      const expire = () => {
        const quiet = Date.now() - Math.max(started, whileAnswering ? this.lastAnswerAt : 0);
        if (quiet < timeoutMs) {
          timer = setTimeout(expire, timeoutMs - quiet);
          timer.unref();
          return;
        }
        fail(Object.assign(new Error('The SFTP request timed out.'), { level: 'client-timeout' }));
        this.markClosed();
      };
      let timer = setTimeout(expire, timeoutMs);
      timer.unref();
      this.pending.add(fail);
      p.then(
        (v) => {
          clearTimeout(timer);
          this.pending.delete(fail);
          resolve(v);
        },
        (e: Error) => fail(e),
      );
    });
  }

  /**
   * Holds the socket's writes until the end of this tick: ssh2 writes every SSH packet (at most
   * 32 KiB on OpenSSH) with its own syscall, and the requests issued together (a window of
   * WRITEs, fstat + futimes) then leave in one writev.
   */
  private cork(): void {
    if (this.corked) return;
    const sock = (this.client as unknown as { _sock?: { cork?: () => void; uncork?: () => void } })._sock;
    if (!sock?.cork || !sock.uncork) return;
    this.corked = true;
    sock.cork();
    process.nextTick(() => {
      this.corked = false;
      sock.uncork!();
    });
  }

  /** One request: resolves with its answer, rejects with a STATUS or a connection error. */
  private call<T>(start: (cb: Cb<T>) => void, timeoutMs = this.timeoutMs): Promise<T> {
    if (this.isClosed) return Promise.reject(connectionLost());
    this.cork();
    const answer = new Promise<T>((resolve, reject) =>
      start((err, value) => {
        this.lastAnswerAt = Date.now();
        if (!err) {
          resolve(value as T);
          return;
        }
        const code = (err as { code?: unknown }).code;
        reject(typeof code === 'number' && !this.isClosed ? new SftpStatusError(code, err.message) : err);
      }),
    );
    return this.race(answer, timeoutMs, true);
  }

  stat(path: string): Promise<Stats> {
    return this.call((cb) => this.sftp.stat(path, cb));
  }

  lstat(path: string): Promise<Stats> {
    return this.call((cb) => this.sftp.lstat(path, cb));
  }

  readdir(path: string): Promise<FileEntry[]> {
    return this.call((cb) => this.sftp.readdir(path, cb));
  }

  mkdir(path: string): Promise<void> {
    return this.call((cb) => this.sftp.mkdir(path, (e) => cb(e)));
  }

  unlink(path: string): Promise<void> {
    return this.call((cb) => this.sftp.unlink(path, (e) => cb(e)));
  }

  /** Plain SFTP v3 rename: fails when the target exists (on OpenSSH). */
  rename(from: string, to: string): Promise<void> {
    return this.call((cb) => this.sftp.rename(from, to, (e) => cb(e)));
  }

  /** posix-rename@openssh.com: rename(2), replacing the target atomically. */
  posixRename(from: string, to: string): Promise<void> {
    return this.call((cb) => this.sftp.ext_openssh_rename(from, to, (e) => cb(e)));
  }

  open(path: string, flags: 'r' | 'wx'): Promise<Buffer> {
    return this.call((cb) => this.sftp.open(path, flags, cb));
  }

  /** Closing a handle may flush the file on the server: it gets {@link FLUSH_TIMEOUT_MS}. */
  closeHandle(handle: Buffer): Promise<void> {
    return this.call(
      (cb) => this.sftp.close(handle, (e) => cb(e)),
      Math.max(this.timeoutMs, FLUSH_TIMEOUT_MS),
    );
  }

  fstat(handle: Buffer): Promise<Stats> {
    return this.call((cb) => this.sftp.fstat(handle, cb));
  }

  write(handle: Buffer, data: Buffer, position: number): Promise<void> {
    return this.call((cb) => this.sftp.write(handle, data, 0, data.length, position, (e) => cb(e)));
  }

  /** Reads up to `length` bytes at `position`; resolves with fewer at the end, empty past it. */
  read(handle: Buffer, length: number, position: number): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(length);
    return this.call<Buffer>((cb) =>
      this.sftp.read(handle, buf, 0, length, position, (e, n) => {
        if (e && (e as { code?: unknown }).code === 1)
          cb(undefined, buf.subarray(0, 0)); // EOF
        else if (e) cb(e);
        else cb(undefined, buf.subarray(0, n));
      }),
    );
  }

  futimes(handle: Buffer, atimeS: number, mtimeS: number): Promise<void> {
    return this.call((cb) => this.sftp.futimes(handle, atimeS, mtimeS, (e) => cb(e)));
  }

  /** fsync@openssh.com. */
  /** fsync@openssh.com; a large file on slow disks takes long: it gets {@link FLUSH_TIMEOUT_MS}. */
  fsync(handle: Buffer): Promise<void> {
    return this.call(
      (cb) => this.sftp.ext_openssh_fsync(handle, (e) => cb(e)),
      Math.max(this.timeoutMs, FLUSH_TIMEOUT_MS),
    );
  }

  /** statvfs@openssh.com. */
  statvfs(path: string): Promise<FsStats> {
    return this.call<FsStats>((cb) =>
      this.sftp.ext_openssh_statvfs(path, (e, st: Record<string, number> | undefined) => {
        if (e || !st) cb(e ?? new Error('statvfs returned nothing'));
        else
          cb(undefined, {
            freeBytes: Number(st.f_bavail) * Number(st.f_frsize || st.f_bsize),
            totalBytes: Number(st.f_blocks) * Number(st.f_frsize || st.f_bsize),
          });
      }),
    );
  }

  /** SSH_FXP_SETSTAT with times only. */
  utimes(path: string, atimeS: number, mtimeS: number): Promise<void> {
    const attrs: Partial<Attributes> = { atime: atimeS, mtime: mtimeS };
    return this.call((cb) => this.sftp.setstat(path, attrs, (e) => cb(e)));
  }
}

/** Why a digest program could not be had: the account cannot run it, it did not answer, or the connection broke. */
type DigesterFailure = 'unavailable' | 'timeout' | 'lost';

/**
 * The digest program on an SSH exec channel: a line in (a path), a line out, in order. Requests
 * on one session come one at a time (a pooled session serves one call), but answers are matched
 * in order all the same.
 */
class Digester {
  private buffered = '';
  private readonly waiting: { resolve: (line: string) => void; reject: (e: Error) => void }[] = [];
  private gone = false;
  /** Which program answers: known once its first line (the banner) came. */
  program: 'perl' | 'perl+openssl' | 'sha256sum' | undefined;
  private readonly started: Promise<boolean>;

  private constructor(private readonly channel: ClientChannel) {
    let onBanner: (ok: boolean) => void = () => undefined;
    this.started = new Promise<boolean>((resolve) => (onBanner = resolve));
    channel.setEncoding('utf8');
    channel.on('data', (chunk: string) => {
      this.buffered += chunk;
      for (let nl = this.buffered.indexOf('\n'); nl >= 0; nl = this.buffered.indexOf('\n')) {
        const line = this.buffered.slice(0, nl);
        this.buffered = this.buffered.slice(nl + 1);
        if (this.program) {
          this.waiting.shift()?.resolve(line);
          continue;
        }
        // Before the banner, lines are the login shell's (an rc file that prints): skipped.
        const m = /^medsync-digest (perl|sha256sum)( openssl)?$/.exec(line);
        if (m) {
          this.program = m[1] === 'perl' ? (m[2] ? 'perl+openssl' : 'perl') : 'sha256sum';
          onBanner(true);
        }
      }
    });
    // What the shell says on stderr (a missing command, a forced sftp-only account) is not needed.
    channel.stderr.resume();
    const end = () => {
      this.gone = true;
      onBanner(false);
      const err = connectionLost();
      for (const w of this.waiting.splice(0)) w.reject(err);
    };
    channel.on('close', end);
    channel.on('error', end);
  }

  /**
   * Opens the channel and checks the program answers (its banner, then the SHA-256 of
   * /dev/null) within `timeoutMs`. A refused channel or one that closes before answering while
   * the connection stays up means the account cannot run it ('unavailable'); no answer in time
   * is 'timeout' (the channel is closed); a connection that broke meanwhile is 'lost'.
   */
  static start(client: Client, timeoutMs: number): Promise<Digester | DigesterFailure> {
    return new Promise<Digester | DigesterFailure>((resolve) => {
      let settled = false;
      let digester: Digester | undefined;
      // ssh2's client has no public "connected" flag; its socket does.
      const connected = () =>
        (client as unknown as { _sock?: { destroyed?: boolean } })._sock?.destroyed === false;
      const finish = (r: Digester | DigesterFailure) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        if (!(r instanceof Digester)) digester?.close();
        if (r !== 'unavailable') {
          resolve(r);
          return;
        }
        // A channel refused or closed as the whole connection goes down is not the account's
        // doing: give the socket a moment to show it, so one blip does not stop every digest.
        setTimeout(() => resolve(connected() ? 'unavailable' : 'lost'), 100).unref();
      };
      const timer = setTimeout(() => finish(connected() ? 'timeout' : 'lost'), timeoutMs);
      timer.unref();
      try {
        client.exec(DIGEST_COMMAND, (err, channel) => {
          if (err) {
            finish('unavailable');
            return;
          }
          const d = new Digester(channel);
          digester = d;
          // Answered too late: the probe already gave up on it.
          if (settled) {
            d.close();
            return;
          }
          d.started
            .then((ok) => (ok ? d.ask('/dev/null') : Promise.reject(connectionLost())))
            .then(
              (line) => finish(line === `ok ${EMPTY_SHA256}` ? d : 'unavailable'),
              () => finish('unavailable'),
            );
        });
      } catch {
        finish('lost');
      }
    });
  }

  ask(path: string): Promise<string> {
    if (this.gone) return Promise.reject(connectionLost());
    return new Promise<string>((resolve, reject) => {
      this.waiting.push({ resolve, reject });
      this.channel.write(`${path}\n`);
    });
  }

  close(): void {
    this.gone = true;
    try {
      this.channel.close();
    } catch {
      // already gone
    }
  }
}

/** Thrown by {@link openSession} when the host key is not the one configured. */
export function hostKeyError(
  check: Extract<HostKeyCheck, { ok: false }>,
  fingerprint: string,
  algorithm: string,
  host: string,
  port: number,
): MedsyncError {
  const pin = `To trust it, check the fingerprint with the server's administrator (ssh-keygen -lf on its host key), then set \`hostFingerprint: "${fingerprint}"\` (CLI: --host-fingerprint ${fingerprint}) or add the key to \`knownHosts\`.`;
  const what =
    check.reason === 'revoked'
      ? `the server's host key (${algorithm} ${fingerprint}) is marked @revoked in knownHosts: refusing to connect.`
      : check.reason === 'mismatch'
        ? `HOST KEY MISMATCH: the server at ${host}:${port} shows host key ${algorithm} ${fingerprint}, which is not the one configured. Someone may be intercepting the connection, or the server was reinstalled. ${pin}`
        : `the server's host key is not known: ${host}:${port} shows ${algorithm} ${fingerprint}, and neither \`hostFingerprint\` nor \`knownHosts\` lists it. ${pin}`;
  return new MedsyncError('E_CONFIG', `Connecting to the SFTP server: ${what}`, {
    adapter: 'sftp',
    retryable: false,
  });
}

/**
 * Opens one SSH connection (verifying the host key, logging in with the key first, then the
 * password; no `none` probe and no keyboard-interactive) and starts its SFTP subsystem. Rejects
 * with a MedsyncError: E_CONFIG for a host key that does not check out (the message shows the
 * server's SHA256 fingerprint), E_AUTH for a refused login, E_TRANSIENT for network trouble.
 */
export function openSession(p: SessionParams): Promise<SftpSession> {
  return new Promise<SftpSession>((resolve, reject) => {
    const client = new (ssh2().Client)();
    let hostKey: ServerInfo['hostKey'] | undefined;
    let refused: MedsyncError | undefined;
    let kex: string | undefined;
    let cipher: string | undefined;
    let banner: string | undefined;
    let settled = false;
    const fail = (e: unknown) => {
      if (settled) return;
      settled = true;
      client.removeAllListeners('ready');
      try {
        client.destroy();
      } catch {
        // already gone
      }
      reject(refused ?? toSftpError(e, 'connect'));
    };
    client.on('error', fail);
    client.on('close', () => fail(connectionLost()));
    client.on('banner', (msg: string) => {
      banner = msg.slice(0, 1000);
    });
    client.on('handshake', (n) => {
      kex = n.kex;
      cipher = n.cs.cipher;
      if (hostKey) hostKey.algorithm = n.serverHostKey;
    });
    client.on('ready', () => {
      // readyTimeout ends at login; the SFTP subsystem gets as long again to start.
      const subsystemTimer = setTimeout(
        () => fail(Object.assign(new Error('The SFTP subsystem timed out.'), { level: 'client-timeout' })),
        p.timeoutMs,
      );
      subsystemTimer.unref();
      client.sftp((err, sftp) => {
        clearTimeout(subsystemTimer);
        if (err) {
          fail(err);
          return;
        }
        if (settled) {
          client.end();
          return;
        }
        settled = true;
        client.removeListener('error', fail);
        const raw = client as unknown as { _protocol?: { _remoteIdentRaw?: Buffer } };
        const ext = (sftp as unknown as { _extensions?: Record<string, string> })._extensions ?? {};
        const info: ServerInfo = {
          ...(raw._protocol?._remoteIdentRaw
            ? { ident: raw._protocol._remoteIdentRaw.toString('latin1') }
            : {}),
          ...(banner ? { banner } : {}),
          hostKey: hostKey!,
          ...(kex ? { kex } : {}),
          ...(cipher ? { cipher } : {}),
          extensions: Object.keys(ext).sort(),
        };
        // Errors after this point close the session (see SftpSession); keep one listener so an
        // 'error' event is never unhandled.
        client.on('error', () => undefined);
        resolve(new SftpSession(client, sftp, info, p.timeoutMs));
      });
    });
    const methods: ('publickey' | 'password')[] = [];
    if (p.privateKey !== undefined) methods.push('publickey');
    if (p.password !== undefined) methods.push('password');
    const algorithms = preferredHostKeyAlgorithms(p.hostKeys.knownHosts, p.host, p.port);
    const config: ConnectConfig = {
      host: p.host,
      port: p.port,
      username: p.user,
      ...(p.password !== undefined ? { password: p.password } : {}),
      ...(p.privateKey !== undefined ? { privateKey: p.privateKey } : {}),
      ...(p.passphrase !== undefined ? { passphrase: p.passphrase } : {}),
      authHandler: methods,
      readyTimeout: p.timeoutMs,
      ...(p.keepaliveMs > 0 ? { keepaliveInterval: p.keepaliveMs, keepaliveCountMax: 3 } : {}),
      ...(algorithms ? { algorithms: { serverHostKey: algorithms } } : {}),
      hostVerifier: (key: Buffer) => {
        const fingerprint = fingerprintOf(key);
        const check = checkHostKey(p.hostKeys, p.host, p.port, key);
        hostKey = { algorithm: keyTypeOf(key), fingerprint, verified: check.ok ? check.via : 'refused' };
        p.onHostKey?.({ ...hostKey });
        if (!check.ok) refused = hostKeyError(check, fingerprint, keyTypeOf(key), p.host, p.port);
        return check.ok;
      },
    };
    try {
      client.connect(config);
    } catch (e) {
      fail(e);
    }
  });
}
