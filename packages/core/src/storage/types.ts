import type { Readable } from 'node:stream';

/** Content hashes a backend may report. */
export type HashKind = 'md5' | 'sha256';

/** What `write` accepts: a stream, or the bytes of a small file. */
export type WriteBody = Readable | Uint8Array;

/** Options every long call takes. */
export interface OpOptions {
  /** Cancels the call; it then rejects with E_ABORTED and leaves nothing half written. */
  signal?: AbortSignal;
}

/** One file in a storage tree. */
export interface StorageEntry {
  /** POSIX path relative to the storage root, no leading slash. */
  path: string;
  /** Size in bytes. */
  size: number;
  /** Modification time in milliseconds since the epoch, when the backend keeps one. */
  mtimeMs?: number;
  /** Content hashes the backend reports for free (see capabilities.hashes). */
  hashes?: Partial<Record<HashKind, string>>;
  /** Backend-specific id (a Drive file id, an etag), when there is one. */
  remoteId?: string;
}

/**
 * What a backend can do, as data (rclone's Features). Engines read these; they never guess. A
 * network adapter may refine them once connected (e.g. FTP learns MFMT from FEAT), so engines read
 * them at the point of use rather than caching them before the first call.
 */
export interface StorageCapabilities {
  /** Hashes present in `stat`/`list`/`write` results without reading the content. */
  hashes: readonly HashKind[];
  /** Whether `write({mtimeMs})` keeps the modification time and listings report it. */
  preservesMtime: boolean;
  /** Precision of stored mtimes in ms (1 for local disks, 1000 for FTP MFMT); null when not kept. */
  mtimePrecisionMs: number | null;
  /** Whether `rename` replaces the target atomically. */
  atomicRename: boolean;
  /** Whether `read` honours `start`/`end`. */
  rangeReads: boolean;
  /** Whether names differing only in case are the same file. */
  caseInsensitive: boolean;
  /**
   * Set where `caseInsensitive` is what this kind of storage usually does rather than a fact of
   * this one: a local folder may be on a FAT or exFAT drive, a CIFS mount, macOS or Windows; an
   * FTP or SFTP server may run on Windows. Before sending two names that differ only in case
   * there, SyncJob asks the storage itself (two probe files whose names differ only in case).
   */
  caseInsensitiveVaries?: boolean;
  /** A sensible upper bound for parallel transfers against this backend. */
  maxConcurrency: number;
}

/** What `test()` reports: the connection test of the first design, made explicit. */
export interface ConnectionReport {
  ok: boolean;
  /** The adapter kind, e.g. `local`, `memory`, `ftp`. */
  kind: string;
  /** The storage id (no credentials). */
  id: string;
  latencyMs: number;
  /** Whether a probe file could be written and removed. */
  writable: boolean;
  /** Entries at the top of the root folder (capped at 10,000 for the count). */
  entries?: number;
  /** Free bytes, when the backend can tell. */
  freeBytes?: number;
  /** Extra details (TLS, host key, server banner) without secrets. */
  details?: Record<string, unknown>;
  /** On failure: the error code and what to do. */
  error?: { code: string; message: string };
  advice?: string;
}

export interface ListOptions extends OpOptions {
  /** Number of concurrent stat calls where listing needs them (local adapter). */
  concurrency?: number;
}

export interface ReadOptions extends OpOptions {
  /** First byte to read (inclusive). */
  start?: number;
  /** Last byte to read (inclusive). */
  end?: number;
}

export interface WriteOptions extends OpOptions {
  /** Expected size in bytes, or -1 when unknown. A mismatch rejects with E_INTEGRITY. */
  size?: number;
  /** Modification time to keep, in ms since the epoch (honoured where capabilities.preservesMtime). */
  mtimeMs?: number;
  /**
   * Digests of the bytes sent, for adapters that can get a digest from the backend before the
   * file is renamed into place (an FTP server's HASH, say). Called once the body has ended (the
   * engine hashes while sending). On a mismatch the write rejects with E_INTEGRITY and nothing
   * appears under the final name. Adapters without backend digests ignore it.
   */
  expectedHashes?: () => Partial<Record<HashKind, string>>;
  /**
   * Called at most once, when every byte is written and only making the file durable and
   * renaming it into place remain. The caller may start other transfers meanwhile: an adapter
   * that can make many files durable at once (LocalStorage: one syncfs for a group of files
   * instead of an fdatasync each) does so only for callers that pass this. The write still
   * resolves only once the file is durable and in place.
   */
  onStaged?: () => void;
}

export interface CopyOptions extends WriteOptions {
  /** Digests to compute of the bytes copied. */
  hashes?: readonly HashKind[];
  /** Hears the bytes copied so far, as the copy goes. */
  onBytes?: (n: number) => void;
}

