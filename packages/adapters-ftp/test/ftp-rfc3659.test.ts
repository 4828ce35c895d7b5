import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  statSync,
  utimesSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LocalStorage, MemoryStore, SyncJob } from '@medsync/core';
import { describeStorageConformance, writeTree } from '@medsync/core/testing';
import { createFtpStorage, type FtpStorage } from '@medsync/adapters-ftp';
import { startFtpServer, type TestFtpServer } from './ftp-server.js';
import { enableRfc3659 } from './ftp-srv-rfc3659.js';

// ftp-srv with MLSD, MLST and MFMT, as proftpd and pure-ftpd offer them: the adapter then lists
// with MLSD, stats with MLST and keeps mtimes (preservesMtime true).
enableRfc3659();

let srv: TestFtpServer;
let scratch = 0;

beforeAll(async () => {
  srv = await startFtpServer();
});
afterAll(async () => {
  await srv?.close();
});

function open(): FtpStorage {
  const name = `m${++scratch}`;
  mkdirSync(join(srv.dir, name));
  return createFtpStorage({
    host: srv.host,
    port: srv.port,
    user: srv.user,
    password: srv.password,
    root: `/${name}`,
  });
}

describeStorageConformance({
  name: 'ftp (ftp-srv + MLSD/MLST/MFMT)',
  create: async () => open(),
  cleanup: async (s) =>
    rmSync(join(srv.dir, (s as FtpStorage).options.root), { recursive: true, force: true }),
  largeFileBytes: 4 * 1024 * 1024,
});

describe('ftp with RFC 3659 commands', () => {
  it('keeps mtimes to the second and reports them in listings and stat', async () => {
    const s = open();
    try {
      expect(s.capabilities.preservesMtime).toBe(false); // not known before the first connection
      const mtime = Date.UTC(2023, 0, 2, 3, 4, 5, 678);
      const w = await s.write('a/b.dcm', Buffer.from('hello'), { size: 5, mtimeMs: mtime });
      expect(s.capabilities).toMatchObject({ preservesMtime: true, mtimePrecisionMs: 1000 });
      expect(w.mtimeMs).toBe(Date.UTC(2023, 0, 2, 3, 4, 5));
      expect((await s.stat('a/b.dcm')).mtimeMs).toBe(w.mtimeMs);
      const listed = [];
      for await (const e of s.list('')) listed.push(e);
      expect(listed).toEqual([{ path: 'a/b.dcm', size: 5, mtimeMs: w.mtimeMs }]);
      expect(statSync(join(srv.dir, s.options.root, 'a/b.dcm')).mtimeMs).toBe(w.mtimeMs);
      const report = await s.test();
      expect(report.details?.features).toEqual(expect.arrayContaining(['MFMT', 'SIZE']));
    } finally {
      await s.close();
    }
  });

  it('cleanupPartials removes only temporary files older than the cutoff', async () => {
    const s = open();
    try {
      const dir = join(srv.dir, s.options.root, 'x');
      mkdirSync(dir);
      writeFileSync(join(dir, '.old.dcm.abc.medsync-part'), 'old');
      writeFileSync(join(dir, '.new.dcm.def.medsync-part'), 'new');
      writeFileSync(join(dir, 'kept.dcm'), 'kept');
      const old = (Date.now() - 3_600_000) / 1000;
      utimesSync(join(dir, '.old.dcm.abc.medsync-part'), old, old);
      expect(await s.cleanupPartials('', { olderThanMs: Date.now() - 60_000 })).toBe(1);
      expect(await s.cleanupPartials('')).toBe(1);
      const left = [];
      for await (const e of s.list('')) left.push(e.path);
      expect(left).toEqual(['x/kept.dcm']);
    } finally {
      await s.close();
    }
  });

  it('a file renamed into place whose answer was lost is found there by the next run, not sent again', async () => {
    // The server renames IM2.dcm into place, then drops the connection before answering, on every
    // attempt of the first run (as when it is killed at that moment).
    let dropping = true;
    const dropper = await startFtpServer({
      dropAfterRename: (_from, to) => dropping && to.endsWith('IM2.dcm'),
    });
    const src = mkdtempSync(join(tmpdir(), 'medsync-lost-'));
    const dest = createFtpStorage({
      host: dropper.host,
      port: dropper.port,
      user: dropper.user,
      password: dropper.password,
      root: '/',
    });
    try {
      writeTree(src, { 'S/IM1.dcm': 'one', 'S/IM2.dcm': 'two two', 'S/IM3.dcm': 'three' });
      const store = new MemoryStore();
      const job = new SyncJob({
        id: 'lost-answer',
        source: new LocalStorage({ root: src }),
        destinations: [dest],
        store,
        concurrency: 1,
        retry: { retries: 2, initialDelayMs: 10, jitter: 0 },
        eventPaths: true,
      });
      const r1 = await job.run();
      expect(r1).toMatchObject({ status: 'partial', filesSynced: 2, filesFailed: 1 });
      expect(r1.errors).toEqual([expect.objectContaining({ path: 'S/IM2.dcm', code: 'E_TRANSIENT' })]);
      // It is there, whole, and not recorded.
      expect(readFileSync(join(dropper.dir, 'S/IM2.dcm'), 'utf8')).toBe('two two');
      const scope = { jobId: 'lost-answer', destination: dest.id };
      expect(await store.manifest.get(scope, 'S/IM2.dcm')).toBeUndefined();
      dropping = false;
      const r2 = await job.run();
      expect(r2).toMatchObject({ status: 'success', filesSynced: 0, filesSkipped: 3, bytes: 0 });
      expect(await store.manifest.get(scope, 'S/IM2.dcm')).toMatchObject({ size: 7, verifiedBy: 'listing' });
      expect(existsSync(join(dropper.dir, 'S/IM2.dcm'))).toBe(true);
    } finally {
      await dest.close();
      await dropper.close();
      rmSync(src, { recursive: true, force: true });
    }
  });
});
