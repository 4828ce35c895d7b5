import type { MedsyncError } from '../errors/errors.js';
import type { RunRecord, RunTrigger } from '../store/types.js';

/** One planned operation at one destination. */
export type PlanOp =
  | { kind: 'upload'; destination: string; path: string; size: number; reason: 'new' | 'changed' }
  | { kind: 'move'; destination: string; from: string; path: string; size: number }
  | { kind: 'delete'; destination: string; path: string; size: number };

/** What a run will do (dry run) or did plan. */
export interface SyncPlan {
  uploads: number;
  uploadBytes: number;
  moves: number;
  deletes: number;
  skipped: number;
  /** Deletions the max-delete limit refused. */
  deletesRefused: number;
  /** The operations themselves (kept for dry runs; capped at 100,000). */
  ops: PlanOp[];
}

/** The outcome of a run: its record plus the plan it followed. */
export interface SyncResult extends RunRecord {
  plan: Omit<SyncPlan, 'ops'> & { ops?: PlanOp[] };
}

/** A progress snapshot: honest counts, a rate over the last seconds, and an ETA. */
export interface SyncProgress {
  runId: string;
  jobId: string;
  filesDone: number;
  filesFailed: number;
  filesTotal: number;
  bytesDone: number;
  bytesTotal: number;
  bytesPerSecond: number;
  /** Milliseconds left at the current rate; undefined until a rate is known. */
  etaMs: number | undefined;
  elapsedMs: number;
}

/**
 * Events of a SyncJob. One payload object each. `path` is the file's path only when the job has
 * `eventPaths: true`; otherwise a stable reference (`ref:` + 12 hex of its SHA-256), because
 * paths in PACS folders often carry patient names.
 */
export interface SyncJobEvents {
  'run:start': (e: { runId: string; jobId: string; trigger: RunTrigger; dryRun: boolean }) => void;
  plan: (e: { runId: string; jobId: string; plan: Omit<SyncPlan, 'ops'> }) => void;
  'file:done': (e: {
    runId: string;
    jobId: string;
    destination: string;
    path: string;
    action: 'upload' | 'move' | 'delete' | 'adopt';
    bytes: number;
  }) => void;
  'file:retry': (e: {
    runId: string;
    jobId: string;
    destination: string;
    path: string;
    /** The attempt that failed (1-based). */
    attempt: number;
    /** Attempts still allowed after it: the file gets `attempt + retriesLeft` in all. */
    retriesLeft: number;
    delayMs: number;
    error: MedsyncError;
  }) => void;
  'file:failed': (e: {
    runId: string;
    jobId: string;
    destination: string;
    path: string;
    error: MedsyncError;
  }) => void;
  progress: (e: SyncProgress) => void;
  warning: (e: { runId: string; jobId: string; code: string; message: string }) => void;
  'run:done': (e: { result: SyncResult }) => void;
}
