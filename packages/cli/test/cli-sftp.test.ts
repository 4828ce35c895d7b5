/**
 * `medsync` with sftp:// destinations, against a real OpenSSH sshd started by
 * scripts/services.sh (see packages/adapters-ftp/test/sshd.ts: under CI=true it must start).
 */
import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { readTree, writeTree } from '@medsync/core/testing';
import { runCli } from './run-cli.js';
import { freshSftpRoot, startSshd, type SshdInfo } from '../../adapters-ftp/test/sshd.js';

const server = startSshd();
const base = mkdtempSync(join(tmpdir(), 'medsync-cli-sftp-'));
/** A HOME without ~/.ssh/known_hosts: every host is unknown unless a flag says otherwise. */
const emptyHome = join(base, 'home-empty');
mkdirSync(emptyHome);
afterAll(() => rmSync(base, { recursive: true, force: true }));

function medsync(args: string[], env: Record<string, string> = {}) {
  return runCli(args, { cwd: base, env: { ...process.env, HOME: emptyHome, ...env } });
}

function define(s: SshdInfo): void {
  const url = (root: string) => `sftp://${s.user}@${s.host}:${s.port}${root}`;

  describe('medsync with an sftp:// destination', () => {
    it('syncs with --identity and --host-fingerprint, then sends nothing; test --json reports the host key', async () => {
      const src = join(base, 'src');
      writeTree(src, {
        'PAT 1/STUDY/IM1.dcm': randomBytes(300_000),
        'PAT 1/STUDY/IM2.dcm': randomBytes(10),
        'empty.dcm': '',
      });
      const root = freshSftpRoot(s);
      const dest = url(`${root}/archive`);
      const flags = ['--identity', s.privateKey, '--host-fingerprint', s.hostFingerprint];
      const state = join(base, 'state.db');
      const r1 = await medsync(['sync', src, dest, '--state', state, '--json', ...flags]);
      expect(r1.stdout + r1.stderr).toContain('"status":"success"');
      expect(r1.code).toBe(0);
      expect(r1.json).toMatchObject({ status: 'success', filesSynced: 3 });
      expect(readTree(join(root, 'archive'))).toEqual(readTree(src));
      const r2 = await medsync(['sync', src, dest, '--state', state, '--json', ...flags]);
      expect(r2.json).toMatchObject({ status: 'success', filesSynced: 0, filesSkipped: 3 });
      const t = await medsync(['test', dest, '--json', ...flags]);
      expect(t.code).toBe(0);
      expect(t.json).toMatchObject({
        ok: true,
        kind: 'sftp',
        writable: true,
        entries: 2,
        details: { hostKey: { fingerprint: s.hostFingerprint, verified: 'fingerprint' } },
      });
      expect(t.json.id).toBe(dest);
      expect(t.json.details.serverDigest).toMatch(/^sha256/);
      const off = await medsync(['test', dest, '--json', '--no-server-digest', ...flags]);
      expect(off.json).toMatchObject({ ok: true, details: { serverDigest: 'off' } });
      writeFileSync(join(src, 'PAT 1/STUDY/IM3.dcm'), randomBytes(1000));
      const r3 = await medsync([
        'sync',
        src,
        dest,
        '--state',
        state,
        '--json',
        '--no-server-digest',
        ...flags,
      ]);
      expect(r3.json).toMatchObject({ status: 'success', filesSynced: 1 });
      expect(readTree(join(root, 'archive'))).toEqual(readTree(src));
    }, 60_000);

    it('logs in with --password-env and checks the host with --known-hosts, or ~/.ssh/known_hosts', async () => {
      const src = join(base, 'src-pw');
      writeTree(src, { 'a.dcm': 'a', 'b/c.dcm': 'c' });
      const kh = join(base, 'known_hosts');
      writeFileSync(kh, `${s.knownHostsLine}\n`);
      const root = freshSftpRoot(s);
      const env = { SFTP_PW: s.password };
      const r = await medsync(
        [
          'sync',
          src,
          url(root),
          '--state',
          join(base, 's-pw.db'),
          '--json',
          '--password-env',
          'SFTP_PW',
          '--known-hosts',
          kh,
        ],
        env,
      );
      expect(r.code).toBe(0);
      expect(readTree(root)).toEqual(readTree(src));
      expect(r.stdout + r.stderr).not.toContain(s.password);
      // No flag: ~/.ssh/known_hosts, as OpenSSH users expect.
      const home = join(base, 'home-known');
      mkdirSync(join(home, '.ssh'), { recursive: true });
      writeFileSync(join(home, '.ssh', 'known_hosts'), `${s.knownHostsLine}\n`);
      const t = await medsync(['test', url(root), '--json', '--password-env', 'SFTP_PW'], {
        ...env,
        HOME: home,
      });
      expect(t.code).toBe(0);
      expect(t.json).toMatchObject({ ok: true, details: { hostKey: { verified: 'known_hosts' } } });
      expect(t.stdout).not.toContain(s.password);
    }, 60_000);

    it('an unknown host is refused (exit 1) with the fingerprint to pin; nothing is sent', async () => {
      const src = join(base, 'src-unknown');
      writeTree(src, { 'a.dcm': 'a' });
      const root = freshSftpRoot(s);
      const t = await medsync(['test', url(root), '--json', '--identity', s.privateKey]);
      expect(t.code).toBe(1);
      expect(t.json).toMatchObject({ ok: false, error: { code: 'E_CONFIG' } });
      expect(t.json.error.message).toContain(s.hostFingerprint);
      expect(t.json.error.message).toContain('--host-fingerprint');
      const text = await medsync(['test', url(root), '--identity', s.privateKey]);
      expect(text.code).toBe(1);
      expect(text.stdout).toContain(`--host-fingerprint ${s.hostFingerprint}`);
      const sync = await medsync([
        'sync',
        src,
        url(root),
        '--state',
        join(base, 's-unk.db'),
        '--json',
        '--identity',
        s.privateKey,
      ]);
      expect(sync.code).toBe(1);
      expect(sync.json.status).toBe('failed');
      expect(JSON.stringify(sync.json.errors)).toContain(s.hostFingerprint);
      expect(readTree(root)).toEqual({});
      // A wrong pinned fingerprint is refused the same way.
      const wrong = `SHA256:${randomBytes(32).toString('base64').replace(/=+$/, '')}`;
      const w = await medsync([
        'test',
        url(root),
        '--json',
        '--identity',
        s.privateKey,
        '--host-fingerprint',
        wrong,
      ]);
      expect(w.code).toBe(1);
      expect(w.json.error.message).toMatch(/MISMATCH/);
      expect(w.json.error.message).toContain(s.hostFingerprint);
    }, 60_000);

    it('needs a login, a user and readable key files (exit 2, no path in the message)', async () => {
      const noLogin = await medsync(['test', url('/x'), '--host-fingerprint', s.hostFingerprint]);
      expect(noLogin.code).toBe(2);
      expect(noLogin.stderr).toMatch(/--identity FILE.*--password-env VAR/);
      const noUser = await medsync(['test', `sftp://${s.host}:${s.port}/x`, '--identity', s.privateKey]);
      expect(noUser.code).toBe(2);
      expect(noUser.stderr).toMatch(/user name/);
      const missingKey = join(base, 'secret-patient-folder', 'id_ed25519');
      const noKey = await medsync(['test', url('/x'), '--identity', missingKey]);
      expect(noKey.code).toBe(2);
      expect(noKey.stderr).toContain('--identity file could not be read');
      expect(noKey.stderr).not.toContain('secret-patient-folder');
    }, 30_000);

    it('config-file endpoints take identityFile and hostFingerprint (run --once)', async () => {
      const d = join(base, 'cfg');
      writeTree(join(d, 'pacs'), { 'a.dcm': 'a', 'b/c.dcm': 'c' });
      const root = freshSftpRoot(s);
      const file = join(d, 'medsync.config.json');
      writeFileSync(
        file,
        JSON.stringify({
          state: 'state.db',
          jobs: [
            {
              id: 'pacs-to-sftp',
              source: 'pacs',
              destinations: [
                { url: url(root), identityFile: s.privateKey, hostFingerprint: s.hostFingerprint },
              ],
            },
          ],
        }),
      );
      const r = await medsync(['run', '--config', file, '--once']);
      expect(r.code).toBe(0);
      expect(readTree(root)).toEqual(readTree(join(d, 'pacs')));
    }, 60_000);
  });
}

if (server) define(server);
else describe.skip('medsync with an sftp:// destination', () => define(undefined as unknown as SshdInfo));
