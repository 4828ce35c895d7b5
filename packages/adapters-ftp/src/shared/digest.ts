/**
 * The slowest rate (bytes per ms, 25 MB/s) at which a server is assumed to read a file back for
 * its digest (FTP HASH/XSHA256/XMD5, the SFTP digest program).
 */
const DIGEST_MIN_BYTES_PER_MS = 25_000;

/**
 * How long to wait for a server's digest of `size` bytes: the request timeout plus the time to
 * read the file at 25 MB/s, so the digest of a 10 GiB file (minutes on a NAS) is not cut by a
 * 30 s timeout and the file resent forever.
 */
export function digestTimeoutMs(timeoutMs: number, size: number): number {
  return timeoutMs + Math.ceil(size / DIGEST_MIN_BYTES_PER_MS);
}
