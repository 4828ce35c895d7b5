import { mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll } from 'vitest';
import { describeStorageConformance } from '@medsync/core/testing';
import { createFtpStorage, type FtpStorage } from '@medsync/adapters-ftp';
import { startFtpServer, type TestFtpServer } from './ftp-server.js';

let ftp: TestFtpServer;
let ftps: TestFtpServer;
let scratch = 0;

beforeAll(async () => {
  [ftp, ftps] = await Promise.all([startFtpServer(), startFtpServer({ tls: true })]);
});
afterAll(async () => {
  await Promise.all([ftp?.close(), ftps?.close()]);
});

/** A fresh, empty folder on the server for one test; the adapter is rooted there. */
function freshRoot(server: TestFtpServer): string {
  const name = `t${++scratch}`;
  mkdirSync(join(server.dir, name));
  return `/${name}`;
}

const removeRoot = (server: () => TestFtpServer) => async (s: unknown) => {
  rmSync(join(server().dir, (s as FtpStorage).options.root), { recursive: true, force: true });
};

describeStorageConformance({
  name: 'ftp (ftp-srv)',
  create: async () =>
    createFtpStorage({
      host: ftp.host,
      port: ftp.port,
      user: ftp.user,
      password: ftp.password,
      root: freshRoot(ftp),
    }),
  cleanup: removeRoot(() => ftp),
  largeFileBytes: 16 * 1024 * 1024,
});

describeStorageConformance({
  name: 'ftps explicit (ftp-srv)',
  create: async () =>
    createFtpStorage({
      host: ftps.host,
      port: ftps.port,
      user: ftps.user,
      password: ftps.password,
      root: freshRoot(ftps),
      secure: 'explicit',
      tls: { ca: ftps.cert! },
    }),
  cleanup: removeRoot(() => ftps),
  largeFileBytes: 16 * 1024 * 1024,
});
