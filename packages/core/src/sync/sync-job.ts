import { createHash, randomUUID } from 'node:crypto';
import { setMaxListeners } from 'node:events';
import { EventEmitter } from 'eventemitter3';
import pLimit from 'p-limit';
import picomatch from 'picomatch';
import { isMedsyncError, MedsyncError, throwIfAborted, toMedsyncError } from '../errors/errors.js';
import { partialNameFor } from '../storage/paths.js';
import type { HashKind, Storage, StorageEntry } from '../storage/types.js';
import type {
  ManifestEntry,
  ManifestScope,
  RunRecord,
  RunTrigger,
  Store,
  VerifiedBy,
} from '../store/types.js';
import type { Clock } from '../util/clock.js';
import { systemClock } from '../util/clock.js';
import { noopLogger, type Logger } from '../util/logger.js';
import { acquireLease, makeOwner } from '../util/lease.js';
import { sharedHashPool } from '../util/hash-pool.js';
import { RetryPolicy, type RetryPolicyOptions } from '../util/retry.js';
import { hashStream, HashingStream, parseRate, TokenBucket, type Digests } from '../util/streams.js';
import type { PlanOp, SyncJobEvents, SyncPlan, SyncProgress, SyncResult } from './types.js';

export type SyncMode = 'copy' | 'mirror';

/** What planning reads of each manifest entry. */
type BriefEntry = Pick<ManifestEntry, 'path' | 'size' | 'mtimeMs'>;

/** A destination's clock against ours: its time minus ours, and the uncertainty of that. */
interface DestinationClock {
  offsetMs: number;
  slackMs: number;
}

/**
 * Errors that say a whole destination is unusable: refused credentials. (E_CONFIG is not among
 * them: some adapters raise it for one file, e.g. a folder where the file should go.)
 */
const DESTINATION_FATAL: ReadonlySet<string> = new Set(['E_AUTH']);

export interface SyncJobOptions {
  /** Stable job id: the manifest, runs and lease are keyed by it. */
  id: string;
  source: Storage;
  /** One or more destinations; each keeps its own manifest. */
  destinations: readonly Storage[];
  store: Store;
  /** `copy` never deletes; `mirror` deletes at the destination what the job delivered and the source lost. */
  mode?: SyncMode;
  /** Globs (picomatch) a file must match to be synced. Default: everything. */
  include?: readonly string[];
  /** Globs that exclude files. */
  exclude?: readonly string[];
  /** Parallel transfers (shared by all destinations). Default 4. */
  concurrency?: number;
  /**
   * Most deletions a mirror run may make. Past it, no deletion happens and the run is partial.
   * Default: half of what the job has delivered to that destination.
   */
  maxDelete?: number;
  /** Bandwidth limit for all transfers together: bytes/s or a string like `10M`. */
  bwlimit?: number | string;
  /** Retries for manual runs. Default 3 retries, 2 s apart (growing ×1.5). */
  retry?: RetryPolicyOptions;
  /** Retries for scheduled runs. Default 3 retries, 5 s apart (growing ×1.5). */
  scheduledRetry?: RetryPolicyOptions;
  /**
   * Content hashes computed while sending and kept in the manifest. Default MD5 and SHA-256;
   * SHA-256 is always included (moves and change checks use it), and so is any hash the
   * destination reports. Small files are hashed on worker threads.
   */
  hashes?: readonly HashKind[];
  /** Files up to this size are read and written as one buffer. Default 8 MiB. */
  smallFileBytes?: number;
  /**
   * Share of delivered files (0 to 1) read back from the destination and compared with the
   * SHA-256 computed while sending, for destinations that report no digest (FTP without HASH,
   * SFTP). 0.05 checks one file in twenty; 1 checks all. Default 0. Verified files are recorded
   * with `verifiedBy: 'readback'`; a mismatch is E_INTEGRITY and the file is sent again.
   */
  readBack?: number;
  /** Detect renames by content hash in mirror mode and rename at the destination. Default true. */
  detectMoves?: boolean;
  /** Put real paths in events (default false: a stable `ref:` instead). */
  eventPaths?: boolean;
  /** Lease length for the job's lock. Default 60 s (renewed every third of it). */
  lockTtlMs?: number;
  /** Instance name for leases and run records. Default hostname:pid:random. */
  owner?: string;
  clock?: Clock;
  logger?: Logger;
}

export interface SyncRunOptions {
  /** Cancels at once: in-flight transfers abort and leave nothing half written. */
  signal?: AbortSignal;
  /** Graceful stop: finish the files in flight, start no new ones. */
  stopSignal?: AbortSignal;
  trigger?: RunTrigger;
  /** Plan only: nothing is written anywhere but the run record. */
  dryRun?: boolean;
  /** Restrict the run to these source paths (used to retry failed files). */
  only?: readonly string[];
}

interface Task {
  dest: Storage;
  scope: ManifestScope;
  op: PlanOp;
  source?: StorageEntry;
  /**
   * An upload whose path differs only in letter case (or Unicode form) from a delivered file the
   * source no longer has: that file is renamed to the new spelling first, then overwritten. On a
   * destination that folds case (SMB, Windows, macOS) the two names are one file, and deleting the
   * old one after the upload would delete the new file.
   */
  renameFrom?: string;
  /** A delete of a file whose write had an unknown outcome and landed (see `saveUnsure`). */
  unsure?: UnsureWrite;
  /** Set when a copy of this upload failed its checks in place and could not be removed. */
  badCopy?: boolean;
}

/** A write with an unknown outcome: the path, and the source file's size and mtime then. */
interface UnsureWrite {
  path: string;
  size: number;
  mtimeMs?: number | undefined;
  /**
   * A copy that failed its checks could not be removed: what is at the destination may be that
   * corrupt copy, with the right size and mtime. Never adopted; sent again.
   */
  bad?: boolean | undefined;
  /** Runs whose lookup of this landed file failed; dropped after {@link MAX_UNSURE_TRIES}. */
  tries?: number | undefined;
}

/** The stored lists, keeping only well-formed entries (settings are JSON anyone may edit). */
function readUnsure(v: unknown): Record<string, UnsureWrite[]> {
  const out: Record<string, UnsureWrite[]> = {};
  if (!v || typeof v !== 'object') return out;
  for (const [dest, list] of Object.entries(v as Record<string, unknown>)) {
    if (!Array.isArray(list)) continue;
    const optional = (v: unknown, type: string) => v === undefined || typeof v === type;
    out[dest] = list.filter((e): e is UnsureWrite => {
      const w = (e ?? {}) as Partial<Record<keyof UnsureWrite, unknown>>;
      return (
        typeof w.path === 'string' &&
        typeof w.size === 'number' &&
        optional(w.mtimeMs, 'number') &&
        optional(w.bad, 'boolean') &&
        optional(w.tries, 'number')
      );
    });
  }
  return out;
}

/**
 * Whether a destination time is the source's, where the destination keeps mtimes (its
 * capabilities are read at the call: a network adapter learns them when it connects); undefined
 * where it keeps none. Times pass through seconds-as-doubles on the way (utimes): one unit of the
 * destination's precision is allowed.
 */
function sameMtime(dest: Storage, at: number | undefined, source: number | undefined): boolean | undefined {
  const precision = dest.capabilities.mtimePrecisionMs;
  if (!dest.capabilities.preservesMtime || precision === null) return undefined;
  return at !== undefined && source !== undefined && Math.abs(at - source) <= Math.max(1, precision);
}

/** Any UTF-16 unit outside ASCII (surrogates included). */
const NON_ASCII = /[\u0080-\uffff]/;

/** A path as a case-insensitive file system compares it. */
function foldName(p: string): string {
  return NON_ASCII.test(p) ? p.normalize('NFC').toLowerCase() : p.toLowerCase();
}

const twinsOf = new WeakMap<ReadonlyMap<string, unknown>, ReadonlyMap<string, string[]>>();

/**
 * Groups of paths (of a scan, or of a manifest) that differ only in letter case (or Unicode form),
 * by folded name; once per map (well under 1 µs per ASCII path).
 */
function caseTwins(sources: ReadonlyMap<string, unknown>): ReadonlyMap<string, string[]> {
  let groups = twinsOf.get(sources);
  if (groups) return groups;
  const first = new Map<string, string>();
  const found = new Map<string, string[]>();
  for (const p of sources.keys()) {
    const fold = foldName(p);
    const seen = first.get(fold);
    if (seen === undefined) first.set(fold, p);
    else found.set(fold, [...(found.get(fold) ?? [seen]), p]);
  }
  groups = found;
  twinsOf.set(sources, groups);
  return groups;
}

const MAX_KEPT_ERRORS = 1000;
/** Transfers in flight at once, counting those whose files wait to be made durable together. */
const MAX_IN_FLIGHT = 256;
/** Files with an unknown outcome kept per destination for the next run (see `saveUnsure`). */
const MAX_UNSURE = 10_000;
/** Runs in a row a landed file may fail to be looked up before it is given up (and left). */
const MAX_UNSURE_TRIES = 5;
/** Small-file buffers kept by transfers that wait to be made durable together. */
const MAX_HELD_BYTES = 32 * 1024 * 1024;

/**
 * Mirrors a source tree to one or more destinations: scan (streaming) → compare with the manifest
 * (size+mtime; content hash only for changed files) → plan → execute in a bounded pool with
 * per-file retries → verify → record each file as it completes. Resumes after a crash or cancel
 * without resending delivered files.
 */
export class SyncJob extends EventEmitter<SyncJobEvents> {
  readonly id: string;
  private readonly o: SyncJobOptions;
  private readonly clock: Clock;
  private readonly log: Logger;
  private readonly owner: string;
  private readonly isIncluded: (p: string) => boolean;

