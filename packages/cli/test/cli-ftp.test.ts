import { randomBytes } from 'node:crypto';
import { chmodSync, chownSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readTree, writeTree } from '@medsync/core/testing';
import { runCli } from './run-cli.js';
import { startFtpServer, type TestFtpServer } from '../../adapters-ftp/test/ftp-server.js';
import { startServer } from '../../adapters-ftp/test/services.js';
import { startFaultProxy } from '../../adapters-ftp/test/fault-proxy.js';

let base: string;
let ftp: TestFtpServer;

// Explicit FTPS against Debian's pure-ftpd (scripts/services.sh; under CI=true it must start):
// ftp-srv's in-process TLS upgrade now and then garbled the first command on a loaded machine.
const tls = startServer('pure-ftpd-tls');
// Plain FTP through the fault proxy: pure-ftpd answers a cut upload 451 (retryable).
const plain = startServer('pure-ftpd');
const ftps = tls && {
  host: tls.host,
  port: tls.port,
  user: tls.user,
  password: tls.password,
  /** The local folder the FTP user sees as `/`. */
  dir: tls.root,
  cert: tls.cert!,
};

beforeAll(async () => {
  base = mkdtempSync(join(tmpdir(), 'medsync-cli-ftp-'));
  ftp = await startFtpServer();
});
afterAll(async () => {
  await ftp?.close();
  rmSync(base, { recursive: true, force: true });
});

function medsync(args: string[], env: Record<string, string> = {}) {
  return runCli(args, { cwd: base, env: { ...process.env, ...env } });
}

