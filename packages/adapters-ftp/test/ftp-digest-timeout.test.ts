import { createHash } from 'node:crypto';
import { readdirSync, readFileSync, mkdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createFtpStorage } from '@medsync/adapters-ftp';
import { startFtpServer, type TestFtpServer } from './ftp-server.js';

// ftp-srv taught XSHA256 that answers only after a pause, as a server reading a large file back
// for its digest does. ftp-srv keeps its commands in one module-level registry: this file runs in
// a process of its own.
const DELAY_MS = 1_600;
const require = createRequire(import.meta.url);
const registry = require('ftp-srv/src/commands/registry') as Record<string, unknown>;
type Conn = {
  fs: { _resolvePath(p: string): { fsPath: string } };
  reply(code: number, message: string): Promise<unknown>;
};
let digestsAsked = 0;
/** 'refuse': the server answers the digest with an error this time (no digest to compare). */
let digestMode: 'slow' | 'refuse' = 'slow';
registry.XSHA256 = {
  directive: 'XSHA256',
  handler: async function (this: Conn, { command }: { command: { arg: string | null } }) {
    digestsAsked++;
    if (digestMode === 'refuse') return this.reply(550, 'Could not compute the digest.');
    // The answer comes DELAY_MS after the question, however long the hashing took here (this
    // server shares the test's process: on a busy machine, reading and hashing 50 MB is slow).
    const asked = performance.now();
    const hex = createHash('sha256')
      .update(readFileSync(this.fs._resolvePath(command.arg ?? '').fsPath))
      .digest('hex');
    await sleep(Math.max(0, DELAY_MS - (performance.now() - asked)));
    await this.reply(250, hex);
  },
  syntax: '{{cmd}} <path>',
  description: 'SHA-256 of a file, slowly',
  flags: { feat: 'XSHA256' },
};

let srv: TestFtpServer;
beforeAll(async () => {
  srv = await startFtpServer();
  mkdirSync(join(srv.dir, 'slow'));
});
afterAll(async () => {
  await srv?.close();
});

describe('ftp server digest of a large file', () => {
  it('waits for the digest in proportion to the size instead of cutting it at timeoutMs', async () => {
    const s = createFtpStorage({
      host: srv.host,
      port: srv.port,
      user: srv.user,
      password: srv.password,
      root: '/slow',
      timeoutMs: 1_000,
    });
    try {
      // 50 MB buys two more seconds (the server is assumed to read back at 25 MB/s or faster):
      // 3 s in all for an answer that takes 1.6 s.
      const body = Buffer.alloc(50_000_000, 7);
      const sha256 = createHash('sha256').update(body).digest('hex');
      const w = await s.write('big.bin', body, { size: body.length, expectedHashes: () => ({ sha256 }) });
      expect(w.hashes).toEqual({ sha256 });
      expect(digestsAsked).toBe(1);
      expect(readFileSync(join(srv.dir, 'slow', 'big.bin')).equals(body)).toBe(true);
      // A small file gets only timeoutMs: the slow digest is then cut, and the upload fails
      // retryably with nothing under its final name.
      const small = Buffer.from('small');
      await expect(
        s.write('small.bin', small, {
          size: small.length,
          expectedHashes: () => ({ sha256: createHash('sha256').update(small).digest('hex') }),
        }),
      ).rejects.toMatchObject({ code: 'E_TRANSIENT', retryable: true });
      expect(() => readFileSync(join(srv.dir, 'slow', 'small.bin'))).toThrow();
    } finally {
      await s.close();
    }
  });

  it('a complete part left by an earlier attempt is renamed only when the server digest checks it', async () => {
    // The first upload of a large file is sent whole, then its slow digest is cut: the complete
    // part stays for the retry. A file of the same name, size and mtime but other bytes then
    // finds that part; the server gives no digest this time, so the part must not be taken.
    mkdirSync(join(srv.dir, 'parts'));
    const s = createFtpStorage({
      host: srv.host,
      port: srv.port,
      user: srv.user,
      password: srv.password,
      root: '/parts',
      timeoutMs: 1_000,
    });
    try {
      const size = 10_000_000;
      const mtimeMs = Date.UTC(2024, 0, 1);
      const v1 = Buffer.alloc(size, 1);
      const v2 = Buffer.alloc(size, 2);
      const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');
      const put = (b: Buffer) =>
        s.write('study/series.bin', Readable.from([b]), {
          size,
          mtimeMs,
          expectedHashes: () => ({ sha256: sha(b) }),
        });
      digestMode = 'slow';
      await expect(put(v1)).rejects.toMatchObject({ code: 'E_TRANSIENT' });
      const left = readdirSync(join(srv.dir, 'parts', 'study'));
      expect(left).toHaveLength(1);
      expect(left[0]).toMatch(/\.medsync-part$/);
      digestMode = 'refuse';
      await expect(put(v2)).rejects.toMatchObject({ code: 'E_INTEGRITY', retryable: true });
      expect(readdirSync(join(srv.dir, 'parts', 'study'))).toEqual([]);
      // The retry sends it whole (checked by size: still no digest).
      await put(v2);
      expect(readFileSync(join(srv.dir, 'parts', 'study', 'series.bin')).equals(v2)).toBe(true);
    } finally {
      await s.close();
      digestMode = 'slow';
    }
  });
});