  constructor(opts: SyncJobOptions) {
    super();
    if (!opts.id || typeof opts.id !== 'string') throw new MedsyncError('E_CONFIG', 'A SyncJob needs an id.');
    if (!opts.source) throw new MedsyncError('E_CONFIG', 'A SyncJob needs a source storage.');
    if (!opts.destinations?.length)
      throw new MedsyncError('E_CONFIG', 'A SyncJob needs at least one destination.');
    if (!opts.store) throw new MedsyncError('E_CONFIG', 'A SyncJob needs a store.');
    const ids = new Set(opts.destinations.map((d) => d.id));
    if (ids.size !== opts.destinations.length)
      throw new MedsyncError('E_CONFIG', 'The same destination is listed twice.');
    if (ids.has(opts.source.id))
      throw new MedsyncError('E_CONFIG', 'A destination may not be the source itself.');
    for (const d of opts.destinations) {
      const a = opts.source.id.replace(/\/?$/, '/');
      const b = d.id.replace(/\/?$/, '/');
      if (a.startsWith(b) || b.startsWith(a)) {
        throw new MedsyncError(
          'E_CONFIG',
          'The source and a destination are nested in each other: each run would copy its own output.',
        );
      }
    }
    if (
      opts.concurrency !== undefined &&
      !(Number.isInteger(opts.concurrency) && opts.concurrency >= 1 && opts.concurrency <= 256)
    ) {
      throw new MedsyncError('E_CONFIG', 'concurrency must be a whole number from 1 to 256.');
    }
    if (opts.maxDelete !== undefined && !(Number.isInteger(opts.maxDelete) && opts.maxDelete >= 0)) {
      throw new MedsyncError('E_CONFIG', 'maxDelete must be a whole number, 0 or more.');
    }
    if (opts.bwlimit !== undefined) parseRate(opts.bwlimit);
    if (opts.readBack !== undefined && !(opts.readBack >= 0 && opts.readBack <= 1)) {
      throw new MedsyncError(
        'E_CONFIG',
        'readBack must be a share from 0 to 1 (0.05 reads back one file in 20).',
      );
    }
    this.o = opts;
    this.id = opts.id;
    this.clock = opts.clock ?? systemClock;
    this.log = opts.logger ?? noopLogger;
    this.owner = opts.owner ?? makeOwner();
    const inc = opts.include?.length ? picomatch([...opts.include], { dot: true }) : () => true;
    const exc = opts.exclude?.length ? picomatch([...opts.exclude], { dot: true }) : () => false;
    this.isIncluded = (p) => inc(p) && !exc(p);
  }

  get mode(): SyncMode {
    return this.o.mode ?? 'copy';
  }

  /** Computes what a run would do, writing nothing. */
  async plan(opts: Omit<SyncRunOptions, 'dryRun'> = {}): Promise<SyncResult> {
    return this.run({ ...opts, dryRun: true });
  }

  /** Runs again only the files that failed in the job's last run. */
  async retryFailed(opts: Omit<SyncRunOptions, 'only'> = {}): Promise<SyncResult> {
    const [last] = await this.o.store.runs.list({ jobId: this.id, limit: 1 });
    const only = [...new Set((last?.errors ?? []).map((e) => e.path).filter((p): p is string => !!p))];
    return this.run({ trigger: 'retry', ...opts, only });
  }

  /**
   * Rebuilds the manifest of each destination from its listing (after the Store was lost), so the
   * next run resends only what is missing or different. Returns the number of files adopted.
   */
  async rebuildManifest(opts: { signal?: AbortSignal } = {}): Promise<number> {
    const sources = await this.scanSource(opts.signal, undefined);
    const unsure = readUnsure(await this.o.store.settings.get(this.settingKey('unsure')));
    let adopted = 0;
    for (const dest of this.o.destinations) {
      const scope = { jobId: this.id, destination: dest.id };
      // Corrupt copies that could not be removed are never taken (see UnsureWrite.bad).
      const bad = new Set((unsure[dest.id] ?? []).filter((w) => w.bad).map((w) => w.path));
      const wanted = [...sources.values()].filter((s) => !bad.has(s.path));
      await this.o.store.manifest.clear(scope);
      // A destination that cannot be listed rejects (E_PERMISSION): nothing could be rebuilt.
      adopted += await this.adoptFromListing(dest, scope, wanted, opts.signal, { unlistableIsEmpty: false });
    }
    return adopted;
  }

  /** Runs the job once. Resolves with the run's record; rejects only with E_LOCKED or E_CONFIG. */
  async run(opts: SyncRunOptions = {}): Promise<SyncResult> {
    if (this.active) throw new MedsyncError('E_LOCKED', `Job ${this.id} is already running in this process.`);
    this.active = true;
    try {
      return await this.runLocked(opts);
    } finally {
      this.active = false;
    }
  }

  private active = false;
  /** When this job's last run in this process started: each run starts at least 1 ms later. */
  private lastStart = -Infinity;

