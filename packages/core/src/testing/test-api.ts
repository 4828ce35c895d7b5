import { MedsyncError } from '../errors/errors.js';

type Fn = () => unknown;

/**
 * The few test-runner functions the conformance suites use. Vitest (with `globals: true`) and
 * Jest provide them as globals; otherwise pass them: `{ describe, it, expect, beforeEach, afterEach }`
 * imported from vitest. Keeping the runner out of the imports lets `@medsync/core/testing` load
 * in CommonJS hosts and in tests run by other runners.
 */
export interface TestApi {
  describe: (name: string, fn: () => void) => void;
  it: ((name: string, fn: Fn, timeout?: number) => void) & {
    skip: (name: string, fn: Fn, timeout?: number) => void;
  };
  /** The runner's `expect` (vitest or Jest). */
  expect: any;
  beforeEach: (fn: Fn, timeout?: number) => void;
  afterEach: (fn: Fn, timeout?: number) => void;
}

/** The given API, or the runner's globals; E_DEPENDENCY_MISSING when neither is there. */
export function resolveTestApi(api?: TestApi): TestApi {
  if (api) return api;
  const g = globalThis as Record<string, any>;
  if (typeof g.describe === 'function' && typeof g.it === 'function' && typeof g.expect === 'function') {
    return {
      describe: g.describe,
      it: g.it,
      expect: g.expect,
      beforeEach: g.beforeEach,
      afterEach: g.afterEach,
    };
  }
  throw new MedsyncError(
    'E_DEPENDENCY_MISSING',
    'The conformance suites need a test runner: run them under vitest with `globals: true` (or Jest), or pass { describe, it, expect, beforeEach, afterEach } as `api`.',
  );
}
