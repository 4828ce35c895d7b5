import type { RunRecord, RunStats } from './types.js';

/** Zeroed statistics. */
export function emptyStats(): RunStats {
  return {
    totalRuns: 0,
    success: 0,
    partial: 0,
    failed: 0,
    cancelled: 0,
    interrupted: 0,
    filesSynced: 0,
    filesFailed: 0,
    filesDeleted: 0,
    bytes: 0,
  };
}

/** Adds one run to running statistics (used by stores that aggregate in code). */
export function addToStats(s: RunStats, r: RunRecord): void {
  if (r.dryRun) return;
  s.totalRuns++;
  if (
    r.status === 'success' ||
    r.status === 'partial' ||
    r.status === 'failed' ||
    r.status === 'cancelled' ||
    r.status === 'interrupted'
  ) {
    s[r.status]++;
  }
  s.filesSynced += r.filesSynced;
  s.filesFailed += r.filesFailed;
  s.filesDeleted += r.filesDeleted;
  s.bytes += r.bytes;
  if (s.lastRunAt === undefined || r.startedAt > s.lastRunAt) s.lastRunAt = r.startedAt;
  if (r.status === 'success' && (s.lastSuccessAt === undefined || r.startedAt > s.lastSuccessAt))
    s.lastSuccessAt = r.startedAt;
}
