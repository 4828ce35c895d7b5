import { MedsyncError } from '../errors/errors.js';

/** Time source for engines, so tests can run schedules and retries on a fake clock. */
export interface Clock {
  now(): number;
  /** Resolves after `ms`; rejects with E_ABORTED when `signal` fires first. */
  sleep(ms: number, signal?: AbortSignal): Promise<void>;
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

/** The real clock. Timers are unref'd so they never keep a process alive on their own. */
export const systemClock: Clock = {
  now: () => Date.now(),
  sleep(ms, signal) {
    return new Promise<void>((resolve, reject) => {
      if (signal?.aborted) {
        reject(new MedsyncError('E_ABORTED', 'The operation was cancelled.', { cause: signal.reason }));
        return;
      }
      const onAbort = () => {
        clearTimeout(t);
        reject(new MedsyncError('E_ABORTED', 'The operation was cancelled.', { cause: signal?.reason }));
      };
      const t = setTimeout(() => {
        signal?.removeEventListener('abort', onAbort);
        resolve();
      }, ms);
      signal?.addEventListener('abort', onAbort, { once: true });
    });
  },
  setTimeout(fn, ms) {
    const t = setTimeout(fn, ms);
    t.unref?.();
    return t;
  },
  clearTimeout(h) {
    clearTimeout(h as ReturnType<typeof setTimeout>);
  },
};
