/**
 * Fault tests against a real pure-ftpd (started by scripts/services.sh): a data connection cut in
 * the middle of an upload, a 425 for one transfer, the server killed and restarted in the middle
 * of a sync, an exceeded quota (552), and a wrong password. Faults on the wire come from a TCP
 * proxy in front of the server (fault-proxy.ts); the rest is the server itself.
 */
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { afterEach, describe, expect, it } from 'vitest';
import { LocalStorage, MemoryStore, SyncJob, isMedsyncError, type ManifestEntry } from '@medsync/core';
import { readTree, writeTree } from '@medsync/core/testing';
import { createFtpStorage, type FtpStorage, type FtpStorageOptions } from '@medsync/adapters-ftp';
import { startFaultProxy, type FaultProxy } from './fault-proxy.js';
import { freshRoot, restartServer, startServer, type ServerInfo } from './services.js';

const plain = startServer('pure-ftpd');
// 1 MB for the whole account: three 300 KB files fit, a fourth does not.
const quota = startServer('pure-ftpd-quota', { MEDSYNC_FTP_QUOTA: '1000:1' });

const cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

function tmp(): string {
  const d = mkdtempSync(join(tmpdir(), 'medsync-faults-'));
  cleanups.push(() => rmSync(d, { recursive: true, force: true }));
  return d;
}

/** FtpStorage on a fresh folder of `server`, optionally reached through `via` (a fault proxy). */
function storageOn(
  server: ServerInfo,
  via?: FaultProxy,
  extra: Partial<FtpStorageOptions> = {},
): { storage: FtpStorage; local: string } {
  const root = freshRoot(server);
  const storage = createFtpStorage({
    host: via?.host ?? server.host,
    port: via?.port ?? server.port,
    user: server.user,
    password: server.password,
    root,
    ...extra,
  });
  cleanups.push(() => storage.close());
  return { storage, local: join(server.root, root) };
}

async function proxyFor(server: ServerInfo): Promise<FaultProxy> {
  const p = await startFaultProxy(server);
  cleanups.push(() => p.close());
  return p;
}

/** Every file under a local folder, temporary ones included. */
function allFiles(dir: string): string[] {
  return Object.keys(readTree(dir)).sort();
}

async function manifestOf(job: SyncJob, store: MemoryStore, dest: FtpStorage): Promise<ManifestEntry[]> {
  const out: ManifestEntry[] = [];
  for await (const e of store.manifest.list({ jobId: job.id, destination: dest.id })) out.push(e);
  return out;
}

const fastRetry = { retries: 3, initialDelayMs: 100, multiplier: 2, jitter: 0 };

const suite = plain && quota ? describe : describe.skip;

