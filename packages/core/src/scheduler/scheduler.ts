import { Cron } from 'croner';
import { EventEmitter } from 'eventemitter3';
import { MedsyncError, toMedsyncError } from '../errors/errors.js';
import type { RunTrigger, Store } from '../store/types.js';
import type { Clock } from '../util/clock.js';
import { systemClock } from '../util/clock.js';
import { acquireLease, makeOwner } from '../util/lease.js';
import { noopLogger, type Logger } from '../util/logger.js';

/** Every N minutes (1 to 1440), or a cron pattern in a time zone. */
export type Schedule = { intervalMinutes: number } | { cron: string; timezone?: string };

/** What a scheduled task receives. */
export interface ScheduledRunContext {
  trigger: RunTrigger;
  /** Hard cancel. */
  signal: AbortSignal;
  /** Graceful stop: finish what is in flight, start nothing new. */
  stopSignal: AbortSignal;
}

export interface ScheduledTask {
  id: string;
  schedule: Schedule;
  /** Default true. */
  enabled?: boolean;
  /**
   * After downtime, run once at start when a run was missed; an interval task that never ran
   * starts at once. Default true.
   */
  catchUp?: boolean;
  run(ctx: ScheduledRunContext): Promise<unknown>;
}

/** A task's state, as `status` reports it. */
export interface ScheduledTaskState {
  id: string;
  enabled: boolean;
  schedule: Schedule;
  lastRunAt?: number | undefined;
  lastFinishedAt?: number | undefined;
  nextRunAt?: number | undefined;
  running: boolean;
}

export interface SchedulerEvents {
  'task:start': (e: { id: string; trigger: RunTrigger }) => void;
  'task:done': (e: { id: string; trigger: RunTrigger; durationMs: number; result: unknown }) => void;
  'task:error': (e: { id: string; trigger: RunTrigger; error: MedsyncError }) => void;
  /** Another instance holds the task's lease; this one skipped the run. */
  'task:skipped': (e: { id: string; reason: 'locked' | 'running' | 'disabled' }) => void;
  stopped: () => void;
}

export interface SchedulerOptions {
  store: Store;
  /** Instance name used for leases. Default hostname:pid:random. */
  owner?: string;
  clock?: Clock;
  logger?: Logger;
  /** Lease length while a task runs. Default 60 s, renewed every third. */
  leaseTtlMs?: number;
}

interface Entry {
  task: ScheduledTask;
  enabled: boolean;
  schedule: Schedule;
  cron?: Cron;
  timer?: unknown;
  nextRunAt?: number;
  lastRunAt?: number;
  lastFinishedAt?: number;
  /** When `enabled` was last chosen (setEnabled, or an explicit flag at add): the latest wins. */
  enabledAt?: number;
  /** A catch-up that found the lease held: tried once more when the lease would have lapsed. */
  catchUpRetryAt?: number;
  catchUpRetried?: boolean;
  running?: Promise<void>;
}

interface Choice {
  enabled: boolean;
  at: number;
}

interface StoredState {
  enabled?: boolean;
  lastRunAt?: number;
  lastFinishedAt?: number;
  schedule?: Schedule;
  configured?: Schedule;
}

const STATE_PREFIX = 'scheduler:';
/**
 * The latest enable/disable choice of a task, in a record of its own that only setEnabled (and
 * an explicit flag at add) writes: instances sharing a Store rewrite the state record often, and
 * would otherwise undo each other's choice.
 */
const CHOICE_SUFFIX = ':enabled';
const MAX_TIMER_MS = 2 ** 31 - 1;

function sameSchedule(a: Schedule, b: Schedule): boolean {
  const key = (s: Schedule) =>
    'intervalMinutes' in s ? `i:${s.intervalMinutes}` : `c:${s.cron}|${s.timezone ?? ''}`;
  return key(a) === key(b);
}