/** What {@link Storage.copyFrom} copied: the written entry and the digests of its bytes. */
export interface CopyResult {
  entry: StorageEntry;
  digests: Partial<Record<HashKind, string>>;
}

export interface CleanupOptions extends OpOptions {
  /** Only remove temporary files last modified before this time (ms since the epoch). */
  olderThanMs?: number;
}

/**
 * One file tree, local or remote. Every adapter implements it and passes the conformance suite
 * in `@medsync/core/testing`. Paths are POSIX-relative to the adapter's root; `..`, absolute
 * paths, backslashes and NUL are rejected with E_INVALID_PATH before any I/O. Every method
 * rejects with a MedsyncError.
 */
export interface Storage {
  /** The adapter kind: `local`, `memory`, `ftp`, `sftp` … */
  readonly kind: string;
  /**
   * A stable identity for this tree without credentials (`file:///srv/pacs`,
   * `ftp://user@host:21/dicom`). Manifests are keyed by it.
   */
  readonly id: string;
  readonly capabilities: StorageCapabilities;

  /** Connection test. Never throws for a backend failure: it reports `ok:false` with advice. */
  test(opts?: OpOptions): Promise<ConnectionReport>;

  /**
   * Every file below `prefix` (recursively), streamed as it is found, in no set order.
   * Folders are not yielded; temporary files of interrupted writes are hidden.
   * Rejects with E_NOT_FOUND if `prefix` does not exist.
   */
  list(prefix?: string, opts?: ListOptions): AsyncIterable<StorageEntry>;

  /** Rejects with E_NOT_FOUND if the file does not exist (never resolves to null). */
  stat(path: string, opts?: OpOptions): Promise<StorageEntry>;

  /** Opens a file for reading. Rejects with E_NOT_FOUND; the stream errors with MedsyncErrors. */
  read(path: string, opts?: ReadOptions): Promise<Readable>;

  /**
   * Reads a whole file into memory. Optional: engines use it for small files (a few MiB), where
   * one buffer costs less than a stream. Rejects like `read`.
   */
  readBuffer?(path: string, opts?: OpOptions): Promise<Buffer>;

  /**
   * Writes `body` (a stream, or a buffer for small files) into `path`, creating parent folders.
   * The bytes go to a temporary name and are renamed into place only once complete, so a reader
   * never sees half a file, and an aborted or failed write leaves nothing under the final name.
   * Overwrites an existing file. Never buffers a whole stream. Resolves to the written entry
   * (with hashes where the backend reports them).
   */
  write(path: string, body: WriteBody, opts?: WriteOptions): Promise<StorageEntry>;

  /**
   * Optional fast path: copies `path` of `source` to `path` here with write()'s guarantees
   * (temporary name, size check, mtime, nothing under the final name on failure), computing the
   * digests asked for. Resolves to undefined when it cannot copy from that source; the engine then
   * reads and writes. A source-side failure keeps the source's error code and is not retryable
   * unless transient; a source that changed size while copied is E_INTEGRITY, not retryable.
   */
  copyFrom?(source: Storage, path: string, opts?: CopyOptions): Promise<CopyResult | undefined>;

  /** Removes a file. Idempotent: a missing file is not an error. */
  remove(path: string, opts?: OpOptions): Promise<void>;

  /** Moves a file within the tree, replacing `to`; creates parents. Rejects with E_NOT_FOUND. */
  rename(from: string, to: string, opts?: OpOptions): Promise<void>;

  /**
   * Makes every write, rename and new folder so far durable (on local disks: fsync of the folders
   * whose entries changed). Engines call it before recording delivered files. Optional: backends
   * that acknowledge durably on each call need not implement it.
   */
  flush?(opts?: OpOptions): Promise<void>;

  /** Removes temporary files left by interrupted writes below `prefix`; returns how many. */
  cleanupPartials?(prefix?: string, opts?: CleanupOptions): Promise<number>;

  /** Releases connections. Further calls reject. */
  close(): Promise<void>;
}

/**
 * The report of a failed connection test: every adapter's `test()` returns this from its catch,
 * so failures look the same whatever the backend.
 */
export function failedReport(
  storage: Pick<Storage, 'kind' | 'id'>,
  startedMs: number,
  error: { code: string; message: string },
  advice: string,
  details?: Record<string, unknown>,
): ConnectionReport {
  return {
    ok: false,
    kind: storage.kind,
    id: storage.id,
    latencyMs: Math.round(performance.now() - startedMs),
    writable: false,
    ...(details ? { details } : {}),
    error: { code: error.code, message: error.message },
    advice,
  };
}
