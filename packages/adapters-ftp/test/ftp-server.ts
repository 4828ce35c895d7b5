import type { EventEmitter } from 'node:events';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FileSystem, FtpSrv } from 'ftp-srv';
import { generate } from 'selfsigned';

/** A bunyan-shaped logger that drops everything (ftp-srv logs every command otherwise). */
const quiet: Record<string, unknown> = {};
for (const level of ['trace', 'debug', 'info', 'warn', 'error', 'fatal']) quiet[level] = () => undefined;
quiet.child = () => quiet;

export interface TestFtpServer {
  host: string;
  port: number;
  /** The local folder the FTP user sees as `/`. */
  dir: string;
  user: string;
  password: string;
  /** PEM certificate of the server (FTPS only), to pass as `tls.ca`. */
  cert?: string;
  /** Login attempts and the most control connections open at once, since the start. */
  stats: { logins: number; peakConnections: number };
  /** Closes every client connection from the server side (421), as an idle timeout would. */
  dropConnections(): Promise<void>;
  /**
   * Logs every session out but keeps its socket: the next commands are answered 530, as some
   * servers answer an idle session instead of closing it.
   */
  logOutSessions(): void;
  close(): Promise<void>;
}

/**
 * Starts ftp-srv in-process on 127.0.0.1 with a free control port (port 0), passive ports from a
 * random range below Linux's ephemeral ports, a temp root and one user. `tls` turns on explicit
 * FTPS (AUTH TLS) with a fresh self-signed certificate for 127.0.0.1.
 */
export async function startFtpServer(
  opts: {
    tls?: boolean;
    /**
     * Refuses these calls of the server's file system with a bare 550 (no "permission" in it), as
     * vsftpd answers a delete the disk refuses: `true` for a path (as the client sent it) fails
     * that call. `get` backs RNFR, SIZE and MDTM alike.
     */
    refuse?: {
      delete?: (path: string) => boolean;
      get?: (path: string) => boolean;
      /** LIST/MLSD and CWD of a folder this account may not enter (it still shows in its parent). */
      enter?: (path: string) => boolean;
      /** RNTO (550): `targetExists` tells whether `to` is there (a server that never replaces). */
      rename?: (from: string, to: string, targetExists: boolean) => boolean;
    };
    /**
     * Does the RNTO, then drops the control connection before answering it (the server killed at
     * that moment): the client cannot know the file is in place.
     */
    dropAfterRename?: (from: string, to: string) => boolean;
    /** The user `anonymous` logs in without a password (230 to USER; PASS is then answered 202). */
    anonymous?: boolean;
  } = {},
): Promise<TestFtpServer> {
  const dir = mkdtempSync(join(tmpdir(), 'medsync-ftp-'));
  const user = 'medsync';
  const password = `pw-${Math.random().toString(36).slice(2)}-secret`;
  let tls: { key: string; cert: string } | false = false;
  if (opts.tls) {
    const pems = await generate([{ name: 'commonName', value: '127.0.0.1' }], {
      keySize: 2048,
      algorithm: 'sha256',
      extensions: [
        { name: 'basicConstraints', cA: false },
        { name: 'keyUsage', digitalSignature: true, keyEncipherment: true },
        { name: 'extKeyUsage', serverAuth: true },
        {
          name: 'subjectAltName',
          altNames: [
            { type: 7, ip: '127.0.0.1' },
            { type: 2, value: 'localhost' },
          ],
        },
      ],
    });
    tls = { key: pems.private, cert: pems.cert };
  }
  const pasvMin = 20000 + Math.floor(Math.random() * 11) * 1000;
  const server = new FtpSrv({
    url: 'ftp://127.0.0.1:0',
    pasv_url: '127.0.0.1',
    pasv_min: pasvMin,
    pasv_max: pasvMin + 999,
    tls,
    log: quiet,
    anonymous: opts.anonymous ?? false,
  });
  const stats = { logins: 0, peakConnections: 0 };
  // 'connect' is emitted by ftp-srv but missing from its typings.
  (server as unknown as EventEmitter).on(
    'connect',
    ({ newConnectionCount }: { newConnectionCount: number }) => {
      stats.peakConnections = Math.max(stats.peakConnections, newConnectionCount);
    },
  );
  server.on('login', ({ connection, username, password: given }, resolve, reject) => {
    stats.logins++;
    if (opts.anonymous && username === 'anonymous') return resolve({ root: dir });
    if (username === user && given === password) {
      const refuse = opts.refuse ?? {};
      if (!opts.refuse && !opts.dropAfterRename) return resolve({ root: dir });
      class RefusingFs extends FileSystem {
        override delete(path: string): Promise<unknown> {
          if (refuse.delete?.(path)) return Promise.reject(new Error('Delete operation failed.'));
          return super.delete(path) as Promise<unknown>;
        }
        override get(fileName: string): Promise<unknown> {
          if (refuse.get?.(fileName)) return Promise.reject(new Error('Operation failed.'));
          return super.get(fileName) as Promise<unknown>;
        }
        override list(path?: string): Promise<unknown> {
          if (path !== undefined && refuse.enter?.(path))
            return Promise.reject(new Error('Permission denied.'));
          return super.list(path) as Promise<unknown>;
        }
        override rename(from: string, to: string): Promise<unknown> {
          const target = (this as unknown as { _resolvePath(p: string): { fsPath: string } })._resolvePath(
            to,
          );
          if (refuse.rename?.(from, to, existsSync(target.fsPath)))
            return Promise.reject(new Error('Rename failed.'));
          const done = super.rename(from, to) as Promise<unknown>;
          if (!opts.dropAfterRename?.(from, to)) return done;
          return done.then((r) => {
            (connection as unknown as { commandSocket: { destroy(): void } }).commandSocket.destroy();
            return r;
          });
        }
        override chdir(path?: string): Promise<string> {
          if (path !== undefined && refuse.enter?.(path))
            return Promise.reject(new Error('Permission denied.'));
          return super.chdir(path) as Promise<string>;
        }
      }
      resolve({ root: dir, fs: new RefusingFs(connection, { root: dir, cwd: '/' }) });
    } else reject(new Error('Invalid username or password'));
  });
  await server.listen();
  const port = (server as unknown as { server: { address(): AddressInfo } }).server.address().port;
  return {
    host: '127.0.0.1',
    port,
    dir,
    user,
    password,
    ...(tls ? { cert: tls.cert } : {}),
    stats,
    dropConnections: async () => {
      const conns = (server as unknown as { connections: Record<string, { close(): Promise<unknown> }> })
        .connections;
      await Promise.all(Object.values(conns).map((c) => c.close()));
    },
    logOutSessions: () => {
      const conns = (server as unknown as { connections: Record<string, { authenticated: boolean }> })
        .connections;
      for (const c of Object.values(conns)) c.authenticated = false;
    },
    close: async () => {
      await server.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