/** Validates a schedule; throws E_CONFIG with what is wrong. */
export function validateSchedule(s: Schedule): void {
  if ('intervalMinutes' in s) {
    if (!Number.isInteger(s.intervalMinutes) || s.intervalMinutes < 1 || s.intervalMinutes > 1440) {
      throw new MedsyncError('E_CONFIG', 'intervalMinutes must be a whole number from 1 to 1440.');
    }
    return;
  }
  try {
    // croner checks the time zone only when it computes a time: compute one now.
    const c = new Cron(s.cron, { paused: true, ...(s.timezone ? { timezone: s.timezone } : {}) });
    c.nextRun();
    c.stop();
  } catch (e) {
    throw new MedsyncError('E_CONFIG', `The cron pattern is invalid: ${(e as Error).message}`, { cause: e });
  }
}

/** The next run time after `from` for a schedule, given the last run. */
export function nextRunTime(s: Schedule, from: number, lastRunAt?: number): number {
  if ('intervalMinutes' in s) {
    const step = s.intervalMinutes * 60_000;
    return lastRunAt === undefined ? from + step : Math.max(from, lastRunAt + step);
  }
  const c = new Cron(s.cron, { paused: true, ...(s.timezone ? { timezone: s.timezone } : {}) });
  const n = c.nextRun(new Date(from));
  c.stop();
  if (!n) throw new MedsyncError('E_CONFIG', 'The cron pattern has no future run.');
  return n.getTime();
}

/**
 * Runs tasks on intervals or cron patterns. Persists enabled flags and last runs in the Store's
 * settings, runs one catch-up after downtime, and with a shared Store lets only one instance run
 * each task (a lease in `locks`). `stop()` lets running tasks finish their files in flight.
 */
export class Scheduler extends EventEmitter<SchedulerEvents> {
  private readonly entries = new Map<string, Entry>();
  private readonly clock: Clock;
  private readonly log: Logger;
  readonly owner: string;
  private started = false;
  private stopping = false;
  private readonly hardStop = new AbortController();
  private readonly softStop = new AbortController();

  constructor(private readonly o: SchedulerOptions) {
    super();
    this.clock = o.clock ?? systemClock;
    this.log = o.logger ?? noopLogger;
    this.owner = o.owner ?? makeOwner();
  }

  /** Adds a task; with the scheduler started, it is planned at once. */
  async add(task: ScheduledTask): Promise<void> {
    if (this.entries.has(task.id))
      throw new MedsyncError('E_CONFIG', `A task with id ${task.id} exists already.`);
    validateSchedule(task.schedule);
    const saved = await this.o.store.settings.get<StoredState>(STATE_PREFIX + task.id);
    const choice = await this.o.store.settings.get<Choice>(STATE_PREFIX + task.id + CHOICE_SUFFIX);
    const entry: Entry = {
      task,
      // An explicit `enabled` (a config file) wins over the stored one; otherwise the last
      // runtime choice (setEnabled) is kept.
      enabled: task.enabled ?? choice?.enabled ?? saved?.enabled ?? true,
      ...(task.enabled === undefined && choice ? { enabledAt: choice.at } : {}),
      // A schedule changed at runtime (setSchedule) is kept across restarts while the code or
      // config file still gives the schedule it gave then; once that changes, it wins.
      schedule:
        saved?.schedule && saved.configured && sameSchedule(saved.configured, task.schedule)
          ? saved.schedule
          : task.schedule,
      ...(saved?.lastRunAt !== undefined ? { lastRunAt: saved.lastRunAt } : {}),
      ...(saved?.lastFinishedAt !== undefined ? { lastFinishedAt: saved.lastFinishedAt } : {}),
    };
    this.entries.set(task.id, entry);
    if (task.enabled !== undefined) await this.choose(entry, task.enabled);
    await this.persist(entry);
    if (this.started) this.plan(entry, true);
  }

