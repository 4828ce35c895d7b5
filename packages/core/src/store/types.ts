/**
 * The Store contract: durable state, in focused parts. Implementations: memory (tests, this
 * package) and SQLite (`@medsync/adapters-db`, the embedded default); PostgreSQL and MySQL
 * implement the same contract next. Every implementation passes `describeStoreConformance`
 * from `@medsync/core/testing`. Methods reject with MedsyncError.
 */
export interface Store {
  /** `memory`, `sqlite`, `postgres`, `mysql`. */
  readonly kind: string;
  readonly manifest: ManifestStore;
  readonly runs: RunStore;
  readonly locks: LockStore;
  readonly settings: SettingsStore;
  readonly audit: AuditStore;
  /** Flushes and releases the store. Further calls reject. */
  close(): Promise<void>;
}

// ---------------------------------------------------------------- manifest

/** How a delivered file was verified. */
export type VerifiedBy = 'size' | 'md5' | 'sha256' | 'listing' | 'readback';

/** One file a job delivered to one destination. */
export interface ManifestEntry {
  jobId: string;
  /** The destination's Storage id. */
  destination: string;
  /** Path relative to the job's source and destination roots. */
  path: string;
  size: number;
  /** Source mtime (ms) when it was delivered. */
  mtimeMs: number;
  md5?: string | undefined;
  sha256?: string | undefined;
  /** Backend id of the delivered object, where the destination has one. */
  remoteId?: string | undefined;
  verifiedBy: VerifiedBy;
  /** When it was delivered (ms since the epoch). */
  deliveredAt: number;
}

/** Identifies a job's manifest at one destination. */
export interface ManifestScope {
  jobId: string;
  destination: string;
}

export interface ManifestListOptions {
  /** Only paths starting with this. */
  prefix?: string;
  /** Rows read per query. */
  pageSize?: number;
}

export interface ManifestStore {
  /** The entry for one path, or undefined. */
  get(scope: ManifestScope, path: string): Promise<ManifestEntry | undefined>;
  /** Every entry of the scope, sorted by path, streamed in pages (bounded memory). */
  list(scope: ManifestScope, opts?: ManifestListOptions): AsyncIterable<ManifestEntry>;
  /**
   * The same, with only `path` and the named fields read (others may be missing): planning a run
   * over many files needs only sizes and times, and reads far less.
   */
  list<K extends keyof ManifestEntry>(
    scope: ManifestScope,
    opts: ManifestListOptions & { fields: readonly K[] },
  ): AsyncIterable<Pick<ManifestEntry, K | 'path'>>;
  /** Inserts or replaces entries (one transaction per call). */
  put(entries: ManifestEntry | readonly ManifestEntry[]): Promise<void>;
  /** Removes entries by path; missing paths are ignored. */
  remove(scope: ManifestScope, paths: readonly string[]): Promise<void>;
  /** Entries of the scope with this SHA-256 (for move detection). */
  findBySha256(scope: ManifestScope, sha256: string): Promise<ManifestEntry[]>;
  /** Number of entries and their total size. */
  summary(scope: ManifestScope): Promise<{ files: number; bytes: number }>;
  /** Removes every entry of the scope (before a rebuild from the destination's listing). */
  clear(scope: ManifestScope): Promise<void>;
}

// ---------------------------------------------------------------- runs

export type RunStatus = 'running' | 'success' | 'partial' | 'failed' | 'cancelled' | 'interrupted';
export type RunTrigger = 'manual' | 'schedule' | 'catch-up' | 'retry';

/** One error of a run, as shown to users (no secrets; the path is the user's own). */
export interface RunError {
  path?: string | undefined;
  destination?: string | undefined;
  code: string;
  message: string;
}

export interface RunRecord {
  id: string;
  jobId: string;
  trigger: RunTrigger;
  status: RunStatus;
  /** Instance that ran it (for interrupted-run detection). */
  owner: string;
  startedAt: number;
  finishedAt?: number | undefined;
  durationMs?: number | undefined;
  filesSynced: number;
  filesSkipped: number;
  filesFailed: number;
  filesDeleted: number;
  filesMoved: number;
  bytes: number;
  /** At most 1,000 errors are kept; `errorCount` has the full number. */
  errors: RunError[];
  errorCount: number;
  dryRun: boolean;
}

/** Aggregates over a job's runs (or every job's). */
export interface RunStats {
  totalRuns: number;
  success: number;
  partial: number;
  failed: number;
  cancelled: number;
  interrupted: number;
  filesSynced: number;
  filesFailed: number;
  filesDeleted: number;
  bytes: number;
  lastRunAt?: number | undefined;
  lastSuccessAt?: number | undefined;
}

export interface RunStore {
  /** Stores a new run (status `running` normally). */
  insert(run: RunRecord): Promise<void>;
  /** Replaces a run by id (rejects with E_NOT_FOUND). */
  update(run: RunRecord): Promise<void>;
  get(id: string): Promise<RunRecord | undefined>;
  /** Newest first. */
  list(opts?: { jobId?: string; limit?: number; status?: RunStatus }): Promise<RunRecord[]>;
  stats(jobId?: string): Promise<RunStats>;
  /** Distinct job ids that have runs. */
  jobIds(): Promise<string[]>;
}

// ---------------------------------------------------------------- locks

export interface LockInfo {
  name: string;
  owner: string;
  expiresAt: number;
}

/**
 * Leases with an expiry: the holder renews before it runs out; a crashed holder's lease lapses
 * and another instance may take it. With a shared database this elects one runner per job.
 */
export interface LockStore {
  /** Takes the lease if free, expired, or already held by `owner`. True when held afterwards. */
  acquire(name: string, owner: string, ttlMs: number, now?: number): Promise<boolean>;
  /** Extends a held lease; false when `owner` no longer holds it. */
  renew(name: string, owner: string, ttlMs: number, now?: number): Promise<boolean>;
  /** Releases if held by `owner`; otherwise does nothing. */
  release(name: string, owner: string): Promise<void>;
  /** The current holder, or undefined when free or expired. */
  get(name: string, now?: number): Promise<LockInfo | undefined>;
}

// ---------------------------------------------------------------- settings

/** Key/value configuration. Values are JSON; secrets are stored encrypted (see SecretBox). */
export interface SettingsStore {
  get<T = unknown>(key: string): Promise<T | undefined>;
  set(key: string, value: unknown): Promise<void>;
  delete(key: string): Promise<void>;
  /** Entries whose key starts with `prefix`, sorted by key. */
  list(prefix?: string): Promise<Array<{ key: string; value: unknown }>>;
}

// ---------------------------------------------------------------- audit

export interface AuditEvent {
  id?: number;
  at: number;
  /** Who: a user, `cli`, `scheduler`, an instance id. */
  actor: string;
  /** What: `sync.run`, `settings.secret.rotate`, `job.enable` … */
  action: string;
  /** Which job, share or setting (never a patient identifier). */
  subject?: string | undefined;
  details?: Record<string, unknown> | undefined;
}

/** Append-only record of who did what. */
export interface AuditStore {
  append(e: AuditEvent): Promise<void>;
  /** Newest first. */
  list(opts?: { since?: number; action?: string; limit?: number }): Promise<AuditEvent[]>;
}
