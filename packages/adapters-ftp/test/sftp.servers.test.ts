/**
 * SFTP against a real OpenSSH sshd (Debian's openssh-server, sftp-server subsystem), started on
 * loopback by scripts/services.sh. Under CI=true the server must start; elsewhere the suite is
 * skipped with one line saying how to enable it.
 */
import { execFileSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import {
  chmodSync,
  chownSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  symlinkSync,
  utimesSync,
  writeFileSync,
} from 'node:fs';
import { createConnection, createServer, type AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, relative } from 'node:path';
import { Readable } from 'node:stream';
import { describe, expect, it, vi } from 'vitest';
import { LocalStorage, MemoryStore, SyncJob } from '@medsync/core';
import {
  describeStorageConformance,
  digestOf,
  generatedStream,
  readTree,
  writeTree,
} from '@medsync/core/testing';
import { createSftpStorage, type SftpStorage, type SftpStorageOptions } from '@medsync/adapters-ftp';
import { expectCaseTwinsArrive } from './case-twins.js';
import { freshSftpRoot, startSshd, type SshdInfo } from './sshd.js';

const server = startSshd();

function keyOf(s: SshdInfo): string {
  return readFileSync(s.privateKey, 'utf8');
}

/** A storage rooted in a fresh folder; password login and the pinned fingerprint by default. */
function storageOn(s: SshdInfo, extra: Partial<SftpStorageOptions> = {}): SftpStorage {
  return createSftpStorage({
    host: s.host,
    port: s.port,
    user: s.user,
    password: s.password,
    hostFingerprint: s.hostFingerprint,
    root: freshSftpRoot(s),
    ...extra,
  });
}

const removeRoot = (s: SftpStorage) => rmSync(s.options.root, { recursive: true, force: true });

/**
 * A TCP proxy to `port` that lets the client's bytes through at `bytesPerSec` (a slow uplink);
 * the server's bytes go back at once.
 */
async function slowUplink(
  port: number,
  bytesPerSec: number,
): Promise<{ port: number; close(): Promise<void> }> {
  const sockets = new Set<import('node:net').Socket>();
  const server = createServer((client) => {
    const up = createConnection(port, '127.0.0.1');
    sockets.add(client).add(up);
    const queue: Buffer[] = [];
    const tickMs = 20;
    const timer = setInterval(() => {
      let budget = Math.ceil((bytesPerSec * tickMs) / 1000);
      while (budget > 0 && queue.length > 0) {
        const head = queue[0]!;
        const n = Math.min(budget, head.length);
        up.write(head.subarray(0, n));
        if (n === head.length) queue.shift();
        else queue[0] = head.subarray(n);
        budget -= n;
      }
    }, tickMs);
    client.on('data', (d: Buffer) => queue.push(d));
    up.on('data', (d: Buffer) => client.write(d));
    const end = () => {
      clearInterval(timer);
      client.destroy();
      up.destroy();
    };
    client.on('close', end).on('error', end);
    up.on('close', end).on('error', end);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return {
    port: (server.address() as AddressInfo).port,
    close: async () => {
      for (const x of sockets) x.destroy();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
}

/** Every file below a local folder (relative paths), temporary files included. */
function filesUnder(dir: string): string[] {
  const out: string[] = [];
  const walk = (d: string) => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      if (e.isDirectory()) walk(p);
      else out.push(relative(dir, p));
    }
  };
  walk(dir);
  return out.sort();
}

const put = (s: SftpStorage, p: string, data: string | Buffer, mtimeMs?: number) =>
  s.write(p, Readable.from([Buffer.from(data)]), {
    size: Buffer.byteLength(data),
    ...(mtimeMs !== undefined ? { mtimeMs } : {}),
  });

/** Lines of sshd's log from `offset` on. */
function logSince(s: SshdInfo, offset: number): string {
  return readFileSync(s.log).subarray(offset).toString();
}

const logSize = (s: SshdInfo) => statSync(s.log).size;

/**
 * A second key for the test user whose every session runs `command` (authorized_keys
 * `restrict,command=`): its private key, and `remove()` to take it out again.
 */
function forcedCommandKey(s: SshdInfo, command: string): { privateKey: string; remove(): void } {
  const key = join(tmpdir(), `medsync-forced-${randomBytes(4).toString('hex')}`);
  execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', key]);
  const authorized = join(dirname(s.privateKey), 'authorized_keys');
  const saved = readFileSync(authorized, 'utf8');
  writeFileSync(
    authorized,
    `${saved.trimEnd()}\nrestrict,command="${command}" ${readFileSync(`${key}.pub`, 'utf8')}`,
  );
  return {
    privateKey: readFileSync(key, 'utf8'),
    remove: () => {
      writeFileSync(authorized, saved);
      rmSync(key, { force: true });
      rmSync(`${key}.pub`, { force: true });
    },
  };
}

function define(s: SshdInfo): void {
  describeStorageConformance({
    name: 'sftp (OpenSSH, password)',
    create: async () => storageOn(s),
    cleanup: async (st) => removeRoot(st as SftpStorage),
    largeFileBytes: 16 * 1024 * 1024,
  });

  describeStorageConformance({
    name: 'sftp (OpenSSH, key + known_hosts, two connections)',
    create: async () =>
      storageOn(s, {
        password: undefined,
        privateKey: keyOf(s),
        hostFingerprint: undefined,
        knownHosts: `${s.knownHostsLine}\n`,
        maxConnections: 2,
      }),
    cleanup: async (st) => removeRoot(st as SftpStorage),
    largeFileBytes: 8 * 1024 * 1024,
  });

  describe('sftp (OpenSSH) behaviour', () => {
    it('logs in with a password, and with a key (no password given)', async () => {
      for (const extra of [{}, { password: undefined, privateKey: keyOf(s) }]) {
        const st = storageOn(s, extra);
        try {
          await put(st, 'a/b.dcm', 'hello');
          expect(readFileSync(join(st.options.root, 'a/b.dcm'), 'utf8')).toBe('hello');
          expect((await st.readBuffer('a/b.dcm')).toString()).toBe('hello');
        } finally {
          await st.close();
          removeRoot(st);
        }
      }
    });

    it('a wrong password is E_AUTH, not retryable, and the server sees one login attempt for many calls', async () => {
      const st = storageOn(s, { password: 'wrong-password-xyz' });
      const before = logSize(s);
      try {
        const calls = [
          put(st, 'x.dcm', 'x'),
          put(st, 'y.dcm', 'y'),
          st.stat('x.dcm'),
          st.readBuffer('x.dcm'),
          st.remove('x.dcm'),
        ];
        const results = await Promise.allSettled(calls);
        for (const r of results) {
          expect(r.status).toBe('rejected');
          expect((r as PromiseRejectedResult).reason).toMatchObject({ code: 'E_AUTH', retryable: false });
          expect(String((r as PromiseRejectedResult).reason.message)).not.toContain('wrong-password-xyz');
        }
        // A later call does not log in again right away (accounts get locked by fail2ban & co).
        await expect(st.stat('x.dcm')).rejects.toMatchObject({ code: 'E_AUTH' });
        const report = await st.test();
        expect(report).toMatchObject({ ok: false, error: { code: 'E_AUTH' } });
        expect(report.advice).toMatch(/password|privateKey/);
        // sshd writes its log line after the reply: wait for it (a busy machine may take a while),
        // then check that there is exactly one.
        await vi.waitFor(() => expect(logSince(s, before)).toMatch(/Failed password for/), {
          timeout: 10_000,
          interval: 100,
        });
        await new Promise((r) => setTimeout(r, 300));
        const failed = logSince(s, before).match(/Failed password for/g) ?? [];
        expect(failed.length).toBe(1);
      } finally {
        await st.close();
        removeRoot(st);
      }
    });

    it('refuses an unknown or mismatching host key; the message shows the real SHA256 fingerprint', async () => {
      const other = `SHA256:${randomBytes(32).toString('base64').replace(/=+$/, '')}`;
      const cases: Partial<SftpStorageOptions>[] = [
        { hostFingerprint: other },
        {
          hostFingerprint: undefined,
          knownHosts: `otherhost.example ssh-ed25519 ${s.knownHostsLine.split(' ')[2]}\n`,
        },
        {
          hostFingerprint: undefined,
          // The right name with another key: a mismatch.
          knownHosts: `[${s.host}]:${s.port} ${readFileSync(s.privateKey + '.pub', 'utf8')
            .split(' ')
            .slice(0, 2)
            .join(' ')}\n`,
        },
      ];
      for (const extra of cases) {
        const st = storageOn(s, extra);
        const before = logSize(s);
        try {
          const e = await st.stat('a.dcm').catch((x: unknown) => x);
          expect(e).toMatchObject({ code: 'E_CONFIG', retryable: false });
          expect((e as Error).message).toContain(s.hostFingerprint);
          const r = await st.test();
          expect(r.ok).toBe(false);
          expect(r.error?.message).toContain(s.hostFingerprint);
          expect(r.details?.hostKey).toMatchObject({
            fingerprint: s.hostFingerprint,
            algorithm: 'ssh-ed25519',
          });
          // Never logged in: no password was sent to an unverified server.
          expect(logSince(s, before)).not.toMatch(/Accepted|Failed password/);
        } finally {
          await st.close();
          removeRoot(st);
        }
      }
      const e1 = (() => {
        try {
          createSftpStorage({ host: s.host, port: s.port, user: s.user, password: s.password });
        } catch (e) {
          return e;
        }
      })();
      expect(e1).toMatchObject({ code: 'E_CONFIG' });
      expect((e1 as Error).message).toMatch(/hostFingerprint.*knownHosts/s);
    });

    it('accepts known_hosts lines: plain [host]:port, hashed (ssh-keygen -H), and with comments', async () => {
      const dir = join(tmpdir(), `medsync-kh-${randomBytes(4).toString('hex')}`);
      mkdirSync(dir);
      try {
        const kh = join(dir, 'known_hosts');
        writeFileSync(kh, `# comment\nsomeone.example ssh-rsa AAAAB3NzaC1yc2E=\n${s.knownHostsLine}\n`);
        execFileSync('ssh-keygen', ['-H', '-f', kh], { stdio: 'ignore' });
        const hashed = readFileSync(kh, 'utf8');
        expect(hashed).toContain('|1|');
        expect(hashed).not.toContain(`[${s.host}]:${s.port}`);
        for (const knownHosts of [`${s.knownHostsLine}\n`, hashed]) {
          const st = storageOn(s, { hostFingerprint: undefined, knownHosts });
          try {
            const r = await st.test();
            expect(r.ok).toBe(true);
            expect(r.details?.hostKey).toMatchObject({ verified: 'known_hosts', check: 'known_hosts' });
          } finally {
            await st.close();
            removeRoot(st);
          }
        }
        // @revoked wins even over a pinned fingerprint.
        const st = storageOn(s, { knownHosts: `@revoked ${s.knownHostsLine}\n` });
        try {
          await expect(st.stat('a')).rejects.toMatchObject({
            code: 'E_CONFIG',
            message: expect.stringMatching(/revoked/),
          });
        } finally {
          await st.close();
          removeRoot(st);
        }
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });

    it('insecureSkipHostKeyCheck connects and says so in the report', async () => {
      const st = storageOn(s, { hostFingerprint: undefined, insecureSkipHostKeyCheck: true });
      try {
        const r = await st.test();
        expect(r.ok).toBe(true);
        expect(r.details).toMatchObject({
          hostKey: { fingerprint: s.hostFingerprint, check: 'off (insecureSkipHostKeyCheck)' },
          warning: expect.stringMatching(/not verified/),
        });
      } finally {
        await st.close();
        removeRoot(st);
      }
    });

    it('a root the account may write but not list (a drop folder): test() passes without a count', async () => {
      const st = storageOn(s);
      try {
        await put(st, 'one.dcm', '1');
        chmodSync(st.options.root, 0o311);
        const r = await st.test();
        expect(r).toMatchObject({ ok: true, writable: true, details: { listable: false } });
        expect(r.entries).toBeUndefined();
        expect(r.advice).toMatch(/drop folder/);
        // Uploads still work.
        await put(st, 'two.dcm', '22');
        chmodSync(st.options.root, 0o755);
        expect(readFileSync(join(st.options.root, 'two.dcm'), 'utf8')).toBe('22');
        // Neither listable nor writable: not a destination.
        chmodSync(st.options.root, 0o111);
        expect(await st.test()).toMatchObject({ ok: false, error: { code: 'E_PERMISSION' } });
      } finally {
        chmodSync(st.options.root, 0o755);
        await st.close();
        removeRoot(st);
      }
    });

    it('test() reports the server, host key, extensions, entries and free space', async () => {
      const st = storageOn(s);
      try {
        await put(st, 'one.dcm', '1');
        await put(st, 'sub/two.dcm', '2');
        const r = await st.test();
        expect(r).toMatchObject({ ok: true, kind: 'sftp', writable: true, entries: 2 });
        expect(r.id).toBe(`sftp://${s.user}@${s.host}:${s.port}${st.options.root}`);
        expect(r.freeBytes).toBeGreaterThan(0);
        expect(r.details).toMatchObject({
          server: expect.stringMatching(/^SSH-2\.0-OpenSSH_/),
          hostKey: { algorithm: 'ssh-ed25519', fingerprint: s.hostFingerprint, verified: 'fingerprint' },
          atomicRename: true,
          fsync: true,
        });
        expect(r.details?.extensions).toEqual(
          expect.arrayContaining(['posix-rename@openssh.com', 'statvfs@openssh.com', 'fsync@openssh.com']),
        );
        expect(JSON.stringify(r)).not.toContain(s.password);
        expect(filesUnder(st.options.root)).toEqual(['one.dcm', 'sub/two.dcm']); // the probe is gone
      } finally {
        await st.close();
        removeRoot(st);
      }
    });

    it('test() advice: missing root, nothing listening', async () => {
      const st = storageOn(s, { root: `${s.root}/no/such/folder` });
      const free = createSftpStorage({
        host: s.host,
        port: 1,
        user: s.user,
        password: s.password,
        hostFingerprint: s.hostFingerprint,
        root: '/',
      });
      try {
        const r = await st.test();
        expect(r).toMatchObject({ ok: false, error: { code: 'E_NOT_FOUND' } });
        expect(r.advice).toMatch(/root/);
        const r2 = await free.test();
        expect(r2).toMatchObject({ ok: false, error: { code: 'E_TRANSIENT' } });
        expect(r2.advice).toMatch(/Nothing accepts connections/);
      } finally {
        await st.close();
        await free.close();
      }
    });

    it('an abort mid-upload leaves nothing under the final name and no temporary file', async () => {
      const st = storageOn(s);
      try {
        const ac = new AbortController();
        let n = 0;
        const body = generatedStream(32 * 1024 * 1024, 5, 64 * 1024);
        body.on('data', () => {
          if (++n === 20) ac.abort();
        });
        await expect(
          st.write('ab/big.bin', body, { size: 32 * 1024 * 1024, signal: ac.signal }),
        ).rejects.toMatchObject({ code: 'E_ABORTED' });
        await new Promise((r) => setTimeout(r, 200));
        expect(filesUnder(st.options.root)).toEqual([]);
        // The storage still works afterwards.
        await put(st, 'ab/after.dcm', 'ok');
        expect(filesUnder(st.options.root)).toEqual(['ab/after.dcm']);
      } finally {
        await st.close();
        removeRoot(st);
      }
    });

    it('a body that errors leaves no temporary file; the error is the source’s, the session stays', async () => {
      const st = storageOn(s, { maxConnections: 1 });
      try {
        let sent = 0;
        const broken = new Readable({
          read() {
            if (sent++ < 10) this.push(randomBytes(64 * 1024));
            else this.destroy(Object.assign(new Error('disk read failed'), { code: 'EIO' }));
          },
        });
        await expect(st.write('br/file.bin', broken, { size: 10_000_000 })).rejects.toMatchObject({
          name: 'MedsyncError',
          code: 'E_IO',
          path: 'br/file.bin',
        });
        expect(filesUnder(st.options.root)).toEqual([]);
        await put(st, 'br/ok.dcm', 'fine');
        expect(filesUnder(st.options.root)).toEqual(['br/ok.dcm']);
      } finally {
        await st.close();
        removeRoot(st);
      }
    });

    it('keeps mtimes to the second, in stat, list and on disk', async () => {
      const st = storageOn(s);
      try {
        const mtime = Date.UTC(2023, 0, 2, 3, 4, 5, 678);
        const w = await put(st, 'm/t.dcm', 'time', mtime);
        expect(w.mtimeMs).toBe(Date.UTC(2023, 0, 2, 3, 4, 5));
        expect((await st.stat('m/t.dcm')).mtimeMs).toBe(Date.UTC(2023, 0, 2, 3, 4, 5));
        const listed: { path: string; mtimeMs?: number }[] = [];
        for await (const e of st.list('')) listed.push(e);
        expect(listed).toEqual([{ path: 'm/t.dcm', size: 4, mtimeMs: Date.UTC(2023, 0, 2, 3, 4, 5) }]);
        expect(statSync(join(st.options.root, 'm/t.dcm')).mtimeMs).toBe(Date.UTC(2023, 0, 2, 3, 4, 5));
        expect(st.capabilities).toMatchObject({
          preservesMtime: true,
          mtimePrecisionMs: 1000,
          atomicRename: true,
        });
      } finally {
        await st.close();
        removeRoot(st);
      }
    });

    it('a 20 MB stream arrives byte-identical, and reads back by range', async () => {
      const st = storageOn(s);
      try {
        const size = 20 * 1024 * 1024 + 12_345;
        const expected = await digestOf(generatedStream(size, 11, 50_000));
        const w = await st.write('big/20mb.bin', generatedStream(size, 11, 50_000), { size });
        expect(w.size).toBe(size);
        const onDisk = createHash('sha256')
          .update(readFileSync(join(st.options.root, 'big/20mb.bin')))
          .digest('hex');
        expect(onDisk).toBe(expected.sha256);
        expect(await digestOf(await st.read('big/20mb.bin'))).toEqual(expected);
        const whole = readFileSync(join(st.options.root, 'big/20mb.bin'));
        for (const [a, b] of [
          [0, 0],
          [65_535, 65_536],
          [70_000, 1_500_000],
          [size - 10, size + 1000],
        ] as const) {
          const parts: Buffer[] = [];
          for await (const c of await st.read('big/20mb.bin', { start: a, end: b })) parts.push(c as Buffer);
          expect(Buffer.concat(parts).equals(whole.subarray(a, b + 1))).toBe(true);
        }
        // A reader that stops early gives its session back.
        const early = await st.read('big/20mb.bin');
        for await (const _ of early) break;
        await expect(st.stat('big/20mb.bin')).resolves.toMatchObject({ size });
      } finally {
        await st.close();
        removeRoot(st);
      }
    });

    it('overwrites with posix-rename: an existing file is replaced, never missing in between', async () => {
      const st = storageOn(s);
      try {
        await put(st, 'o/f.dcm', 'version one');
        const inode = statSync(join(st.options.root, 'o/f.dcm')).ino;
        await put(st, 'o/f.dcm', 'version two!');
        expect(readFileSync(join(st.options.root, 'o/f.dcm'), 'utf8')).toBe('version two!');
        expect(statSync(join(st.options.root, 'o/f.dcm')).ino).not.toBe(inode);
        await put(st, 'o/g.dcm', 'other');
        await st.rename('o/g.dcm', 'o/f.dcm');
        expect(readFileSync(join(st.options.root, 'o/f.dcm'), 'utf8')).toBe('other');
        expect(filesUnder(st.options.root)).toEqual(['o/f.dcm']);
      } finally {
        await st.close();
        removeRoot(st);
      }
    });

    it('lists symlinks to files, not symlinked folders, and hides temporary files; cleanupPartials removes old ones', async () => {
      const st = storageOn(s);
      try {
        await put(st, 'real/a.dcm', 'aaa');
        const root = st.options.root;
        symlinkSync(join(root, 'real/a.dcm'), join(root, 'link.dcm'));
        symlinkSync(join(root, 'real'), join(root, 'linkdir'));
        // A link whose target is gone (an unmounted share behind it) is listed as unreadable.
        symlinkSync(join(root, 'unmounted/study'), join(root, 'dangling'));
        const part = join(root, 'real/.b.dcm.1234.medsync-part');
        writeFileSync(part, 'half');
        const fresh = join(root, 'real/.c.dcm.5678.medsync-part');
        writeFileSync(fresh, 'writing');
        // Written just now but already given the source's old mtime (fsync, digest and rename
        // still to come): its access time says it is fresh.
        const finishing = join(root, 'real/.d.dcm.9abc.medsync-part');
        writeFileSync(finishing, 'finishing');
        const old = new Date(Date.now() - 3_600_000);
        utimesSync(part, old, old);
        utimesSync(finishing, new Date(), old);
        for (const p of [part, fresh, finishing]) chownSync(p, s.uid, s.gid);
        const listed: string[] = [];
        for await (const e of st.list('')) listed.push(`${e.path} ${e.size}`);
        expect(listed.sort()).toEqual(['dangling -1', 'link.dcm 3', 'real/a.dcm 3']);
        expect(await st.cleanupPartials('', { olderThanMs: Date.now() - 60_000 })).toBe(1);
        expect(existsSync(part)).toBe(false);
        expect(existsSync(fresh)).toBe(true);
        expect(existsSync(finishing)).toBe(true);
        expect(await st.cleanupPartials('')).toBe(2);
      } finally {
        await st.close();
        removeRoot(st);
      }
    });

    it('a session cut mid-upload is E_TRANSIENT (retryable) and leaves nothing; idle sessions that died are replaced', async () => {
      /** Kills the SFTP server processes of this test's throwaway user (by pid), cutting its sessions. */
      const cutSessions = () => {
        let out: string;
        try {
          out = execFileSync('pgrep', ['-u', s.systemUser, '-f', 'sftp-server'], { encoding: 'utf8' });
        } catch {
          return 0;
        }
        const pids = out.split('\n').filter((p) => /^\d+$/.test(p));
        for (const pid of pids) process.kill(Number(pid), 'SIGKILL');
        return pids.length;
      };
      const st = storageOn(s, { maxConnections: 2 });
      try {
        await put(st, 'keep.dcm', 'kept');
        const body = Readable.from(
          (async function* () {
            let n = 0;
            for await (const c of generatedStream(16 * 1024 * 1024, 9, 64 * 1024)) {
              if (++n === 40) cutSessions();
              yield c as Buffer;
            }
          })(),
        );
        const e = await st.write('cut/big.bin', body, { size: 16 * 1024 * 1024 }).catch((x: unknown) => x);
        expect(e).toMatchObject({ code: 'E_TRANSIENT', retryable: true, path: 'cut/big.bin' });
        // The temporary file was removed over a new session.
        await vi.waitFor(() => expect(filesUnder(st.options.root)).toEqual(['keep.dcm']), {
          timeout: 10_000,
          interval: 100,
        });
        // Idle pooled sessions die too: the next calls reconnect without an error.
        expect((await st.readBuffer('keep.dcm')).toString()).toBe('kept');
        expect(cutSessions()).toBeGreaterThan(0);
        await new Promise((r) => setTimeout(r, 200));
        expect((await st.stat('keep.dcm')).size).toBe(4);
        await put(st, 'cut/after.dcm', 'after');
        expect(filesUnder(st.options.root)).toEqual(['cut/after.dcm', 'keep.dcm']);
      } finally {
        await st.close();
        removeRoot(st);
      }
    });

    it('a full disk is E_QUOTA (statvfs shows it), not retried, and leaves nothing', async () => {
      const st = storageOn(s);
      const disk = join(st.options.root, 'small-disk');
      mkdirSync(disk);
      // A 1 MiB tmpfs owned by the SFTP user: OpenSSH answers ENOSPC with a bare SSH_FX_FAILURE.
      execFileSync('mount', [
        '-t',
        'tmpfs',
        '-o',
        `size=1m,mode=0755,uid=${s.uid},gid=${s.gid}`,
        'tmpfs',
        disk,
      ]);
      try {
        await put(st, 'small-disk/fits.dcm', 'x'.repeat(1000));
        const size = 3 * 1024 * 1024;
        await expect(
          st.write('small-disk/a/big.bin', generatedStream(size, 4), { size }),
        ).rejects.toMatchObject({
          code: 'E_QUOTA',
          retryable: false,
          path: 'small-disk/a/big.bin',
          message: expect.stringMatching(/full/),
        });
        expect(filesUnder(disk)).toEqual(['fits.dcm']);
        await expect(put(st, 'small-disk/b.dcm', 'small')).resolves.toMatchObject({ size: 5 });
      } finally {
        await st.close();
        execFileSync('umount', [disk]);
        removeRoot(st);
      }
    });

    it('a folder the account may not write is E_PERMISSION, not retried', async () => {
      const st = storageOn(s);
      try {
        const locked = join(st.options.root, 'locked');
        mkdirSync(locked, { mode: 0o755 }); // owned by root
        await expect(put(st, 'locked/x.dcm', 'x')).rejects.toMatchObject({
          code: 'E_PERMISSION',
          retryable: false,
          path: 'locked/x.dcm',
        });
        await expect(st.rename('nothere.dcm', 'locked/y.dcm')).rejects.toMatchObject({ code: 'E_NOT_FOUND' });
      } finally {
        await st.close();
        removeRoot(st);
      }
    });

    it('two names that differ only in case both arrive (the server is asked, and its probe is removed)', async () => {
      const st = storageOn(s);
      try {
        await expectCaseTwinsArrive(st, st.options.root);
      } finally {
        await st.close();
        removeRoot(st);
      }
    });

    it("checks each upload against the server's sha256sum before the rename, over one shell per connection; the manifest says so", async () => {
      const src = mkdtempSync(join(tmpdir(), 'medsync-sftp-digest-'));
      const st = storageOn(s, { maxConnections: 1 });
      const before = logSize(s);
      try {
        expect(st.capabilities.hashes).toEqual([]); // not known before the first upload
        const tree: Record<string, Buffer> = { 'b.dcm': randomBytes(3_000_000), 'e.dcm': Buffer.alloc(0) };
        for (let i = 0; i < 8; i++) tree[`PAT 1/CT 1/IM ${i}.dcm`] = randomBytes(10_000 + i);
        writeTree(src, tree);
        const store = new MemoryStore();
        const job = new SyncJob({
          id: 'sd',
          source: new LocalStorage({ root: src }),
          destinations: [st],
          store,
        });
        expect(await job.run()).toMatchObject({ status: 'success', filesSynced: 10 });
        expect(st.capabilities.hashes).toEqual(['sha256']);
        let n = 0;
        for await (const m of store.manifest.list({ jobId: 'sd', destination: st.id })) {
          n++;
          expect(m.verifiedBy).toBe('sha256');
          expect(m.sha256).toBe(createHash('sha256').update(tree[m.path]!).digest('hex'));
        }
        expect(n).toBe(10);
        expect(readTree(st.options.root)).toEqual(readTree(src));
        expect((await st.test()).details).toMatchObject({
          serverDigest: expect.stringMatching(/^sha256 \(Perl's Digest::SHA.* on the server\)$/),
        });
        // One connection: one command channel for all ten files, not one per file.
        expect(logSince(s, before).match(/Starting session: command /g)).toHaveLength(1);
      } finally {
        await st.close();
        removeRoot(st);
        rmSync(src, { recursive: true, force: true });
      }
    });

    it('a server digest that does not match the bytes sent is E_INTEGRITY, and nothing is left on the server', async () => {
      const st = storageOn(s);
      try {
        const body = randomBytes(50_000);
        const err = await st
          .write('x/y.dcm', body, { size: body.length, expectedHashes: () => ({ sha256: '0'.repeat(64) }) })
          .then(
            () => undefined,
            (e: unknown) => e,
          );
        expect(err).toMatchObject({ code: 'E_INTEGRITY', retryable: true, path: 'x/y.dcm' });
        expect(filesUnder(st.options.root)).toEqual([]);
        const sha256 = createHash('sha256').update(body).digest('hex');
        const ok = await st.write('x/y.dcm', body, { size: body.length, expectedHashes: () => ({ sha256 }) });
        expect(ok.hashes).toEqual({ sha256 });
      } finally {
        await st.close();
        removeRoot(st);
      }
    });

    it('an sftp-only account (forced sftp-server) and serverDigest: false upload checked by size, without digests', async () => {
      // A second key for the same user whose every session runs sftp-server: SFTP works, commands do not.
      const forced = forcedCommandKey(s, '/usr/lib/openssh/sftp-server');
      const only = storageOn(s, { password: undefined, privateKey: forced.privateKey });
      const off = storageOn(s, { serverDigest: false });
      try {
        const body = Buffer.from('checked by size');
        for (const st of [only, off]) {
          const before = logSize(s);
          const w = await st.write('a/b.dcm', body, { size: body.length });
          expect(w.hashes).toBeUndefined();
          expect(st.capabilities.hashes).toEqual([]);
          expect(readFileSync(join(st.options.root, 'a/b.dcm'))).toEqual(body);
          if (st === off) expect(logSince(s, before)).not.toMatch(/Starting session: command /);
        }
        expect((await only.test()).details).toMatchObject({ serverDigest: expect.stringMatching(/^none/) });
        expect((await off.test()).details).toMatchObject({ serverDigest: 'off' });
      } finally {
        forced.remove();
        await only.close();
        await off.close();
        removeRoot(only);
        removeRoot(off);
      }
    });

    it('a read cancelled while the file opens rejects with E_ABORTED instead of streaming it', async () => {
      const st = storageOn(s);
      try {
        await put(st, 'r/a.dcm', 'some bytes');
        const ac = new AbortController();
        const reading = st.read('r/a.dcm', { signal: ac.signal });
        ac.abort();
        await expect(reading).rejects.toMatchObject({ code: 'E_ABORTED' });
        expect((await st.readBuffer('r/a.dcm')).toString()).toBe('some bytes');
      } finally {
        await st.close();
        removeRoot(st);
      }
    });

    it('a source time outside the range of SFTP times (before 1970) is not sent: it would wrap to 2106', async () => {
      const st = storageOn(s);
      try {
        const body = Buffer.from('an old scan');
        const w = await st.write('old/a.dcm', body, { size: body.length, mtimeMs: Date.UTC(1969, 11, 31) });
        expect(w.mtimeMs).toBeUndefined();
        expect(statSync(join(st.options.root, 'old/a.dcm')).mtimeMs).toBeLessThan(Date.UTC(2100, 0, 1));
        expect(readFileSync(join(st.options.root, 'old/a.dcm'))).toEqual(body);
      } finally {
        await st.close();
        removeRoot(st);
      }
    });

    it('a server that refuses to set times still gets the file; mtimes are no longer promised', async () => {
      // sftp-server -P denies SETSTAT/FSETSTAT with SSH_FX_PERMISSION_DENIED, as object-store
      // gateways do.
      const forced = forcedCommandKey(s, '/usr/lib/openssh/sftp-server -P setstat,fsetstat');
      const st = storageOn(s, { password: undefined, privateKey: forced.privateKey });
      try {
        expect(st.capabilities.preservesMtime).toBe(true);
        const body = Buffer.from('no times here');
        const mtimeMs = Date.parse('2020-05-01T10:00:00Z');
        const w = await st.write('t/a.dcm', body, { size: body.length, mtimeMs });
        expect(w).toMatchObject({ path: 't/a.dcm', size: body.length });
        expect(w.mtimeMs).toBeUndefined();
        expect(readFileSync(join(st.options.root, 't/a.dcm'))).toEqual(body);
        expect(statSync(join(st.options.root, 't/a.dcm')).mtimeMs).not.toBe(mtimeMs);
        expect(st.capabilities).toMatchObject({ preservesMtime: false, mtimePrecisionMs: null });
        expect(readdirSync(join(st.options.root, 't'))).toEqual(['a.dcm']);
      } finally {
        forced.remove();
        await st.close();
        removeRoot(st);
      }
    });

    it('without mtimes there, a lost manifest is rebuilt by write time against the server clock', async () => {
      const forced = forcedCommandKey(s, '/usr/lib/openssh/sftp-server -P setstat,fsetstat');
      // No digests either (a forced sftp-server runs no commands): only write times are left.
      const st = storageOn(s, { password: undefined, privateKey: forced.privateKey, serverDigest: false });
      const src = mkdtempSync(join(tmpdir(), 'medsync-sftp-adopt-'));
      try {
        writeTree(src, { 'a.dcm': 'aaaa', 'b/c.dcm': 'cccc' });
        const past = new Date(Date.now() - 3_600_000);
        for (const f of ['a.dcm', 'b/c.dcm']) utimesSync(join(src, f), past, past);
        const job = (store: MemoryStore) =>
          new SyncJob({ id: 'adopt', source: new LocalStorage({ root: src }), destinations: [st], store });
        expect(await job(new MemoryStore()).run()).toMatchObject({ status: 'success', filesSynced: 2 });
        expect(st.capabilities.preservesMtime).toBe(false);
        // The Store is lost: the copies are taken from the listing (written after the source
        // last changed, by the server's clock as a probe file measured it).
        expect(await job(new MemoryStore()).run()).toMatchObject({
          status: 'success',
          filesSynced: 0,
          filesSkipped: 2,
        });
        // a.dcm is corrected in place (same size) after its upload: lost again, it is resent.
        writeFileSync(join(src, 'a.dcm'), 'AAAA');
        const later = new Date(Date.now() + 60_000);
        utimesSync(join(src, 'a.dcm'), later, later);
        expect(await job(new MemoryStore()).run()).toMatchObject({ filesSynced: 1, filesSkipped: 1 });
        expect(readFileSync(join(st.options.root, 'a.dcm'), 'utf8')).toBe('AAAA');
        expect(readdirSync(st.options.root).sort()).toEqual(['a.dcm', 'b']);
      } finally {
        forced.remove();
        await st.close();
        removeRoot(st);
        rmSync(src, { recursive: true, force: true });
      }
    });

    it('a slow link: requests queued behind a window of writes do not time out while the server answers', async () => {
      // 300 KB/s up: the 1 MiB window of pipelined WRITEs takes ~3.5 s to cross, longer than
      // timeoutMs. Only a session that stopped answering altogether may be given up.
      const proxy = await slowUplink(s.port, 300_000);
      const st = storageOn(s, { port: proxy.port, timeoutMs: 1_500, serverDigest: false });
      try {
        const body = randomBytes(2 * 1024 * 1024);
        await st.write('slow/big.dcm', Readable.from([body]), { size: body.length });
        expect(readFileSync(join(st.options.root, 'slow/big.dcm')).equals(body)).toBe(true);
      } finally {
        await st.close();
        await proxy.close();
        removeRoot(st);
      }
    }, 60_000);

    it('flush makes renames, new folders and removals durable: each changed folder is fsynced', async () => {
      // sftp-server logs each request (-l VERBOSE: fsync included) to a file of the test user's.
      const log = join(s.root, `sftp-${randomBytes(4).toString('hex')}.log`);
      const forced = forcedCommandKey(s, `/usr/lib/openssh/sftp-server -e -l VERBOSE 2>>${log}`);
      const st = storageOn(s, { password: undefined, privateKey: forced.privateKey, serverDigest: false });
      try {
        await put(st, 'p/s1/a.dcm', 'aaa');
        await put(st, 'p/s2/b.dcm', 'bbb');
        await st.rename('p/s2/b.dcm', 'p/s3/b.dcm');
        await st.flush();
        const root = st.options.root;
        const synced = readFileSync(log, 'utf8')
          .split('\n')
          .flatMap((l) => /fsync "([^"]+)"/.exec(l)?.[1] ?? [])
          .filter((p) => !p.includes('.medsync-part'))
          .map((p) => relative(root, p) || '.')
          .sort();
        // The folders that gained an entry: the root (p), p (s1, s2, s3), and the three leaves.
        expect(synced).toEqual(['.', 'p', 'p/s1', 'p/s2', 'p/s3']);
        // Nothing changed since: nothing to do.
        const fsyncs = () =>
          readFileSync(log, 'utf8')
            .split('\n')
            .filter((l) => /fsync "/.test(l)).length;
        const before = fsyncs();
        await st.flush();
        expect(fsyncs()).toBe(before);
        // A removal changes its folder too (a mirror forgets the file only after the flush); a
        // file that was not there changes nothing.
        await st.remove('p/s1/a.dcm');
        await st.remove('p/s2/never.dcm');
        await st.flush();
        const after = readFileSync(log, 'utf8')
          .split('\n')
          .filter((l) => /fsync "/.test(l))
          .slice(before)
          .map((l) => relative(root, /fsync "([^"]+)"/.exec(l)![1]!));
        expect(after).toEqual(['p/s1']);
      } finally {
        forced.remove();
        await st.close();
        removeRoot(st);
        rmSync(log, { force: true });
      }
    });

    it('rejects bad options with E_CONFIG naming the field; never echoes secrets', () => {
      const base = { host: s.host, user: s.user, hostFingerprint: s.hostFingerprint };
      const bad: [unknown, RegExp][] = [
        [{ ...base }, /password.*privateKey/],
        [{ ...base, password: 'p', root: 'relative' }, /root/],
        [{ ...base, password: 'p', hostFingerprint: 'MD5:aa:bb' }, /hostFingerprint/],
        [{ ...base, privateKey: 'not a key at all, secret-ish' }, /privateKey/],
        [{ ...base, password: 'p', port: 70000 }, /port/],
        [{ ...base, password: 'p', nope: 1 }, /nope/],
        [{ ...base, password: 'p', insecureSkipHostKeyCheck: true }, /insecureSkipHostKeyCheck/],
      ];
      for (const [opts, re] of bad) {
        let err: unknown;
        try {
          createSftpStorage(opts as SftpStorageOptions);
        } catch (e) {
          err = e;
        }
        expect(err).toMatchObject({ code: 'E_CONFIG' });
        expect((err as Error).message).toMatch(re);
        expect((err as Error).message).not.toContain('secret-ish');
      }
      const enc = join(tmpdir(), `medsync-enc-${randomBytes(4).toString('hex')}`);
      execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', 'pass-phrase-1', '-f', enc]);
      try {
        const key = readFileSync(enc, 'utf8');
        expect(() => createSftpStorage({ ...base, privateKey: key })).toThrow(/passphrase/);
        expect(() => createSftpStorage({ ...base, privateKey: key, passphrase: 'wrong-one' })).toThrow(
          /passphrase/,
        );
        expect(() =>
          createSftpStorage({ ...base, privateKey: key, passphrase: 'pass-phrase-1' }),
        ).not.toThrow();
      } finally {
        rmSync(enc, { force: true });
        rmSync(`${enc}.pub`, { force: true });
      }
    });
  });
}

if (server) define(server);
else describe.skip('sftp (OpenSSH)', () => define(undefined as unknown as SshdInfo));