  /** Starts timers; runs one catch-up per task whose run was missed while down. */
  start(): void {
    if (this.started) return;
    this.started = true;
    for (const e of this.entries.values()) this.plan(e, true);
  }

  private plan(e: Entry, atStart: boolean): void {
    if (e.timer !== undefined) this.clock.clearTimeout(e.timer);
    e.timer = undefined;
    e.nextRunAt = undefined;
    if (!e.enabled || this.stopping) return;
    const now = this.clock.now();
    let next: number;
    let trigger: RunTrigger = 'schedule';
    if (e.catchUpRetryAt !== undefined) {
      next = e.catchUpRetryAt;
      trigger = 'catch-up';
      e.catchUpRetryAt = undefined;
    } else if (
      atStart &&
      (e.task.catchUp ?? true) &&
      e.lastRunAt === undefined &&
      'intervalMinutes' in e.schedule
    ) {
      // Never ran: an interval job starts at once rather than an interval after start-up.
      next = now;
    } else if (atStart && (e.task.catchUp ?? true) && e.lastRunAt !== undefined) {
      const due = nextRunTime(e.schedule, e.lastRunAt, e.lastRunAt);
      // A run that started and never finished (the process was killed) is redone too.
      const interrupted = e.lastFinishedAt === undefined || e.lastFinishedAt < e.lastRunAt;
      if (due <= now || interrupted) {
        next = now;
        trigger = 'catch-up';
      } else next = due;
    } else if ('intervalMinutes' in e.schedule) {
      next = nextRunTime(e.schedule, now, e.lastRunAt);
    } else next = nextRunTime(e.schedule, now);
    e.nextRunAt = next;
    // Timers cannot wait longer than 2^31-1 ms (about 24.8 days; a monthly cron is longer):
    // wake up early and plan again.
    const wait = Math.max(0, next - now);
    e.timer = this.clock.setTimeout(
      () => (wait > MAX_TIMER_MS ? this.plan(e, false) : void this.fire(e, trigger)),
      Math.min(wait, MAX_TIMER_MS),
    );
    void this.persist(e).catch(() => undefined);
  }

  private async fire(e: Entry, trigger: RunTrigger): Promise<void> {
    e.timer = undefined;
    // Another instance on the same Store may have disabled the task since, or run this slot.
    const slot = e.nextRunAt;
    await this.merge(e).catch(() => undefined);
    if (!e.enabled || this.stopping) return;
    if (trigger === 'schedule' && slot !== undefined && e.lastRunAt !== undefined && e.lastRunAt >= slot) {
      this.emit('task:skipped', { id: e.task.id, reason: 'locked' });
      this.plan(e, false);
      return;
    }
    if (e.running) {
      // A manual run still going: plan again once it ends (planning now could find the slot due
      // again at once, and spin until the run ends).
      this.emit('task:skipped', { id: e.task.id, reason: 'running' });
      void e.running.then(() => this.plan(e, false));
      return;
    }
    await this.execute(e, trigger).catch(() => undefined);
    this.plan(e, false);
  }

