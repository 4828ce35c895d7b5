import { randomBytes } from 'node:crypto';
import { mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type AddressInfo } from 'node:net';
import { join } from 'node:path';
import { Readable, Transform } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isMedsyncError, type MedsyncError } from '@medsync/core';
import { generatedStream } from '@medsync/core/testing';
import { createFtpStorage, toFtpError, type FtpStorage, type FtpStorageOptions } from '@medsync/adapters-ftp';
import { FTPError } from 'basic-ftp';
import { startFaultProxy } from './fault-proxy.js';
import { startFtpServer, type TestFtpServer } from './ftp-server.js';

let ftp: TestFtpServer;
let ftps: TestFtpServer;
let scratch = 0;
const open: FtpStorage[] = [];

beforeAll(async () => {
  [ftp, ftps] = await Promise.all([startFtpServer(), startFtpServer({ tls: true })]);
});
afterAll(async () => {
  await Promise.all(open.map((s) => s.close()));
  await Promise.all([ftp?.close(), ftps?.close()]);
});

/** An adapter rooted in a fresh folder of `server`; closed after the file's tests. */
function storage(server: TestFtpServer, extra: Partial<FtpStorageOptions> = {}): FtpStorage {
  const name = `s${++scratch}`;
  mkdirSync(join(server.dir, name));
  const s = createFtpStorage({
    host: server.host,
    port: server.port,
    user: server.user,
    password: server.password,
    root: `/${name}`,
    ...(server.cert ? { secure: 'explicit' as const, tls: { ca: server.cert } } : {}),
    ...extra,
  });
  open.push(s);
  return s;
}

async function caught(p: Promise<unknown>): Promise<MedsyncError> {
  try {
    await p;
  } catch (e) {
    if (isMedsyncError(e)) return e;
    throw e;
  }
  throw new Error('expected a rejection');
}

async function text(s: FtpStorage, path: string, range?: { start?: number; end?: number }): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const c of await s.read(path, range ?? {})) parts.push(c as Buffer);
  return Buffer.concat(parts);
}

/** `body` that fails like a lost disk after `chunks` chunks went through. */
function failingAfter(chunks: number, body: Readable): Readable {
  let n = 0;
  return body.pipe(
    new Transform({
      transform(chunk, _enc, cb) {
        if (++n === chunks) cb(Object.assign(new Error('read failed'), { code: 'EIO' }));
        else cb(null, chunk);
      },
    }),
  );
}

async function closedPort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const { port } = srv.address() as AddressInfo;
  await new Promise((r) => srv.close(r));
  return port;
}

describe('FtpStorage options and identity', () => {
  it('validates options with E_CONFIG naming the field, never echoing the password', () => {
    const base = { host: 'ftp.example.org', user: 'pacs', password: 'Sup3r-Secret!' };
    for (const [bad, field] of [
      [{ ...base, port: 70000 }, 'port'],
      [{ ...base, host: '' }, 'host'],
      [{ ...base, root: 'relative/dir' }, 'root'],
      [{ ...base, root: '/a/../b' }, 'root'],
      [{ ...base, secure: 'implicit' }, 'secure'],
      [{ ...base, maxConnections: 0 }, 'maxConnections'],
      [{ ...base, user: 'x\r\nDELE /' }, 'user'],
      [{ ...base, unknown: 1 }, 'unknown'],
    ] as const) {
      let err: unknown;
      try {
        createFtpStorage(bad as unknown as FtpStorageOptions);
      } catch (e) {
        err = e;
      }
      expect(err).toMatchObject({ code: 'E_CONFIG', retryable: false });
      expect((err as Error).message).toContain(field);
      expect((err as Error).message).not.toContain('Sup3r-Secret!');
    }
    expect(() => createFtpStorage({ ...base, tls: { rejectUnauthorized: false } })).toThrow(
      expect.objectContaining({ code: 'E_CONFIG', message: expect.stringContaining('secure') }),
    );
  });

  it('builds an id without the password, and applies defaults', () => {
    const s = createFtpStorage({
      host: 'ftp.example.org',
      user: 'pacs user',
      password: 'Sup3r-Secret!',
      root: '/dicom/in/',
    });
    expect(s.id).toBe('ftp://pacs%20user@ftp.example.org:21/dicom/in');
    expect(s.kind).toBe('ftp');
    expect(s.options).toMatchObject({ port: 21, secure: false, maxConnections: 4, timeoutMs: 30_000 });
    expect(s.options.tls.rejectUnauthorized).toBe(true);
    expect(JSON.stringify(s)).not.toContain('Sup3r-Secret!');
    expect(s.capabilities).toMatchObject({
      hashes: [],
      atomicRename: true,
      rangeReads: true,
      maxConcurrency: 4,
    });
    const t = createFtpStorage({ host: '::1', port: 990, user: 'u', password: 'p', secure: 'explicit' });
    expect(t.id).toBe('ftps://u@[::1]:990/');
    expect(t.kind).toBe('ftps');
  });
});

