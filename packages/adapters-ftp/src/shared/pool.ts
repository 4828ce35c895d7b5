import { MedsyncError } from '@medsync/core';

/** A connection lent by the pool; `reused` is false when it was connected for this lease. */
export interface PoolLease<T> {
  conn: T;
  reused: boolean;
}

/** How the pool opens, checks and closes one connection. */
export interface PoolHooks<T> {
  /** Opens and logs in one connection. */
  connect(): Promise<T>;
  /** True once the connection is unusable (closed by the server, a timeout, or {@link close}). */
  isClosed(conn: T): boolean;
  /** Closes the connection; must not throw. */
  close(conn: T): void;
  /** The error every call gets after {@link ConnectionPool.close}. */
  closedError(): MedsyncError;
  /** True when a failed connect should fail every waiter (wrong password, bad host key). */
  isFatal(e: unknown): boolean;
}

interface Waiter<T> {
  resolve(lease: PoolLease<T>): void;
  reject(e: unknown): void;
}

/**
 * Up to `max` logged-in connections of any protocol, each running one command or transfer at a
 * time. Connections open lazily when a caller waits and none is idle; a connection that was
 * closed (by the server, a timeout, or {@link ConnectionPool.release} with `broken`) is dropped
 * and replaced on demand. Waiters are served first come, first served. While nothing is
 * connected, one connect runs at a time; a failed connect fails every waiter at once when it is
 * fatal or nothing is connected (so a wrong password is tried once, not once per waiter),
 * otherwise only the first waiter.
 */
export class ConnectionPool<T> {
  private readonly idle: T[] = [];
  private readonly all = new Set<T>();
  private readonly waiters: Waiter<T>[] = [];
  private connecting = 0;
  private closed = false;

  constructor(
    private readonly hooks: PoolHooks<T>,
    private readonly max: number,
  ) {}

  /** Number of open connections (idle, lent or connecting). */
  get size(): number {
    return this.all.size + this.connecting;
  }

  /** Waits for a connection. Rejects with E_ABORTED when `signal` fires while waiting. */
  acquire(signal?: AbortSignal): Promise<PoolLease<T>> {
    if (this.closed) return Promise.reject(this.hooks.closedError());
    if (signal?.aborted) {
      return Promise.reject(
        new MedsyncError('E_ABORTED', 'The operation was cancelled.', { cause: signal.reason }),
      );
    }
    return new Promise<PoolLease<T>>((resolve, reject) => {
      const onAbort = () => {
        const i = this.waiters.indexOf(waiter);
        if (i >= 0) this.waiters.splice(i, 1);
        reject(new MedsyncError('E_ABORTED', 'The operation was cancelled.', { cause: signal?.reason }));
      };
      const waiter: Waiter<T> = {
        resolve: (lease) => {
          signal?.removeEventListener('abort', onAbort);
          resolve(lease);
        },
        reject: (e) => {
          signal?.removeEventListener('abort', onAbort);
          reject(e);
        },
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      this.waiters.push(waiter);
      this.pump();
    });
  }

  /** Returns a connection. A broken or closed one is closed and forgotten; its slot frees up. */
  release(conn: T, broken = false): void {
    if (broken || this.closed || this.hooks.isClosed(conn)) this.drop(conn);
    else this.idle.push(conn);
    this.pump();
  }

  /** Closes every connection, idle or lent, and fails the waiters. Further acquires reject. */
  close(): void {
    this.closed = true;
    for (const w of this.waiters.splice(0)) w.reject(this.hooks.closedError());
    for (const c of this.all) this.hooks.close(c);
    this.all.clear();
    this.idle.length = 0;
  }

  private drop(conn: T): void {
    this.hooks.close(conn);
    this.all.delete(conn);
    const i = this.idle.indexOf(conn);
    if (i >= 0) this.idle.splice(i, 1);
  }

  private pump(): void {
    if (this.closed) return;
    while (this.waiters.length > 0 && this.idle.length > 0) {
      const conn = this.idle.pop()!;
      if (this.hooks.isClosed(conn)) {
        this.drop(conn);
        continue;
      }
      this.waiters.shift()!.resolve({ conn, reused: true });
    }
    // With nothing connected yet, one connect goes first: when it fails (wrong password, unknown
    // host key), the server has seen one attempt, not one per waiter.
    while (
      this.waiters.length > this.connecting &&
      this.all.size + this.connecting < this.max &&
      (this.all.size > 0 || this.connecting === 0)
    ) {
      this.connecting++;
      this.hooks.connect().then(
        (conn) => {
          this.connecting--;
          if (this.closed) {
            this.hooks.close(conn);
            return;
          }
          this.all.add(conn);
          const w = this.waiters.shift();
          if (w) w.resolve({ conn, reused: false });
          else this.idle.push(conn);
          this.pump();
        },
        (e: unknown) => {
          this.connecting--;
          if (this.closed) return;
          // With nothing connected, or a failure no retry cures, every waiter would fail the same
          // way: fail them all now rather than repeat a refused login (accounts get locked).
          const all = this.hooks.isFatal(e) || this.all.size === 0;
          const failed = all ? this.waiters.splice(0) : this.waiters.splice(0, 1);
          for (const w of failed) w.reject(e);
          this.pump();
        },
      );
    }
  }
}