  private async execute(e: Entry, trigger: RunTrigger): Promise<unknown> {
    // Marked running before the first await, so stop() always waits for it.
    let done!: () => void;
    e.running = new Promise<void>((r) => (done = r));
    const lock = `schedule:${e.task.id}`;
    const ttl = this.o.leaseTtlMs ?? 60_000;
    let renew: ReturnType<typeof setInterval> | undefined;
    let signal: AbortSignal;
    let stopListening = () => {};
    let held = false;
    const started = this.clock.now();
    try {
      held = await acquireLease(this.o.store.locks, lock, this.owner, ttl, this.clock.now());
      if (!held) {
        // Another instance runs this slot: it counts as run here too, so the next attempt is the
        // next slot (not at once, again and again, until the other run ends, then a second run).
        // A catch-up is tried once more when the lease would have lapsed: the holder may be this
        // task's own crashed run (a restart within the lease's lifetime).
        if (trigger === 'catch-up' && !e.catchUpRetried) {
          e.catchUpRetried = true;
          e.catchUpRetryAt = started + ttl + 1000;
        } else {
          const saved = await this.o.store.settings
            .get<{ lastRunAt?: number }>(STATE_PREFIX + e.task.id)
            .catch(() => undefined);
          e.lastRunAt = Math.max(e.lastRunAt ?? 0, saved?.lastRunAt ?? 0, started);
        }
        this.emit('task:skipped', { id: e.task.id, reason: 'locked' });
        return undefined;
      }
      // The task stops when the scheduler stops hard, or when the lease is lost (another instance
      // took the task over after this one could not renew in time): never two runs at once.
      const cancel = new AbortController();
      const onHardStop = () => cancel.abort(this.hardStop.signal.reason);
      if (this.hardStop.signal.aborted) onHardStop();
      else this.hardStop.signal.addEventListener('abort', onHardStop, { once: true });
      stopListening = () => this.hardStop.signal.removeEventListener('abort', onHardStop);
      signal = cancel.signal;
      renew = setInterval(
        () => {
          this.o.store.locks.renew(lock, this.owner, ttl, this.clock.now()).then(
            (ok) => {
              if (ok || cancel.signal.aborted) return;
              this.log.error('Scheduled task lost its lease to another instance; cancelling it', {
                id: e.task.id,
              });
              cancel.abort(new MedsyncError('E_LOCKED', 'The task lease was lost to another instance.'));
            },
            () => undefined,
          );
        },
        Math.max(1000, Math.floor(ttl / 3)),
      );
      renew.unref?.();
      e.lastRunAt = started;
      await this.persist(e);
      this.emit('task:start', { id: e.task.id, trigger });
      const result = await e.task.run({ trigger, signal, stopSignal: this.softStop.signal });
      this.emit('task:done', { id: e.task.id, trigger, durationMs: this.clock.now() - started, result });
      return result;
    } catch (err) {
      const me = toMedsyncError(err, 'Scheduled task');
      this.log.error('Scheduled task failed', { id: e.task.id, code: me.code });
      this.emit('task:error', { id: e.task.id, trigger, error: me });
      throw me;
    } finally {
      if (renew) clearInterval(renew);
      stopListening();
      if (held) {
        e.lastFinishedAt = this.clock.now();
        await this.persist(e).catch(() => undefined);
        await this.o.store.locks.release(lock, this.owner).catch(() => undefined);
      }
      e.running = undefined;
      done();
    }
  }

  /**
   * Takes in what other instances sharing the Store recorded: later run times, and a later
   * enable/disable choice.
   */
  private async merge(e: Entry): Promise<void> {
    const saved = await this.o.store.settings.get<StoredState>(STATE_PREFIX + e.task.id);
    if (saved?.lastRunAt !== undefined && saved.lastRunAt > (e.lastRunAt ?? -Infinity))
      e.lastRunAt = saved.lastRunAt;
    if (saved?.lastFinishedAt !== undefined && saved.lastFinishedAt > (e.lastFinishedAt ?? -Infinity))
      e.lastFinishedAt = saved.lastFinishedAt;
    const choice = await this.o.store.settings.get<Choice>(STATE_PREFIX + e.task.id + CHOICE_SUFFIX);
    if (choice && choice.at > (e.enabledAt ?? -Infinity)) {
      e.enabled = choice.enabled;
      e.enabledAt = choice.at;
    }
  }

  /** Records an enable/disable choice for every instance sharing the Store. */
  private async choose(e: Entry, enabled: boolean): Promise<void> {
    e.enabled = enabled;
    e.enabledAt = Math.max(this.clock.now(), (e.enabledAt ?? 0) + 1);
    const choice: Choice = { enabled, at: e.enabledAt };
    await this.o.store.settings.set(STATE_PREFIX + e.task.id + CHOICE_SUFFIX, choice);
  }