describe('FtpStorage against ftp-srv', () => {
  it('a wrong password is E_AUTH, not retryable, and never printed; waiters do not each retry the login', async () => {
    const wrong = `wrong-${randomBytes(4).toString('hex')}`;
    const s = storage(ftp, { password: wrong, maxConnections: 2 });
    const before = ftp.stats.logins;
    const errs = await Promise.all(Array.from({ length: 6 }, (_, i) => caught(s.stat(`f${i}.dcm`))));
    for (const e of errs) {
      expect(e).toMatchObject({ code: 'E_AUTH', retryable: false, adapter: 'ftp' });
      expect(e.message).toMatch(/user name or password/);
      expect(e.message).not.toContain(wrong);
      expect(e.message).not.toContain(ftp.password);
      expect(JSON.stringify(e)).not.toContain(wrong);
    }
    expect(ftp.stats.logins - before).toBeLessThanOrEqual(2);
    expect(s.id).not.toContain(wrong);
  });

  it('an account that needs no password (230 to USER) logs in; the password sent along is ignored', async () => {
    const anon = await startFtpServer({ anonymous: true });
    try {
      mkdirSync(join(anon.dir, 'in'));
      const s = createFtpStorage({
        host: anon.host,
        port: anon.port,
        user: 'anonymous',
        password: 'guest@example.org',
        root: '/in',
        maxConnections: 2,
      });
      try {
        await Promise.all(['a.dcm', 'b.dcm', 'c.dcm'].map((n) => s.write(n, Buffer.from(n))));
        expect((await s.readBuffer('b.dcm')).toString()).toBe('b.dcm');
        expect(readFileSync(join(anon.dir, 'in/c.dcm'), 'utf8')).toBe('c.dcm');
        expect(await s.test()).toMatchObject({ ok: true, writable: true, entries: 3 });
      } finally {
        await s.close();
      }
    } finally {
      await anon.close();
    }
  });

  it('test() reports a wrong password with advice instead of throwing', async () => {
    const wrong = `wrong-${randomBytes(4).toString('hex')}`;
    const r = await storage(ftp, { password: wrong }).test();
    expect(r).toMatchObject({ ok: false, kind: 'ftp', writable: false, error: { code: 'E_AUTH' } });
    expect(r.advice).toMatch(/user.*password/);
    expect(JSON.stringify(r)).not.toContain(wrong);
  });

  it('test() reports a closed port with advice instead of throwing', async () => {
    const port = await closedPort();
    const s = createFtpStorage({
      host: '127.0.0.1',
      port,
      user: 'u',
      password: 'Sup3r-Secret!',
      timeoutMs: 5000,
    });
    open.push(s);
    const r = await s.test();
    expect(r).toMatchObject({ ok: false, error: { code: 'E_TRANSIENT' } });
    expect(r.advice).toMatch(/Nothing accepts connections/);
    expect(JSON.stringify(r)).not.toContain('Sup3r-Secret!');
    await expect(s.stat('x.dcm')).rejects.toMatchObject({ code: 'E_TRANSIENT', retryable: true });
  });

  it('test() reports ok, entries, TLS and the server features', async () => {
    const s = storage(ftps);
    await s.write('one.dcm', Buffer.from('1'));
    await s.write('sub/two.dcm', Buffer.from('2'));
    const r = await s.test();
    expect(r).toMatchObject({ ok: true, writable: true, entries: 2, kind: 'ftps' });
    expect(r.details).toMatchObject({
      tls: true,
      features: expect.arrayContaining(['AUTH TLS', 'SIZE', 'MDTM']),
    });
    expect(r.details?.tlsProtocol).toMatch(/^TLS/);
    // ftp-srv has no MFMT: mtimes are not kept; nor a digest command.
    expect(s.capabilities).toMatchObject({ preservesMtime: false, mtimePrecisionMs: null });
    expect(r.details?.serverDigest).toBe('none');
    expect((await storage(ftps, { serverDigest: false }).test()).details?.serverDigest).toBe('off');
  });

  it('test() reports a missing root folder', async () => {
    const s = createFtpStorage({
      host: ftp.host,
      port: ftp.port,
      user: ftp.user,
      password: ftp.password,
      root: '/no/such',
    });
    open.push(s);
    const r = await s.test();
    expect(r).toMatchObject({ ok: false, error: { code: 'E_NOT_FOUND' } });
    expect(r.advice).toMatch(/root/);
  });

  it('FTPS refuses an untrusted certificate unless told otherwise', async () => {
    const untrusted = storage(ftps, { tls: {} });
    const e = await caught(untrusted.stat('x.dcm'));
    expect(e).toMatchObject({ code: 'E_CONFIG', retryable: false });
    expect(e.message).toMatch(/tls\.ca/);
    const r = await untrusted.test();
    expect(r).toMatchObject({ ok: false, error: { code: 'E_CONFIG' } });
    expect(r.advice).toMatch(/tls\.ca/);
    const warnings: Array<{ code?: string; message: string }> = [];
    const onWarning = (w: Error & { code?: string }) => warnings.push(w);
    process.on('warning', onWarning);
    try {
      const lax = storage(ftps, { tls: { rejectUnauthorized: false } });
      const report = await lax.test();
      expect(report.ok).toBe(true);
      // Turning verification off is said out loud: a process warning, and the report.
      expect(report.details).toMatchObject({ tls: true, tlsVerified: false });
      await new Promise((r) => setImmediate(r));
      expect(warnings.filter((w) => w.code === 'MEDSYNC_TLS_UNVERIFIED')).toHaveLength(1);
      expect(warnings[0]!.message).not.toContain(ftps.password);
    } finally {
      process.off('warning', onWarning);
    }
  });

  it('explicit FTPS against a server without TLS is E_CONFIG', async () => {
    const s = storage(ftp, { secure: 'explicit' });
    await expect(s.stat('x.dcm')).rejects.toMatchObject({ code: 'E_CONFIG', retryable: false });
  });

  it('range reads: from an offset, a slice, and a small head of a large file', async () => {
    const s = storage(ftp, { maxConnections: 1 });
    const data = randomBytes(3 * 1024 * 1024 + 17);
    await s.write('big.bin', Readable.from([data]), { size: data.length });
    expect((await text(s, 'big.bin', { start: 1000 })).equals(data.subarray(1000))).toBe(true);
    expect((await text(s, 'big.bin', { start: 10, end: 20 })).equals(data.subarray(10, 21))).toBe(true);
    // 400 bytes of 3 MiB: the rest is not drained past 1 MiB, the connection is replaced.
    expect((await text(s, 'big.bin', { end: 399 })).equals(data.subarray(0, 400))).toBe(true);
    expect((await s.stat('big.bin')).size).toBe(data.length);
    expect((await s.readBuffer('big.bin')).equals(data)).toBe(true);
  });

  it('a read stream destroyed early frees its connection; an aborted read errors with E_ABORTED', async () => {
    const s = storage(ftp, { maxConnections: 1 });
    await s.write('big.bin', generatedStream(4 * 1024 * 1024, 5), { size: 4 * 1024 * 1024 });
    const r1 = await s.read('big.bin');
    r1.destroy();
    expect((await s.stat('big.bin')).size).toBe(4 * 1024 * 1024); // would hang if the slot leaked
    const ac = new AbortController();
    const r2 = await s.read('big.bin', { signal: ac.signal });
    const got = (async () => {
      for await (const _ of r2) ac.abort();
    })();
    await expect(got).rejects.toMatchObject({ code: 'E_ABORTED' });
    await expect(s.read('missing.bin')).rejects.toMatchObject({ code: 'E_NOT_FOUND' });
    expect((await s.stat('big.bin')).size).toBe(4 * 1024 * 1024);
  });

  it('a read cancelled while it starts rejects with E_ABORTED instead of streaming', async () => {
    const s = storage(ftp);
    await s.write('r/a.dcm', Buffer.from('some bytes'));
    const ac = new AbortController();
    const reading = s.read('r/a.dcm', { signal: ac.signal });
    ac.abort();
    await expect(reading).rejects.toMatchObject({ code: 'E_ABORTED' });
    expect((await text(s, 'r/a.dcm')).toString()).toBe('some bytes');
  });

  it('replaces connections the server dropped', async () => {
    const s = storage(ftp, { maxConnections: 1 });
    await s.write('a.dcm', Buffer.from('abc'));
    await ftp.dropConnections();
    await new Promise((r) => setTimeout(r, 50));
    expect((await text(s, 'a.dcm')).toString()).toBe('abc');
    // No pause: the pooled connection is reused before the client noticed it was closed.
    await ftp.dropConnections();
    await s.write('b.dcm', Buffer.from('b'));
    await ftp.dropConnections();
    expect((await s.stat('b.dcm')).size).toBe(1);
    await ftp.dropConnections();
    expect((await text(s, 'b.dcm')).toString()).toBe('b');
    await ftp.dropConnections();
    expect((await s.test()).ok).toBe(true);
  });

  it('replaces a pooled session the server logged out (530) and runs the command on a new one', async () => {
    const s = storage(ftp, { maxConnections: 1 });
    await s.write('lo/a.dcm', Buffer.from('abc'));
    ftp.logOutSessions();
    expect((await text(s, 'lo/a.dcm')).toString()).toBe('abc');
    ftp.logOutSessions();
    await s.write('lo/b.dcm', Buffer.from('b'));
    ftp.logOutSessions();
    expect((await s.stat('lo/b.dcm')).size).toBe(1);
    ftp.logOutSessions();
    await s.remove('lo/b.dcm');
    ftp.logOutSessions();
    const listed: string[] = [];
    for await (const e of s.list('lo')) listed.push(e.path);
    expect(listed).toEqual(['lo/a.dcm']);
  });

  it('never opens more than maxConnections', async () => {
    const s = storage(ftp, { maxConnections: 2 });
    const peakBefore = ftp.stats.peakConnections;
    await ftp.dropConnections();
    await new Promise((r) => setTimeout(r, 50));
    ftp.stats.peakConnections = 0;
    await Promise.all(Array.from({ length: 10 }, (_, i) => s.write(`p/${i}.dcm`, randomBytes(5000))));
    expect(ftp.stats.peakConnections).toBeLessThanOrEqual(2);
    ftp.stats.peakConnections = Math.max(peakBefore, ftp.stats.peakConnections);
    expect(s.capabilities.maxConcurrency).toBe(2);
  });

  it('an aborted write removes its temporary file', async () => {
    const s = storage(ftp);
    const ac = new AbortController();
    let n = 0;
    // Aborts once 20 chunks went through, i.e. while the upload is running.
    const tap = new Transform({
      transform(chunk, _enc, cb) {
        if (++n === 20) ac.abort();
        cb(null, chunk);
      },
    });
    const body = generatedStream(16 * 1024 * 1024, 9, 64 * 1024).pipe(tap);
    const writing = s.write('ab/x.bin', body, { size: 16 * 1024 * 1024, signal: ac.signal });
    await expect(writing).rejects.toMatchObject({ code: 'E_ABORTED' });
    expect(n).toBeGreaterThanOrEqual(20);
    await new Promise((r) => setTimeout(r, 100));
    expect(readdirSync(join(ftp.dir, s.options.root, 'ab'))).toEqual([]);
  });

  it('an upload stopped on our side mid-transfer retires its connection; the next calls get their own replies', async () => {
    const s = storage(ftp, { maxConnections: 1 });
    await s.write('ok.dcm', Buffer.from('first'));
    const cases: Array<[string, () => Readable, number, string | undefined]> = [
      // The source grew while it was sent (a file still being written by the modality).
      ['grown.dcm', () => generatedStream(8 * 1024 * 1024, 5, 64 * 1024), 4 * 1024 * 1024, 'E_INTEGRITY'],
      // The source failed to read (a NAS that went away).
      [
        'unread.dcm',
        () => failingAfter(10, generatedStream(8 * 1024 * 1024, 6, 64 * 1024)),
        8 * 1024 * 1024,
        undefined,
      ],
    ];
    for (const [name, body, size, code] of cases) {
      const before = ftp.stats.logins;
      // The server still owes the reply of the cut transfer: the next command on the same
      // session would read it as its own.
      const e = await caught(s.write(name, body(), { size }));
      expect(e.path).toBe(name);
      if (code) expect(e.code).toBe(code);
      expect((await s.stat('ok.dcm')).size).toBe(5);
      expect((await text(s, 'ok.dcm')).toString()).toBe('first');
      await s.write('next.dcm', Buffer.from(name));
      expect((await text(s, 'next.dcm')).toString()).toBe(name);
      // The session was closed and one new session replaced it.
      expect(ftp.stats.logins - before).toBe(1);
    }
    await new Promise((r) => setTimeout(r, 100));
    expect(readdirSync(join(ftp.dir, s.options.root)).sort()).toEqual(['next.dcm', 'ok.dcm']);
  });

  it('lists a file prefix as that file, and hides temporary files', async () => {
    const s = storage(ftp);
    await s.write('d/f.dcm', Buffer.from('12345'));
    writeFileSync(join(ftp.dir, s.options.root, 'd', '.f.dcm.1.medsync-part'), 'partial');
    const got = [];
    for await (const e of s.list('d/f.dcm')) got.push(e);
    expect(got).toEqual([expect.objectContaining({ path: 'd/f.dcm', size: 5 })]);
    const all = [];
    for await (const e of s.list('')) all.push(e.path);
    expect(all).toEqual(['d/f.dcm']);
    // ftp-srv's MDTM gives the time, so an old-enough cutoff keeps the fresh partial.
    expect(await s.cleanupPartials('', { olderThanMs: Date.now() - 60_000 })).toBe(0);
    expect(await s.cleanupPartials('d')).toBe(1);
    expect(await s.cleanupPartials('no/such')).toBe(0);
  });

  it('a folder that cannot be entered is listed as unreadable; one removed during the walk is skipped', async () => {
    // Servers answer 550 alike for a missing folder and a forbidden one. Skipping the forbidden
    // one would hide its files: a mirror from this server would delete their copies. It is
    // listed with size -1 (a mirror deletes nothing below it), and the walk goes on.
    let dir = '';
    const refusing = await startFtpServer({
      refuse: {
        enter: (p) => {
          if (p.endsWith('/locked')) return true;
          // Removed by someone else just as the walk reaches it.
          if (!p.endsWith('/vanishing')) return false;
          rmSync(join(dir, p), { recursive: true, force: true });
          return true;
        },
      },
    });
    dir = refusing.dir;
    try {
      const s = storage(refusing);
      await s.write('a/one.dcm', Buffer.from('1'));
      await s.write('b/vanishing/two.dcm', Buffer.from('2'));
      await s.write('a/locked/three.dcm', Buffer.from('3'));
      await s.write('c/four.dcm', Buffer.from('4'));
      const seen: string[] = [];
      for await (const e of s.list('')) seen.push(`${e.path} ${e.size}`);
      expect(seen.sort()).toEqual(['a/locked -1', 'a/one.dcm 1', 'c/four.dcm 1']);
      await s.close();
    } finally {
      await refusing.close();
    }
  });

  it('a server that never replaces a file: the old version moves aside, and comes back if the new one cannot go in', async () => {
    let locked = false;
    const refusing = await startFtpServer({
      refuse: {
        // Never over an existing file; and, while `locked`, not the new upload into b.dcm
        // either (a virus scanner holding it). Moves aside and back are allowed.
        rename: (from, to, exists) =>
          exists || (locked && to.endsWith('/b.dcm') && !/\.old[0-9a-z]+\.medsync-part$/.test(from)),
      },
    });
    try {
      const s = storage(refusing);
      const root = join(refusing.dir, s.options.root);
      await s.write('d/a.dcm', Buffer.from('version 1'));
      await s.write('d/a.dcm', Buffer.from('version 2'));
      expect((await s.readBuffer('d/a.dcm')).toString()).toBe('version 2');
      await s.write('d/b.dcm', Buffer.from('keep me'));
      locked = true;
      await expect(s.write('d/b.dcm', Buffer.from('new bytes'))).rejects.toMatchObject({ path: 'd/b.dcm' });
      // The old version is still there, and nothing else is left behind.
      expect((await s.readBuffer('d/b.dcm')).toString()).toBe('keep me');
      expect(readdirSync(join(root, 'd')).sort()).toEqual(['a.dcm', 'b.dcm']);
      // A folder in the way (with a delivered file in it) is never moved aside: the write fails.
      locked = false;
      await s.write('d/c.dcm/inside.dcm', Buffer.from('delivered'));
      await expect(s.write('d/c.dcm', Buffer.from('a file here?'))).rejects.toMatchObject({
        path: 'd/c.dcm',
      });
      expect(readdirSync(join(root, 'd')).sort()).toEqual(['a.dcm', 'b.dcm', 'c.dcm']);
      expect((await s.readBuffer('d/c.dcm/inside.dcm')).toString()).toBe('delivered');
      await s.close();
    } finally {
      await refusing.close();
    }
  });

  it('a temporary file removed by someone else before its checks fails retryably, not as a refusal', async () => {
    let dir = '';
    let sweeps = 0;
    const refusing = await startFtpServer({
      refuse: {
        // Another program sweeps the temporary file just as the upload is checked (SIZE), and
        // the server says only "550 Operation failed." (vsftpd: "550 Could not get file size.").
        get: (p) => {
          if (!p.endsWith('.medsync-part') || sweeps > 0) return false;
          sweeps++;
          rmSync(join(dir, p), { force: true });
          return true;
        },
      },
    });
    dir = refusing.dir;
    try {
      const s = storage(refusing);
      const err = await caught(s.write('d/a.dcm', Buffer.from('some bytes')));
      expect(sweeps).toBe(1);
      expect(err).toMatchObject({ code: 'E_TRANSIENT', retryable: true, path: 'd/a.dcm' });
      // The retry goes through.
      await s.write('d/a.dcm', Buffer.from('some bytes'));
      expect((await s.readBuffer('d/a.dcm')).toString()).toBe('some bytes');
      await s.close();
    } finally {
      await refusing.close();
    }
  });

  it('a bare 550 on DELE or RNFR of a file that is still there is E_PERMISSION, not "already gone"', async () => {
    // vsftpd answers "550 Delete operation failed." when the disk refuses (a retention share);
    // only a file seen missing counts as removed.
    let rnfrRefusals = 0;
    let sealed = false;
    const refusing = await startFtpServer({
      refuse: {
        delete: (p) => p.endsWith('/kept.dcm') || p.endsWith('/sealed.dcm'),
        // RNFR is the first `get` of moved.dcm; the SIZE that follows it finds the file.
        // sealed.dcm may be neither deleted nor read (SIZE, MDTM refused too).
        get: (p) =>
          (p.endsWith('/moved.dcm') && rnfrRefusals++ === 0) || (sealed && p.endsWith('/sealed.dcm')),
      },
    });
    try {
      const s = storage(refusing);
      await s.write('d/kept.dcm', Buffer.from('keep me'));
      await s.write('d/moved.dcm', Buffer.from('stay'));
      const del = await caught(s.remove('d/kept.dcm'));
      expect(del).toMatchObject({ code: 'E_PERMISSION', retryable: false, path: 'd/kept.dcm' });
      expect(del.message).toMatch(/refused \(550\) and the file is still there/);
      expect(del.message).not.toContain('kept');
      expect((await s.stat('d/kept.dcm')).size).toBe(7);
      const mv = await caught(s.rename('d/moved.dcm', 'd/elsewhere.dcm'));
      expect(mv).toMatchObject({ code: 'E_PERMISSION', path: 'd/moved.dcm' });
      expect(rnfrRefusals).toBeGreaterThan(0);
      await s.write('d/sealed.dcm', Buffer.from('unreadable'));
      sealed = true;
      expect(await caught(s.remove('d/sealed.dcm'))).toMatchObject({
        code: 'E_PERMISSION',
        path: 'd/sealed.dcm',
      });
      expect(readdirSync(join(refusing.dir, s.options.root, 'd'))).toContain('sealed.dcm');
      // A missing file still counts as removed, and its rename as not found.
      await expect(s.remove('d/never-there.dcm')).resolves.toBeUndefined();
      await expect(s.rename('d/never-there.dcm', 'd/x.dcm')).rejects.toMatchObject({ code: 'E_NOT_FOUND' });
      await s.close();
    } finally {
      await refusing.close();
    }
  });

  it('an upload cut mid-transfer (ftp-srv then answers "550 read ECONNRESET") is retryable, not E_PERMISSION', async () => {
    const proxy = await startFaultProxy(ftp);
    const s = storage(ftp, { host: proxy.host, port: proxy.port });
    const dir = join(ftp.dir, s.options.root);
    try {
      for (const [label, body] of [
        ['buffer', randomBytes(3_000_000)],
        ['stream', randomBytes(3_000_000)],
      ] as const) {
        proxy.cutNextUpload(1_000_000);
        const e = await caught(
          s.write(`${label}.dcm`, label === 'buffer' ? body : Readable.from([body]), { size: body.length }),
        );
        // E_INTEGRITY when ftp-srv took the reset for the end of the file (226, then SIZE tells).
        expect([e.code, e.retryable, label]).toEqual([
          expect.stringMatching(/^E_(TRANSIENT|INTEGRITY)$/),
          true,
          label,
        ]);
        // The retry (the job's) then delivers it.
        await s.write(`${label}.dcm`, label === 'buffer' ? body : Readable.from([body]), {
          size: body.length,
        });
        expect(readFileSync(join(dir, `${label}.dcm`)).equals(body)).toBe(true);
      }
      expect(proxy.stats.cuts).toBe(2);
      expect(readdirSync(dir).sort()).toEqual(['buffer.dcm', 'stream.dcm']);
    } finally {
      await proxy.close();
    }
  });

  it('rejects CR/LF in paths before any I/O, and calls after close', async () => {
    const s = storage(ftp);
    await expect(s.stat('a\r\nDELE x')).rejects.toMatchObject({ code: 'E_INVALID_PATH' });
    await s.close();
    await expect(s.stat('a.dcm')).rejects.toMatchObject({ code: 'E_CONFIG' });
  });
});