  private async runLocked(opts: SyncRunOptions): Promise<SyncResult> {
    const store = this.o.store;
    const trigger = opts.trigger ?? 'manual';
    const dryRun = opts.dryRun ?? false;
    const lockName = `sync:${this.id}`;
    const ttl = this.o.lockTtlMs ?? 60_000;
    if (!(await acquireLease(store.locks, lockName, this.owner, ttl, this.clock.now()))) {
      const holder = await store.locks.get(lockName, this.clock.now());
      throw new MedsyncError(
        'E_LOCKED',
        `Job ${this.id} is already running${holder ? ` on ${holder.owner}` : ''}; wait for it to finish.`,
      );
    }
    const inner = new AbortController();
    // Every transfer in flight listens on the run's signal (read stream, pipeline, throttle).
    setMaxListeners(Math.max(20, (this.o.concurrency ?? 4) * 8), inner.signal);
    const abort = (reason: unknown) => inner.abort(reason);
    const onOuterAbort = () => abort(opts.signal?.reason);
    opts.signal?.addEventListener('abort', onOuterAbort, { once: true });
    if (opts.signal?.aborted) abort(opts.signal.reason);
    let lostLease = false;
    const renew = setInterval(
      () => {
        store.locks.renew(lockName, this.owner, ttl, this.clock.now()).then(
          (ok) => {
            if (!ok) {
              lostLease = true;
              abort(new MedsyncError('E_LOCKED', 'The job lease was lost to another instance.'));
            }
          },
          (e: unknown) =>
            this.log.warn('Renewing the job lease failed', { error: toMedsyncError(e).message }),
        );
      },
      Math.max(1000, Math.floor(ttl / 3)),
    );
    renew.unref?.();

    const runId = randomUUID();
    // Runs are ordered by their start: two in the same millisecond (a quick run, then
    // retryFailed()) would leave "the last run" to the random run id.
    const now = this.clock.now();
    const startedAt = Math.max(now, this.lastStart + 1);
    this.lastStart = startedAt;
    const record: RunRecord = {
      id: runId,
      jobId: this.id,
      trigger,
      status: 'running',
      owner: this.owner,
      startedAt,
      filesSynced: 0,
      filesSkipped: 0,
      filesFailed: 0,
      filesDeleted: 0,
      filesMoved: 0,
      bytes: 0,
      errors: [],
      errorCount: 0,
      dryRun,
    };
    const plan: SyncPlan = {
      uploads: 0,
      uploadBytes: 0,
      moves: 0,
      deletes: 0,
      skipped: 0,
      deletesRefused: 0,
      ops: [],
    };
    let fatal: MedsyncError | undefined;
    let progressTimer: unknown;
    let interimSave: Promise<void> = Promise.resolve();
    const progress = {
      filesDone: 0,
      filesTotal: 0,
      bytesDone: 0,
      bytesTotal: 0,
      samples: [] as Array<[number, number]>,
    };
    // Files whose write (or move) failed with an unknown outcome: the connection dropped, so the
    // destination may have put the file in place and only its answer was lost. The next run looks
    // them up there before sending them again. Per destination id.
    const unsureKey = this.settingKey('unsure');
    let unsureBefore: Record<string, UnsureWrite[]> = {};
    const unsureNow = new Map<string, Map<string, UnsureWrite>>();
    const keepUnsure = (destId: string, w: UnsureWrite) => {
      let m = unsureNow.get(destId);
      if (!m) unsureNow.set(destId, (m = new Map()));
      m.set(w.path, w);
    };
    /** Destinations planned this run, with the earlier unsure paths their planning settled. */
    const unsureSettled = new Map<string, ReadonlySet<string>>();
    const addError = (err: MedsyncError, path?: string, destination?: string) => {
      record.errorCount++;
      if (record.errors.length < MAX_KEPT_ERRORS) {
        record.errors.push({
          ...(path !== undefined ? { path } : {}),
          ...(destination ? { destination } : {}),
          code: err.code,
          message: err.message,
        });
      }
    };
    try {
      // A run that was still `running` while we hold the lease was interrupted (crash, kill -9).
      // A dry run must not use up the interrupted state: the next real run recovers.
      // The recovery (leftover cleanup, adoption) stays pending until a run gets through planning.
      const recoverKey = this.settingKey('recover');
      const adoptKey = this.settingKey('adopt');
      let interrupted = false;
      /** An earlier run delivered files the manifest could not record: adopt them from the listing. */
      let adoptPending = false;
      if (!dryRun) {
        if (await this.markInterrupted()) await store.settings.set(recoverKey, true);
        interrupted = (await store.settings.get<boolean>(recoverKey)) === true;
        adoptPending = (await store.settings.get<boolean>(adoptKey)) === true;
      }
      // Read by dry runs too (their plan shows the deletes it leads to); written by real runs only.
      unsureBefore = readUnsure(await store.settings.get(unsureKey));
      await store.runs.insert(record);
      this.safeEmit('run:start', { runId, jobId: this.id, trigger, dryRun });
      this.log.info('Sync run started', { jobId: this.id, runId, trigger, dryRun });

      // A graceful stop (stopSignal) has no files in flight to wait for while scanning and
      // planning: it ends those at once, as a cancel does.
      const planSignal = opts.stopSignal ? AbortSignal.any([inner.signal, opts.stopSignal]) : inner.signal;
      // The first destination is opened beside the scan (its manifest read, its presence checked):
      // over a network, its connection and lookups then take no time of their own. Its failure is
      // reported by its planning (the handler below only keeps it from counting as unhandled
      // while the scan runs). A run that ends before planning stops it and waits for it.
      const first = this.o.destinations[0];
      const stopOpening = new AbortController();
      const opened = first
        ? this.openDestination(
            first,
            { jobId: this.id, destination: first.id },
            AbortSignal.any([planSignal, stopOpening.signal]),
          )
        : undefined;
      opened?.catch(() => undefined);
      const notOpened = async () => {
        stopOpening.abort();
        await opened?.catch(() => undefined);
      };
      let sources: Map<string, StorageEntry>;
      try {
        sources = await this.scanSource(planSignal, opts.only);
      } catch (e) {
        await notOpened();
        throw e;
      }
      if (this.mode === 'mirror' && sources.size === 0 && !opts.only) {
        await notOpened();
        throw new MedsyncError(
          'E_SAFETY',
          'The source is empty: a mirror run refuses to run, so an unmounted share never empties the archive. Check the source, or use copy mode.',
        );
      }

      const tasks: Task[] = [];
      let unplanned = 0;
      /** Files that failed at planning (case conflicts): not among the run's transfers. */
      let unplannedFailures = 0;
      const deletes: Task[] = [];
      for (const dest of this.o.destinations) {
        const scope = { jobId: this.id, destination: dest.id };
        let r: Awaited<ReturnType<SyncJob['planDestination']>>;
        try {
          const unsure = new Map((unsureBefore[dest.id] ?? []).map((w) => [w.path, w]));
          r = await this.planDestination(dest, scope, sources, {
            interrupted,
            adoptPending,
            dryRun,
            // The clock's own reading (startedAt may be a bumped one): the crash cleanup's cutoff.
            runStart: now,
            only: opts.only,
            signal: planSignal,
            unsure,
            opened: dest === first ? opened : undefined,
          });
          // Planning looked up (or adopted, or planned to send) every file the scan covered.
          unsureSettled.set(
            dest.id,
            new Set(opts.only ? [...unsure.keys()].filter((p) => sources.has(p)) : unsure.keys()),
          );
        } catch (e) {
          // One destination that cannot be planned (login refused, unmounted, unreachable) does
          // not hold back the others; it gets nothing this run and the run says why.
          const me = toMedsyncError(e, 'Planning a destination');
          if (me.code === 'E_ABORTED' || planSignal.aborted) throw me;
          addError(me, undefined, dest.id);
          this.log.error('A destination was skipped this run', { jobId: this.id, code: me.code });
          unplanned++;
          continue;
        }
        plan.skipped += r.skipped;
        // A landed file with an unknown outcome that a mirror is to delete stays on the list until
        // its delete is done (a refused, failed or stopped delete is tried by a later run).
        // So does a corrupt copy still in place, until an upload replaces it.
        const badCopies = r.tasks.flatMap((t): UnsureWrite[] =>
          t.badCopy && t.source
            ? [{ path: t.op.path, size: t.source.size, mtimeMs: t.source.mtimeMs, bad: true }]
            : [],
        );
        for (const w of dryRun
          ? []
          : [...r.deletes.flatMap((d) => d.unsure ?? []), ...r.unsureKept, ...badCopies])
          keepUnsure(dest.id, w);
        for (const path of r.caseConflicts) {
          record.filesFailed++;
          unplannedFailures++;
          addError(
            new MedsyncError(
              'E_EXISTS',
              'Another source file has the same name but for letter case, and this destination does not tell them apart (or could not be asked whether it does): rename one of them at the source.',
              { retryable: false, path },
            ),
            path,
            dest.id,
          );
        }
        for (const t of r.tasks) {
          tasks.push(t);
          if (t.op.kind === 'upload') {
            plan.uploads++;
            plan.uploadBytes += t.op.size;
          } else if (t.op.kind === 'move') plan.moves++;
          if (dryRun && plan.ops.length < 100_000) plan.ops.push(t.op);
        }
        if (r.refused) {
          plan.deletesRefused += r.deletes.length;
          addError(
            new MedsyncError(
              'E_SAFETY',
              `Mirror would delete ${r.deletes.length} files at a destination, over the limit of ${r.limit}; no file was deleted. Raise maxDelete (--max-delete) if this is intended.`,
            ),
            undefined,
            dest.id,
          );
        } else {
          for (const d of r.deletes) {
            deletes.push(d);
            plan.deletes++;
            if (dryRun && plan.ops.length < 100_000) plan.ops.push(d.op);
          }
        }
      }
      record.filesSkipped = plan.skipped;
      // Recovery (leftover cleanup, adoption) stays pending until every destination got it.
      // A stop during planning may have cut the leftover cleanup short: keep it pending.
      if (unplanned === 0 && !planSignal.aborted) {
        if (interrupted) await store.settings.delete(recoverKey);
        if (adoptPending) await store.settings.delete(adoptKey);
      }
      const { ops: _ops, ...planSummary } = plan;
      this.safeEmit('plan', { runId, jobId: this.id, plan: planSummary });

      if (!dryRun) {
        progress.filesTotal = tasks.length + deletes.length;
        progress.bytesTotal = plan.uploadBytes;
        const snapshot = (): SyncProgress => {
          const now = this.clock.now();
          const s = progress.samples;
          s.push([now, progress.bytesDone]);
          while (s.length > 2 && now - s[0]![0] > 5000) s.shift();
          const [t0, b0] = s[0]!;
          const rate = now > t0 ? ((progress.bytesDone - b0) * 1000) / (now - t0) : 0;
          const left = progress.bytesTotal - progress.bytesDone;
          return {
            runId,
            jobId: this.id,
            filesDone: progress.filesDone,
            filesFailed: record.filesFailed,
            filesTotal: progress.filesTotal,
            bytesDone: progress.bytesDone,
            bytesTotal: progress.bytesTotal,
            bytesPerSecond: Math.round(rate),
            etaMs: rate > 0 ? Math.round((left / rate) * 1000) : left === 0 ? 0 : undefined,
            elapsedMs: now - startedAt,
          };
        };
        let lastSaved = this.clock.now();
        const tick = () => {
          this.safeEmit('progress', snapshot());
          // Every few seconds the run record shows the counts so far (status of a running job).
          if (this.clock.now() - lastSaved >= 5000) {
            lastSaved = this.clock.now();
            interimSave = interimSave
              .then(() => store.runs.update({ ...record, errors: [...record.errors] }))
              .catch(() => undefined);
          }
          progressTimer = this.clock.setTimeout(tick, 250);
        };
        progressTimer = this.clock.setTimeout(tick, 250);

        const retry = new RetryPolicy(
          trigger === 'schedule' || trigger === 'catch-up'
            ? { retries: 3, initialDelayMs: 5000, multiplier: 1.5, ...this.o.scheduledRetry }
            : { retries: 3, initialDelayMs: 2000, multiplier: 1.5, ...this.o.retry },
          this.clock,
        );
        const bucket = this.o.bwlimit !== undefined ? mkBucket(this.o.bwlimit, this.clock) : undefined;
        const limit = pLimit(this.o.concurrency ?? 4);
        const writer = new ManifestWriter(store, this.clock, this.o.destinations);
        const stopped = () => inner.signal.aborted || !!opts.stopSignal?.aborted || writer.failed;

        // A destination that refused the login fails every file the same way: once one file got
        // such an error, the rest are not attempted (no login storm that
        // locks the account), and are recorded as failed so retryFailed() picks them up.
        const deadDestinations = new Map<string, MedsyncError>();
        const exec = async (
          t: Task,
          staged: (heldBytes: number) => void,
          slot: <R>(fn: () => Promise<R>) => Promise<R>,
        ) => {
          if (stopped()) return;
          const ref = this.ref(t.op.path);
          const mayHaveLanded = () => {
            // Deletes are redone from the manifest (or, for a landed file, see below).
            if (t.op.kind === 'delete' || !t.source) return;
            keepUnsure(t.dest.id, {
              path: t.op.path,
              size: t.source.size,
              mtimeMs: t.source.mtimeMs,
              ...(t.badCopy ? { bad: true } : {}),
            });
          };
          try {
            const dead = deadDestinations.get(t.dest.id);
            if (dead) {
              throw new MedsyncError(
                dead.code,
                `Not attempted: an earlier file at this destination failed with ${dead.code}, which every file would. ${dead.message}`,
                { retryable: false },
              );
            }
            await retry.run(
              async () => {
                throwIfAborted(inner.signal);
                await slot(() =>
                  this.execute(
                    t,
                    inner.signal,
                    bucket,
                    (n) => (progress.bytesDone += n),
                    record,
                    writer,
                    staged,
                  ),
                );
              },
              {
                signal: inner.signal,
                onRetry: (e) => {
                  this.safeEmit('file:retry', {
                    runId,
                    jobId: this.id,
                    destination: t.dest.id,
                    path: ref,
                    attempt: e.attempt,
                    retriesLeft: e.retriesLeft,
                    delayMs: e.delayMs,
                    error: this.eventError(e.error),
                  });
                  this.log.warn('Retrying a file', {
                    jobId: this.id,
                    code: e.error.code,
                    attempt: e.attempt,
                    delayMs: e.delayMs,
                  });
                },
              },
            );
            progress.filesDone++;
            if (t.unsure || t.badCopy) unsureNow.get(t.dest.id)?.delete(t.op.path);
            const action = t.op.kind;
            this.safeEmit('file:done', {
              runId,
              jobId: this.id,
              destination: t.dest.id,
              path: ref,
              action,
              bytes: action === 'upload' ? t.op.size : 0,
            });
          } catch (e) {
            // Whatever a transfer throws once the run is cancelled (a timeout reason, a lost
            // lease) is the cancellation, not a failure of that file.
            if (inner.signal.aborted) {
              mayHaveLanded();
              return;
            }
            const me = toMedsyncError(e, undefined, { path: t.op.path });
            if (t.badCopy) mayHaveLanded();
            // A lost connection or a throttled answer: the destination may have done it. (Not
            // E_INTEGRITY: a copy that failed its checks must never be adopted.)
            if (me.code === 'E_TRANSIENT' || me.code === 'E_RATE_LIMITED') mayHaveLanded();
            if (DESTINATION_FATAL.has(me.code) && !deadDestinations.has(t.dest.id)) {
              deadDestinations.set(t.dest.id, me);
              this.log.error('A destination refused the connection; its other files are not attempted', {
                jobId: this.id,
                code: me.code,
              });
            }
            record.filesFailed++;
            addError(me, t.op.path, t.dest.id);
            this.safeEmit('file:failed', {
              runId,
              jobId: this.id,
              destination: t.dest.id,
              path: ref,
              error: this.eventError(me),
            });
            this.log.warn('A file failed', { jobId: this.id, code: me.code });
          }
        };
        // Feed the pool as it drains, so a run over many files holds few promises at once. A
        // transfer holds its slot until its bytes are written: files that wait to be made durable
        // together (onStaged, see LocalStorage's groupSync) free theirs for the next transfer.
        const pump = async (list: Task[]) => {
          const inFlight = new Set<Promise<void>>();
          let pumpError: unknown;
          let heldBytes = 0;
          let wake: (() => void) | undefined;
          const nudge = () => {
            const w = wake;
            wake = undefined;
            w?.();
          };
          for (const t of list) {
            if (stopped()) break;
            let whole: Promise<void> = Promise.resolve();
            const p: Promise<void> = limit(
              () =>
                new Promise<void>((release) => {
                  let freed = false;
                  let held = 0;
                  const free = () => {
                    if (freed) return;
                    freed = true;
                    release();
                    nudge();
                  };
                  // `bytes`: what the waiting transfer keeps in memory (a small file's buffer).
                  const staged = (bytes: number) => {
                    if (freed || (bytes > 0 && heldBytes > 0 && heldBytes + bytes > MAX_HELD_BYTES)) return;
                    held = bytes;
                    heldBytes += bytes;
                    free();
                  };
                  // Once its slot is freed, a retry of the transfer queues for a slot again.
                  const slot = <R>(fn: () => Promise<R>): Promise<R> => (freed ? limit(fn) : fn());
                  whole = exec(t, staged, slot);
                  const done = () => {
                    heldBytes -= held;
                    held = 0;
                    free();
                  };
                  // A rejection (exec catches every file error; this is a bug or a throwing
                  // logger) still frees the slot, and reaches the run through `p`.
                  whole.then(done, done);
                }),
            )
              .then(() => whole)
              .finally(() => {
                inFlight.delete(p);
                nudge();
              });
            inFlight.add(p);
            // exec records every file's failure itself; a rejection here is a bug (or a logger
            // that throws): kept, and thrown once the transfers in flight have ended.
            p.catch((e: unknown) => (pumpError ??= e));
            while (limit.pendingCount >= limit.concurrency || inFlight.size >= MAX_IN_FLIGHT) {
              await new Promise<void>((r) => (wake = r));
            }
          }
          await Promise.allSettled(inFlight);
          if (pumpError !== undefined) throw pumpError;
        };
        try {
          await pump(tasks);
          // Deletions come last (rclone's --delete-after): a failed upload never costs a delete.
          if (!stopped()) await pump(deletes);
        } finally {
          await writer.flush().catch(async (e: unknown) => {
            // Delivered files, made durable, that the manifest could not record: the next run
            // lists the destination and adopts them instead of sending them again. (After a
            // failed destination flush they are sent again: nothing says they are durable.)
            if (writer.storeFailed) {
              await store.settings.set(adoptKey, true).catch((e2: unknown) =>
                this.log.warn('Marking unrecorded files for adoption failed', {
                  jobId: this.id,
                  error: toMedsyncError(e2).message,
                }),
              );
            }
            throw e;
          });
        }
        if (!stopped()) await this.sweepPartials(inner.signal);
        if (inner.signal.aborted) {
          throw lostLease
            ? new MedsyncError('E_LOCKED', 'The job lease was lost to another instance; the run stopped.')
            : new MedsyncError('E_ABORTED', 'The run was cancelled.');
        }
        this.clock.clearTimeout(progressTimer);
        this.safeEmit('progress', snapshot());
        // Stopped with work left undone: cancelled. A stop that came once every file was done
        // (during the final sweep) leaves the run's own outcome.
        const failedInRun = record.filesFailed - unplannedFailures;
        if (opts.stopSignal?.aborted && progress.filesDone + failedInRun < progress.filesTotal)
          record.status = 'cancelled';
      }
    } catch (e) {
      fatal = toMedsyncError(e, 'Sync run');
      if (fatal.code !== 'E_ABORTED') addError(fatal);
      this.log.error('Sync run failed', { jobId: this.id, code: fatal.code });
    } finally {
      clearInterval(renew);
      this.clock.clearTimeout(progressTimer);
      opts.signal?.removeEventListener('abort', onOuterAbort);
    }

    if (!dryRun) await this.saveUnsure(unsureKey, unsureBefore, unsureSettled, unsureNow);

    const finishedAt = this.clock.now();
    record.finishedAt = finishedAt;
    record.durationMs = finishedAt - startedAt;
    const succeeded = record.filesSynced + record.filesMoved + record.filesDeleted;
    if (fatal?.code === 'E_ABORTED' || (record.status === 'cancelled' && !fatal)) record.status = 'cancelled';
    else if (fatal) record.status = succeeded > 0 ? 'partial' : 'failed';
    else if (record.errorCount === 0) record.status = 'success';
    else record.status = succeeded > 0 ? 'partial' : 'failed';
    try {
      await interimSave;
      await store.runs.update(record);
      await store.audit.append({
        at: finishedAt,
        actor: this.owner,
        action: dryRun ? 'sync.plan' : 'sync.run',
        subject: this.id,
        details: {
          runId,
          status: record.status,
          files: record.filesSynced,
          failed: record.filesFailed,
          deleted: record.filesDeleted,
          bytes: record.bytes,
        },
      });
    } catch (e) {
      this.log.error('Recording the run failed', { jobId: this.id, error: toMedsyncError(e).message });
    } finally {
      await store.locks.release(lockName, this.owner).catch(() => undefined);
    }
    const { ops, ...summary } = plan;
    const result: SyncResult = { ...record, plan: dryRun ? { ...summary, ops } : summary };
    this.safeEmit('run:done', {
      result: this.o.eventPaths
        ? result
        : {
            ...result,
            errors: result.errors.map((e) => (e.path === undefined ? e : { ...e, path: this.ref(e.path) })),
            plan: summary,
          },
    });
    this.log.info('Sync run finished', {
      jobId: this.id,
      runId,
      status: record.status,
      files: record.filesSynced,
      failed: record.filesFailed,
    });
    return result;
  }

