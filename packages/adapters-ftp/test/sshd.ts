/**
 * A real OpenSSH sshd for the SFTP tests, started on loopback by `scripts/services.sh start sshd`
 * (which installs openssh-server when missing and creates a throwaway user). Under CI=true a
 * server that cannot be started fails the run; elsewhere the caller skips its suite and one line
 * says how to enable it.
 */
import { randomBytes } from 'node:crypto';
import { chownSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { startService } from './services.js';

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

/** Starts sshd and stops it after the test file; undefined when it cannot be had outside CI. */
export function startSshd(): SshdInfo | undefined {
  return startService<Omit<SshdInfo, 'stateDir'>>('sshd');
}

/** A fresh, empty folder in the user's home for one test, owned by the user; its absolute path. */
export function freshSftpRoot(server: SshdInfo): string {
  const local = join(server.root, `t-${randomBytes(6).toString('hex')}`);
  mkdirSync(local);
  chownSync(local, server.uid, server.gid);
  return local;
}
