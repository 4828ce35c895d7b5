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
      !(Number.isInteger(this.retries) || this.retries === Infinity) ||
      !(this.retries >= 0) ||
      !(this.initialDelayMs >= 0) ||
      !(this.multiplier >= 1) ||
      !(this.jitter >= 0 && this.jitter <= 1)
    ) {
      throw new MedsyncError(
        'E_CONFIG',
        'RetryPolicy: retries must be a whole number >= 0, delays >= 0, multiplier >= 1, jitter in 0..1.',
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
    // The first attempt runs without p-retry: nearly every call succeeds at once, and a sync of
    // many small files makes one call per file (p-retry's set-up costs ~2.5 KB of garbage each).
    // p-retry takes over from the first failure that may be retried, with the same checks.
    let first: MedsyncError;
    try {
      signal?.throwIfAborted();
      const result = await fn(1);
      signal?.throwIfAborted();
      return result;
    } catch (e) {
      first = toMedsyncError(e);
      if (!first.retryable || signal?.aborted || this.retries === 0) throw first;
    }
    try {
      await this.beforeRetry(first, 1, this.retries, opts);
      return await pRetry(
        async (n) => {
          try {
            return await fn(n + 1);
          } catch (e) {
            const me = toMedsyncError(e);
            if (!me.retryable || signal?.aborted) throw new AbortError(me);
            throw me;
          }
        },
        {
          retries: this.retries - 1,
          minTimeout: 0,
          maxTimeout: 0,
          randomize: false,
          ...(signal ? { signal } : {}),
          onFailedAttempt: async (ctx) => {
            if (ctx.retriesLeft <= 0) return;
            await this.beforeRetry(toMedsyncError(ctx.error), ctx.attemptNumber + 1, ctx.retriesLeft, opts);
          },
        },
      );
    } catch (e) {
      if (isMedsyncError(e)) throw e;
      const inner = (e as { originalError?: unknown }).originalError;
      throw toMedsyncError(inner ?? e);
    }
  }

  /** Reports a failed attempt that will be retried, then waits the delay before the next one. */
  private async beforeRetry(
    me: MedsyncError,
    attempt: number,
    retriesLeft: number,
    opts: RetryRunOptions,
  ): Promise<void> {
    let delay = this.delayFor(attempt);
    if (this.jitter > 0) delay = Math.round(delay * (1 - this.jitter + Math.random() * 2 * this.jitter));
    if (me.retryAfterMs !== undefined) delay = Math.max(delay, me.retryAfterMs);
    opts.onRetry?.({ attempt, retriesLeft, error: me, delayMs: delay });
    await this.clock.sleep(delay, opts.signal);
  }
}
