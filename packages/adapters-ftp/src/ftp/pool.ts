import { MedsyncError } from '@medsync/core';
import type { Client } from 'basic-ftp';

/** A client lent by the pool; `reused` is false when it was connected for this lease. */
export interface Lease {
  client: Client;
  reused: boolean;
}

interface Waiter {
  resolve(lease: Lease): void;
  reject(e: unknown): void;
}

/**
 * Up to `max` logged-in basic-ftp clients, each running one command or transfer at a time.
 * Clients are connected lazily when a caller waits and none is idle; a client that was closed
 * (by the server, a timeout, or {@link ClientPool.release} with `broken`) is dropped and replaced
 * on demand. Waiters are served first come, first served.
 */
export class ClientPool {
  private readonly idle: Client[] = [];
  private readonly all = new Set<Client>();
  private readonly waiters: Waiter[] = [];
  private connecting = 0;
  private closed = false;

  constructor(
    private readonly connect: () => Promise<Client>,
    private readonly max: number,
    private readonly closedError: () => MedsyncError,
    /** True when a failed connect should fail every waiter (wrong password, bad TLS setup). */
    private readonly isFatal: (e: unknown) => boolean,
  ) {}

  /** Number of open clients (idle, lent or connecting). */
  get size(): number {
    return this.all.size + this.connecting;
  }

  /** Waits for a client. Rejects with E_ABORTED when `signal` fires while waiting. */
  acquire(signal?: AbortSignal): Promise<Lease> {
    if (this.closed) return Promise.reject(this.closedError());
    if (signal?.aborted) {
      return Promise.reject(
        new MedsyncError('E_ABORTED', 'The operation was cancelled.', { cause: signal.reason }),
      );
    }
    return new Promise<Lease>((resolve, reject) => {
      const onAbort = () => {
        const i = this.waiters.indexOf(waiter);
        if (i >= 0) this.waiters.splice(i, 1);
        reject(new MedsyncError('E_ABORTED', 'The operation was cancelled.', { cause: signal?.reason }));
      };
      const waiter: Waiter = {
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

  /** Returns a client. A broken or closed client is closed and forgotten; its slot frees up. */
  release(client: Client, broken = false): void {
    if (broken || client.closed || this.closed) {
      this.drop(client);
    } else {
      this.idle.push(client);
    }
    this.pump();
  }

  /** Closes every client, idle or lent, and fails the waiters. Further acquires reject. */
  close(): void {
    this.closed = true;
    for (const w of this.waiters.splice(0)) w.reject(this.closedError());
    for (const c of this.all) c.close();
    this.all.clear();
    this.idle.length = 0;
  }

  private drop(client: Client): void {
    client.close();
    this.all.delete(client);
    const i = this.idle.indexOf(client);
    if (i >= 0) this.idle.splice(i, 1);
  }

  private pump(): void {
    if (this.closed) return;
    while (this.waiters.length > 0 && this.idle.length > 0) {
      const client = this.idle.pop()!;
      if (client.closed) {
        this.all.delete(client);
        continue;
      }
      this.waiters.shift()!.resolve({ client, reused: true });
    }
    while (this.waiters.length > this.connecting && this.all.size + this.connecting < this.max) {
      this.connecting++;
      this.connect().then(
        (client) => {
          this.connecting--;
          if (this.closed) {
            client.close();
            return;
          }
          this.all.add(client);
          const w = this.waiters.shift();
          if (w) w.resolve({ client, reused: false });
          else this.idle.push(client);
          this.pump();
        },
        (e: unknown) => {
          this.connecting--;
          if (this.closed) return;
          // With nothing connected, or a failure no retry cures, every waiter would fail the same
          // way: fail them all now rather than repeat a refused login (accounts get locked).
          const all = this.isFatal(e) || this.all.size === 0;
          const failed = all ? this.waiters.splice(0) : this.waiters.splice(0, 1);
          for (const w of failed) w.reject(e);
          this.pump();
        },
      );
    }
  }
}
