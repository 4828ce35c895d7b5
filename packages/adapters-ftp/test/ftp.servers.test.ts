/**
 * Storage conformance against real FTP servers from Debian (pure-ftpd, pure-ftpd with explicit
 * TLS, vsftpd), started on loopback by scripts/services.sh (which installs them when missing).
 * Under CI=true a server that cannot be started fails the run; elsewhere its suite is skipped
 * with one line saying how to enable it.
 */
import { readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { describeStorageConformance } from '@medsync/core/testing';
import { createFtpStorage, type FtpStorage, type FtpStorageOptions } from '@medsync/adapters-ftp';
import { freshRoot, startServer, type ServerInfo, type ServerName } from './services.js';

// Started (synchronously, one after the other: apt-get takes a lock) before the suites are defined.
const servers: Partial<Record<ServerName, ServerInfo | undefined>> = {
  'pure-ftpd': startServer('pure-ftpd'),
  'pure-ftpd-tls': startServer('pure-ftpd-tls'),
  vsftpd: startServer('vsftpd'),
};

function storageOn(server: ServerInfo, extra: Partial<FtpStorageOptions> = {}): FtpStorage {
  return createFtpStorage({
    host: server.host,
    port: server.port,
    user: server.user,
    password: server.password,
    root: freshRoot(server),
    ...extra,
    ...(server.tls ? { secure: 'explicit' as const, tls: { ca: server.cert! } } : {}),
  });
}

const removeRoot = (server: ServerInfo) => (s: FtpStorage) =>
  rmSync(join(server.root, s.options.root), { recursive: true, force: true });

/**
 * pure-ftpd replaces a trailing space in a new name with "_", by design and with no option to
 * turn it off (jedisct1/pure-ftpd#130), so the conformance clause UnicodeAndSpaces (which has
 * "space at end /x y.dcm") cannot pass there. It is skipped for pure-ftpd and replaced by the two
 * checks below: unicode and inner spaces round-trip, and a trailing space is refused cleanly.
 */
const RENAMES_TRAILING_SPACE: ServerName[] = ['pure-ftpd', 'pure-ftpd-tls'];

function suite(name: ServerName, title: string): void {
  const server = servers[name];
  const trailingSpace = RENAMES_TRAILING_SPACE.includes(name);
  const define = () => {
    describeStorageConformance({
      name: title,
      create: async () => storageOn(server!),
      cleanup: async (s) => removeRoot(server!)(s as FtpStorage),
      largeFileBytes: 16 * 1024 * 1024,
      skipUnicodeNames: trailingSpace,
    });
    if (!trailingSpace) return;
    describe(`${title} names`, () => {
      it('unicode and inner spaces round-trip', async () => {
        const s = storageOn(server!);
        try {
          const names = ['Müller Hans/CT Thorax 1.dcm', 'été/naïve café.dcm', '患者/画像 01.dcm'];
          for (const n of names) {
            await s.write(n, Readable.from([Buffer.from(n)]), { size: Buffer.byteLength(n) });
          }
          const listed: string[] = [];
          for await (const e of s.list('')) listed.push(e.path);
          expect(listed.sort()).toEqual([...names].sort());
          for (const n of names) expect((await s.readBuffer(n)).toString()).toBe(n);
        } finally {
          await s.close();
          removeRoot(server!)(s);
        }
      });
      it('a folder with a trailing space is refused (E_UNSUPPORTED), not retried forever', async () => {
        const s = storageOn(server!);
        try {
          const n = 'space at end /x y.dcm';
          await expect(
            s.write(n, Readable.from([Buffer.from(n)]), { size: Buffer.byteLength(n) }),
          ).rejects.toMatchObject({ code: 'E_UNSUPPORTED', retryable: false });
          const listed: string[] = [];
          for await (const e of s.list('')) listed.push(e.path);
          expect(listed).toEqual([]);
          expect(readdirSync(join(server!.root, s.options.root))).toEqual([]);
        } finally {
          await s.close();
          removeRoot(server!)(s);
        }
      });
    });
  };
  if (server) define();
  else describe.skip(title, define);
}

suite('pure-ftpd', 'ftp (pure-ftpd)');
suite('pure-ftpd-tls', 'ftps explicit (pure-ftpd)');
suite('vsftpd', 'ftp (vsftpd)');
