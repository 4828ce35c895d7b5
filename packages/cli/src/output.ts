import type { JobStatus, SyncProgress, SyncResult } from '@medsync/core';

/** Where the CLI writes: injectable for tests. */
export interface CliIO {
  stdout: NodeJS.WritableStream & { isTTY?: boolean };
  stderr: NodeJS.WritableStream & { isTTY?: boolean; columns?: number };
  env: NodeJS.ProcessEnv;
  cwd: string;
}

/** Exit codes: 0 success, 3 partial, 1 failed, 2 usage or configuration error, 130 cancelled. */
export const EXIT = { success: 0, failed: 1, usage: 2, partial: 3, cancelled: 130 } as const;

export function exitCodeFor(status: string): number {
  switch (status) {
    case 'success':
      return EXIT.success;
    case 'partial':
      return EXIT.partial;
    case 'cancelled':
      return EXIT.cancelled;
    default:
      return EXIT.failed;
  }
}

/** Human sizes in binary units. */
export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${i === 0 ? v : v.toFixed(1)} ${units[i]}`;
}

export function formatDuration(ms: number | undefined): string {
  if (ms === undefined) return '?';
  if (ms < 1000) return `${ms} ms`;
  const s = Math.round(ms / 1000);
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m${String(s % 60).padStart(2, '0')}s`;
  return `${Math.floor(m / 60)}h${String(m % 60).padStart(2, '0')}m`;
}

/** The `--json` object of `medsync sync`; `retries`: failed attempts that were tried again. */
export function syncJson(r: SyncResult, retries = 0): Record<string, unknown> {
  return {
    status: r.status,
    jobId: r.jobId,
    runId: r.id,
    dryRun: r.dryRun,
    filesSynced: r.filesSynced,
    filesSkipped: r.filesSkipped,
    filesFailed: r.filesFailed,
    filesDeleted: r.filesDeleted,
    filesMoved: r.filesMoved,
    bytes: r.bytes,
    durationMs: r.durationMs ?? 0,
    errors: r.errors.map((e) => ({ path: e.path ?? null, code: e.code, message: e.message })),
    errorCount: r.errorCount,
    retries,
    ...(r.dryRun ? { plan: r.plan } : {}),
  };
}

/** A one-line progress bar on a TTY (stderr), redrawn in place. */
export class ProgressLine {
  private last = 0;
  constructor(private readonly out: CliIO['stderr']) {}

  update(p: SyncProgress): void {
    const now = Date.now();
    if (now - this.last < 100) return;
    this.last = now;
    const width = Math.max(10, Math.min(30, (this.out.columns ?? 80) - 60));
    const frac =
      p.bytesTotal > 0 ? p.bytesDone / p.bytesTotal : p.filesTotal > 0 ? p.filesDone / p.filesTotal : 1;
    const filled = Math.round(Math.min(1, Math.max(0, frac)) * width);
    const bar = '█'.repeat(filled) + '░'.repeat(width - filled);
    const eta = p.etaMs === undefined ? '--' : formatDuration(p.etaMs);
    const line = `${bar} ${(frac * 100).toFixed(0).padStart(3)}%  ${p.filesDone}/${p.filesTotal} files  ${formatBytes(p.bytesDone)}  ${formatBytes(p.bytesPerSecond)}/s  ETA ${eta}`;
    this.out.write(`\r${line}\x1b[K`);
  }

  done(): void {
    if (this.last) this.out.write('\r\x1b[K');
  }

  /** Clears the line for a message; the next update draws it again at once. */
  clear(): void {
    this.done();
    this.last = 0;
  }
}

/**
 * The stderr line of `medsync sync` for a failed attempt that will be tried again, so a run slowed
 * by retries says why as it happens. Without the file's path, as in the logs (paths may name
 * patients); a file that fails for good is listed with its path in the summary.
 */
export function retryText(e: {
  attempt: number;
  retriesLeft: number;
  delayMs: number;
  error: { code: string; message: string };
}): string {
  const wait = e.delayMs >= 1000 ? `${(e.delayMs / 1000).toFixed(1)} s` : `${Math.round(e.delayMs)} ms`;
  return `medsync: retrying a file in ${wait} (attempt ${e.attempt} of ${e.attempt + e.retriesLeft} failed: ${e.error.code}: ${e.error.message})\n`;
}

/** Text summary of a sync run. */
export function syncText(r: SyncResult, retries = 0): string {
  const lines: string[] = [];
  if (r.dryRun) {
    lines.push(`Dry run: nothing was written.`);
    for (const op of r.plan.ops ?? []) {
      if (op.kind === 'upload') lines.push(`  upload  ${op.path}  (${formatBytes(op.size)}, ${op.reason})`);
      else if (op.kind === 'move') lines.push(`  move    ${op.from} -> ${op.path}`);
      else lines.push(`  delete  ${op.path}`);
    }
    lines.push(
      `Plan: ${r.plan.uploads} to upload (${formatBytes(r.plan.uploadBytes)}), ${r.plan.moves} to move, ${r.plan.deletes} to delete, ${r.plan.skipped} unchanged.`,
    );
  } else {
    lines.push(
      `${r.status.toUpperCase()}: ${r.filesSynced} synced (${formatBytes(r.bytes)}), ${r.filesSkipped} unchanged, ${r.filesMoved} moved, ${r.filesDeleted} deleted, ${r.filesFailed} failed in ${formatDuration(r.durationMs)}${retries > 0 ? ` (${retries} ${retries === 1 ? 'retry' : 'retries'})` : ''}.`,
    );
  }
  for (const e of r.errors.slice(0, 50)) lines.push(`  ${e.code}  ${e.path ?? '(run)'}: ${e.message}`);
  if (r.errorCount > 50) lines.push(`  … and ${r.errorCount - 50} more errors (see --json).`);
  return lines.join('\n') + '\n';
}

/** Text form of job statuses. */
export function statusText(all: JobStatus[]): string {
  if (!all.length) return 'No jobs have run with this state file yet.\n';
  const out: string[] = [];
  const when = (t: number | undefined) => (t === undefined ? 'never' : new Date(t).toISOString());
  for (const s of all) {
    out.push(`Job ${s.jobId}`);
    const sched = s.config.schedule
      ? 'intervalMinutes' in s.config.schedule
        ? `every ${s.config.schedule.intervalMinutes} min`
        : `cron ${s.config.schedule.cron}${s.config.schedule.timezone ? ` (${s.config.schedule.timezone})` : ''}`
      : 'manual only';
    out.push(
      s.config.schedule
        ? `  schedule: ${sched}, ${s.config.enabled ? 'enabled' : 'disabled'}; last sync ${when(s.config.lastSyncAt)}; next ${when(s.config.nextSyncAt)}`
        : `  schedule: none (manual runs); last sync ${when(s.config.lastSyncAt)}`,
    );
    if (s.lastRun) {
      const r = s.lastRun;
      out.push(
        `  last run: ${r.status} at ${when(r.startedAt)}: ${r.filesSynced} synced, ${r.filesFailed} failed, ${r.filesDeleted} deleted, ${formatBytes(r.bytes)} in ${formatDuration(r.durationMs)}`,
      );
    }
    const st = s.statistics;
    out.push(
      `  statistics: ${st.totalRuns} syncs (${st.success} successful, ${st.partial} partial, ${st.failed} failed), ${st.filesSynced} files, ${st.megabytes} MB`,
    );
  }
  return out.join('\n') + '\n';
}