describe('toFtpError', () => {
  const reply = (code: number, message: string) => new FTPError({ code, message: `${code} ${message}` });

  it('classifies FTP replies by code and operation', () => {
    expect(toFtpError(reply(530, 'Login incorrect.'), 'login')).toMatchObject({
      code: 'E_AUTH',
      retryable: false,
    });
    // A 530 to one command (not the login) is about that path: it must not stop the destination.
    expect(toFtpError(reply(530, 'Not allowed here'), 'write')).toMatchObject({
      code: 'E_PERMISSION',
      retryable: false,
    });
    expect(toFtpError(reply(552, 'Quota exceeded'), 'write')).toMatchObject({
      code: 'E_QUOTA',
      retryable: false,
    });
    expect(toFtpError(reply(550, 'x.dcm: No such file'), 'read')).toMatchObject({ code: 'E_NOT_FOUND' });
    expect(toFtpError(reply(550, 'Failed to open file.'), 'stat')).toMatchObject({ code: 'E_NOT_FOUND' });
    expect(toFtpError(reply(553, 'Could not create file.'), 'write')).toMatchObject({
      code: 'E_PERMISSION',
      retryable: false,
    });
    expect(toFtpError(reply(550, '/in/x.dcm: Permission denied'), 'read')).toMatchObject({
      code: 'E_PERMISSION',
    });
    for (const code of [421, 425, 426, 450, 451]) {
      expect(toFtpError(reply(code, 'busy'), 'write')).toMatchObject({
        code: 'E_TRANSIENT',
        retryable: true,
      });
    }
    expect(toFtpError(reply(502, 'Command not implemented'), 'write')).toMatchObject({
      code: 'E_UNSUPPORTED',
    });
    expect(toFtpError(reply(534, 'Policy requires SSL'), 'login')).toMatchObject({ code: 'E_CONFIG' });
  });

  it('classifies socket failures as transient', () => {
    const reset = Object.assign(new Error('read ECONNRESET (control socket)'), { code: 'ECONNRESET' });
    expect(toFtpError(reset, 'list')).toMatchObject({ code: 'E_TRANSIENT', retryable: true });
    expect(toFtpError(new Error('Timeout (data socket)'), 'read')).toMatchObject({ code: 'E_TRANSIENT' });
    expect(
      toFtpError(new Error('Server sent FIN packet unexpectedly, closing connection.'), 'stat'),
    ).toMatchObject({
      code: 'E_TRANSIENT',
    });
    const cert = Object.assign(new Error('self-signed certificate'), { code: 'DEPTH_ZERO_SELF_SIGNED_CERT' });
    expect(toFtpError(cert, 'tls')).toMatchObject({ code: 'E_CONFIG', retryable: false });
    expect(toFtpError(cert, 'write')).toMatchObject({ code: 'E_CONFIG', retryable: false });
    // A garbled TLS record on a session that was set up is a broken connection; the same error
    // while setting it up says the port does not speak TLS as configured.
    const mac = Object.assign(new Error('decryption failed or bad record mac'), {
      code: 'ERR_SSL_DECRYPTION_FAILED_OR_BAD_RECORD_MAC',
    });
    expect(toFtpError(mac, 'write')).toMatchObject({ code: 'E_TRANSIENT', retryable: true });
    expect(toFtpError(mac, 'list')).toMatchObject({ code: 'E_TRANSIENT', retryable: true });
    expect(toFtpError(mac, 'tls')).toMatchObject({ code: 'E_CONFIG', retryable: false });
    expect(toFtpError(mac, 'connect')).toMatchObject({ code: 'E_CONFIG', retryable: false });
  });

  it('keeps the path out of the message and in `path`', () => {
    const e = toFtpError(
      reply(550, '/pacs/Müller Hans/CT.dcm: No such file or directory'),
      'read',
      'Müller Hans/CT.dcm',
    );
    expect(e.message).not.toContain('Müller');
    expect(e.path).toBe('Müller Hans/CT.dcm');
    const odd = toFtpError(new Error("Can't parse response to 'SIZE /pacs/Müller Hans/CT.dcm'"), 'stat');
    expect(odd.message).not.toContain('Müller');
  });
});
