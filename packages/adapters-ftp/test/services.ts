/**
 * Real FTP servers from Debian for the tests, started on loopback by scripts/services.sh (which
 * installs them when missing). Under CI=true a server that cannot be started fails the run;
 * elsewhere the caller skips its suite and one line says how to enable it.
 */
import { execFile, execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chownSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll } from 'vitest';

const SCRIPT = fileURLToPath(new URL('../../../scripts/services.sh', import.meta.url));
const CI = process.env.CI === 'true';

export type ServerName = 'pure-ftpd' | 'pure-ftpd-tls' | 'pure-ftpd-quota' | 'proftpd' | 'vsftpd';

/** What scripts/services.sh writes to `<statedir>/<name>.json`. */
export interface ServerInfo {
  name: ServerName;
  /** The folder scripts/services.sh keeps this server's state in. */
  stateDir: string;
  host: string;
  port: number;
  user: string;
  password: string;
  /** The local folder the FTP user sees as `/`. */
  root: string;
  pid: number;
  tls: boolean;
  /** The server certificate (PEM) when `tls`. */
  cert: string | null;
  uid: number;
  gid: number;
}

const stateDirs: string[] = [];
let cleanupRegistered = false;

/**
 * Starts one server of scripts/services.sh (synchronously: apt-get takes a lock, so starts run
 * one after the other) and stops it after the test file. Returns what the script wrote to
 * `<statedir>/<name>.json` plus `stateDir`, or undefined when it cannot be had outside CI.
 */
export function startService<T extends object>(
  name: string,
  env: NodeJS.ProcessEnv = {},
): (T & { stateDir: string }) | undefined {
  if (!cleanupRegistered) {
    cleanupRegistered = true;
    afterAll(() => {
      for (const dir of stateDirs.splice(0)) {
        try {
          execFileSync('bash', [SCRIPT, 'stop', dir], { stdio: 'ignore', timeout: 60_000 });
        } finally {
          rmSync(dir, { recursive: true, force: true });
        }
      }
    });
  }
  const dir = mkdtempSync(join(tmpdir(), `medsync-${name}-`));
  stateDirs.push(dir);
  try {
    execFileSync('bash', [SCRIPT, 'start', name, dir], {
      stdio: ['ignore', 'ignore', 'pipe'],
      timeout: 300_000,
      env: { ...process.env, ...env },
    });
    const info = JSON.parse(readFileSync(join(dir, `${name}.json`), 'utf8')) as T;
    return { ...info, stateDir: dir };
  } catch (e) {
    if (CI) {
      const stderr = (e as { stderr?: Buffer }).stderr?.toString() ?? '';
      throw new Error(`scripts/services.sh start ${name} failed under CI=true:\n${stderr}`, { cause: e });
    }
    console.log(
      `[medsync] ${name} not available: run scripts/services.sh start ${name} DIR (needs root and apt) to enable`,
    );
    return undefined;
  }
}

/** An FTP server of scripts/services.sh; see {@link startService}. */
export function startServer(name: ServerName, env: NodeJS.ProcessEnv = {}): ServerInfo | undefined {
  const info = startService<Omit<ServerInfo, 'name' | 'stateDir'>>(name, env);
  return info && { ...info, name };
}

/**
 * Kills the server (every session in flight is cut), keeps it down for `downSeconds`, and starts
 * it again on the same port. Asynchronous, so the caller's event loop keeps running meanwhile.
 */
export function restartServer(server: ServerInfo, downSeconds: number): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile(
      'bash',
      [SCRIPT, 'restart', server.stateDir, server.name, String(downSeconds)],
      { timeout: 60_000 },
      (err, _stdout, stderr) =>
        err ? reject(new Error(`restart failed: ${stderr}`, { cause: err })) : resolve(),
    );
  });
}

/** A fresh, empty folder on the server for one test, owned by the server's user. */
export function freshRoot(server: ServerInfo): string {
  const name = `t-${randomBytes(6).toString('hex')}`;
  const local = join(server.root, name);
  mkdirSync(local);
  chownSync(local, server.uid, server.gid);
  return `/${name}`;
}
