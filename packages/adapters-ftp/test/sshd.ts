/**
 * A real OpenSSH sshd for the SFTP tests, started on loopback by `scripts/services.sh start sshd`
 * (which installs openssh-server when missing and creates a throwaway user). Under CI=true a
 * server that cannot be started fails the run; elsewhere the caller skips its suite and one line
 * says how to enable it.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chownSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll } from 'vitest';

const SCRIPT = fileURLToPath(new URL('../../../scripts/services.sh', import.meta.url));
const CI = process.env.CI === 'true';

/** What scripts/services.sh writes to `<statedir>/sshd.json`. */
export interface SshdInfo {
  host: string;
  port: number;
  user: string;
  password: string;
  /** Path of the user's ed25519 private key (OpenSSH format, no passphrase). */
  privateKey: string;
  publicKey: string;
  /** The user's home folder (absolute; SFTP paths are the server's real paths). */
  root: string;
  /** `SHA256:…` of the server's ed25519 host key. */
  hostFingerprint: string;
  /** `[127.0.0.1]:port ssh-ed25519 AAAA…` */
  knownHostsLine: string;
  pid: number;
  uid: number;
  gid: number;
  systemUser: string;
  /** sshd's log (LogLevel VERBOSE: one line per failed password). */
  log: string;
  /** The folder scripts/services.sh keeps this server's state in. */
  stateDir: string;
}

/**
 * Starts sshd (synchronously: apt-get takes a lock) and stops it after the test file. Returns
 * undefined when it cannot be had outside CI.
 */
export function startSshd(): SshdInfo | undefined {
  const dir = mkdtempSync(join(tmpdir(), 'medsync-sshd-'));
  afterAll(() => {
    try {
      execFileSync('bash', [SCRIPT, 'stop', dir], { stdio: 'ignore', timeout: 60_000 });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
  try {
    execFileSync('bash', [SCRIPT, 'start', 'sshd', dir], {
      stdio: ['ignore', 'ignore', 'pipe'],
      timeout: 300_000,
    });
    const info = JSON.parse(readFileSync(join(dir, 'sshd.json'), 'utf8')) as Omit<SshdInfo, 'stateDir'>;
    return { ...info, stateDir: dir };
  } catch (e) {
    if (CI) {
      const stderr = (e as { stderr?: Buffer }).stderr?.toString() ?? '';
      throw new Error(`scripts/services.sh start sshd failed under CI=true:\n${stderr}`, { cause: e });
    }
    console.log(
      '[medsync] sshd not available: run scripts/services.sh start sshd DIR (needs root and apt) to enable',
    );
    return undefined;
  }
}

/** A fresh, empty folder in the user's home for one test, owned by the user; its absolute path. */
export function freshSftpRoot(server: SshdInfo): string {
  const local = join(server.root, `t-${randomBytes(6).toString('hex')}`);
  mkdirSync(local);
  chownSync(local, server.uid, server.gid);
  return local;
}
