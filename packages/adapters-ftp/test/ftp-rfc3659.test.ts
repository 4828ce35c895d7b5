import { mkdirSync, rmSync, statSync, utimesSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { describeStorageConformance } from '@medsync/core/testing';
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
});
