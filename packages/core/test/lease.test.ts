import { spawnSync } from 'node:child_process';
import { hostname } from 'node:os';
import { describe, expect, it } from 'vitest';
import { MemoryStore } from '@medsync/core';
import { acquireLease, isDeadLocalOwner, makeOwner } from '../src/util/lease.js';

describe('leases of dead processes', () => {
  const deadPid = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))'], {
    encoding: 'utf8',
  }).stdout;

  it('recognises a dead holder of this host and PID space, and nothing else', () => {
    const mine = makeOwner();
    const [host, space] = mine.split(':');
    expect(host).toBe(hostname());
    expect(isDeadLocalOwner(`${host}:${space}:${deadPid}:abcd1234`)).toBe(true);
    expect(isDeadLocalOwner(`${host}:${space}:${process.pid}:abcd1234`)).toBe(false);
    expect(isDeadLocalOwner(`${host}:00000000:${deadPid}:abcd1234`)).toBe(false);
    expect(isDeadLocalOwner(`other-host:${space}:${deadPid}:abcd1234`)).toBe(false);
    expect(isDeadLocalOwner('not an owner')).toBe(false);
  });

  it('takes over a lease held by a dead local process at once', async () => {
    const store = new MemoryStore();
    const [host, space] = makeOwner().split(':');
    const dead = `${host}:${space}:${deadPid}:abcd1234`;
    expect(await store.locks.acquire('job', dead, 60_000)).toBe(true);
    expect(await acquireLease(store.locks, 'job', makeOwner(), 60_000, Date.now())).toBe(true);
    expect(await acquireLease(store.locks, 'job', 'elsewhere:12345678:1:x', 60_000, Date.now())).toBe(false);
  });
});
