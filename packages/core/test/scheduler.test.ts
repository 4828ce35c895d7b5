import { describe, expect, it } from 'vitest';
import {
  MemoryStore,
  nextRunTime,
  Scheduler,
  validateSchedule,
  type ScheduledRunContext,
} from '@medsync/core';
import { FakeClock } from '@medsync/core/testing';

const MIN = 60_000;

function counter() {
  const runs: ScheduledRunContext[] = [];
  return { runs, run: async (ctx: ScheduledRunContext) => void runs.push(ctx) };
}

describe('Scheduler', () => {
  it('runs every N minutes and reports last and next run', async () => {
    const clock = new FakeClock();
    const store = new MemoryStore();
    const s = new Scheduler({ store, clock });
    const c = counter();
    await s.add({ id: 'job', schedule: { intervalMinutes: 120 }, run: c.run, catchUp: false });
    s.start();
    const t0 = clock.now();
    expect(s.state('job').nextRunAt).toBe(t0 + 120 * MIN);
    await clock.advance(119 * MIN);
    expect(c.runs).toHaveLength(0);
    await clock.advance(1 * MIN);
    expect(c.runs).toHaveLength(1);
    expect(c.runs[0]!.trigger).toBe('schedule');
    expect(s.state('job')).toMatchObject({ lastRunAt: t0 + 120 * MIN, nextRunAt: t0 + 240 * MIN });
    await clock.advance(240 * MIN);
    expect(c.runs).toHaveLength(3);
    await s.stop();
  });

  it('an interval job that never ran starts at once, then every N minutes', async () => {
    const clock = new FakeClock();
    const s = new Scheduler({ store: new MemoryStore(), clock });
    const c = counter();
    await s.add({ id: 'job', schedule: { intervalMinutes: 120 }, run: c.run });
    s.start();
    await clock.advance(0);
    expect(c.runs).toHaveLength(1);
    await clock.advance(120 * MIN);
    expect(c.runs).toHaveLength(2);
    await s.stop();
  });

  it('enable/disable at runtime is stored and stops runs', async () => {
    const clock = new FakeClock();
    const store = new MemoryStore();
    const s = new Scheduler({ store, clock });
    const c = counter();
    await s.add({ id: 'job', schedule: { intervalMinutes: 1 }, run: c.run, catchUp: false });
    s.start();
    await clock.advance(MIN);
    expect(c.runs).toHaveLength(1);
    await s.setEnabled('job', false);
    expect(s.state('job').nextRunAt).toBeUndefined();
    await clock.advance(10 * MIN);
    expect(c.runs).toHaveLength(1);
    expect((await store.settings.get<{ enabled: boolean }>('scheduler:job'))?.enabled).toBe(false);
    expect((await store.audit.list({ action: 'job.disable' })).length).toBe(1);
    // a new instance on the same store keeps the choice
    const s2 = new Scheduler({ store, clock });
    await s2.add({ id: 'job', schedule: { intervalMinutes: 1 }, run: c.run });
    expect(s2.state('job').enabled).toBe(false);
    await s.setEnabled('job', true);
    // the run is overdue, so it starts at once
    await clock.advance(0);
    expect(c.runs).toHaveLength(2);
    await s.setSchedule('job', { intervalMinutes: 30 });
    await clock.advance(29 * MIN);
    expect(c.runs).toHaveLength(2);
    await clock.advance(MIN);
    expect(c.runs).toHaveLength(3);
    await s.stop();
    await s2.stop();
    // The runtime schedule survives a restart while the code still gives the same one…
    const s3 = new Scheduler({ store, clock });
    await s3.add({ id: 'job', schedule: { intervalMinutes: 1 }, run: c.run });
    expect(s3.state('job').schedule).toEqual({ intervalMinutes: 30 });
    // …and a new schedule in the code (an edited config file) wins.
    const s4 = new Scheduler({ store, clock });
    await s4.add({ id: 'job', schedule: { cron: '0 3 * * *' }, run: c.run });
    expect(s4.state('job').schedule).toEqual({ cron: '0 3 * * *' });
  });

  it('runs one catch-up after downtime, not one per missed slot', async () => {
    const clock = new FakeClock();
    const store = new MemoryStore();
    const c = counter();
    const s1 = new Scheduler({ store, clock });
    await s1.add({ id: 'job', schedule: { intervalMinutes: 60 }, run: c.run, catchUp: false });
    s1.start();
    await clock.advance(60 * MIN);
    expect(c.runs).toHaveLength(1);
    await s1.stop();
    await clock.advance(10 * 60 * MIN); // down for ten hours
    const s2 = new Scheduler({ store, clock });
    await s2.add({ id: 'job', schedule: { intervalMinutes: 60 }, run: c.run });
    s2.start();
    await clock.advance(1);
    expect(c.runs).toHaveLength(2);
    expect(c.runs[1]!.trigger).toBe('catch-up');
    await clock.advance(59 * MIN);
    expect(c.runs).toHaveLength(2);
    await clock.advance(MIN);
    expect(c.runs).toHaveLength(3);
    await s2.stop();
  });

  it('with a shared store only one instance runs a job', async () => {
    const clock = new FakeClock();
    const store = new MemoryStore();
    let running = 0;
    let maxRunning = 0;
    let total = 0;
    const run = async () => {
      running++;
      total++;
      maxRunning = Math.max(maxRunning, running);
      await clock.sleep(5 * MIN);
      running--;
    };
    const a = new Scheduler({ store, clock, owner: 'A' });
    const b = new Scheduler({ store, clock, owner: 'B' });
    const skipped: string[] = [];
    b.on('task:skipped', (e) => skipped.push(e.reason));
    a.on('task:skipped', (e) => skipped.push(e.reason));
    await a.add({ id: 'job', schedule: { intervalMinutes: 10 }, run, catchUp: false });
    await b.add({ id: 'job', schedule: { intervalMinutes: 10 }, run, catchUp: false });
    a.start();
    b.start();
    await clock.advance(10 * MIN);
    await clock.advance(5 * MIN);
    expect(total).toBe(1);
    expect(maxRunning).toBe(1);
    expect(skipped).toEqual(['locked']);
    await a.stop();
    await b.stop();
  });

  it('an instance that finds the job running elsewhere waits for the next slot: no spinning, no second run', async () => {
    const clock = new FakeClock();
    const store = new MemoryStore();
    const starts: Array<[string, number]> = [];
    let running = 0;
    let maxRunning = 0;
    const run = (who: string) => async () => {
      starts.push([who, clock.now()]);
      maxRunning = Math.max(maxRunning, ++running);
      await clock.sleep(5 * MIN);
      running--;
    };
    const a = new Scheduler({ store, clock, owner: 'A' });
    const b = new Scheduler({ store, clock, owner: 'B' });
    let skips = 0;
    for (const s of [a, b]) s.on('task:skipped', () => skips++);
    await a.add({ id: 'job', schedule: { intervalMinutes: 10 }, run: run('A'), catchUp: false });
    await b.add({ id: 'job', schedule: { intervalMinutes: 10 }, run: run('B'), catchUp: false });
    a.start();
    b.start();
    // Five slots, each run 5 minutes long, with both instances knowing the last run.
    for (let i = 0; i < 5; i++) await clock.advance(10 * MIN);
    expect(maxRunning).toBe(1);
    expect(starts).toHaveLength(5);
    // One run per slot, ten minutes apart, whichever instance ran it.
    const at = starts.map(([, t]) => t);
    for (let i = 1; i < at.length; i++) expect(at[i]! - at[i - 1]!).toBe(10 * MIN);
    expect(skips).toBeLessThanOrEqual(5);
    await clock.advance(5 * MIN); // the last run ends
    await a.stop();
    await b.stop();
  });

  it('a slot that comes during a long manual run waits for it, then plans the next', async () => {
    const clock = new FakeClock();
    const s = new Scheduler({ store: new MemoryStore(), clock });
    const triggers: string[] = [];
    let skips = 0;
    s.on('task:skipped', () => skips++);
    await s.add({
      id: 'job',
      schedule: { intervalMinutes: 1 },
      catchUp: false,
      run: async (ctx) => {
        triggers.push(ctx.trigger);
        if (ctx.trigger === 'manual') await clock.sleep(3 * MIN);
      },
    });
    s.start();
    const manual = s.runNow('job');
    await clock.advance(3 * MIN);
    await manual;
    // The slot due at 1 min was skipped once and runs when the manual run ends, then every minute.
    expect(skips).toBe(1);
    expect(triggers).toEqual(['manual', 'schedule']);
    await clock.advance(MIN);
    expect(triggers).toEqual(['manual', 'schedule', 'schedule']);
    expect(skips).toBe(1);
    await s.stop();
  });

  it('a run cut short by a crash is redone at start-up (catch-up), even before its next slot', async () => {
    const clock = new FakeClock(Date.UTC(2026, 0, 1, 2, 10));
    const store = new MemoryStore();
    // The 02:00 run started and the process died at 02:05: no finish recorded.
    await store.settings.set('scheduler:job', {
      enabled: true,
      schedule: { cron: '0 2 * * *' },
      lastRunAt: Date.UTC(2026, 0, 1, 2, 0),
      lastFinishedAt: Date.UTC(2025, 11, 31, 2, 40),
    });
    const c = counter();
    const s = new Scheduler({ store, clock });
    await s.add({ id: 'job', schedule: { cron: '0 2 * * *' }, run: c.run });
    s.start();
    await clock.advance(1);
    expect(c.runs.map((r) => r.trigger)).toEqual(['catch-up']);
    // A finished run is not redone.
    await s.stop();
    const s2 = new Scheduler({ store, clock });
    await s2.add({ id: 'job', schedule: { cron: '0 2 * * *' }, run: c.run });
    s2.start();
    await clock.advance(MIN);
    expect(c.runs).toHaveLength(1);
    await s2.stop();
  });

  it('a restart within the lease of its own crashed run catches up once the lease lapses', async () => {
    const clock = new FakeClock(Date.UTC(2026, 0, 1, 2, 1));
    const store = new MemoryStore();
    // The 02:00 run of the crashed process: started, never finished, its lease still alive.
    await store.settings.set('scheduler:job', {
      enabled: true,
      schedule: { cron: '0 2 * * *' },
      configured: { cron: '0 2 * * *' },
      lastRunAt: Date.UTC(2026, 0, 1, 2, 0),
      lastFinishedAt: Date.UTC(2025, 11, 31, 2, 30),
    });
    expect(await store.locks.acquire('schedule:job', 'crashed-pid', 60_000, clock.now())).toBe(true);
    const c = counter();
    const s = new Scheduler({ store, clock, leaseTtlMs: 60_000 });
    const skipped: string[] = [];
    s.on('task:skipped', (e) => skipped.push(e.reason));
    await s.add({ id: 'job', schedule: { cron: '0 2 * * *' }, run: c.run });
    s.start();
    await clock.advance(1);
    expect(skipped).toEqual(['locked']);
    expect(c.runs).toHaveLength(0);
    await clock.advance(62_000);
    expect(c.runs.map((r) => r.trigger)).toEqual(['catch-up']);
    await s.stop();
  });

  it('a task disabled on one instance stops running on the others sharing the Store', async () => {
    const clock = new FakeClock();
    const store = new MemoryStore();
    const c = counter();
    const a = new Scheduler({ store, clock, owner: 'A' });
    const b = new Scheduler({ store, clock, owner: 'B' });
    await a.add({ id: 'job', schedule: { intervalMinutes: 10 }, run: c.run, catchUp: false });
    await b.add({ id: 'job', schedule: { intervalMinutes: 10 }, run: c.run, catchUp: false });
    a.start();
    b.start();
    await clock.advance(10 * MIN);
    expect(c.runs).toHaveLength(1);
    await a.setEnabled('job', false);
    await clock.advance(60 * MIN);
    expect(c.runs).toHaveLength(1);
    expect(b.state('job').enabled).toBe(false);
    expect((await store.settings.get<{ enabled: boolean }>('scheduler:job'))?.enabled).toBe(false);
    await a.stop();
    await b.stop();
  });

  it('a task whose lease is taken over by another instance is cancelled (never two runs at once)', async () => {
    const store = new MemoryStore();
    const s = new Scheduler({ store, clock: new FakeClock(), owner: 'A', leaseTtlMs: 3000 });
    let reason: unknown;
    let started!: () => void;
    const running = new Promise<void>((r) => (started = r));
    await s.add({
      id: 'job',
      schedule: { intervalMinutes: 60 },
      run: async (ctx) => {
        started();
        await new Promise<void>((r) => ctx.signal.addEventListener('abort', () => r(), { once: true }));
        reason = ctx.signal.reason;
      },
    });
    const done = s.runNow('job');
    await running;
    // A stalled instance: its lease lapsed and another took the task over.
    await store.locks.release('schedule:job', 'A');
    expect(await store.locks.acquire('schedule:job', 'B', 60_000)).toBe(true);
    await done;
    expect(reason).toMatchObject({ code: 'E_LOCKED' });
    await s.stop();
  }, 10_000);

  it('stop() lets the running task finish its files in flight', async () => {
    const clock = new FakeClock();
    const s = new Scheduler({ store: new MemoryStore(), clock });
    let sawStop = false;
    let finished = false;
    await s.add({
      id: 'job',
      schedule: { intervalMinutes: 1 },
      catchUp: false,
      run: async (ctx) => {
        await new Promise<void>((r) => ctx.stopSignal.addEventListener('abort', () => r(), { once: true }));
        sawStop = true;
        await new Promise((r) => setTimeout(r, 20));
        finished = true;
      },
    });
    s.start();
    await clock.advance(MIN);
    expect(s.state('job').running).toBe(true);
    await s.stop();
    expect(sawStop).toBe(true);
    expect(finished).toBe(true);
    expect(s.state('job').running).toBe(false);
  });

  it('cron schedules honour time zones; bad schedules are E_CONFIG', async () => {
    const from = Date.UTC(2026, 2, 28, 12, 0); // the day before the EU DST change
    const next = nextRunTime({ cron: '0 2 * * *', timezone: 'Europe/Berlin' }, from);
    expect(new Date(next).toISOString()).toBe('2026-03-29T01:00:00.000Z');
    const after = nextRunTime({ cron: '0 2 * * *', timezone: 'Europe/Berlin' }, next + 1000);
    expect(new Date(after).toISOString()).toBe('2026-03-30T00:00:00.000Z');
    expect(() => validateSchedule({ intervalMinutes: 0 })).toThrow(
      expect.objectContaining({ code: 'E_CONFIG' }),
    );
    expect(() => validateSchedule({ intervalMinutes: 1441 })).toThrow(
      expect.objectContaining({ code: 'E_CONFIG' }),
    );
    expect(() => validateSchedule({ cron: '0 2 * * *', timezone: 'Europe/Atlantis' })).toThrow(
      expect.objectContaining({ code: 'E_CONFIG' }),
    );
    const tzs = new Scheduler({ store: new MemoryStore(), clock: new FakeClock() });
    await expect(
      tzs.add({ id: 'tz', schedule: { cron: '0 2 * * *', timezone: 'Mars/Olympus' }, run: async () => {} }),
    ).rejects.toMatchObject({ code: 'E_CONFIG' });
    expect(tzs.state()).toEqual([]);
    expect(() => validateSchedule({ cron: 'not a cron' })).toThrow(
      expect.objectContaining({ code: 'E_CONFIG' }),
    );
    const clock = new FakeClock(from);
    const s = new Scheduler({ store: new MemoryStore(), clock });
    const c = counter();
    await s.add({ id: 'nightly', schedule: { cron: '0 2 * * *', timezone: 'Europe/Berlin' }, run: c.run });
    s.start();
    expect(s.state('nightly').nextRunAt).toBe(next);
    await clock.advance(next - from);
    expect(c.runs).toHaveLength(1);
    await s.stop();
  });

  it('a monthly cron runs once a month (waits longer than a timer can)', async () => {
    const clock = new FakeClock(Date.UTC(2026, 0, 15));
    const s = new Scheduler({ store: new MemoryStore(), clock });
    const c = counter();
    await s.add({ id: 'monthly', schedule: { cron: '0 2 1 * *', timezone: 'UTC' }, run: c.run });
    s.start();
    await clock.advance(20 * 24 * 60 * MIN);
    expect(c.runs).toHaveLength(1);
    await clock.advance(45 * 24 * 60 * MIN); // to March 21: Feb 1 and Mar 1
    expect(c.runs).toHaveLength(2);
    await clock.advance(12 * 24 * 60 * MIN); // to April 2
    expect(c.runs).toHaveLength(3);
    await s.stop();
  });

  it('an explicit enabled flag (a config file) wins over the stored choice', async () => {
    const store = new MemoryStore();
    const clock = new FakeClock();
    const s1 = new Scheduler({ store, clock });
    await s1.add({ id: 'job', schedule: { intervalMinutes: 5 }, run: async () => undefined });
    await s1.setEnabled('job', false);
    const s2 = new Scheduler({ store, clock });
    await s2.add({ id: 'job', schedule: { intervalMinutes: 5 }, enabled: true, run: async () => undefined });
    expect(s2.state('job').enabled).toBe(true);
    const s3 = new Scheduler({ store, clock });
    await s3.add({ id: 'job', schedule: { intervalMinutes: 5 }, enabled: false, run: async () => undefined });
    expect(s3.state('job').enabled).toBe(false);
  });

  it('runNow runs a task at once with the manual trigger', async () => {
    const s = new Scheduler({ store: new MemoryStore(), clock: new FakeClock() });
    const c = counter();
    await s.add({ id: 'job', schedule: { intervalMinutes: 5 }, run: c.run });
    await s.runNow('job');
    expect(c.runs.map((r) => r.trigger)).toEqual(['manual']);
    await expect(s.runNow('nope')).rejects.toMatchObject({ code: 'E_NOT_FOUND' });
  });
});
