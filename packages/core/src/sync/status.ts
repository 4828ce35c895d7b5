import type { RunRecord, RunStats, Store } from '../store/types.js';
import { readScheduleState, type Schedule } from '../scheduler/scheduler.js';

/** The status of a job: last run, history, configuration and statistics. */
export interface JobStatus {
  jobId: string;
  lastRun?: RunRecord | undefined;
  history: RunRecord[];
  config: {
    enabled: boolean;
    schedule?: Schedule | undefined;
    /** Interval in minutes when the schedule is an interval. */
    intervalMinutes?: number | undefined;
    lastSyncAt?: number | undefined;
    nextSyncAt?: number | undefined;
  };
  statistics: RunStats & { megabytes: number };
}

/** Reads a job's status from the Store (no running scheduler needed). */
export async function getJobStatus(
  store: Store,
  jobId: string,
  opts: { historyLimit?: number } = {},
): Promise<JobStatus> {
  const history = (await store.runs.list({ jobId, limit: opts.historyLimit ?? 20 })).filter((r) => !r.dryRun);
  const stats = await store.runs.stats(jobId);
  const sched = await readScheduleState(store, jobId);
  const schedule = sched?.schedule;
  return {
    jobId,
    lastRun: history[0],
    history,
    config: {
      enabled: sched?.enabled ?? false,
      schedule,
      intervalMinutes: schedule && 'intervalMinutes' in schedule ? schedule.intervalMinutes : undefined,
      lastSyncAt: history[0]?.startedAt ?? sched?.lastRunAt,
      nextSyncAt: sched?.enabled ? sched.nextRunAt : undefined,
    },
    statistics: { ...stats, megabytes: Math.round((stats.bytes / 1e6) * 100) / 100 },
  };
}

/** Status of every job with runs or a schedule in the Store. */
export async function getAllJobStatus(
  store: Store,
  opts: { historyLimit?: number } = {},
): Promise<JobStatus[]> {
  const ids = new Set(await store.runs.jobIds());
  for (const { key } of await store.settings.list('scheduler:')) ids.add(key.slice('scheduler:'.length));
  const out: JobStatus[] = [];
  for (const id of [...ids].sort()) out.push(await getJobStatus(store, id, opts));
  return out;
}
