import { createHash } from 'node:crypto';
import { readFileSync, mkdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
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
registry.XSHA256 = {
  directive: 'XSHA256',
  handler: async function (this: Conn, { command }: { command: { arg: string | null } }) {
    digestsAsked++;
    const hex = createHash('sha256')
      .update(readFileSync(this.fs._resolvePath(command.arg ?? '').fsPath))
      .digest('hex');
    await sleep(DELAY_MS);
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
});
