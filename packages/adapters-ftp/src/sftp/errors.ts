import { isMedsyncError, MedsyncError, toMedsyncError, type MedsyncErrorCode } from '@medsync/core';
import { TRANSIENT_ERRNO } from '../shared/errors.js';

/** The operation an SFTP error happened in; it decides how ambiguous statuses are read. */
export type SftpOp =
  | 'connect'
  | 'test'
  | 'list'
  | 'stat'
  | 'read'
  | 'write'
  | 'mkdir'
  | 'remove'
  | 'rename'
  | 'cleanup'
  | 'flush';

const CONTEXT: Record<SftpOp, string> = {
  connect: 'Connecting to the SFTP server',
  test: 'Testing the SFTP connection',
  list: 'Listing a folder',
  stat: 'Reading file metadata',
  read: 'Reading the file',
  write: 'Writing the file',
  mkdir: 'Creating a folder',
  remove: 'Removing the file',
  rename: 'Renaming the file',
  cleanup: 'Removing temporary files',
  flush: 'Making renamed files durable on the server',
};

/** SFTP v3 status codes (draft-ietf-secsh-filexfer-02). */
export const SFTP_STATUS = {
  OK: 0,
  EOF: 1,
  NO_SUCH_FILE: 2,
  PERMISSION_DENIED: 3,
  FAILURE: 4,
  BAD_MESSAGE: 5,
  NO_CONNECTION: 6,
  CONNECTION_LOST: 7,
  OP_UNSUPPORTED: 8,
} as const;

const STATUS_NAME: Record<number, string> = {
  1: 'SSH_FX_EOF',
  2: 'SSH_FX_NO_SUCH_FILE',
  3: 'SSH_FX_PERMISSION_DENIED',
  4: 'SSH_FX_FAILURE',
  5: 'SSH_FX_BAD_MESSAGE',
  6: 'SSH_FX_NO_CONNECTION',
  7: 'SSH_FX_CONNECTION_LOST',
  8: 'SSH_FX_OP_UNSUPPORTED',
};

/**
 * A STATUS reply of the SFTP server to one request: the session is still usable. (ssh2 reports
 * these as plain errors with a numeric `code`, the same shape as its SSH disconnect errors; the
 * session wraps them in this type so the two cannot be confused.)
 */
export class SftpStatusError extends Error {
  constructor(
    readonly status: number,
    serverText: string,
  ) {
    super(serverText);
    this.name = 'SftpStatusError';
  }
}

/** True for an SFTP STATUS reply (see {@link SftpStatusError}). */
export function isSftpStatus(e: unknown, status?: number): e is SftpStatusError {
  return e instanceof SftpStatusError && (status === undefined || e.status === status);
}

/** ssh2's words for a connection that went away or never answered. */
const CONNECTION_TEXT =
  /no response from server|not connected|channel is not open|keepalive timeout|connection lost|closed|socket|no free channels|timed out|unexpected disconnection/i;

/** Words of an SSH disconnect that says the server is busy or limits sessions. */
const DISCONNECT_BUSY = new Set([12 /* TOO_MANY_CONNECTIONS */]);

/**
 * Maps anything an SFTP call throws to a MedsyncError. Messages are medsync's own words plus the
 * SFTP status name: server texts are kept out (they may echo a path), the path goes in `path`,
 * and secrets are registered for redaction as well. The raw error stays in `cause`.
 *
 * - Login refused ("All configured authentication methods failed") → E_AUTH, not retried.
 * - SSH_FX_NO_SUCH_FILE → E_NOT_FOUND; while writing or creating a folder → E_TRANSIENT (a folder
 *   vanished under the writer; it is created again on the next attempt).
 * - SSH_FX_PERMISSION_DENIED → E_PERMISSION; SSH_FX_BAD_MESSAGE (OpenSSH: EINVAL, ENAMETOOLONG)
 *   → E_INVALID_PATH; SSH_FX_OP_UNSUPPORTED → E_UNSUPPORTED.
 * - SSH_FX_FAILURE (OpenSSH sends it for every other errno, ENOSPC and EDQUOT included) → E_IO,
 *   not retried; the storage turns it into E_QUOTA when statvfs shows the disk full.
 * - Refused, reset or dropped connections, keepalive and request timeouts, SSH_FX_CONNECTION_LOST
 *   → E_TRANSIENT (retried).
 * - Unknown host names and handshakes without a common algorithm → E_CONFIG.
 */