  /**
   * Keeps, for the next run, the files whose write had an unknown outcome: this run's, and the
   * earlier ones its planning did not get to (a destination not planned, a retry of other files).
   * Past {@link MAX_UNSURE} paths the next run lists the destinations instead (as after a crash).
   */
  private async saveUnsure(
    key: string,
    before: Record<string, UnsureWrite[]>,
    settled: Map<string, ReadonlySet<string>>,
    now: Map<string, Map<string, UnsureWrite>>,
  ): Promise<void> {
    const next: Record<string, UnsureWrite[]> = {};
    let overflow = false;
    for (const dest of this.o.destinations) {
      const writes = new Map(now.get(dest.id));
      const done = settled.get(dest.id);
      for (const w of before[dest.id] ?? [])
        if (!done?.has(w.path) && !writes.has(w.path)) writes.set(w.path, w);
      if (writes.size === 0) continue;
      if (writes.size > MAX_UNSURE) overflow = true;
      next[dest.id] = [...writes.values()].slice(0, MAX_UNSURE);
    }
    const store = this.o.store;
    try {
      if (overflow) await store.settings.set(this.settingKey('recover'), true);
      if (Object.keys(next).length > 0) await store.settings.set(key, next);
      else if (Object.keys(before).length > 0) await store.settings.delete(key);
    } catch (e) {
      // The files are then sent again by the next run: nothing is lost.
      this.log.warn('Recording the files with an unknown outcome failed', {
        jobId: this.id,
        error: toMedsyncError(e).message,
      });
    }
  }

  /**
   * This job's own keys in the Store's settings: `recover` (an interrupted run's recovery is
   * pending), `adopt` (a run's last manifest records could not be written: the next run adopts
   * from the destination's listing, without the crash cleanup), `unsure` (see {@link saveUnsure}),
   * and per destination `caseChecked` (the manifest's names were checked against its case
   * folding: see planDestination).
   */
  private settingKey(name: 'recover' | 'adopt' | 'unsure'): string;
  private settingKey(name: 'caseChecked', destination: string): string;
  private settingKey(name: string, destination?: string): string {
    return destination === undefined ? `sync:${this.id}:${name}` : `sync:${this.id}:${name}:${destination}`;
  }

  /** Emits without letting a throwing listener change the run's outcome. */
  private safeEmit<K extends keyof SyncJobEvents>(event: K, ...args: Parameters<SyncJobEvents[K]>): void {
    try {
      (this.emit as (e: K, ...a: Parameters<SyncJobEvents[K]>) => boolean)(event, ...args);
    } catch (e) {
      this.log.error('A SyncJob event listener threw', { event, error: toMedsyncError(e).message });
    }
  }

  /** The error as events show it: without the native cause, and with the path as a ref. */
  private eventError(e: MedsyncError): MedsyncError {
    if (this.o.eventPaths) return e;
    return new MedsyncError(e.code, e.message, {
      retryable: e.retryable,
      ...(e.retryAfterMs !== undefined ? { retryAfterMs: e.retryAfterMs } : {}),
      ...(e.adapter ? { adapter: e.adapter } : {}),
      ...(e.path !== undefined ? { path: this.ref(e.path) } : {}),
    });
  }

  private ref(path: string): string {
    return this.o.eventPaths ? path : `ref:${createHash('sha256').update(path).digest('hex').slice(0, 12)}`;
  }

  /** Marks this job's runs left `running` (by a crashed process) as interrupted. */
  private async markInterrupted(): Promise<boolean> {
    const running = await this.o.store.runs.list({ jobId: this.id, status: 'running' });
    for (const r of running) {
      await this.o.store.runs.update({ ...r, status: 'interrupted', finishedAt: this.clock.now() });
    }
    return running.length > 0;
  }

  private async scanSource(
    signal: AbortSignal | undefined,
    only: readonly string[] | undefined,
  ): Promise<Map<string, StorageEntry>> {
    const out = new Map<string, StorageEntry>();
    const onlySet = only ? new Set(only) : undefined;
    try {
      for await (const e of this.o.source.list('', { signal })) {
        if (!this.isIncluded(e.path)) continue;
        if (onlySet && !onlySet.has(e.path)) continue;
        out.set(e.path, e);
      }
    } catch (e) {
      const me = toMedsyncError(e, 'Scanning the source');
      if (me.code === 'E_NOT_FOUND') {
        throw new MedsyncError(
          'E_NOT_FOUND',
          'The source folder does not exist: check the path, and that the share is mounted.',
          { cause: me },
        );
      }
      throw me;
    }
    return out;
  }