  private async persist(e: Entry): Promise<void> {
    // Instances sharing a Store share this record: never move its times back, nor undo a later
    // choice made elsewhere.
    await this.merge(e);
    await this.o.store.settings.set(STATE_PREFIX + e.task.id, {
      enabled: e.enabled,
      schedule: e.schedule,
      configured: e.task.schedule,
      ...(e.lastRunAt !== undefined ? { lastRunAt: e.lastRunAt } : {}),
      ...(e.lastFinishedAt !== undefined ? { lastFinishedAt: e.lastFinishedAt } : {}),
      ...(e.nextRunAt !== undefined ? { nextRunAt: e.nextRunAt } : {}),
    });
  }

  private get(id: string): Entry {
    const e = this.entries.get(id);
    if (!e) throw new MedsyncError('E_NOT_FOUND', `No scheduled task with id ${id}.`);
    return e;
  }

  /** Runs a task now (manual trigger), outside its schedule. Rejects with the task's error. */
  async runNow(id: string): Promise<unknown> {
    const e = this.get(id);
    if (e.running) throw new MedsyncError('E_LOCKED', `Task ${id} is running already.`);
    return this.execute(e, 'manual');
  }

  /** Enables or disables a task at runtime; the choice is stored. */
  async setEnabled(id: string, enabled: boolean): Promise<void> {
    const e = this.get(id);
    await this.choose(e, enabled);
    if (this.started) this.plan(e, false);
    await this.persist(e);
    await this.o.store.audit.append({
      at: this.clock.now(),
      actor: this.owner,
      action: enabled ? 'job.enable' : 'job.disable',
      subject: id,
    });
  }

  /** Changes a task's schedule at runtime. */
  async setSchedule(id: string, schedule: Schedule): Promise<void> {
    validateSchedule(schedule);
    const e = this.get(id);
    e.schedule = schedule;
    if (this.started) this.plan(e, false);
    await this.persist(e);
  }

  /** The state of one task, or all. */
  state(id: string): ScheduledTaskState;
  state(): ScheduledTaskState[];
  state(id?: string): ScheduledTaskState | ScheduledTaskState[] {
    const one = (e: Entry): ScheduledTaskState => ({
      id: e.task.id,
      enabled: e.enabled,
      schedule: e.schedule,
      lastRunAt: e.lastRunAt,
      lastFinishedAt: e.lastFinishedAt,
      nextRunAt: e.nextRunAt,
      running: !!e.running,
    });
    return id === undefined ? [...this.entries.values()].map(one) : one(this.get(id));
  }

  /**
   * Stops: no new runs; running tasks finish the files in flight (their stopSignal fires). With
   * `timeoutMs`, tasks still running after it are cancelled hard.
   */
  async stop(opts: { timeoutMs?: number } = {}): Promise<void> {
    this.stopping = true;
    for (const e of this.entries.values()) {
      if (e.timer !== undefined) this.clock.clearTimeout(e.timer);
      e.timer = undefined;
      e.nextRunAt = undefined;
    }
    this.softStop.abort();
    const running = [...this.entries.values()].map((e) => e.running).filter((p): p is Promise<void> => !!p);
    let t: ReturnType<typeof setTimeout> | undefined;
    if (opts.timeoutMs !== undefined && running.length) {
      t = setTimeout(() => this.hardStop.abort(), opts.timeoutMs);
    }
    await Promise.all(running);
    if (t) clearTimeout(t);
    this.emit('stopped');
  }
}

/** Reads a scheduled task's stored state (for status without a running scheduler). */
export async function readScheduleState(
  store: Store,
  id: string,
): Promise<
  | {
      enabled?: boolean;
      schedule?: Schedule;
      lastRunAt?: number;
      lastFinishedAt?: number;
      nextRunAt?: number;
    }
  | undefined
> {
  return store.settings.get(STATE_PREFIX + id);
}