export function toSftpError(e: unknown, op: SftpOp, path?: string): MedsyncError {
  if (isMedsyncError(e)) return e;
  const ctx = CONTEXT[op];
  const opts = { adapter: 'sftp', cause: e, ...(path !== undefined ? { path } : {}) };
  const make = (code: MedsyncErrorCode, msg: string, retryable?: boolean) =>
    new MedsyncError(code, `${ctx}: ${msg}`, retryable === undefined ? opts : { ...opts, retryable });

  if (e instanceof SftpStatusError) {
    const name = STATUS_NAME[e.status] ?? `status ${e.status}`;
    switch (e.status) {
      case SFTP_STATUS.NO_SUCH_FILE:
        if (op === 'write' || op === 'mkdir') {
          return make(
            'E_TRANSIENT',
            `a folder on the way is missing (${name}); it is created again on the next attempt.`,
          );
        }
        return make('E_NOT_FOUND', `no such file or folder (${name}).`);
      case SFTP_STATUS.PERMISSION_DENIED:
        return make(
          'E_PERMISSION',
          `the server refused access (${name}): check the account's rights on this path.`,
        );
      case SFTP_STATUS.BAD_MESSAGE:
        return make(
          'E_INVALID_PATH',
          `the server refused the name (${name}): it may be too long or not allowed on the server's file system.`,
          false,
        );
      case SFTP_STATUS.OP_UNSUPPORTED:
        return make('E_UNSUPPORTED', `the server does not support this operation (${name}).`);
      case SFTP_STATUS.NO_CONNECTION:
      case SFTP_STATUS.CONNECTION_LOST:
        return make('E_TRANSIENT', `the server lost the connection (${name}).`);
      case SFTP_STATUS.FAILURE:
        return make(
          'E_IO',
          op === 'write'
            ? `the server reported a failure (${name}): the disk may be full or the account over its quota; check the server.`
            : `the server reported a failure (${name}).`,
          false,
        );
      default:
        return make('E_IO', `the server reported an error (${name}).`, false);
    }
  }

  const err = e as { name?: string; code?: unknown; level?: unknown; message?: unknown } | undefined;
  const errno = typeof err?.code === 'string' ? err.code : undefined;
  const level = typeof err?.level === 'string' ? err.level : undefined;
  const message = typeof err?.message === 'string' ? err.message : '';
  if (err && (err.name === 'AbortError' || errno === 'ABORT_ERR')) {
    return make('E_ABORTED', 'the operation was cancelled.');
  }
  if (level === 'client-authentication' || /authentication methods failed/i.test(message)) {
    return make(
      'E_AUTH',
      'the server refused the login: check `user` and `password` or `privateKey`, and that this account may log in over SSH (AllowUsers, a disabled or expired account).',
      false,
    );
  }
  if (/unable to start subsystem/i.test(message)) {
    return make(
      'E_UNSUPPORTED',
      "the server does not offer SFTP to this account (no sftp subsystem, or a shell-only or forced-command login): check the server's Subsystem and ForceCommand settings.",
      false,
    );
  }
  if (errno === 'ENOTFOUND' || level === 'client-dns') {
    return make('E_CONFIG', 'the host name could not be resolved (ENOTFOUND): check `host`.');
  }
  if (errno === 'ECONNREFUSED') {
    return make(
      'E_TRANSIENT',
      'the connection was refused (ECONNREFUSED): is the SSH server running on this port?',
    );
  }
  if (/timed out while waiting for handshake/i.test(message)) {
    return make('E_TRANSIENT', 'the server did not answer in time (no SSH handshake within `timeoutMs`).');
  }
  if (level === 'client-timeout') {
    return make(
      'E_TRANSIENT',
      'the server stopped answering (nothing for `timeoutMs`); the session was closed.',
    );
  }
  if (/no matching|handshake failed/i.test(message) || level === 'handshake') {
    return make(
      'E_CONFIG',
      'the SSH handshake failed: the server and ssh2 share no key exchange, host key, cipher or MAC algorithm.',
    );
  }
  if (typeof err?.code === 'number') {
    // An SSH disconnect from the server, with its reason code (RFC 4253 §11.1).
    if (err.code === 14) {
      return make(
        'E_AUTH',
        'the server has no login method left for this account (SSH disconnect 14).',
        false,
      );
    }
    return make(
      'E_TRANSIENT',
      DISCONNECT_BUSY.has(err.code)
        ? `the server refused more connections (SSH disconnect ${err.code}): lower \`maxConnections\` if this repeats.`
        : `the server closed the connection (SSH disconnect ${err.code}).`,
    );
  }
  if (errno && TRANSIENT_ERRNO.has(errno)) return make('E_TRANSIENT', `the connection failed (${errno}).`);
  if (CONNECTION_TEXT.test(message)) {
    return make(
      'E_TRANSIENT',
      /keepalive|timed out/i.test(message)
        ? 'the server stopped answering (keepalive or request timeout).'
        : 'the connection was closed.',
    );
  }
  return toMedsyncError(e, ctx, opts);
}
