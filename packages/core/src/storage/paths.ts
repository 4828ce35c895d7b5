import { MedsyncError } from '../errors/errors.js';

/**
 * Validates and normalises a storage path: POSIX, relative to the adapter's root, no `..`
 * segment, no NUL, no backslash, not absolute. `''` (the root) is allowed only where
 * `allowRoot` is set (listing). Throws E_INVALID_PATH before any I/O.
 */
export function normalizePath(path: string, opts: { allowRoot?: boolean } = {}): string {
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

/** A temporary sibling name for `path`: hidden, unique, recognisable by {@link isPartialName}. */
export function partialNameFor(path: string, unique: string): string {
  const dir = dirname(path);
  const name = `.${basename(path).slice(0, 120)}.${unique}${PARTIAL_MARKER}`;
  return dir ? `${dir}/${name}` : name;
}