suite('FTP faults (pure-ftpd)', () => {
  it('a session opens in as few round trips as it can: FEAT once per storage, no repeated or default-only commands', async () => {
    const proxy = await proxyFor(plain!);
    const { storage, local } = storageOn(plain!, proxy, { maxConnections: 2 });
    const names = ['a.dcm', 'b.dcm', 'ü ñ.dcm', 'd.dcm'];
    const put = (n: string) => storage.write(`S/${n}`, Buffer.from(n), { size: Buffer.byteLength(n) });
    // One session first; the parallel writes then open a second one.
    await put(names[0]!);
    await Promise.all(names.slice(1).map(put));
    expect(allFiles(local)).toEqual(names.map((n) => `S/${n}`).sort());
    expect(proxy.stats.commands).toHaveLength(2);
    // Up to the first command of the work itself.
    const opening = (cmds: string[]) =>
      cmds.slice(
        0,
        cmds.findIndex((c) => !/^(USER|PASS|FEAT|TYPE|OPTS|STRU)/.test(c)),
      );
    const [first, second] = proxy.stats.commands.map(opening).sort((x, y) => y.length - x.length);
    expect(first).toEqual(['USER', 'PASS', 'FEAT', 'TYPE', 'OPTS UTF8', 'OPTS MLST']);
    expect(second).toEqual(['USER', 'PASS', 'TYPE', 'OPTS UTF8', 'OPTS MLST']);
    // The login, FEAT and the settings leave in one write, for one round trip.
    expect(proxy.stats.chunks.map((chunks) => chunks[0]).sort()).toEqual([
      'USER + PASS + FEAT + TYPE + OPTS UTF8 + OPTS MLST',
      'USER + PASS + TYPE + OPTS UTF8 + OPTS MLST',
    ]);
  });

  it('a server that drops the commands sent after a refused PASS: the refusal is E_AUTH at once, not a timeout that is retried', async () => {
    const proxy = await proxyFor(plain!);
    // A minute of silence before a timeout: the test's own 15 s limit fails a login that waits.
    const { storage } = storageOn(plain!, proxy, { timeoutMs: 60_000, password: 'not-the-password' });
    // The server answers USER 331 and the wrong PASS 530; what follows is never answered.
    proxy.dropAfter(/^PASS /i);
    const err = await storage.stat('x.dcm').then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(isMedsyncError(err) && err.code).toBe('E_AUTH');
    expect(proxy.stats.controlConnections).toBe(1);
    // The settings were sent with the login, and dropped unanswered.
    expect(proxy.stats.chunks[0]![0]).toBe('USER + PASS + FEAT + TYPE + OPTS UTF8 + OPTS MLST');
    await storage.close();
  }, 15_000);

  it('a server that answers 421 to the settings sent together and hangs up: the error is its 421, retryable', async () => {
    const proxy = await proxyFor(plain!);
    const { storage } = storageOn(plain!, proxy);
    proxy.refuseAlways(/^TYPE /i, '421 Too many connections, closing control connection.', { hangUp: true });
    const err = await storage.stat('x.dcm').then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(isMedsyncError(err) && err.code).toBe('E_TRANSIENT');
    expect((err as Error).message).toMatch(/421/);
    expect((err as Error).message).toMatch(/maxConnections/);
  });

  it('a data connection cut mid-upload: the write fails retryable and leaves nothing behind', async () => {
    const proxy = await proxyFor(plain!);
    const { storage, local } = storageOn(plain!, proxy);
    const body = randomBytes(3 * 1024 * 1024);
    proxy.cutNextUpload(1024 * 1024);
    const err = await storage.write('study/big.dcm', Readable.from([body]), { size: body.length }).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(proxy.stats.cuts).toBe(1);
    expect(isMedsyncError(err)).toBe(true);
    expect(err).toMatchObject({ code: 'E_TRANSIENT', retryable: true, path: 'study/big.dcm' });
    // Nothing under the final name, and the temporary file was removed.
    expect(existsSync(join(local, 'study/big.dcm'))).toBe(false);
    expect(readdirSync(join(local, 'study'))).toEqual([]);
    // The storage is still usable: the same write now succeeds, byte-identical.
    await storage.write('study/big.dcm', Readable.from([body]), { size: body.length });
    expect((await storage.readBuffer('study/big.dcm')).equals(body)).toBe(true);
  });

  it('a cut upload the server has not noticed yet (it refuses the next command with 500, then says 451) stays retryable and resumes', async () => {
    const proxy = await proxyFor(plain!);
    const { storage, local } = storageOn(plain!, proxy);
    const MiB = 1024 * 1024;
    const body = randomBytes(12 * MiB);
    const put = () =>
      storage.write('s/big.dcm', Readable.from([body]), { size: body.length, mtimeMs: Date.UTC(2024, 0, 1) });
    proxy.cutNextUpload(5 * MiB, { serverBusy: true });
    const err = await put().then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(proxy.stats.cuts).toBe(1);
    // The 500 answered the adapter's question, not the upload: the verdict is the 451 after it.
    expect(err).toMatchObject({
      code: 'E_TRANSIENT',
      retryable: true,
      message: expect.stringMatching(/451/),
    });
    expect(allFiles(local)).toHaveLength(1); // the part, kept for a resume
    // The retry sends only what the part lacks: as much as the server had stored, whatever that
    // was when the cut came (see cutNextUpload).
    const part = statSync(join(local, allFiles(local)[0]!)).size;
    expect(part).toBeGreaterThan(0);
    const before = proxy.stats.bytesUp;
    await put();
    expect(proxy.stats.bytesUp - before).toBe(body.length - part);
    expect(proxy.stats.commands.flat()).toContain('APPE');
    expect((await storage.readBuffer('s/big.dcm')).equals(body)).toBe(true);
    expect(allFiles(local)).toEqual(['s/big.dcm']);
  });

  it('a sync whose upload is cut mid-transfer retries that file and ends byte-identical', async () => {
    const proxy = await proxyFor(plain!);
    const { storage, local } = storageOn(plain!, proxy);
    const src = tmp();
    writeTree(src, {
      'PAT1/CT/IM1.dcm': randomBytes(2 * 1024 * 1024),
      'PAT1/CT/IM2.dcm': randomBytes(200_000),
      'PAT1/MR/IM1.dcm': randomBytes(300_000),
      'PAT2/CR/IM1.dcm': randomBytes(50_000),
    });
    proxy.cutNextUpload(1024 * 1024); // only the 2 MB file carries that much
    const job = new SyncJob({
      id: 'cut',
      source: new LocalStorage({ root: src }),
      destinations: [storage],
      store: new MemoryStore(),
      retry: fastRetry,
      eventPaths: true,
    });
    const retried: Array<{ path: string; code: string; retryable: boolean }> = [];
    job.on('file:retry', (e) =>
      retried.push({ path: e.path, code: e.error.code, retryable: e.error.retryable }),
    );
    const r = await job.run();
    expect(proxy.stats.cuts).toBe(1);
    expect(r.status).toBe('success');
    expect(r.filesSynced).toBe(4);
    expect(retried).toEqual([{ path: 'PAT1/CT/IM1.dcm', code: 'E_TRANSIENT', retryable: true }]);
    // Byte-identical, and no temporary file left anywhere.
    expect(readTree(local)).toEqual(readTree(src));
  });

  it('a large upload cut midway resumes on the retry (APPE) instead of starting over', async () => {
    const proxy = await proxyFor(plain!);
    const { storage, local } = storageOn(plain!, proxy);
    const src = tmp();
    const MiB = 1024 * 1024;
    writeTree(src, { 'CT/series.bin': randomBytes(24 * MiB) });
    proxy.cutNextUpload(10 * MiB);
    const store = new MemoryStore();
    const job = new SyncJob({
      id: 'resume',
      source: new LocalStorage({ root: src }),
      destinations: [storage],
      store,
      retry: fastRetry,
      smallFileBytes: MiB,
      eventPaths: true,
    });
    const r = await job.run();
    expect(proxy.stats.cuts).toBe(1);
    expect(r).toMatchObject({ status: 'success', filesSynced: 1, bytes: 24 * MiB });
    // Two uploads: the first cut past 10 MiB, the second (APPE) only what the server had not
    // stored of it (how much that was depends on how far the server had read; see cutNextUpload).
    const uploads = proxy.stats.uploads.filter((n) => n > 0);
    expect(uploads).toHaveLength(2);
    expect(uploads[0]).toBeGreaterThan(10 * MiB);
    expect(uploads[1]).toBeLessThan(24 * MiB);
    expect(uploads[1]).toBeGreaterThanOrEqual(24 * MiB - uploads[0]!);
    expect(proxy.stats.commands.flat()).toContain('APPE');
    expect(readTree(local)).toEqual(readTree(src));
    const [entry] = await manifestOf(job, store, storage);
    expect(entry!.sha256).toBe(
      createHash('sha256')
        .update(readFileSync(join(src, 'CT/series.bin')))
        .digest('hex'),
    );
  });

  it('a server that refuses APPE (502) gets the whole file again on the retry', async () => {
    const proxy = await proxyFor(plain!);
    proxy.refuseAlways(/^APPE /i, '502 Command not implemented.');
    const { storage, local } = storageOn(plain!, proxy);
    const MiB = 1024 * 1024;
    const body = randomBytes(12 * MiB);
    const put = () =>
      storage.write('s/big.dcm', Readable.from([body]), { size: body.length, mtimeMs: Date.UTC(2024, 0, 1) });
    proxy.cutNextUpload(6 * MiB);
    await expect(put()).rejects.toMatchObject({ code: 'E_TRANSIENT' });
    expect(allFiles(local)).toHaveLength(1); // the part, kept for a resume
    const before = proxy.stats.bytesUp;
    await put();
    expect(proxy.stats.bytesUp - before).toBe(body.length);
    expect((await storage.readBuffer('s/big.dcm')).equals(body)).toBe(true);
    expect(allFiles(local)).toEqual(['s/big.dcm']);
  });

  it('a partial left by another version of the file is never resumed; cleanupPartials removes it', async () => {
    const proxy = await proxyFor(plain!);
    const { storage, local } = storageOn(plain!, proxy);
    const MiB = 1024 * 1024;
    const v1 = randomBytes(12 * MiB);
    proxy.cutNextUpload(6 * MiB);
    await expect(
      storage.write('s/big.dcm', Readable.from([v1]), { size: v1.length, mtimeMs: Date.UTC(2024, 0, 1) }),
    ).rejects.toMatchObject({ code: 'E_TRANSIENT' });
    const kept = allFiles(local);
    expect(kept).toHaveLength(1);
    expect(kept[0]).toMatch(/^s\/\.big\.dcm\.r[0-9a-f]+\.medsync-part$/);
    // The file was exported again: same size, new content and time. It is sent whole.
    const v2 = randomBytes(12 * MiB);
    const before = proxy.stats.bytesUp;
    await storage.write('s/big.dcm', Readable.from([v2]), { size: v2.length, mtimeMs: Date.UTC(2024, 0, 2) });
    expect(proxy.stats.bytesUp - before).toBe(v2.length);
    expect((await storage.readBuffer('s/big.dcm')).equals(v2)).toBe(true);
    expect(await storage.cleanupPartials('', { olderThanMs: Date.now() + 60_000 })).toBe(1);
    expect(allFiles(local)).toEqual(['s/big.dcm']);
  });

  it('a large upload without a source mtime is not kept for resuming (nothing tells its versions apart)', async () => {
    const proxy = await proxyFor(plain!);
    const { storage, local } = storageOn(plain!, proxy);
    const body = randomBytes(9 * 1024 * 1024);
    proxy.cutNextUpload(4 * 1024 * 1024);
    await expect(
      storage.write('s/big.dcm', Readable.from([body]), { size: body.length }),
    ).rejects.toMatchObject({ code: 'E_TRANSIENT' });
    expect(allFiles(local)).toEqual([]);
  });

  it('a 425 for one transfer is retried at once for that file; the write succeeds', async () => {
    const proxy = await proxyFor(plain!);
    const { storage, local } = storageOn(plain!, proxy);
    const body = randomBytes(100_000);
    proxy.refuseNextStor();
    await storage.write('a/b.dcm', Readable.from([body]), { size: body.length });
    expect(proxy.stats.refused).toBe(1);
    expect((await storage.readBuffer('a/b.dcm')).equals(body)).toBe(true);
    expect(allFiles(local)).toEqual(['a/b.dcm']);
  });

  it('uploads from memory send EPSV and STOR in one write once EPSV worked, and arrive whole', async () => {
    const proxy = await proxyFor(plain!);
    const { storage, local } = storageOn(plain!, proxy, { maxConnections: 1 });
    const bodies = [0, 1, 300_000, 5_000, 1_000_000].map((n) => randomBytes(n));
    for (const [i, body] of bodies.entries()) await storage.write(`m/${i}.dcm`, body, { size: body.length });
    expect(allFiles(local)).toEqual(bodies.map((_, i) => `m/${i}.dcm`));
    for (const [i, body] of bodies.entries())
      expect(readFileSync(join(local, `m/${i}.dcm`)).equals(body)).toBe(true);
    const chunks = proxy.stats.chunks[0]!;
    // The first transfer finds the passive mode (EPSV alone); every later one pipelines it.
    expect(chunks.filter((c) => c === 'EPSV')).toHaveLength(1);
    expect(chunks.filter((c) => c === 'EPSV + STOR')).toHaveLength(bodies.length - 1);
    expect(chunks.filter((c) => c === 'STOR')).toHaveLength(1);
  });

  it.each(['500 Unknown command.', '522 Extended passive mode not supported.'])(
    'a pipelined EPSV the server stops accepting (%s): the file goes through PASV at once on a new session, and so do the next',
    async (reply) => {
      const proxy = await proxyFor(plain!);
      const { storage, local } = storageOn(plain!, proxy, { maxConnections: 1 });
      await storage.write('e/0.dcm', Buffer.from('first'), { size: 5 });
      proxy.refuseAlways(/^EPSV/i, reply);
      const bodies = [randomBytes(70_000), randomBytes(10)];
      for (const [i, body] of bodies.entries()) {
        const entry = await storage.write(`e/${i + 1}.dcm`, body, { size: body.length });
        expect(entry.size).toBe(body.length);
      }
      expect(allFiles(local)).toEqual(['e/0.dcm', 'e/1.dcm', 'e/2.dcm']);
      for (const [i, body] of bodies.entries())
        expect(readFileSync(join(local, `e/${i + 1}.dcm`)).equals(body)).toBe(true);
      const chunks = proxy.stats.chunks.flat();
      const after = chunks.slice(chunks.indexOf('EPSV + STOR'));
      // Refused once pipelined, which closes that session; the new one tries EPSV alone (refused
      // again), then PASV, which the next upload keeps.
      expect(after.filter((c) => c === 'EPSV + STOR')).toHaveLength(1);
      expect(after.filter((c) => c === 'EPSV')).toHaveLength(1);
      expect(after.filter((c) => c === 'PASV')).toHaveLength(2);
      expect(proxy.stats.refused).toBe(2);
      expect(proxy.stats.controlConnections).toBe(2);
    },
  );

  it('a 425 for a pipelined upload from memory is retried at once on the same session', async () => {
    const proxy = await proxyFor(plain!);
    const { storage, local } = storageOn(plain!, proxy, { maxConnections: 1 });
    await storage.write('f/0.dcm', Buffer.from('first'), { size: 5 });
    proxy.refuseNextStor();
    const body = randomBytes(200_000);
    await storage.write('f/1.dcm', body, { size: body.length });
    expect(proxy.stats.refused).toBe(1);
    expect(proxy.stats.controlConnections).toBe(1);
    expect(readFileSync(join(local, 'f/1.dcm')).equals(body)).toBe(true);
    expect(allFiles(local)).toEqual(['f/0.dcm', 'f/1.dcm']);
  });

  it('a data connection reset before the server accepted it: a new session sends the file at once, nothing is left behind', async () => {
    const proxy = await proxyFor(plain!);
    const { storage, local } = storageOn(plain!, proxy, { maxConnections: 1 });
    await storage.write('g/0.dcm', Buffer.from('first'), { size: 5 });
    proxy.resetNextDataConnection();
    const body = randomBytes(150_000);
    await storage.write('g/1.dcm', body, { size: body.length });
    // The stuck session was closed, not asked for a verdict it would never give (NOOP, 5 s).
    expect(proxy.stats.commands.flat()).not.toContain('NOOP');
    expect(proxy.stats.refused).toBe(1);
    expect(proxy.stats.controlConnections).toBe(2);
    expect(readFileSync(join(local, 'g/1.dcm')).equals(body)).toBe(true);
    expect(allFiles(local)).toEqual(['g/0.dcm', 'g/1.dcm']);
  });

  it('a server that cannot rename: a clear E_UNSUPPORTED, and atomicUpload: false uploads in place', async () => {
    const proxy = await proxyFor(plain!);
    proxy.refuseAlways(/^RNFR /i, '502 Command not implemented.');
    const atomic = storageOn(plain!, proxy);
    const body = Buffer.from('x'.repeat(1000));
    await expect(atomic.storage.write('a/b.dcm', body, { size: body.length })).rejects.toMatchObject({
      code: 'E_UNSUPPORTED',
      retryable: false,
      message: expect.stringMatching(/atomicUpload: false/),
    });
    expect(allFiles(atomic.local)).toEqual([]);
    const direct = storageOn(plain!, proxy, { atomicUpload: false });
    const entry = await direct.storage.write('a/b.dcm', body, { size: body.length });
    expect(entry.size).toBe(1000);
    expect(allFiles(direct.local)).toEqual(['a/b.dcm']);
    expect((await direct.storage.readBuffer('a/b.dcm')).equals(body)).toBe(true);
  });

  it('the server killed and restarted mid-sync: partial or success, every recorded file there and whole, re-run sends only what is missing', async () => {
    const { storage, local } = storageOn(plain!);
    const src = tmp();
    const tree: Record<string, Buffer> = {};
    for (let i = 0; i < 48; i++) tree[`S${i % 4}/IM${i}.dcm`] = randomBytes(256 * 1024);
    writeTree(src, tree);
    const store = new MemoryStore();
    const job = new SyncJob({
      id: 'restart',
      source: new LocalStorage({ root: src }),
      destinations: [storage],
      store,
      concurrency: 4,
      // Down for 1.5 s: the later retries (after 0.3 s, 0.6 s, 1.2 s) may find it back.
      retry: { retries: 3, initialDelayMs: 300, multiplier: 2, jitter: 0 },
      eventPaths: true,
    });
    let done = 0;
    let retried = 0;
    job.on('file:retry', () => retried++);
    let restart: Promise<void> | undefined;
    job.on('file:done', () => {
      if (++done !== 10) return;
      // Killed here, synchronously: the transfers in flight now are cut for sure (a kill left to
      // the restart script could land after the last of them on a slow machine). The script then
      // keeps it down for 1.5 s and starts it again on the same port.
      const { pid } = JSON.parse(readFileSync(join(plain!.stateDir, 'pure-ftpd.json'), 'utf8')) as {
        pid: number;
      };
      process.kill(-pid, 'SIGKILL');
      restart = restartServer(plain!, 1.5);
    });
    const r1 = await job.run();
    await restart;
    expect(restart).toBeDefined();
    expect(['success', 'partial']).toContain(r1.status);
    // The kill hit transfers in flight: they were retried (and may have run out of retries).
    expect(retried).toBeGreaterThan(0);
    expect(r1.filesSynced + r1.filesFailed).toBe(48);
    // Every file the manifest lists is at the destination, byte-identical. A file may also be
    // there unrecorded: the kill can land after the server renamed it and before its reply
    // reached us (the upload then failed on our side). Such a file is complete, never partial,
    // and the re-run finds it there instead of sending it again.
    const delivered = (await manifestOf(job, store, storage)).map((e) => e.path).sort();
    const there = Object.keys(readTree(local))
      .filter((p) => !p.split('/').pop()!.startsWith('.'))
      .sort();
    expect(there).toEqual(expect.arrayContaining(delivered));
    expect(there.length - delivered.length).toBeLessThanOrEqual(4); // at most the transfers in flight
    expect(delivered.length).toBe(r1.filesSynced);
    const srcTree = readTree(src);
    const dstTree = readTree(local);
    for (const p of there) expect(dstTree[p]).toBe(srcTree[p]);
    // A re-run sends only what is missing, and then everything is there and recorded.
    const r2 = await job.run();
    expect(r2.status).toBe('success');
    expect(r2.filesSynced).toBe(48 - there.length);
    const final = readTree(local);
    for (const [p, b64] of Object.entries(srcTree)) expect(final[p]).toBe(b64);
    expect((await manifestOf(job, store, storage)).map((e) => e.path).sort()).toEqual(
      Object.keys(srcTree).sort(),
    );
  });

  it('quota exceeded (552) is E_QUOTA, not retried; the run is partial and names the files', async () => {
    const { storage, local } = storageOn(quota!);
    const src = tmp();
    const tree: Record<string, Buffer> = {};
    for (let i = 0; i < 5; i++) tree[`IM${i}.dcm`] = randomBytes(300_000);
    writeTree(src, tree);
    const job = new SyncJob({
      id: 'quota',
      source: new LocalStorage({ root: src }),
      destinations: [storage],
      store: new MemoryStore(),
      concurrency: 1,
      retry: fastRetry,
      eventPaths: true,
    });
    let retries = 0;
    job.on('file:retry', () => retries++);
    const r = await job.run();
    expect(r.status).toBe('partial');
    expect(r.filesSynced).toBe(3);
    expect(r.filesFailed).toBe(2);
    expect(retries).toBe(0);
    expect(r.errors.map((e) => e.code)).toEqual(['E_QUOTA', 'E_QUOTA']);
    expect(r.errors[0]!.message).toMatch(/out of space or over quota \(552\)/);
    // The refused files left nothing behind: three whole files, no temporary ones.
    const there = allFiles(local);
    expect(there).toHaveLength(3);
    for (const p of there) expect(readTree(local)[p]).toBe(readTree(src)[p]);
  });

  it('a wrong password is E_AUTH: one login, no retries, the run fails and says why', async () => {
    const proxy = await proxyFor(plain!);
    const { storage } = storageOn(plain!, proxy, { password: 'not-the-password' });
    const src = tmp();
    const tree: Record<string, string> = {};
    for (let i = 0; i < 20; i++) tree[`IM${i}.dcm`] = `file ${i}`;
    writeTree(src, tree);
    const job = new SyncJob({
      id: 'auth',
      source: new LocalStorage({ root: src }),
      destinations: [storage],
      store: new MemoryStore(),
      concurrency: 4,
      retry: fastRetry,
      eventPaths: true,
    });
    let retries = 0;
    job.on('file:retry', () => retries++);
    const r = await job.run();
    expect(r.status).toBe('failed');
    expect(r.filesSynced).toBe(0);
    expect(retries).toBe(0);
    // The first look at the destination (its listing, to adopt files already there) is refused:
    // the destination is skipped with one error that says why, and nothing else tries to log in.
    expect(r.errors).toEqual([
      {
        destination: storage.id,
        code: 'E_AUTH',
        message: expect.stringMatching(/refused the user name or password \(530\)/),
      },
    ]);
    expect(JSON.stringify(r.errors)).not.toContain('not-the-password');
    expect(proxy.stats.controlConnections).toBe(1);
  });
});
