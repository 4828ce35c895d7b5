/**
 * The letter-case check shared by the FTP and SFTP server suites (their servers tell names apart
 * by case).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { expect } from 'vitest';
import { LocalStorage, MemoryStore, SyncJob, type Storage } from '@medsync/core';
import { readTree, writeTree } from '@medsync/core/testing';

/**
 * Syncs two pairs of names that differ only in case to `dest`, one pair per run (each run asks
 * the server whether it folds case), and checks that the server's folder `local` then holds
 * exactly the source's files, hidden ones included: every name arrived and no probe was left.
 */
export async function expectCaseTwinsArrive(dest: Storage, local: string): Promise<void> {
  const src = mkdtempSync(join(tmpdir(), 'medsync-case-'));
  try {
    writeTree(src, { 'S1/a.dcm': 'lower', 'S1/A.dcm': 'upper' });
    const job = new SyncJob({
      id: 'case',
      source: new LocalStorage({ root: src }),
      destinations: [dest],
      store: new MemoryStore(),
    });
    expect(await job.run()).toMatchObject({ status: 'success', filesSynced: 2 });
    expect(readTree(local)).toEqual(readTree(src));
    writeTree(src, { 'S1/b.dcm': 'b', 'S1/B.dcm': 'B' });
    expect(await job.run()).toMatchObject({ status: 'success', filesSynced: 2 });
    expect(readTree(local)).toEqual(readTree(src));
  } finally {
    rmSync(src, { recursive: true, force: true });
  }
}
