import { isMedsyncError, MedsyncError, toMedsyncError, type MedsyncErrorCode } from '@medsync/core';
import { TRANSIENT_ERRNO } from '../shared/errors.js';

/** The operation an FTP error happened in; it decides how ambiguous replies (550) are read. */
export type FtpOp =
  | 'connect'
  | 'tls'
  | 'login'
  | 'test'
  | 'list'
  | 'stat'
  | 'read'
  | 'write'
  | 'mkdir'
  | 'remove'
  | 'rename-source'
  | 'rename'
  | 'cleanup';

const CONTEXT: Record<FtpOp, string> = {
  connect: 'Connecting to the FTP server',
  tls: 'Starting TLS (AUTH TLS)',
  login: 'Logging in to the FTP server',
  test: 'Testing the FTP connection',
  list: 'Listing a folder',
  stat: 'Reading file metadata',
  read: 'Reading the file',
  write: 'Writing the file',
  mkdir: 'Creating a folder',
  remove: 'Removing the file',
  'rename-source': 'Renaming the file',
  rename: 'Renaming the file',
  cleanup: 'Removing temporary files',
};

/** Operations where a "file unavailable" reply means the path does not exist. */
const LOOKUPS: ReadonlySet<FtpOp> = new Set(['list', 'stat', 'read', 'rename-source', 'remove', 'cleanup']);

const NOT_FOUND_TEXT =
  /no such file|not found|does not exist|doesn't exist|ENOENT|cannot find|not a directory/i;
const PERMISSION_TEXT =
  /permission denied|access denied|access is denied|EACCES|EPERM|not allowed|forbidden/i;

/** Node TLS verification failures: the server's certificate is not trusted as configured. */
const TLS_CERT_CODES = new Set([
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'SELF_SIGNED_CERT_IN_CHAIN',
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'CERT_HAS_EXPIRED',
  'CERT_NOT_YET_VALID',
  'CERT_SIGNATURE_FAILURE',
  'CERT_UNTRUSTED',
  'CERT_REJECTED',
  'ERR_TLS_CERT_ALTNAME_INVALID',
]);

/** Messages of basic-ftp for a dropped or stuck connection. */
const CONNECTION_TEXT =
  /timeout|timed out|closed|FIN packet|transmission error|data connection|transfer strateg|socket hang up|not connected/i;

/** True for a reply of the FTP server (basic-ftp's FTPError): the session itself is still usable. */
export function isFtpReply(e: unknown): e is Error & { code: number } {
  return e instanceof Error && e.name === 'FTPError' && typeof (e as { code?: unknown }).code === 'number';
}

/**
 * Maps anything an FTP call throws to a MedsyncError. Messages are medsync's own words plus the
 * FTP reply code: server texts are kept out (they often echo the path), the path goes in `path`,
 * and the password never appears (it is registered for redaction as well). The raw error stays
 * in `cause`.
 *
 * - 530/532 → E_AUTH (not retried), 552/452 → E_QUOTA (not retried).
 * - 550/551/553 → E_NOT_FOUND for lookups (list, stat, read, rename source, remove); E_PERMISSION
 *   for writes unless the reply says the folder is missing, then E_TRANSIENT (the folder is
 *   recreated on the next attempt). A reply that says "permission denied" is E_PERMISSION anywhere.
 * - 421/425/426/450/451, resets, timeouts and closed connections → E_TRANSIENT (retried).
 * - 500/501/502/504 → E_UNSUPPORTED; 431/533/534 and certificate failures → E_CONFIG; other TLS
 *   failures → E_CONFIG while the session is set up, E_TRANSIENT once it is (a garbled record).
 */
/** Steps of opening a session: a TLS failure there is the configuration's. */
const SETUP_OPS: ReadonlySet<FtpOp> = new Set(['connect', 'tls', 'login', 'test']);