  private async planDestination(
    dest: Storage,
    scope: ManifestScope,
    sources: Map<string, StorageEntry>,
    ctx: {
      interrupted: boolean;
      /** Adopt from the listing as after a crash, without its cleanup (see `settingKey`). */
      adoptPending?: boolean;
      dryRun: boolean;
      runStart: number;
      only: readonly string[] | undefined;
      signal: AbortSignal;
      /** Files whose last write here had an unknown outcome, by path (see `saveUnsure`). */
      unsure?: ReadonlyMap<string, UnsureWrite> | undefined;
      /** {@link openDestination}, already started for this destination. */
      opened?: Promise<Map<string, BriefEntry>> | undefined;
    },
  ): Promise<{
    tasks: Task[];
    deletes: Task[];
    skipped: number;
    refused: boolean;
    limit: number;
    caseConflicts: string[];
    unsureKept: UnsureWrite[];
  }> {
    const store = this.o.store;
    const manifest = await (ctx.opened ?? this.openDestination(dest, scope, ctx.signal));

    if (ctx.interrupted && !ctx.dryRun && dest.cleanupPartials) {
      // Temporary files written before this run started are the crashed run's leftovers; those of
      // other writers (another job on the same destination) are fresher. The destination dates
      // them by its own clock: the cutoff is moved to it, less the margin, so a clock running
      // behind ours does not make another writer's files in progress look old.
      const clock = await this.destinationClock(dest, ctx.signal);
      if (clock) {
        // Never later than our own start: some adapters date temporary files by the writer's
        // clock (SFTP's access times), and a destination clock running ahead must not make
        // another writer's finished, not yet renamed file look old.
        const olderThanMs = ctx.runStart + Math.min(0, clock.offsetMs) - clock.slackMs;
        await dest.cleanupPartials('', { olderThanMs, signal: ctx.signal }).catch((e: unknown) =>
          this.log.warn('Removing leftovers of an interrupted run failed', {
            error: toMedsyncError(e).message,
          }),
        );
      }
    }

    // Whether the destination takes names that differ only in case for one file: declared, or
    // asked of it once this planning (a dry run asks nothing: the declaration stands). Undefined:
    // it could not tell.
    const caps = dest.capabilities;
    const mayFold = caps.caseInsensitive || caps.caseInsensitiveVaries === true;
    let asked: Promise<boolean | undefined> | undefined;
    const folds = (): Promise<boolean | undefined> =>
      caps.caseInsensitive
        ? Promise.resolve(true)
        : ctx.dryRun
          ? Promise.resolve(false)
          : (asked ??= this.foldsCase(dest, ctx.signal));

    // Names the manifest holds as delivered that differ only in case, on a destination that folds:
    // one file there stands for all of them, with the bytes of whichever was written last (sent
    // by a version that took the kind's word instead of asking). Its content may be a twin's, so
    // the manifest forgets them: the first name still at the source is sent again (the others
    // fail E_EXISTS as below), and where none is left one name stays recorded, without digests
    // (no move may take it for a file it is not), for the mirror to delete the file once. Nothing
    // is deleted here. Checked once per job and destination (`caseChecked`), on a run over the
    // whole source whose question was answered. (Pairs a later run may still record, such as a
    // case-only rename in copy mode, are guarded at deletion below.)
    const checked = this.settingKey('caseChecked', dest.id);
    /** Names whose recorded content may be a twin's: not adopted, not moved this run. */
    const suspect = new Set<string>();
    if (mayFold && !ctx.only && (await store.settings.get<boolean>(checked)) !== true) {
      const held = manifest.size > 1 ? caseTwins(manifest) : undefined;
      const answer = held?.size ? await folds() : false;
      if (answer) {
        const forget: string[] = [];
        const bare: ManifestEntry[] = [];
        for (const group of held!.values()) {
          const sorted = [...group].sort();
          const stays = sorted.some((p) => sources.has(p)) ? undefined : sorted[0];
          for (const p of sorted) {
            suspect.add(p);
            if (p !== stays) {
              manifest.delete(p);
              forget.push(p);
              continue;
            }
            const full = await store.manifest.get(scope, p);
            if (full) bare.push({ ...full, md5: undefined, sha256: undefined });
          }
        }
        if (!ctx.dryRun) {
          await store.manifest.remove(scope, forget);
          if (bare.length) await store.manifest.put(bare);
        }
        this.log.warn(
          'The job state held names that differ only in letter case as separate files on a destination that folds case: it now keeps one of each, sent again where the source still has it',
          { jobId: this.id, names: suspect.size },
        );
      }
      if (answer !== undefined && !ctx.dryRun) await store.settings.set(checked, true);
    }

    let skipped = 0;
    /** Earlier unknown outcomes this planning could not decide: kept for a later run. */
    const unsureKept: UnsureWrite[] = [];
    const candidates: StorageEntry[] = [];
    const touched: ManifestEntry[] = [];
    for (const s of sources.values()) {
      const m = manifest.get(s.path);
      if (m && m.size === s.size && m.mtimeMs === s.mtimeMs) {
        skipped++;
        continue;
      }
      const full =
        m && m.size === s.size && s.size >= 0 ? await store.manifest.get(scope, s.path) : undefined;
      if (full?.sha256) {
        // Same size, new mtime: hash the source before resending (touch, restore from backup).
        const h = await this.hashSource(s.path, ctx.signal).catch(() => undefined);
        if (h && h.sha256 === full.sha256) {
          skipped++;
          touched.push({ ...full, mtimeMs: s.mtimeMs ?? full.mtimeMs });
          continue;
        }
      }
      candidates.push(s);
    }
    if (touched.length && !ctx.dryRun) await store.manifest.put(touched);

    // A destination that folds case cannot hold two source files whose names differ only in case
    // (`a.dcm`, `A.dcm`): one would overwrite the other there. The one delivered before (else the
    // first in code-point order) is kept; the others fail with E_EXISTS, named in the errors.
    // Where the adapter's `false` is only what its kind usually does (a local folder may be on a
    // FAT drive or a CIFS mount, an FTP server on Windows), the destination itself is asked.
    // Asked only when such names are to be sent (or held by the manifest, or deleted: see there).
    const caseConflicts: string[] = [];
    const sameButCase = candidates.length > 0 && mayFold ? caseTwins(sources) : undefined;
    if (
      sameButCase?.size &&
      candidates.some((c) => sameButCase.has(foldName(c.path))) &&
      (await folds()) !== false
    ) {
      const owner = new Map<string, string>();
      for (const [fold, group] of sameButCase) {
        const sorted = [...group].sort();
        owner.set(fold, sorted.find((p) => manifest.has(p)) ?? sorted[0]!);
      }
      const kept = candidates.filter((c) => {
        const o = owner.get(foldName(c.path));
        if (o === undefined || o === c.path) return true;
        caseConflicts.push(c.path);
        return false;
      });
      candidates.splice(0, candidates.length, ...kept);
    }

    // Files already at the destination that the manifest does not know: adopt them instead of
    // resending. Files whose last write had an unknown outcome (its answer lost with the
    // connection) are looked up one by one; after a crash between rename and record, or when the
    // Store was lost, the destination is listed.
    let toSend = candidates;
    if (!ctx.dryRun) {
      const adoptedPaths = new Set<string>();
      const clock: { measured?: Promise<DestinationClock | null> } = {};
      const unsure = ctx.unsure;
      const maybe = unsure?.size
        ? candidates.filter((s) => unsure.has(s.path) && !unsure.get(s.path)!.bad && !suspect.has(s.path))
        : [];
      if (maybe.length > 0)
        await this.adoptByStat(dest, scope, maybe, ctx.signal, adoptedPaths, clock, (p) => !manifest.has(p));
      const newOnes = candidates.filter(
        (s) =>
          !manifest.has(s.path) &&
          !adoptedPaths.has(s.path) &&
          !unsure?.get(s.path)?.bad &&
          !suspect.has(s.path),
      );
      if (newOnes.length > 0 && (ctx.interrupted || ctx.adoptPending || manifest.size === 0))
        await this.adoptFromListing(dest, scope, newOnes, ctx.signal, { adopted: adoptedPaths, clock });
      if (adoptedPaths.size) {
        skipped += adoptedPaths.size;
        toSend = candidates.filter((s) => !adoptedPaths.has(s.path));
      }
    }

    const deletes: Task[] = [];
    if (this.mode === 'mirror' && !ctx.only) {
      // Entries the scan could not read (size -1: unreadable, a dangling symlink) may stand for a
      // whole folder: nothing below them is deleted.
      const blocked = [...sources.values()].filter((e) => e.size < 0).map((e) => e.path + '/');
      for (const m of manifest.values()) {
        if (blocked.some((b) => m.path.startsWith(b))) continue;
        if (!sources.has(m.path) && this.isIncluded(m.path)) {
          deletes.push({
            dest,
            scope,
            op: { kind: 'delete', destination: dest.id, path: m.path, size: m.size },
          });
        }
      }
      // A file whose write had an unknown outcome and whose source is gone since: if it landed
      // (same size and the source's mtime), the job delivered it and the mirror deletes it; a
      // file there that is not that write (the destination keeps no mtimes to tell) is left.
      // One that cannot be decided now (its folder unreadable at the source, the lookup failed) is
      // kept for a later run. A name that differs only in case from a file the source or the
      // manifest has is left alone: on a destination that folds case it is that file.
      let folded: Set<string> | undefined;
      let lookupFailed = false;
      for (const w of ctx.unsure?.values() ?? []) {
        if (sources.has(w.path) || manifest.has(w.path) || !this.isIncluded(w.path)) continue;
        folded ??= new Set([...sources.keys(), ...manifest.keys()].map(foldName));
        if (folded.has(foldName(w.path)) || w.mtimeMs === undefined) continue;
        // After one failed lookup the rest wait for a later run, untouched.
        if (lookupFailed || blocked.some((b) => w.path.startsWith(b))) {
          unsureKept.push(w);
          continue;
        }
        let d: StorageEntry;
        try {
          d = await dest.stat(w.path, { signal: ctx.signal });
        } catch (e) {
          const me = toMedsyncError(e);
          if (ctx.signal.aborted || DESTINATION_FATAL.has(me.code)) throw me;
          if (me.code === 'E_NOT_FOUND') continue;
          lookupFailed = true;
          const tries = (w.tries ?? 0) + 1;
          if (tries < MAX_UNSURE_TRIES) unsureKept.push({ ...w, tries });
          else
            this.log.warn('Gave up looking up a file whose write had an unknown outcome', { jobId: this.id });
          continue;
        }
        // Read after the lookup: a network adapter learns whether it keeps mtimes on connecting.
        if (d.size !== w.size || sameMtime(dest, d.mtimeMs, w.mtimeMs) !== true) continue;
        deletes.push({
          dest,
          scope,
          unsure: w,
          op: { kind: 'delete', destination: dest.id, path: w.path, size: w.size },
        });
      }
    }

    const tasks: Task[] = [];
    // Moves: a new path whose content equals a file about to be deleted is renamed, not resent.
    if (deletes.length > 0 && (this.o.detectMoves ?? true)) {
      const bySize = new Map<number, Task[]>();
      const shaOf = new Map<string, string>();
      for (const d of deletes) {
        if (suspect.has(d.op.path)) continue;
        const m = await store.manifest.get(scope, d.op.path);
        if (!m?.sha256) continue;
        shaOf.set(d.op.path, m.sha256);
        bySize.set(m.size, [...(bySize.get(m.size) ?? []), d]);
      }
      const remaining: StorageEntry[] = [];
      for (const s of toSend) {
        const pool = manifest.has(s.path) ? undefined : bySize.get(s.size);
        if (!pool?.length) {
          remaining.push(s);
          continue;
        }
        const h = await this.hashSource(s.path, ctx.signal).catch(() => undefined);
        const idx = h ? pool.findIndex((d) => shaOf.get(d.op.path) === h.sha256) : -1;
        if (idx < 0 || !h) {
          remaining.push(s);
          continue;
        }
        const [d] = pool.splice(idx, 1);
        deletes.splice(deletes.indexOf(d!), 1);
        tasks.push({
          dest,
          scope,
          source: { ...s, hashes: { md5: h.md5, sha256: h.sha256 } },
          op: { kind: 'move', destination: dest.id, from: d!.op.path, path: s.path, size: s.size },
        });
      }
      toSend = remaining;
    }
    // Case twins: a delivered file the source lost, whose name differs only in case from a file
    // to send, is renamed to the new spelling by that upload instead of being deleted.
    const twins = new Map<string, Task>();
    if (deletes.length > 0) {
      const byFold = new Map<string, Task>();
      for (const d of deletes) byFold.set(foldName(d.op.path), d);
      for (const src of toSend) {
        const d = manifest.has(src.path) ? undefined : byFold.get(foldName(src.path));
        if (!d) continue;
        byFold.delete(foldName(src.path));
        twins.set(src.path, d);
        deletes.splice(deletes.indexOf(d), 1);
      }
    }
    for (const s of toSend) {
      const twin = twins.get(s.path);
      tasks.push({
        dest,
        scope,
        ...(twin ? { renameFrom: twin.op.path } : {}),
        ...(ctx.unsure?.get(s.path)?.bad ? { badCopy: true } : {}),
        source: s,
        op: {
          kind: 'upload',
          destination: dest.id,
          path: s.path,
          size: s.size,
          reason: manifest.has(s.path) ? 'changed' : 'new',
        },
      });
    }

    // A delete whose name differs only in case from a name that stays (at the source, or recorded
    // and not deleted) may be that name's file, on a destination that folds case: a case-only
    // rename recorded in copy mode, or through a retry of some files, leaves both names in the
    // manifest. There the manifest forgets it and nothing is deleted; where the destination tells
    // them apart the delete goes ahead; where it cannot tell, the delete waits for a later run.
    // Asked only when such a delete is planned.
    if (mayFold && deletes.length > 0) {
      const gone = new Set(deletes.map((d) => d.op.path));
      const byFold = new Map<string, Task[]>();
      for (const d of deletes) {
        const f = foldName(d.op.path);
        const same = byFold.get(f);
        if (same) same.push(d);
        else byFold.set(f, [d]);
      }
      const shared = new Set<Task>();
      for (const names of [sources.keys(), manifest.keys()]) {
        for (const k of names) {
          if (gone.has(k)) continue;
          for (const d of byFold.get(foldName(k)) ?? []) shared.add(d);
        }
      }
      const answer = shared.size > 0 ? await folds() : false;
      if (answer !== false) {
        let kept = 0;
        for (const d of deletes) if (!shared.has(d)) deletes[kept++] = d;
        deletes.length = kept;
        if (answer && !ctx.dryRun) {
          await store.manifest.remove(
            scope,
            [...shared].map((d) => d.op.path),
          );
        }
      }
    }

    const limit = this.o.maxDelete ?? Math.floor(manifest.size / 2);
    const refused = deletes.length > limit;
    return { tasks, deletes, skipped, refused, limit, caseConflicts, unsureKept };
  }

