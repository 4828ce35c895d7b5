import { randomUUID } from 'node:crypto';
import { hostname } from 'node:os';
import type { LockStore } from '../store/types.js';

/** A lease owner name: `host:pid:random`, so a dead local holder can be recognised. */
export function makeOwner(): string {
  return `${hostname()}:${process.pid}:${randomUUID().slice(0, 8)}`;
}

/** True when `owner` names a process on this host that no longer exists (killed, crashed). */
export function isDeadLocalOwner(owner: string): boolean {
  const m = /^(.*):(\d+):[^:]*$/.exec(owner);
  if (!m || m[1] !== hostname()) return false;
  const pid = Number(m[2]);
  if (pid === process.pid) return false;
  try {
    process.kill(pid, 0);
    return false;
  } catch (e) {
    return (e as { code?: string }).code === 'ESRCH';
  }
}

/**
 * Takes a lease. A lease held by a process of this host that has died (kill -9, power loss of a
 * container) is taken over at once instead of waiting for it to expire.
 */
export async function acquireLease(
  locks: LockStore,
  name: string,
  owner: string,
  ttlMs: number,
  now: number,
): Promise<boolean> {
  if (await locks.acquire(name, owner, ttlMs, now)) return true;
  const holder = await locks.get(name, now);
  if (holder && isDeadLocalOwner(holder.owner)) {
    await locks.release(name, holder.owner);
    return locks.acquire(name, owner, ttlMs, now);
  }
  return false;
}