(ftps ? describe : describe.skip)('medsync with an ftps:// destination (pure-ftpd)', () => {
  it('syncs over explicit FTPS with --password-env and --ca, then sends nothing; the password never shows', async () => {
    const src = join(base, 'src');
    writeTree(src, {
      'PAT 1/STUDY/IM1.dcm': randomBytes(40_000),
      'PAT 1/STUDY/IM2.dcm': randomBytes(10),
      'empty.dcm': '',
    });
    const ca = join(base, 'ca.pem');
    writeFileSync(ca, ftps!.cert);
    const url = `ftps://${ftps!.user}@${ftps!.host}:${ftps!.port}/archive`;
    const env = { FTP_PASSWORD: ftps!.password };
    const state = join(base, 'state.db');
    const r1 = await medsync(
      ['sync', src, url, '--state', state, '--json', '--password-env', 'FTP_PASSWORD', '--ca', ca],
      env,
    );
    expect(r1.stdout + r1.stderr).toContain('"status":"success"');
    expect(r1.code).toBe(0);
    expect(r1.json).toMatchObject({ status: 'success', filesSynced: 3 });
    expect(readTree(join(ftps!.dir, 'archive'))).toEqual(readTree(src));
    const r2 = await medsync(
      ['sync', src, url, '--state', state, '--json', '--password-env', 'FTP_PASSWORD', '--ca', ca],
      env,
    );
    expect(r2.json).toMatchObject({ status: 'success', filesSynced: 0, filesSkipped: 3 });
    const t = await medsync(['test', url, '--json', '--password-env', 'FTP_PASSWORD', '--ca', ca], env);
    expect(t.json, JSON.stringify(t.json)).toMatchObject({ ok: true, kind: 'ftps', writable: true });
    expect(t.code).toBe(0);
    for (const r of [r1, r2, t]) expect(r.stdout + r.stderr).not.toContain(ftps!.password);
  }, 60_000);

  it('medsync test on a drop folder (writable, not listable): OK, "not listable", and the advice', async () => {
    const ca = join(base, 'ca-drop.pem');
    writeFileSync(ca, ftps!.cert);
    const drop = join(ftps!.dir, 'drop');
    mkdirSync(drop);
    chownSync(drop, tls!.uid, tls!.gid);
    chmodSync(drop, 0o311);
    try {
      const url = `ftps://${ftps!.user}@${ftps!.host}:${ftps!.port}/drop`;
      const t = await medsync(['test', url, '--password-env', 'FTP_PASSWORD', '--ca', ca], {
        FTP_PASSWORD: ftps!.password,
      });
      expect(t.code).toBe(0);
      expect(t.stdout).toMatch(/^OK: ftps /);
      expect(t.stdout).toContain('writable: yes; entries in folder: not listable');
      expect(t.stdout).toMatch(/advice: .*drop folder/);
    } finally {
      chmodSync(drop, 0o755);
    }
  }, 60_000);

  it('a wrong password is E_AUTH (run failed, exit 1) and an untrusted certificate is refused', async () => {
    const src = join(base, 'src2');
    writeTree(src, { 'a.dcm': 'a' });
    const url = `ftps://${ftps!.user}@${ftps!.host}:${ftps!.port}/x`;
    const ca = join(base, 'ca.pem');
    writeFileSync(ca, ftps!.cert);
    const bad = await medsync(
      ['sync', src, url, '--state', join(base, 's2.db'), '--json', '--password-env', 'P', '--ca', ca],
      {
        P: 'wrong-password-123',
      },
    );
    expect(bad.code).toBe(1);
    expect(bad.json.errors[0].code).toBe('E_AUTH');
    expect(bad.stdout).not.toContain('wrong-password-123');
    const untrusted = await medsync(['test', url, '--json', '--password-env', 'P'], { P: ftps!.password });
    expect(untrusted.code).toBe(1);
    expect(untrusted.json.ok).toBe(false);
  }, 60_000);

  it('opens as many connections as --concurrency; a config endpoint can cap them and pass adapter options', async () => {
    const src = join(base, 'many');
    const files: Record<string, Buffer> = {};
    for (let i = 0; i < 40; i++) files[`S${i % 4}/IM${i}.dcm`] = randomBytes(200_000);
    writeTree(src, files);
    const url = `ftp://${ftp.user}@${ftp.host}:${ftp.port}/many`;
    const env = { FTP_PASSWORD: ftp.password };
    ftp.stats.peakConnections = 0;
    const r = await medsync(
      [
        'sync',
        src,
        url,
        '--state',
        join(base, 'm.db'),
        '--json',
        '--password-env',
        'FTP_PASSWORD',
        '--concurrency',
        '8',
      ],
      env,
    );
    expect(r.json).toMatchObject({ status: 'success', filesSynced: 40 });
    expect(ftp.stats.peakConnections).toBeGreaterThan(4);
    expect(ftp.stats.peakConnections).toBeLessThanOrEqual(8);

    const cfg = (options: Record<string, unknown>, id: string) => {
      const file = join(base, `${id}.config.json`);
      writeFileSync(
        file,
        JSON.stringify({
          state: `${id}.db`,
          jobs: [
            {
              id,
              source: src,
              destinations: [
                {
                  url: `ftp://${ftp.user}@${ftp.host}:${ftp.port}/${id}`,
                  passwordEnv: 'FTP_PASSWORD',
                  options,
                },
              ],
              concurrency: 8,
            },
          ],
        }),
      );
      return file;
    };
    ftp.stats.peakConnections = 0;
    const capped = await medsync(
      ['run', '--config', cfg({ maxConnections: 2, serverDigest: false }, 'capped'), '--once'],
      env,
    );
    expect(capped.code).toBe(0);
    expect(readTree(join(ftp.dir, 'capped'))).toEqual(readTree(src));
    expect(ftp.stats.peakConnections).toBeLessThanOrEqual(2);
    const bad = await medsync(['run', '--config', cfg({ maxConections: 2 }, 'typo'), '--once'], env);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/maxConections/);
    const secret = await medsync(
      ['run', '--config', cfg({ password: 'plain-text-secret-42' }, 'secret'), '--once'],
      env,
    );
    expect(secret.code).toBe(2);
    expect(secret.stderr).toMatch(/may not hold "password"/);
    expect(secret.stdout + secret.stderr).not.toContain('plain-text-secret-42');
  }, 90_000);

  it('a config endpoint trusts an FTPS server through caFile (relative to the config file)', async () => {
    const dir = mkdtempSync(join(base, 'cfg-'));
    writeTree(join(dir, 'pacs'), { 'a.dcm': randomBytes(1000), 'b/c.dcm': randomBytes(10) });
    writeFileSync(join(dir, 'server.pem'), ftps!.cert);
    const url = `ftps://${ftps!.user}@${ftps!.host}:${ftps!.port}/cfg`;
    const file = join(dir, 'medsync.config.json');
    const write = (dest: object) =>
      writeFileSync(
        file,
        JSON.stringify({ state: 'state.db', jobs: [{ id: 'tls', source: 'pacs', destinations: [dest] }] }),
      );
    write({ url, passwordEnv: 'FTP_PASSWORD', caFile: 'server.pem' });
    const ok = await medsync(['run', '--config', file, '--once'], { FTP_PASSWORD: ftps!.password });
    expect(ok.code).toBe(0);
    expect(readTree(join(ftps!.dir, 'cfg'))).toEqual(readTree(join(dir, 'pacs')));
    write({ url, passwordEnv: 'FTP_PASSWORD' });
    const untrusted = await medsync(['run', '--config', file, '--once'], { FTP_PASSWORD: ftps!.password });
    expect(untrusted.code).toBe(1);
    expect(untrusted.stderr).toMatch(/E_CONFIG/);
  }, 60_000);
});

