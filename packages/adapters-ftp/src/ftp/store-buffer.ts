import type { Socket } from 'node:net';
import { connect as connectTls, TLSSocket } from 'node:tls';
import { FTPError, type Client, type FTPContext, type FTPResponse, type ResponseHandler } from 'basic-ftp';

/**
 * Chunks of an upload from memory: the data socket's inactivity timeout is refreshed when a write
 * completes, so a slow but moving upload never looks stalled unless one chunk takes the whole
 * timeout (under ~9 KB/s with the default 30 s).
 */
const CHUNK = 256 * 1024;

/** The port in an EPSV reply: `229 Entering Extended Passive Mode (|||6446|)` (IBM i uses `!`). */
function epsvPort(message: string): number | undefined {
  const m = /[|!]{3}(\d+)[|!]/.exec(message);
  const port = m ? Number(m[1]) : NaN;
  return Number.isInteger(port) && port > 0 && port < 65536 ? port : undefined;
}

interface Task {
  resolve(value: unknown): void;
  reject(reason: unknown): void;
}

/**
 * Sends `commands` in one write, the first through basic-ftp's `handle` (whose `handler` then gets
 * every reply, in order), the rest straight to the control socket behind it: basic-ftp sends one
 * command per call and refuses line breaks in it. The socket is corked meanwhile, so they leave in
 * one write (each write on loopback wakes the server: measured at ~50 µs apiece on a 2-vCPU VM).
 * Servers read the control connection one command at a time, so this only saves round trips.
 * Paths never hold CR or LF (the adapter refuses them).
 */
export function handleTypedAhead<T>(
  ftp: FTPContext,
  commands: readonly string[],
  handler: ResponseHandler,
): Promise<T> {
  const socket = ftp.socket;
  socket.cork();
  try {
    const done = ftp.handle(commands[0], handler) as Promise<T>;
    for (const command of commands.slice(1)) socket.write(`${command}\r\n`, ftp.encoding);
    return done;
  } finally {
    socket.uncork();
  }
}

type FtpInternals = FTPContext & { _newSocket(): Socket };

export interface StoreBufferOptions {
  /**
   * EPSV and STOR leave in one write (one round trip and one loopback write fewer per file). Only
   * for a server whose EPSV already worked, and for a temporary name: should the EPSV be refused,
   * the STOR behind it runs without a data connection (a server may create the file, answer 425,
   * or try an active connection), which must never touch a final name.
   */
  pipelined: boolean;
  /** Called once, just before the first byte is written to the data connection. */
  onStart(): void;
  /**
   * The client was closed with the STOR sent (the server was left waiting for a data connection
   * that will not come, or the STOR behind a refused EPSV would be answered late or never); the
   * error thrown is `error`. The server's process for that session may still act on the STOR
   * (create or truncate the file). `pipelineFailed`: the pipelined EPSV was refused (or its reply
   * had no port), or its data connection could not be opened.
   */
  onRetired?(error: unknown, pipelineFailed: boolean): void;
}

/**
 * Uploads one file held in memory with STOR on `c`: what basic-ftp's `uploadFrom` does, without
 * the stream pipeline it builds per file (an AbortController, a DOMException on every finish, a
 * Readable, the data socket's address formatted for a log line that is off: ~0.1 ms per file) and
 * with EPSV pipelined when `pipelined`. Resolves to the final reply (226); rejects with the
 * server's refusal (an FTPError), or with the data connection's error, in which case the STOR's
 * reply may still be on its way (the caller reads it, see FtpStorage.transferVerdict). The data
 * connection is basic-ftp's `ftp.dataSocket` while it is open, so closing the client closes it.
 */
export async function storeBuffer(
  c: Client,
  remotePath: string,
  data: Buffer,
  opts: StoreBufferOptions,
): Promise<FTPResponse> {
  const ftp = c.ftp as FtpInternals;
  if (!opts.pipelined) {
    // basic-ftp's passive mode (EPSV, then PASV on the client's first transfer) opens the data
    // connection before the STOR is sent.
    await c.prepareTransfer(ftp);
    const socket = ftp.dataSocket;
    if (!socket) throw new Error('Upload should begin but no data connection is available.');
    return transfer(ftp, `STOR ${remotePath}`, undefined, data, opts, socket);
  }
  return transfer(ftp, 'EPSV', `STOR ${remotePath}`, data, opts, undefined);
}