  /**
   * The first look at a destination: what the manifest says the job delivered there (sizes and
   * times are all planning needs of most entries; the rest is read for the few that changed), and
   * the check that those files are still there.
   */
  private async openDestination(
    dest: Storage,
    scope: ManifestScope,
    signal: AbortSignal,
  ): Promise<Map<string, BriefEntry>> {
    const manifest = new Map<string, BriefEntry>();
    for await (const m of this.o.store.manifest.list(scope, { fields: ['size', 'mtimeMs'] }))
      manifest.set(m.path, m);
    if (manifest.size > 0) await this.checkDestinationPresent(dest, manifest, signal);
    return manifest;
  }

  /**
   * A destination that held delivered files and now holds none of a sample of them is most likely
   * an unmounted share (an empty mount point) or a wiped archive: refuse, rather than refill a
   * local folder that the share will hide once it is mounted again.
   */
  private async checkDestinationPresent(
    dest: Storage,
    manifest: Map<string, BriefEntry>,
    signal: AbortSignal,
  ): Promise<void> {
    const all = [...manifest.keys()];
    const sample = [...new Set([all[0]!, all[Math.floor(all.length / 2)]!, all[all.length - 1]!])];
    // One found is enough (over a network, each lookup is a round trip): only a destination
    // missing every sampled file is refused.
    for (const p of sample) {
      try {
        await dest.stat(p, { signal });
        return;
      } catch (e) {
        const me = toMedsyncError(e);
        if (me.code !== 'E_NOT_FOUND') throw me;
      }
    }
    throw new MedsyncError(
      'E_SAFETY',
      'None of the sampled files this job delivered is at the destination: is the share mounted? If the archive was emptied on purpose, clear the job state (or use a new --state) to send everything again.',
    );
  }

  /**
   * Whether `dest` takes names that differ only in letter case for one file, asked of the
   * destination itself: two small probe files whose names differ only in case are written at its
   * root (temporary names, skipped by listings; the daily sweep removes them if left), the first
   * is looked up, and both are removed. It folds case when the second replaced the first.
   * Undefined when it cannot tell (a failed write, or the first no longer found by its name):
   * callers then do what is safe either way (of names that differ only in case only one is sent,
   * none is deleted, nothing is remembered). Refused credentials end the destination's planning,
   * as in its other lookups.
   */
  private async foldsCase(dest: Storage, signal: AbortSignal): Promise<boolean | undefined> {
    const id = randomUUID().slice(0, 8);
    const lower = partialNameFor('medsync-case-probe', id);
    const upper = partialNameFor('MEDSYNC-CASE-PROBE', id.toUpperCase());
    let written = false;
    let code: string;
    try {
      await dest.write(lower, Buffer.from('l'), { size: 1, signal });
      written = true;
      await dest.write(upper, Buffer.from('UU'), { size: 2, signal });
      const first = await dest.stat(lower, { signal }).catch((e: unknown) => {
        if (toMedsyncError(e).code === 'E_NOT_FOUND') return undefined;
        throw e;
      });
      // Two files: it tells them apart. One, holding the second's bytes: it folds.
      if (first?.size === 1) return false;
      if (first?.size === 2) return true;
      code = 'E_TRANSIENT'; // the first no longer found by its name
    } catch (e) {
      code = toMedsyncError(e).code;
      if (signal.aborted || DESTINATION_FATAL.has(code)) throw e;
    } finally {
      // Not after a refused first write (a refused login would be tried once more for nothing).
      if (written) for (const path of [lower, upper]) await dest.remove(path).catch(() => undefined);
    }
    this.log.warn(
      'Could not check whether the destination tells names apart by letter case; of names that differ only in case, only one is sent there this run, and none of them is deleted',
      { jobId: this.id, code },
    );
    return undefined;
  }

  /**
   * How far the destination's clock is from ours, as its listings show it: a small probe file is
   * written at its root (under a temporary name, skipped by listings and swept if left), its
   * time read back, and the file removed. `slackMs` covers the round trip and the precision of
   * the destination's times.
   * Null when the probe cannot be written or shows no time. Used where the destination's times
   * are compared with ours: adoption by write time, and the cleanup after a crash.
   */
  private async destinationClock(
    dest: Storage,
    signal: AbortSignal | undefined,
  ): Promise<DestinationClock | null> {
    const probe = partialNameFor('medsync-clock-probe', randomUUID().slice(0, 8));
    let written = false;
    try {
      const before = this.clock.now();
      await dest.write(probe, Buffer.from('medsync clock probe\n'), { signal });
      written = true;
      const after = this.clock.now();
      const seen = await dest.stat(probe, { signal });
      if (seen.mtimeMs === undefined) return null;
      // Times may be cut to the destination's precision (whole seconds where unknown), the probe's
      // and the compared file's alike: twice that, plus half the round trip.
      const precision = Math.max(1, dest.capabilities.mtimePrecisionMs ?? 1000);
      return {
        offsetMs: seen.mtimeMs - (before + after) / 2,
        slackMs: (after - before) / 2 + 2 * precision,
      };
    } catch (e) {
      if (signal?.aborted) throw e;
      this.log.warn('Could not measure the destination clock; files there without a digest are resent', {
        jobId: this.id,
        code: toMedsyncError(e).code,
      });
      return null;
    } finally {
      // Not after a failed write (a refused login would be tried once more for nothing).
      if (written) await dest.remove(probe).catch(() => undefined);
    }
  }