(plain ? describe : describe.skip)('medsync sync with retries (pure-ftpd behind a fault proxy)', () => {
  it('says on stderr, without the path, why a file is tried again, and counts the retries in the summary and the JSON', async () => {
    const src = join(base, 'retried');
    writeTree(src, {
      'DOE^JANE/CT/IM1.dcm': randomBytes(3_000_000),
      'DOE^JANE/CT/IM2.dcm': randomBytes(1000),
    });
    const proxy = await startFaultProxy(plain!);
    try {
      proxy.cutNextUpload(1_000_000); // only IM1 carries that much
      const url = `ftp://${plain!.user}@${proxy.host}:${proxy.port}/retried`;
      const env = { FTP_PASSWORD: plain!.password };
      const r = await medsync(
        ['sync', src, url, '--state', join(base, 'retried.db'), '--json', '--password-env', 'FTP_PASSWORD'],
        env,
      );
      expect(proxy.stats.cuts).toBe(1);
      expect(r.code, r.stdout + r.stderr).toBe(0);
      expect(r.json).toMatchObject({ status: 'success', filesSynced: 2, retries: 1 });
      expect(r.stderr).toMatch(
        /^medsync: retrying a file in \d\.\d s \(attempt 1 of 4 failed: E_TRANSIENT: .+\)$/m,
      );
      expect(r.stderr).not.toContain('DOE');
      expect(readTree(join(plain!.root, 'retried'))).toEqual(readTree(src));
      const again = await medsync(
        ['sync', src, url, '--state', join(base, 'retried.db'), '--password-env', 'FTP_PASSWORD'],
        env,
      );
      expect(again.stdout).toMatch(/^SUCCESS: 0 synced .* in [^(]*\.$/m); // no retry, no count
      proxy.cutNextUpload(1_000_000);
      const text = await medsync(
        [
          'sync',
          src,
          `${url}-text`,
          '--state',
          join(base, 'retried-text.db'),
          '--password-env',
          'FTP_PASSWORD',
        ],
        env,
      );
      expect(proxy.stats.cuts).toBe(2);
      expect(text.stdout).toMatch(/^SUCCESS: 2 synced .* \(1 retry\)\.$/m);
    } finally {
      await proxy.close();
    }
  }, 60_000);
});