function transfer(
  ftp: FtpInternals,
  first: string,
  then: string | undefined,
  data: Buffer,
  opts: StoreBufferOptions,
  opened: Socket | undefined,
): Promise<FTPResponse> {
  let phase: 'epsv' | 'stor' = then ? 'epsv' : 'stor';
  let retired: { error: unknown; pipelineFailed: boolean } | undefined;
  let socket = opened;
  let connected = opened !== undefined;
  let ready = false; // 150 or 125 seen
  let started = false;
  let awaitingTls = false;
  let written = false;
  let reply: FTPResponse | undefined;
  let task: Task | undefined;
  let settled = false;

  const release = () => {
    const s = socket;
    socket = undefined;
    if (s && ftp.dataSocket === s) ftp.dataSocket = undefined;
    s?.destroy();
  };
  const fail = (err: unknown) => {
    if (settled || !task) return;
    settled = true;
    ftp.socket.setTimeout(ftp.timeout);
    release();
    task.reject(err);
  };
  // The server is left waiting for a data connection that will not come (or sent a reply this
  // cannot answer): the session is closed, which rejects the task with `err`.
  const retire = (err: Error, pipelineFailed = false) => {
    if (!settled) retired = { error: err, pipelineFailed };
    fail(err);
    ftp.closeWithError(err);
  };
  const tryResolve = () => {
    if (settled || !task || !written || !reply) return;
    settled = true;
    release();
    task.resolve(reply);
  };

  const watch = (s: Socket) => {
    // Once everything was written, the server's reply decides (a reset after its last byte was
    // read is no failure), as with basic-ftp; the control connection's timeout covers the wait.
    const failed = (err: Error) => {
      if (written) return;
      if (started) fail(err);
      else retire(err);
    };
    s.on('error', failed);
    s.once('close', () => {
      if (!written) failed(new Error('The data connection closed before the upload was complete.'));
    });
  };

  const start = () => {
    const s = socket;
    if (started || settled || !ready || !connected || !s) return;
    if (s instanceof TLSSocket && s.getCipher() === undefined) {
      if (!awaitingTls) s.once('secureConnect', start);
      awaitingTls = true;
      return;
    }
    started = true;
    opts.onStart();
    // The data connection is in charge of timeouts while the bytes move, as in basic-ftp.
    ftp.socket.setTimeout(0);
    s.setTimeout(ftp.timeout);
    s.once('finish', () => {
      written = true;
      s.setTimeout(0);
      if (!settled) ftp.socket.setTimeout(ftp.timeout);
      tryResolve();
    });
    if (data.length <= CHUNK) {
      s.end(data);
      return;
    }
    let offset = 0;
    const next = (err?: Error | null): void => {
      if (err || settled) return;
      const end = Math.min(offset + CHUNK, data.length);
      const piece = data.subarray(offset, end);
      offset = end;
      if (offset >= data.length) s.end(piece);
      else s.write(piece, next);
    };
    next();
  };

  const connect = (port: number) => {
    const host = ftp.socket.remoteAddress;
    if (host === undefined) {
      retire(new Error("Control socket is disconnected, can't get remote address."));
      return;
    }
    const raw = ftp._newSocket();
    socket = raw;
    const failConnect = (err: Error) => {
      err.message = `Can't open data connection in passive mode: ${err.message}`;
      retire(err, true);
    };
    raw.setTimeout(ftp.timeout);
    raw.once('error', failConnect);
    raw.once('timeout', () =>
      failConnect(new Error(`Timeout when trying to open data connection to ${host}:${port}`)),
    );
    raw.connect({ port, host, ...(ftp.ipFamily !== undefined ? { family: ftp.ipFamily } : {}) }, () => {
      raw.removeListener('error', failConnect);
      raw.removeAllListeners('timeout');
      raw.setTimeout(0);
      if (settled) {
        raw.destroy();
        return;
      }
      let s: Socket = raw;
      if (ftp.socket instanceof TLSSocket) {
        // The control connection's TLS session is resumed on the data connection: servers
        // (pure-ftpd, vsftpd with require_ssl_reuse) refuse a data connection without it.
        const tls = connectTls({
          ...ftp.tlsOptions,
          socket: raw,
          session: ftp.tlsSessionStore ?? ftp.socket.getSession(),
        });
        tls.on('session', (session: Buffer) => {
          ftp.tlsSessionStore = session;
        });
        s = tls;
      }
      socket = s;
      ftp.dataSocket = s;
      watch(s);
      connected = true;
      start();
    });
  };

  const handler = (res: Error | FTPResponse, t: Task): void => {
    task = t;
    if (settled) return;
    if (phase === 'epsv') {
      if (res instanceof FTPError || (!(res instanceof Error) && res.code >= 200)) {
        const port = res instanceof FTPError ? undefined : epsvPort(res.message);
        if (port === undefined) {
          // The STOR behind it has no data connection: a server may answer it 425 at once, or
          // try the default active port and hang. The session is closed, so it is never read.
          retire(
            res instanceof FTPError
              ? res
              : new FTPError({ code: 500, message: `500 Can't parse response to 'EPSV': ${res.message}` }),
            true,
          );
          return;
        }
        phase = 'stor';
        connect(port);
        return;
      }
      if (res instanceof Error) fail(res);
      return;
    }
    if (res instanceof Error) {
      fail(res);
      return;
    }
    if (res.code === 150 || res.code === 125) {
      ready = true;
      start();
    } else if (res.code >= 200 && res.code < 300) {
      reply = res;
      tryResolve();
    } else if (res.code >= 300) {
      retire(new Error(`Unexpected FTP response is requesting an answer: ${res.message}`));
    }
  };

  if (opened) watch(opened);
  return handleTypedAhead<FTPResponse>(ftp, then ? [first, then] : [first], handler).catch((e: unknown) => {
    release();
    if (retired && e === retired.error) opts.onRetired?.(e, retired.pipelineFailed);
    throw e;
  });
}
