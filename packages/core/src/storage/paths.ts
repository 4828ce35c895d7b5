import { MedsyncError } from '../errors/errors.js';

/**
 * What a normal path never holds: NUL, a backslash, a leading `/` or drive letter, an empty,
 * `.` or `..` segment (`//`, a trailing `/`, `./`, `/..`).
 */
const NEEDS_WORK = /[\0\\]|^\/|^[a-zA-Z]:|\/\/|\/$|(?:^|\/)\.{1,2}(?:\/|$)/;

/**
 * Validates and normalises a storage path: POSIX, relative to the adapter's root, no `..`
 * segment, no NUL, no backslash, not absolute. `''` (the root) is allowed only where
 * `allowRoot` is set (listing). Throws E_INVALID_PATH before any I/O.
 */
export function normalizePath(path: string, opts: { allowRoot?: boolean } = {}): string {
  // Already normal (the common case: paths from listings and manifests): returned as is, without
  // the split and join below, which cost a few hundred bytes of garbage per call on a hot path.
  if (typeof path === 'string' && path !== '' && !NEEDS_WORK.test(path)) return path;
  if (typeof path !== 'string') {
    throw new MedsyncError('E_INVALID_PATH', 'A storage path must be a string.');
  }
  if (path.includes('\0')) throw new MedsyncError('E_INVALID_PATH', 'A storage path may not contain NUL.');
  if (path.includes('\\')) {
    throw new MedsyncError('E_INVALID_PATH', 'A storage path may not contain a backslash; use "/".');
  }
  if (path.startsWith('/')) {
    throw new MedsyncError('E_INVALID_PATH', 'A storage path must be relative to the storage root.');
  }
  if (/^[a-zA-Z]:/.test(path)) {
    throw new MedsyncError('E_INVALID_PATH', 'A storage path may not start with a drive letter.');
  }
  const parts: string[] = [];
  for (const seg of path.split('/')) {
    if (seg === '' || seg === '.') continue;
    if (seg === '..') throw new MedsyncError('E_INVALID_PATH', 'A storage path may not contain "..".');
    parts.push(seg);
  }
  const out = parts.join('/');
  if (out === '' && !opts.allowRoot) {
    throw new MedsyncError('E_INVALID_PATH', 'A storage path may not be empty.');
  }
  return out;
}

/** The parent folder of a normalised path (`''` for a top-level file). */
export function dirname(path: string): string {
  const i = path.lastIndexOf('/');
  return i < 0 ? '' : path.slice(0, i);
}

/** The last segment of a normalised path. */
export function basename(path: string): string {
  const i = path.lastIndexOf('/');
  return i < 0 ? path : path.slice(i + 1);
}

/** Joins normalised segments, skipping empty ones. */
export function joinPath(...parts: string[]): string {
  return parts.filter((p) => p !== '').join('/');
}

/** Marker in the names of temporary files written before the rename into place. */
export const PARTIAL_MARKER = '.medsync-part';

/** True for the name of a temporary file left by an interrupted write. */
export function isPartialName(name: string): boolean {
  return name.startsWith('.') && name.endsWith(PARTIAL_MARKER);
}

/** Bytes of the final name kept in a temporary name: room is left for the rest within 255 bytes. */
const PARTIAL_NAME_BYTES = 120;

/** `name` cut to at most `max` UTF-8 bytes, on a code point boundary. */
function utf8Prefix(name: string, max: number): string {
  // A UTF-16 unit takes at most 3 bytes (a surrogate pair 4 for 2 units): short names fit whole.
  if (name.length * 3 <= max) return name;
  let bytes = 0;
  let end = 0;
  for (const ch of name) {
    const cp = ch.codePointAt(0)!;
    bytes += cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
    if (bytes > max) break;
    end += ch.length;
  }
  return name.slice(0, end);
}

/**
 * A temporary sibling name for `path`: hidden, unique, recognisable by {@link isPartialName}, and
 * within the 255-byte name limit of common file systems whenever `unique` is short (the final
 * name is cut to 120 UTF-8 bytes in it, never inside a character).
 */
export function partialNameFor(path: string, unique: string): string {
  const dir = dirname(path);
  const name = `.${utf8Prefix(basename(path), PARTIAL_NAME_BYTES)}.${unique}${PARTIAL_MARKER}`;
  return dir ? `${dir}/${name}` : name;
}
