import pRetry, { AbortError } from 'p-retry';
import { isMedsyncError, MedsyncError, toMedsyncError } from '../errors/errors.js';
import type { Clock } from './clock.js';
import { systemClock } from './clock.js';

/** How a failed operation is retried. Only errors with `retryable` set are retried. */
export interface RetryPolicyOptions {
  /** Retries after the first attempt (3 means up to 4 attempts). Default 3. */
  retries?: number;
  /** Delay before the first retry, ms. Default 2000. */
  initialDelayMs?: number;
  /** Growth of the delay per retry. Default 2. */
  multiplier?: number;
  /** Upper bound of one delay, ms. Default 60000. */
  maxDelayMs?: number;
  /** Randomise each delay by up to ±this share (0..1). Default 0.2. */
  jitter?: number;
}

export interface RetryEvent {
  /** The attempt that failed (1-based). */
  attempt: number;
  /** Retries left after this one. */
  retriesLeft: number;
  error: MedsyncError;
  delayMs: number;
}

export interface RetryRunOptions {
  signal?: AbortSignal;
  /** Called before each wait. */
  onRetry?: (e: RetryEvent) => void;
}

/**
 * Retries an async operation on p-retry with exponential backoff and jitter. Non-retryable
 * MedsyncErrors stop at once; `retryAfterMs` from the backend overrides the computed delay.
 * Waits on the given {@link Clock}, so tests can use a fake one.
 */
export class RetryPolicy {
  readonly retries: number;
  readonly initialDelayMs: number;
  readonly multiplier: number;
  readonly maxDelayMs: number;
  readonly jitter: number;

  constructor(
    opts: RetryPolicyOptions = {},
    private readonly clock: Clock = systemClock,
  ) {
    this.retries = opts.retries ?? 3;
    this.initialDelayMs = opts.initialDelayMs ?? 2000;
    this.multiplier = opts.multiplier ?? 2;
    this.maxDelayMs = opts.maxDelayMs ?? 60_000;
    this.jitter = opts.jitter ?? 0.2;
    if (
      !(this.retries >= 0) ||
      !(this.initialDelayMs >= 0) ||
      !(this.multiplier >= 1) ||
      !(this.jitter >= 0 && this.jitter <= 1)
    ) {
      throw new MedsyncError(
        'E_CONFIG',
        'RetryPolicy: retries and delays must be >= 0, multiplier >= 1, jitter in 0..1.',
      );
    }
  }

  /** The delay before retry number `n` (1-based), before jitter. */
  delayFor(n: number): number {
    return Math.min(this.maxDelayMs, this.initialDelayMs * this.multiplier ** (n - 1));
  }

  /** Runs `fn` until it succeeds, fails with a non-retryable error, or retries run out. */
  async run<T>(fn: (attempt: number) => Promise<T>, opts: RetryRunOptions = {}): Promise<T> {
    const { signal } = opts;
    try {
      return await pRetry(
        async (attempt) => {
          try {
            return await fn(attempt);
          } catch (e) {
            const me = toMedsyncError(e);
            if (!me.retryable || signal?.aborted) throw new AbortError(me);
            throw me;
          }
        },
        {
          retries: this.retries,
          minTimeout: 0,
          maxTimeout: 0,
          randomize: false,
          ...(signal ? { signal } : {}),
          onFailedAttempt: async (ctx) => {
            if (ctx.retriesLeft <= 0) return;
            const me = toMedsyncError(ctx.error);
            let delay = this.delayFor(ctx.attemptNumber);
            if (this.jitter > 0)
              delay = Math.round(delay * (1 - this.jitter + Math.random() * 2 * this.jitter));
            if (me.retryAfterMs !== undefined) delay = Math.max(delay, me.retryAfterMs);
            opts.onRetry?.({
              attempt: ctx.attemptNumber,
              retriesLeft: ctx.retriesLeft,
              error: me,
              delayMs: delay,
            });
            await this.clock.sleep(delay, signal);
          },
        },
      );
    } catch (e) {
      if (isMedsyncError(e)) throw e;
      const inner = (e as { originalError?: unknown }).originalError;
      throw toMedsyncError(inner ?? e);
    }
  }
}
