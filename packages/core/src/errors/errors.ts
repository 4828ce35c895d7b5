import { redact } from '../secrets/redact.js';

/**
 * Stable error codes. Host applications branch on these, never on messages.
 * - E_NOT_FOUND: the path, job or record does not exist.
 * - E_EXISTS: the target exists and the operation does not overwrite.
 * - E_AUTH: credentials were refused. Not retried.
 * - E_PERMISSION: the credentials are valid but not allowed to do this. Not retried.
 * - E_QUOTA: the destination is full or over quota. Not retried.
 * - E_TRANSIENT: a network drop, timeout or busy server. Retried.
 * - E_RATE_LIMITED: the backend asked us to slow down (`retryAfterMs` when known). Retried.
 * - E_CONFIG: bad configuration or input (the message names the field). Not retried.
 * - E_INVALID_PATH: a path was absolute, held `..`, a NUL or a backslash. Rejected before any I/O.
 * - E_ABORTED: the caller's AbortSignal fired.
 * - E_INTEGRITY: bytes did not arrive intact (size or hash mismatch). Retried.
 * - E_UNSUPPORTED: the backend cannot do this (see its capabilities).
 * - E_DEPENDENCY_MISSING: an optional peer dependency or system tool is not installed.
 * - E_LOCKED: another instance holds the job's lease.
 * - E_SAFETY: a safety check refused the operation (empty source in mirror mode, max-delete).
 * - E_SECRET: a secret could not be decrypted (wrong or missing key, tampered value).
 * - E_IO: another local I/O failure.
 */
export type MedsyncErrorCode =
  | 'E_NOT_FOUND'
  | 'E_EXISTS'
  | 'E_AUTH'
  | 'E_PERMISSION'
  | 'E_QUOTA'
  | 'E_TRANSIENT'
  | 'E_RATE_LIMITED'
  | 'E_CONFIG'
  | 'E_INVALID_PATH'
  | 'E_ABORTED'
  | 'E_INTEGRITY'
  | 'E_UNSUPPORTED'
  | 'E_DEPENDENCY_MISSING'
  | 'E_LOCKED'
  | 'E_SAFETY'
  | 'E_SECRET'
  | 'E_IO';

const RETRYABLE_BY_DEFAULT: ReadonlySet<MedsyncErrorCode> = new Set([
  'E_TRANSIENT',
  'E_RATE_LIMITED',
  'E_INTEGRITY',
]);

const BRAND = Symbol.for('medsync.error');

export interface MedsyncErrorOptions {
  cause?: unknown;
  /** Overrides the code's default retry classification. */
  retryable?: boolean;
  /** The backend asked to wait this long before the next attempt. */
  retryAfterMs?: number;
  /** The adapter or engine that raised it, e.g. `local`, `sqlite`, `sync`. */
  adapter?: string;
  /** The relative path concerned, kept out of the message (paths may identify patients). */
  path?: string;
}

/**
 * The one error type medsync throws. Messages say what happened and what to do; they never carry
 * secrets (they pass through {@link redact}) nor paths (see `path`).
 * Check with {@link isMedsyncError}, not `instanceof`, so two copies of the package still agree.
 */
export class MedsyncError extends Error {
  readonly [BRAND] = true;
  readonly code: MedsyncErrorCode;
  readonly retryable: boolean;
  readonly retryAfterMs: number | undefined;
  readonly adapter: string | undefined;
  readonly path: string | undefined;