  private async hashSource(path: string, signal?: AbortSignal): Promise<{ md5: string; sha256: string }> {
    const stream = await this.o.source.read(path, { signal });
    return hashStream(stream);
  }

  /**
   * Whether `d`, found at the destination, is a copy of the source file `s`: same size, and the
   * source's mtime where the destination keeps mtimes; elsewhere the same digest where the
   * destination reports one, or else a copy written after the source last changed (by the
   * destination's clock, corrected by {@link destinationClock}). The digests to record, or false.
   */
  private async isCopy(
    dest: Storage,
    s: StorageEntry,
    d: StorageEntry,
    clock: { measured?: Promise<DestinationClock | null> },
    signal: AbortSignal | undefined,
    byTime = true,
  ): Promise<{ hashes: Partial<Record<HashKind, string>> | undefined } | false> {
    if (s.size !== d.size || s.size < 0) return false;
    // Read per entry: a network adapter learns its capabilities (MFMT…) when it connects.
    const same = sameMtime(dest, d.mtimeMs, s.mtimeMs);
    if (same !== undefined) return same && { hashes: d.hashes };
    if (d.hashes?.sha256 || d.hashes?.md5) {
      // No source mtime there to compare: the destination's digest must match the source's.
      const h = await this.hashSource(s.path, signal).catch(() => undefined);
      const same = d.hashes.sha256
        ? h?.sha256 === d.hashes.sha256.toLowerCase()
        : h?.md5 === d.hashes.md5!.toLowerCase();
      return h && same ? { hashes: h } : false;
    }
    // Size alone does not tell an edited file (a corrected header keeps its size) from a copy:
    // only a copy written after the source last changed is taken; others are resent. The write
    // time is the destination's clock, which may run ahead of ours (or report local time as
    // UTC): it is brought to ours, with a margin, before the comparison.
    if (!byTime || d.mtimeMs === undefined || s.mtimeMs === undefined) return false;
    const c = await (clock.measured ??= this.destinationClock(dest, signal));
    if (!c || d.mtimeMs - c.offsetMs - c.slackMs < s.mtimeMs) return false;
    return { hashes: d.hashes };
  }

  /** The manifest entry of a file adopted from the destination (see {@link isCopy}). */
  private adoptedEntry(
    scope: ManifestScope,
    s: StorageEntry,
    d: StorageEntry,
    hashes: Partial<Record<HashKind, string>> | undefined,
  ): ManifestEntry {
    return {
      ...scope,
      path: s.path,
      size: s.size,
      mtimeMs: s.mtimeMs ?? 0,
      md5: hashes?.md5,
      sha256: hashes?.sha256,
      remoteId: d.remoteId,
      verifiedBy: 'listing',
      deliveredAt: this.clock.now(),
    };
  }

  /**
   * Lists the destination once and records the files there that are copies of the source
   * ({@link isCopy}).
   */
  private async adoptFromListing(
    dest: Storage,
    scope: ManifestScope,
    wanted: StorageEntry[],
    signal: AbortSignal | undefined,
    {
      adopted = new Set<string>(),
      clock = {},
      unlistableIsEmpty = true,
    }: {
      /** Paths adopted so far (skipped), and this call's added. */
      adopted?: Set<string>;
      clock?: { measured?: Promise<DestinationClock | null> };
      /** A destination that refuses to be listed adopts nothing, instead of rejecting. */
      unlistableIsEmpty?: boolean;
    } = {},
  ): Promise<number> {
    const byPath = new Map(wanted.map((s) => [s.path, s]));
    const batch: ManifestEntry[] = [];
    try {
      for await (const d of dest.list('', { signal })) {
        const s = byPath.get(d.path);
        if (!s || adopted.has(s.path)) continue;
        const copy = await this.isCopy(dest, s, d, clock, signal);
        if (!copy) continue;
        batch.push(this.adoptedEntry(scope, s, d, copy.hashes));
        adopted.add(s.path);
        if (batch.length >= 500) await this.o.store.manifest.put(batch.splice(0));
      }
    } catch (e) {
      const me = toMedsyncError(e);
      // A destination this account may write but not list (a drop folder): nothing can be
      // adopted, everything is sent.
      if (me.code === 'E_PERMISSION' && unlistableIsEmpty && !signal?.aborted) {
        this.log.warn('The destination cannot be listed: files already there are sent again', {
          jobId: this.id,
          code: me.code,
        });
      } else if (me.code !== 'E_NOT_FOUND') throw me;
    }
    if (batch.length) await this.o.store.manifest.put(batch);
    return adopted.size;
  }

  /**
   * Looks up each of a few files at the destination and records those that are copies of the
   * source ({@link isCopy}): the files whose last write had an unknown outcome (the connection
   * dropped after the destination may have put the file in place). A file the manifest knows in
   * an older version is taken only on its mtime or digest: an old copy written after the source's
   * mtime (a restored file keeps an old one) must not pass for the new version. The first lookup
   * that fails other than "not there" ends the lookups (the rest are sent again); a refused login
   * fails the planning of this destination, which keeps them for the next run.
   */
  private async adoptByStat(
    dest: Storage,
    scope: ManifestScope,
    wanted: StorageEntry[],
    signal: AbortSignal,
    adopted: Set<string>,
    clock: { measured?: Promise<DestinationClock | null> },
    isNew: (path: string) => boolean,
  ): Promise<void> {
    const batch: ManifestEntry[] = [];
    for (const s of wanted) {
      throwIfAborted(signal);
      let d: StorageEntry;
      try {
        d = await dest.stat(s.path, { signal });
      } catch (e) {
        const me = toMedsyncError(e);
        if (signal.aborted || DESTINATION_FATAL.has(me.code)) throw me;
        if (me.code === 'E_NOT_FOUND') continue;
        break;
      }
      const copy = await this.isCopy(dest, s, d, clock, signal, isNew(s.path));
      if (!copy) continue;
      batch.push(this.adoptedEntry(scope, s, d, copy.hashes));
      adopted.add(s.path);
    }
    if (batch.length) await this.o.store.manifest.put(batch);
  }

  private async execute(
    t: Task,
    signal: AbortSignal,
    bucket: TokenBucket | undefined,
    onBytes: (n: number) => void,
    record: RunRecord,
    writer: ManifestWriter,
    staged?: (heldBytes: number) => void,
  ): Promise<void> {
    const { dest, scope, op } = t;
    const store = this.o.store;
    if (op.kind === 'delete') {
      await dest.remove(op.path, { signal });
      await writer.flush();
      await store.manifest.remove(scope, [op.path]);
      record.filesDeleted++;
      return;
    }
    const src = t.source!;
    if (op.kind === 'move') {
      try {
        await dest.rename(op.from, op.path, { signal });
      } catch (e) {
        const me = toMedsyncError(e);
        if (me.code !== 'E_NOT_FOUND') throw me;
        // The old copy is gone at the destination: forget it and send the file instead.
        await writer.flush();
        await store.manifest.remove(scope, [op.from]);
        return this.execute(
          {
            ...t,
            op: { kind: 'upload', destination: op.destination, path: op.path, size: op.size, reason: 'new' },
          },
          signal,
          bucket,
          onBytes,
          record,
          writer,
          staged,
        );
      }
      await writer.flush();
      const old = await store.manifest.get(scope, op.from);
      await store.manifest.put({
        ...scope,
        path: op.path,
        size: src.size,
        mtimeMs: src.mtimeMs ?? 0,
        md5: src.hashes?.md5 ?? old?.md5,
        sha256: src.hashes?.sha256 ?? old?.sha256,
        remoteId: old?.remoteId,
        verifiedBy: old?.verifiedBy ?? 'size',
        deliveredAt: this.clock.now(),
      });
      await store.manifest.remove(scope, [op.from]);
      record.filesMoved++;
      return;
    }
    if (t.renameFrom !== undefined) {
      // The old spelling first takes the new name (one file where the destination folds case);
      // the upload below then replaces it. Gone already (a retry): nothing to rename.
      try {
        await dest.rename(t.renameFrom, op.path, { signal });
      } catch (e) {
        if (toMedsyncError(e).code !== 'E_NOT_FOUND') throw e;
      }
      await writer.flush();
      await store.manifest.remove(scope, [t.renameFrom]);
    }
    const kinds = this.hashKinds(dest);
    // Passed to every destination: those that keep mtimes set it, and the others may still use it
    // to tell versions of a file apart (the FTP adapter's resumable temporary names).
    const mtime = src.mtimeMs !== undefined ? { mtimeMs: src.mtimeMs } : {};
    // `held`: the bytes the transfer keeps in memory while its file waits to be made durable.
    const onStaged = (held: number) => (staged ? { onStaged: () => staged(held) } : {});
    const sourceError = (e: unknown) => {
      const me = toMedsyncError(e, 'Reading the source file', { path: op.path });
      // A source file that cannot be read will not become readable by retrying.
      return me.code === 'E_TRANSIENT'
        ? me
        : new MedsyncError(me.code, me.message, { cause: me, retryable: false, path: op.path });
    };
    let sent = 0;
    let digests: Digests;
    let written: StorageEntry;
    try {
      // A destination that copies from this source itself (local to local, on worker threads).
      const copied =
        dest.copyFrom && !bucket
          ? await dest.copyFrom(this.o.source, op.path, {
              size: op.size,
              signal,
              hashes: kinds,
              onBytes: (n) => {
                sent += n;
                onBytes(n);
              },
              ...mtime,
              ...onStaged(0),
            })
          : undefined;
      if (copied) {
        written = copied.entry;
        digests = copied.digests;
      } else if (src.size >= 0 && src.size <= this.smallFileBytes && this.o.source.readBuffer) {
        // Small files: one buffer, hashed in one call, written in one call.
        const raw = await this.o.source.readBuffer(op.path, { signal }).catch((e: unknown) => {
          throw sourceError(e);
        });
        if (bucket) await bucket.take(raw.length, signal);
        const hashed = await sharedHashPool().digest(raw, kinds);
        const buf = hashed.buffer;
        const known = hashed.digests;
        digests = known;
        written = await dest.write(op.path, buf, {
          size: buf.length,
          signal,
          expectedHashes: () => known,
          ...mtime,
          ...onStaged(buf.length),
        });
        sent = buf.length;
        onBytes(sent);
      } else {
        const body = await this.o.source.read(op.path, { signal }).catch((e: unknown) => {
          throw sourceError(e);
        });
        // Large files: MD5 and SHA-256 on a worker thread, beside the upload (the main thread
        // often encrypts or frames the same bytes: SFTP, FTPS).
        const hasher = new HashingStream(
          kinds,
          (n) => {
            sent += n;
            onBytes(n);
          },
          bucket,
          signal,
          sharedHashPool().stream(kinds),
        );
        body.on('error', (e) => hasher.destroy(e));
        body.pipe(hasher);
        try {
          written = await dest.write(op.path, hasher, {
            size: op.size,
            signal,
            expectedHashes: () => hasher.result(),
            ...mtime,
            ...onStaged(0),
          });
        } catch (e) {
          if (hasher.writableEnded && hasher.bytes !== op.size) {
            // The whole source was read but its size differs from the scan: it changed while
            // being sent. Retrying now would race the writer again; the next run sends it.
            throw new MedsyncError(
              'E_INTEGRITY',
              'The source file changed while it was being sent; it will be sent by the next run.',
              {
                path: op.path,
                retryable: false,
                cause: e,
              },
            );
          }
          throw e;
        } finally {
          body.destroy();
          // Frees its off-thread hasher when the destination stopped reading early (the
          // digests of a stream that ended are kept).
          hasher.destroy();
        }
        digests = hasher.result();
      }
    } catch (e) {
      onBytes(-sent);
      throw isMedsyncError(e) ? e : toMedsyncError(e, 'Writing to the destination', { path: op.path });
    }
    // A copy in place that fails its checks is removed (as rclone does): it must not stay under
    // the final name looking delivered, to be taken for a copy by a later run's adoption.
    const corrupt = async (message: string): Promise<never> => {
      onBytes(-sent);
      // Not removed (a dropped connection, a cancel): the next runs must not adopt it.
      await dest.remove(op.path, { signal }).catch(() => (t.badCopy = true));
      throw new MedsyncError('E_INTEGRITY', message, { path: op.path });
    };
    if (written.size !== sent)
      await corrupt(`The destination holds ${written.size} bytes, ${sent} were sent.`);
    let verifiedBy: VerifiedBy = 'size';
    for (const kind of ['sha256', 'md5'] as const) {
      const remote = written.hashes?.[kind];
      const local = digests[kind];
      if (!remote || !local) continue;
      if (remote.toLowerCase() !== local)
        await corrupt(`The destination's ${kind} does not match the bytes sent; resending.`);
      if (verifiedBy === 'size') verifiedBy = kind;
    }
    if (this.takeReadBack()) {
      const back = await this.readBack(dest, op.path, digests.sha256!, signal).catch((e: unknown) => {
        onBytes(-sent);
        throw e;
      });
      if (!back)
        await corrupt('The file read back from the destination differs from the bytes sent; resending.');
      verifiedBy = 'readback';
    }
    writer.add({
      ...scope,
      path: op.path,
      size: sent,
      mtimeMs: src.mtimeMs ?? 0,
      md5: digests.md5,
      sha256: digests.sha256,
      remoteId: written.remoteId,
      verifiedBy,
      deliveredAt: this.clock.now(),
    });
    record.filesSynced++;
    record.bytes += sent;
  }