export function toFtpError(e: unknown, op: FtpOp, path?: string, adapter = 'ftp'): MedsyncError {
  if (isMedsyncError(e)) return e;
  const ctx = CONTEXT[op];
  const opts = { adapter, cause: e, ...(path !== undefined ? { path } : {}) };
  const make = (code: MedsyncErrorCode, msg: string, retryable?: boolean) =>
    new MedsyncError(code, `${ctx}: ${msg}`, retryable === undefined ? opts : { ...opts, retryable });

  if (isFtpReply(e)) return fromReply(e.code, e.message, op, make);

  const err = e as { name?: string; code?: unknown; message?: unknown } | undefined;
  const errno = typeof err?.code === 'string' ? err.code : undefined;
  const message = typeof err?.message === 'string' ? err.message : '';
  if (err && (err.name === 'AbortError' || errno === 'ABORT_ERR')) {
    return make('E_ABORTED', 'the operation was cancelled.');
  }
  if (errno && TLS_CERT_CODES.has(errno)) {
    return make(
      'E_CONFIG',
      `the server's TLS certificate is not trusted (${errno}). Pass the server's certificate (or its CA) as \`tls.ca\`; check that \`host\` matches the certificate.`,
    );
  }
  if (errno?.startsWith('ERR_SSL_') && !SETUP_OPS.has(op)) {
    // On a session whose handshake worked: a garbled record (bad MAC, an unexpected message), as
    // a reset is. A port that does not speak TLS fails at the handshake, in `connect`/`tls`.
    return make('E_TRANSIENT', `a TLS error broke the connection (${errno}).`);
  }
  if (errno?.startsWith('ERR_SSL_') || /SSL routines|handshake/i.test(message)) {
    return make(
      'E_CONFIG',
      `the TLS handshake failed${errno ? ` (${errno})` : ''}: check that the port speaks explicit FTPS (AUTH TLS), not implicit TLS or plain FTP only.`,
    );
  }
  if (errno === 'ENOTFOUND') {
    return make('E_CONFIG', 'the host name could not be resolved (ENOTFOUND): check `host`.');
  }
  if (errno === 'ECONNREFUSED') {
    return make(
      'E_TRANSIENT',
      'the connection was refused (ECONNREFUSED): is the FTP server running on this port?',
    );
  }
  if (errno && TRANSIENT_ERRNO.has(errno)) {
    return make('E_TRANSIENT', `the connection failed (${errno}).`);
  }
  if (CONNECTION_TEXT.test(message)) {
    const what = /timeout|timed out/i.test(message)
      ? 'the server did not answer in time'
      : /transfer strateg|data connection/i.test(message)
        ? 'no data connection could be opened (passive mode); check firewalls and the server’s passive ports'
        : 'the connection was closed';
    return make('E_TRANSIENT', `${what}.`);
  }
  return toMedsyncError(e, ctx, opts);
}

function fromReply(
  code: number,
  text: string,
  op: FtpOp,
  make: (code: MedsyncErrorCode, msg: string, retryable?: boolean) => MedsyncError,
): MedsyncError {
  if (code === 530 || code === 532) {
    // Only a refused login is E_AUTH (which stops a destination); a 530 to one command is about
    // that file or folder.
    return op === 'login' || op === 'connect' || op === 'test'
      ? make(
          'E_AUTH',
          `the server refused the user name or password (${code}): check both, and that this account may log in over FTP.`,
          false,
        )
      : make(
          'E_PERMISSION',
          `the server says this session may not do this (${code}): check the account's rights on this path.`,
          false,
        );
  }
  if (code === 552 || code === 452) {
    return make(
      'E_QUOTA',
      `the server is out of space or over quota (${code}): free space, then retry.`,
      false,
    );
  }
  if (code === 431 || code === 533 || code === 534 || (op === 'tls' && code >= 500)) {
    return make(
      'E_CONFIG',
      `the server refused TLS (${code}): it may not offer explicit FTPS, or it requires a different setting for \`secure\`.`,
    );
  }
  if (code === 550 || code === 551 || code === 553 || code === 450) {
    if (PERMISSION_TEXT.test(text)) {
      return make(
        'E_PERMISSION',
        `the server refused access (${code}): check the account's rights on this path.`,
      );
    }
    if (LOOKUPS.has(op) && (code !== 450 || NOT_FOUND_TEXT.test(text))) {
      return make('E_NOT_FOUND', `no such file or folder (${code}).`);
    }
    if ((op === 'write' || op === 'mkdir' || op === 'rename') && NOT_FOUND_TEXT.test(text)) {
      return make(
        'E_TRANSIENT',
        `the destination folder is missing (${code}); it is created again on the next attempt.`,
      );
    }
    if (code === 450) return make('E_TRANSIENT', `the file is busy or unavailable right now (${code}).`);
    return make(
      'E_PERMISSION',
      `the server refused the operation (${code}): check that the account may write here and the name is allowed.`,
    );
  }
  if (code === 421) {
    return make(
      'E_TRANSIENT',
      `the server closed the session (421): it is busy or limits connections; lower \`maxConnections\` if this repeats.`,
    );
  }
  if (code === 425 || code === 426) {
    return make('E_TRANSIENT', `the data connection failed (${code}).`);
  }
  if (code === 500 || code === 501 || code === 502 || code === 504) {
    return make('E_UNSUPPORTED', `the server does not support this command (${code}).`);
  }
  if (code >= 400 && code < 500)
    return make('E_TRANSIENT', `the server reported a temporary failure (${code}).`);
  return make('E_IO', `the server reported a failure (${code}).`);
}