  constructor(code: MedsyncErrorCode, message: string, opts: MedsyncErrorOptions = {}) {
    super(redact(message), opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = 'MedsyncError';
    this.code = code;
    this.retryable = opts.retryable ?? RETRYABLE_BY_DEFAULT.has(code);
    this.retryAfterMs = opts.retryAfterMs;
    this.adapter = opts.adapter;
    this.path = opts.path;
  }

  /** A plain object for JSON output: code, message, retryable, adapter, path. */
  toJSON(): { code: MedsyncErrorCode; message: string; retryable: boolean; adapter?: string; path?: string } {
    return {
      code: this.code,
      message: this.message,
      retryable: this.retryable,
      ...(this.adapter ? { adapter: this.adapter } : {}),
      ...(this.path !== undefined ? { path: this.path } : {}),
    };
  }
}

/** True for any MedsyncError, from this or another copy of the package. */
export function isMedsyncError(e: unknown): e is MedsyncError {
  return typeof e === 'object' && e !== null && BRAND in e;
}

const ERRNO_MAP: Record<string, [MedsyncErrorCode, string]> = {
  ENOENT: ['E_NOT_FOUND', 'No such file or directory.'],
  ENOTDIR: ['E_NOT_FOUND', 'A parent of the path is not a directory.'],
  EEXIST: ['E_EXISTS', 'The target already exists.'],
  EACCES: ['E_PERMISSION', 'Permission denied: check the owner and mode of the file or folder.'],
  EPERM: ['E_PERMISSION', 'Operation not permitted: check the owner and mode of the file or folder.'],
  EROFS: ['E_PERMISSION', 'The file system is read-only.'],
  ENOSPC: ['E_QUOTA', 'No space left on the device: free space on the destination, then retry.'],
  EDQUOT: ['E_QUOTA', 'Disk quota exceeded: raise the quota or free space, then retry.'],
  EISDIR: ['E_CONFIG', 'Expected a file but found a directory.'],
  ECONNRESET: ['E_TRANSIENT', 'The connection was reset.'],
  ECONNREFUSED: ['E_TRANSIENT', 'The connection was refused: is the server running?'],
  ETIMEDOUT: ['E_TRANSIENT', 'The operation timed out.'],
  EPIPE: ['E_TRANSIENT', 'The connection was closed while writing.'],
  EAI_AGAIN: ['E_TRANSIENT', 'Name resolution failed temporarily.'],
  EBUSY: ['E_TRANSIENT', 'The resource is busy.'],
  EAGAIN: ['E_TRANSIENT', 'The resource is temporarily unavailable.'],
  ESTALE: ['E_TRANSIENT', 'A stale network file handle: the share was remounted.'],
  EHOSTDOWN: ['E_TRANSIENT', 'The host is down.'],
  EHOSTUNREACH: ['E_TRANSIENT', 'The host is unreachable.'],
  ENETUNREACH: ['E_TRANSIENT', 'The network is unreachable.'],
  ENETDOWN: ['E_TRANSIENT', 'The network is down.'],
  ECONNABORTED: ['E_TRANSIENT', 'The connection was aborted.'],
  EMFILE: ['E_TRANSIENT', 'Too many open files: lower the concurrency.'],
  ENFILE: ['E_TRANSIENT', 'Too many open files in the system: lower the concurrency.'],
  EIO: ['E_IO', 'An I/O error occurred on the device.'],
};

/**
 * Maps anything thrown (Node errno errors, AbortError, strings) to a MedsyncError. An existing
 * MedsyncError passes through unchanged. `context` prefixes the message ("Reading the source file").
 */
export function toMedsyncError(
  e: unknown,
  context?: string,
  opts: Omit<MedsyncErrorOptions, 'cause'> = {},
): MedsyncError {
  if (isMedsyncError(e)) return e;
  const prefix = context ? `${context}: ` : '';
  const err = e as { name?: string; code?: string; message?: string } | undefined;
  if (err && (err.name === 'AbortError' || err.code === 'ABORT_ERR')) {
    return new MedsyncError('E_ABORTED', `${prefix}the operation was cancelled.`, { ...opts, cause: e });
  }
  const errno = err?.code ? ERRNO_MAP[err.code] : undefined;
  if (errno) {
    return new MedsyncError(errno[0], `${prefix}${errno[1]} (${err?.code})`, { ...opts, cause: e });
  }
  const detail = typeof e === 'string' ? e : (err?.message ?? String(e));
  return new MedsyncError('E_IO', `${prefix}${shorten(stripPaths(detail))}`, { ...opts, cause: e });
}

/**
 * The first line of a foreign message, at most 200 characters: some errors carry pages of text
 * (a module's source in a SyntaxError, a server's banner), which do not belong in a message.
 */
function shorten(message: string): string {
  const line = message.split('\n', 1)[0]!.trim();
  return line.length > 200 ? `${line.slice(0, 197)}...` : line;
}

/** Removes quoted or absolute paths from a native message so they cannot leak patient names. */
function stripPaths(message: string): string {
  // Node quotes paths as '...'; a name may itself hold a quote, so cut from the first quote
  // before a slash to the end of the message.
  return message.replace(/'[^']*\/.*$/s, "'<path>'").replace(/(?:^|\s)\/[^\s,']+/g, ' <path>');
}

/** Throws E_ABORTED when the signal has fired. */
export function throwIfAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) {
    throw new MedsyncError('E_ABORTED', 'The operation was cancelled.', { cause: signal.reason });
  }
}