  /**
   * Once a day per destination, removes temporary files older than a day: partial uploads kept
   * for a resume that never came (the file changed or was excluded since). Best effort.
   */
  private async sweepPartials(signal: AbortSignal): Promise<void> {
    const day = 24 * 60 * 60 * 1000;
    const now = this.clock.now();
    for (const dest of this.o.destinations) {
      if (!dest.cleanupPartials) continue;
      const key = `sync:${this.id}:swept:${dest.id}`;
      const last = await this.o.store.settings.get<number>(key);
      if (last !== undefined && now - last < day) continue;
      await this.o.store.settings.set(key, now);
      // The first run only starts the clock: a fresh destination has nothing old to sweep.
      if (last === undefined) continue;
      try {
        const n = await dest.cleanupPartials('', { olderThanMs: now - day, signal });
        if (n > 0) this.log.info('Removed old temporary files', { jobId: this.id, files: n });
      } catch (e) {
        this.log.warn('Removing old temporary files failed', {
          jobId: this.id,
          code: toMedsyncError(e).code,
        });
      }
    }
  }

  private readBackCredit = 0;

  /** True for the files the read-back share picks: exactly `readBack` of them, spread evenly. */
  private takeReadBack(): boolean {
    const share = this.o.readBack ?? 0;
    if (share <= 0) return false;
    this.readBackCredit += share;
    if (this.readBackCredit < 1 - 1e-9) return false;
    this.readBackCredit -= 1;
    return true;
  }

  /** Reads a delivered file back and compares its SHA-256 with the one computed while sending. */
  /** Whether the file at the destination reads back with this SHA-256; rejects if unreadable. */
  private async readBack(dest: Storage, path: string, sha256: string, signal: AbortSignal): Promise<boolean> {
    let got: string;
    try {
      const stream = await dest.read(path, { signal });
      const hash = createHash('sha256');
      for await (const chunk of stream as AsyncIterable<Buffer>) hash.update(chunk);
      got = hash.digest('hex');
    } catch (e) {
      throw toMedsyncError(e, 'Reading the delivered file back', { path });
    }
    return got === sha256;
  }

  /** The job's hashes (default MD5 and SHA-256), plus any the destination reports. */
  private hashKinds(dest: Storage): HashKind[] {
    const kinds = new Set<HashKind>([
      ...(this.o.hashes ?? ['md5', 'sha256']),
      'sha256',
      ...dest.capabilities.hashes,
    ]);
    return [...kinds];
  }

  private get smallFileBytes(): number {
    return this.o.smallFileBytes ?? 8 * 1024 * 1024;
  }
}

/**
 * Buffers manifest records and writes them in batches (one transaction per batch). At most one
 * batch is being written and one waits: records added meanwhile join the waiting batch, so a slow
 * flush (an fsync of the destination, a busy store) makes the batches larger instead of queueing
 * one per few hundred files (which held every waiting record in memory and recorded files ever
 * later). A crash loses at most the records of the batches not yet written; the next run adopts
 * those files from the destination's listing instead of resending them.
 */
class ManifestWriter {
  private pending: ManifestEntry[] = [];
  private timer: unknown;
  private flushing: Promise<void> = Promise.resolve();
  /** The flush that has not started yet: it takes everything pending when it starts. */
  private waiting: Promise<void> | undefined;
  private failure: unknown;

  constructor(
    private readonly store: Store,
    private readonly clock: Clock,
    /** Flushed before each batch is recorded, so a record never outlives its file. */
    private readonly destinations: readonly Storage[],
    private readonly maxBatch = 256,
    private readonly maxDelayMs = 250,
  ) {}

  /** True once a batch could not be written after retries: the run must stop. */
  get failed(): boolean {
    return this.failure !== undefined;
  }

  /** Whether that failure came from the store, after the destinations' flush had succeeded. */
  storeFailed = false;

  add(e: ManifestEntry): void {
    this.pending.push(e);
    if (this.pending.length >= this.maxBatch) {
      if (this.waiting === undefined) void this.flush().catch(() => undefined);
    } else if (this.timer === undefined) {
      this.timer = this.clock.setTimeout(() => void this.flush().catch(() => undefined), this.maxDelayMs);
    }
  }

  /**
   * Makes what the destinations did so far durable, then writes everything pending; rejects if
   * any batch failed.
   */
  flush(): Promise<void> {
    if (this.timer !== undefined) this.clock.clearTimeout(this.timer);
    this.timer = undefined;
    this.waiting ??= this.flushing = this.flushing.then(() => this.writePending());
    return this.waiting.then(() => {
      if (this.failure) {
        const me = toMedsyncError(this.failure, 'Recording delivered files in the state store');
        throw new MedsyncError(me.code, me.message, { cause: me, retryable: false });
      }
    });
  }

  private async writePending(): Promise<void> {
    this.waiting = undefined;
    if (this.failure) return;
    // Taken before the destinations' flush: every record in it is for a file written before, so
    // the flush covers it. Records added during the flush wait for the next one.
    const batch = this.pending;
    this.pending = [];
    /** Records of `batch` written so far. */
    let written = 0;
    let flushed = false;
    // Up to 3 tries for the flush, then for each part.
    for (let attempt = 1; ; attempt++) {
      try {
        if (!flushed) {
          // Even with nothing to record: a move or delete about to be recorded by the caller
          // must be durable at its destination first (a renamed folder entry, for one).
          await Promise.all(this.destinations.map((d) => d.flush?.()));
          flushed = true;
          attempt = 1;
        }
        // A batch that grew during a slow flush goes in parts: a store may write one call in one
        // synchronous transaction, which would hold the event loop (transfers, lease renewals).
        while (written < batch.length) {
          const part = batch.slice(written, written + WRITE_PART);
          await this.store.manifest.put(part);
          written += part.length;
          attempt = 1;
          if (written < batch.length) await new Promise<void>((r) => setImmediate(r));
        }
        return;
      } catch (e) {
        const me = toMedsyncError(e);
        if (!me.retryable || attempt >= 3) {
          // Keep the records for the error; the run stops starting transfers (see `failed`).
          // (concat, not unshift(...): a spread of a large batch overflows the stack.)
          this.pending = batch.slice(written).concat(this.pending);
          this.failure = e;
          this.storeFailed = flushed;
          return;
        }
        await this.clock.sleep(500 * attempt);
      }
    }
  }
}

/** Records per manifest write of a large batch (see `ManifestWriter`). */
const WRITE_PART = 1024;

function mkBucket(rate: number | string, clock: Clock): TokenBucket | undefined {
  const r = parseRate(rate);
  return r ? new TokenBucket(r, clock) : undefined;
}

/** Creates a {@link SyncJob}. */
export function createSyncJob(opts: SyncJobOptions): SyncJob {
  return new SyncJob(opts);
}
