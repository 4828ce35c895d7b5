import { createHash, randomUUID } from 'node:crypto';
import { readFileSync, readlinkSync } from 'node:fs';
import { hostname } from 'node:os';
import type { LockStore } from '../store/types.js';

/**
 * What identifies this process's PID space: boot id and PID namespace, where Linux tells them.
 * Two containers sharing a hostname but not a PID namespace get different values.
 */
function pidSpace(): string {
  const read = (f: () => string) => {
    try {
      return f();
    } catch {
      return '';
    }
  };
  const boot = read(() => readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim().slice(0, 8));
  const ns = read(() => readlinkSync('/proc/self/ns/pid').replace(/\D/g, ''));
  return createHash('sha256').update(`${boot}/${ns}`).digest('hex').slice(0, 8);
}

const SPACE = pidSpace();

/** A lease owner name: `host:space:pid:random`, so a dead holder of this PID space can be recognised. */
export function makeOwner(): string {
  return `${hostname()}:${SPACE}:${process.pid}:${randomUUID().slice(0, 8)}`;
}

/**
 * True when `owner` names a process of this host and PID space (same boot, same PID namespace)
 * that no longer exists (killed, crashed). Owners from elsewhere are never judged dead.
 */
export function isDeadLocalOwner(owner: string): boolean {
  const m = /^(.*):([0-9a-f]{8}):(\d+):[^:]*$/.exec(owner);
  if (!m || m[1] !== hostname() || m[2] !== SPACE) return false;
  const pid = Number(m[3]);
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
