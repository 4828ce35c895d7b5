import { spawn, spawnSync, type SpawnOptions } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import {
  chmodSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openSqliteStore } from '@medsync/adapters-db';
import { readTree, writeTree } from '@medsync/core/testing';
import { BIN, runCli, type CliRun } from './run-cli.js';

const isRoot = process.getuid?.() === 0;
let base: string;

beforeAll(() => {
  if (!existsSync(BIN)) throw new Error('Build first: npm run build (npm test does this).');
  base = mkdtempSync(join(tmpdir(), 'medsync-cli-'));
  chmodSync(base, 0o777);
});
afterAll(() => rmSync(base, { recursive: true, force: true }));

let n = 0;
function dir(name: string): string {
  const d = join(base, `${name}-${++n}`);
  mkdirSync(d, { recursive: true });
  chmodSync(d, 0o777);
  return d;
}

function medsync(args: string[], opts: SpawnOptions & { asNobody?: boolean } = {}): Promise<CliRun> {
  const { asNobody, ...rest } = opts;
  return runCli(args, {
    cwd: base,
    env: { ...process.env, NO_COLOR: '1' },
    ...(asNobody && isRoot ? { uid: 65534, gid: 65534 } : {}),
    ...rest,
  });
}

function chmodTree(root: string): void {
  const walk = (d: string) => {
    chmodSync(d, 0o777);
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const abs = join(d, e.name);
      if (e.isDirectory()) walk(abs);
      else chmodSync(abs, 0o666);
    }
  };
  walk(root);
}

describe('medsync sync', () => {
  it('makes DST byte-identical to SRC (nested, unicode, spaces, empty, 20 MB), then sends nothing', async () => {
    const src = dir('src');
    const dst = join(dir('dst'), 'nested', 'target');
    writeTree(src, {
      'PAT 0001/STUDY 1/SERIES 1/IM00001.dcm': randomBytes(50_000),
      'PAT 0001/STUDY 1/SERIES 2/IM00001.dcm': randomBytes(70_000),
      'Müller Hans/CT Thorax/画像 01.dcm': randomBytes(1234),
      'empty.dcm': '',
      'big/20MB.bin': randomBytes(20 * 1024 * 1024),
    });
    const state = join(base, `s${n}.db`);
    const r1 = await medsync(['sync', src, dst, '--state', state, '--json']);
    expect(r1.code).toBe(0);
    expect(r1.json).toMatchObject({
      status: 'success',
      filesSynced: 5,
      filesSkipped: 0,
      filesFailed: 0,
      filesDeleted: 0,
      errors: [],
    });
    expect(r1.json.bytes).toBe(50_000 + 70_000 + 1234 + 20 * 1024 * 1024);
    expect(typeof r1.json.durationMs).toBe('number');
    expect(readTree(dst)).toEqual(readTree(src));
    const r2 = await medsync(['sync', src, dst, '--state', state, '--json']);
    expect(r2.json).toMatchObject({ status: 'success', filesSynced: 0, filesSkipped: 5, bytes: 0 });
    const st = await medsync(['status', '--state', state, '--json']);
    expect(st.code).toBe(0);
    expect(st.json.jobs).toHaveLength(1);
    expect(st.json.jobs[0].statistics).toMatchObject({
      totalRuns: 2,
      success: 2,
      partial: 0,
      failed: 0,
      filesSynced: 5,
    });
    expect(st.json.jobs[0].lastRun.status).toBe('success');
    const text = await medsync(['status', '--state', state]);
    expect(text.stdout).toMatch(/2 syncs \(2 successful, 0 partial, 0 failed\)/);
  }, 120_000);

  it('survives kill -9 of the process group mid-run: re-run finishes, resends nothing completed, no partial file visible', async () => {
    const src = dir('src');
    const dst = dir('dst');
    const files: Record<string, Buffer> = {};
    for (let i = 0; i < 40; i++) files[`s${i % 4}/f${i}.bin`] = randomBytes(512 * 1024);
    writeTree(src, files);
    const state = join(base, `kill${n}.db`);
    const child = spawn(
      process.execPath,
      [BIN, 'sync', src, dst, '--state', state, '--json', '--bwlimit', '4M', '--concurrency', '4'],
      {
        cwd: base,
        detached: true,
        stdio: 'ignore',
      },
    );
    // Names only: files are being renamed into place while we look.
    const finals = () =>
      existsSync(dst)
        ? (readdirSync(dst, { recursive: true }) as string[])
            .filter((p) => p.endsWith('.bin'))
            .map((p) => p.split('\\').join('/'))
        : [];
    const deadline = Date.now() + 30_000;
    while (finals().length < 8 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    process.kill(-child.pid!, 'SIGKILL');
    await new Promise((r) => child.on('exit', r));
    const seen = finals();
    expect(seen.length).toBeGreaterThanOrEqual(8);
    expect(seen.length).toBeLessThan(40);
    for (const p of seen) expect(readFileSync(join(dst, p)).equals(files[p]!)).toBe(true);
    const store = await openSqliteStore({ path: state });
    const recorded: string[] = [];
    for await (const e of store.manifest.list({
      jobId: (await store.runs.list())[0]!.jobId,
      destination: `file://${dst}`,
    }))
      recorded.push(e.path);
    await store.close();
    const r = await medsync(['sync', src, dst, '--state', state, '--json']);
    expect(r.code).toBe(0);
    expect(r.json.status).toBe('success');
    expect(r.json.filesSynced + r.json.filesSkipped).toBe(40);
    expect(r.json.filesSynced).toBeLessThanOrEqual(40 - recorded.length);
    expect(r.json.filesSynced).toBeLessThanOrEqual(40 - seen.length);
    expect(readTree(dst)).toEqual(readTree(src));
  }, 120_000);

  it('a reader that closes the pipe early (| head) gets no stack trace; the exit code and the run stand', async () => {
    const src = dir('src');
    const dst = dir('dst');
    writeTree(src, { 'a/b.dcm': randomBytes(1000) });
    const state = join(base, `pipe${n}.db`);
    const child = spawn(process.execPath, [BIN, 'sync', src, dst, '--state', state, '--json'], {
      cwd: base,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    // The read end is gone before the command prints anything.
    child.stdout!.destroy();
    let stderr = '';
    child.stderr!.on('data', (c: Buffer) => (stderr += c.toString()));
    const code = await new Promise((r) => child.on('close', r));
    expect(stderr).toBe('');
    expect(code).toBe(0);
    expect(readFileSync(join(dst, 'a/b.dcm')).equals(readFileSync(join(src, 'a/b.dcm')))).toBe(true);
  });

  it('an unreadable source file makes the run partial (exit 3), names it, and delivers every other file', async () => {
    const src = dir('src');
    const dst = dir('dst');
    writeTree(src, {
      'ok/1.dcm': 'one',
      'ok/2.dcm': 'two',
      'locked/secret.dcm': 'cannot read me',
      'ok/3.dcm': 'three',
    });
    chmodTree(src);
    chmodSync(join(src, 'locked/secret.dcm'), 0o000);
    const state = join(dir('state'), 'state.db');
    const r = await medsync(['sync', src, dst, '--state', state, '--json'], { asNobody: true });
    expect(r.code).toBe(3);
    expect(r.json).toMatchObject({ status: 'partial', filesSynced: 3, filesFailed: 1 });
    expect(r.json.errors).toEqual([
      { path: 'locked/secret.dcm', code: 'E_PERMISSION', message: expect.any(String) },
    ]);
    expect(r.json.errors[0].message).not.toContain(src);
    expect(Object.keys(readTree(dst)).sort()).toEqual(['ok/1.dcm', 'ok/2.dcm', 'ok/3.dcm']);
  }, 60_000);

  it('mirror deletes what the source lost; refuses past --max-delete and on an empty source', async () => {
    const src = dir('src');
    const dst = dir('dst');
    const files: Record<string, string> = {};
    for (let i = 0; i < 10; i++) files[`d/${i}.dcm`] = `file ${i}`;
    writeTree(src, files);
    const state = join(base, `m${n}.db`);
    const sync = (...extra: string[]) =>
      medsync(['sync', src, dst, '--state', state, '--mode', 'mirror', '--json', ...extra]);
    expect((await sync()).json.filesSynced).toBe(10);
    rmSync(join(src, 'd/0.dcm'));
    const r1 = await sync();
    expect(r1.json).toMatchObject({ status: 'success', filesDeleted: 1 });
    expect(existsSync(join(dst, 'd/0.dcm'))).toBe(false);
    for (const i of [1, 2, 3]) rmSync(join(src, `d/${i}.dcm`));
    const r2 = await sync('--max-delete', '2');
    expect(r2.code).toBe(1);
    expect(r2.json.filesDeleted).toBe(0);
    expect(r2.json.errors[0].code).toBe('E_SAFETY');
    expect(Object.keys(readTree(dst))).toHaveLength(9);
    const r3 = await sync('--max-delete', '3');
    expect(r3.json).toMatchObject({ status: 'success', filesDeleted: 3 });
    rmSync(src, { recursive: true });
    mkdirSync(src);
    const r4 = await sync('--max-delete', '100');
    expect(r4.code).toBe(1);
    expect(r4.json.errors[0]).toMatchObject({ code: 'E_SAFETY' });
    expect(Object.keys(readTree(dst))).toHaveLength(6);
  }, 60_000);

  it('--read-back reads back the given share of files and records it in the manifest', async () => {
    const src = dir('src');
    const dst = dir('dst');
    const files: Record<string, Buffer> = {};
    for (let i = 0; i < 8; i++) files[`S/IM${i}.dcm`] = randomBytes(5000);
    writeTree(src, files);
    const state = join(base, `rb${n}.db`);
    const r = await medsync(['sync', src, dst, '--state', state, '--read-back', '25%', '--json']);
    expect(r.json).toMatchObject({ status: 'success', filesSynced: 8 });
    const store = await openSqliteStore({ path: state });
    try {
      const [run] = await store.runs.list({ limit: 1 });
      const by: string[] = [];
      for await (const m of store.manifest.list({
        jobId: run!.jobId,
        destination: pathToFileURL(dst).href,
      })) {
        by.push(m.verifiedBy);
      }
      expect(by).toHaveLength(8);
      expect(by.filter((v) => v === 'readback')).toHaveLength(2);
    } finally {
      await store.close();
    }
    const bad = await medsync(['sync', src, dst, '--state', state, '--read-back', '150%']);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/--read-back must be a share from 0 to 1/);
  }, 30_000);

  it('dry run prints the plan and writes nothing', async () => {
    const src = dir('src');
    const dst = join(dir('dst'), 'never');
    writeTree(src, { 'a.dcm': 'a', 'b/c.dcm': 'c' });
    const r = await medsync(['sync', src, dst, '--state', join(base, `d${n}.db`), '--dry-run']);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/upload\s+a\.dcm/);
    expect(r.stdout).toMatch(/upload\s+b\/c\.dcm/);
    expect(r.stdout).toMatch(/Plan: 2 to upload/);
    expect(existsSync(dst)).toBe(false);
  }, 30_000);

  it('usage and config errors exit 2 with a clear message; passwords in URLs are refused', async () => {
    const r1 = await medsync(['sync', 'only-one-arg']);
    expect(r1.code).toBe(2);
    expect(r1.stderr).toMatch(/missing required argument/);
    const r2 = await medsync(['sync', 'a', 'b', '--concurrency', 'zero']);
    expect(r2.code).toBe(2);
    const r3 = await medsync(['sync', dir('src'), 'ftp://bob:hunter2@example.org/x', '--json']);
    expect(r3.code).toBe(2);
    expect(r3.json.error.code).toBe('E_CONFIG');
    expect(r3.stdout + r3.stderr).not.toContain('hunter2');
    const r4 = await medsync(['frobnicate']);
    expect(r4.code).toBe(2);
    // --ca with plain ftp:// (the password would go unencrypted) is a mistake, not ignored.
    const ca = join(dir('ca'), 'ca.pem');
    writeFileSync(ca, 'not used');
    const r5 = await medsync(['sync', dir('src'), 'ftp://bob@127.0.0.1:9/x', '--ca', ca, '--json'], {
      env: { ...process.env, PW: 'x' },
    });
    expect(r5.code).toBe(2);
    expect(r5.json.error).toMatchObject({ code: 'E_CONFIG', message: expect.stringMatching(/ftps:\/\//) });
    const r6 = await medsync(['test', 'ftp://bob@127.0.0.1:9/x', '--ca', ca, '--json']);
    expect(r6.code).toBe(2);
  }, 30_000);
});

describe('medsync test', () => {
  it('reports a reachable folder and a missing one', async () => {
    const d = dir('t');
    writeTree(d, { 'x.dcm': 'x', 'y/z.dcm': 'z' });
    const ok = await medsync(['test', d, '--json']);
    expect(ok.code).toBe(0);
    expect(ok.json).toMatchObject({ ok: true, kind: 'local', writable: true, entries: 2 });
    const bad = await medsync(['test', join(d, 'missing'), '--json']);
    expect(bad.code).toBe(1);
    expect(bad.json).toMatchObject({ ok: false, error: { code: 'E_NOT_FOUND' } });
    expect(bad.json.advice).toMatch(/mounted/);
  }, 30_000);
});

describe('medsync run', () => {
  function config(dirPath: string, jobs: unknown[]): string {
    const file = join(dirPath, 'medsync.config.json');
    writeFileSync(file, JSON.stringify({ state: 'state.db', jobs }));
    return file;
  }

  it('--once runs each enabled job; status shows the schedule', async () => {
    const d = dir('run');
    writeTree(join(d, 'pacs'), { 'a.dcm': 'a', 'b/c.dcm': 'c' });
    const file = config(d, [
      { id: 'pacs-to-host', source: 'pacs', destinations: ['host'], schedule: { intervalMinutes: 30 } },
      { id: 'disabled-job', source: 'pacs', destinations: ['other'], enabled: false },
    ]);
    const r = await medsync(['run', '--config', file, '--once']);
    expect(r.code).toBe(0);
    expect(readTree(join(d, 'host'))).toEqual(readTree(join(d, 'pacs')));
    expect(existsSync(join(d, 'other'))).toBe(false);
    const st = await medsync(['status', '--state', join(d, 'state.db'), '--job', 'pacs-to-host', '--json']);
    expect(st.json.config).toMatchObject({ enabled: true, intervalMinutes: 30 });
    expect(st.json.lastRun.status).toBe('success');
  }, 30_000);

  it('rejects an invalid config with exit 2 and every problem listed', async () => {
    const d = dir('badcfg');
    const file = config(d, [{ id: 'x', source: 'a', destinations: [], schedule: { intervalMinutes: 5000 } }]);
    const r = await medsync(['run', '--config', file]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/destinations/);
    expect(r.stderr).toMatch(/intervalMinutes/);
    // A misspelt endpoint key, and a CA for a plain ftp:// destination, are refused too.
    const typo = config(d, [{ id: 'y', source: 'a', destinations: [{ url: 'b', pasword: 'x' }] }]);
    const r2 = await medsync(['run', '--config', typo, '--once']);
    expect(r2.code).toBe(2);
    expect(r2.stderr).toMatch(/pasword/);
    mkdirSync(join(d, 'a'), { recursive: true });
    const plain = config(d, [
      {
        id: 'z',
        source: 'a',
        destinations: [{ url: 'ftp://u@127.0.0.1:9/x', passwordEnv: 'PW', caFile: 'ca.pem' }],
      },
    ]);
    const r3 = await medsync(['run', '--config', plain, '--once'], { env: { ...process.env, PW: 'pw' } });
    expect(r3.code).toBe(2);
    expect(r3.stderr).toMatch(/caFile.*ftps:\/\//);
  }, 30_000);

  it('--once stops on SIGTERM after the files in flight, starts no further job (exit 130), and a re-run finishes', async () => {
    const d = dir('once-term');
    const files = Object.fromEntries(
      Array.from({ length: 30 }, (_, i) => [`s/${i}.dcm`, randomBytes(50_000)]),
    );
    writeTree(join(d, 'pacs'), files);
    writeTree(join(d, 'other'), { 'x.dcm': 'x' });
    // 1.5 MB at 300 KB/s: about five seconds, so the signal comes mid-run.
    const file = config(d, [
      { id: 'slow', source: 'pacs', destinations: ['host'], bwlimit: '300K', concurrency: 2 },
      { id: 'second', source: 'other', destinations: ['host2'] },
    ]);
    const child = spawn(process.execPath, [BIN, 'run', '--config', file, '--once'], { cwd: base });
    let stderr = '';
    child.stderr.on('data', (x) => (stderr += x));
    const host = join(d, 'host');
    const deadline = Date.now() + 15_000;
    const delivered = () =>
      existsSync(join(host, 's')) ? readdirSync(join(host, 's')).filter((n) => !n.startsWith('.')) : [];
    while (delivered().length < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    child.kill('SIGTERM');
    const code = await new Promise((r) => child.on('exit', r));
    expect(stderr).toContain('stopping: finishing the files in flight');
    expect(code).toBe(130);
    const got = readTree(host);
    expect(Object.keys(got).length).toBeGreaterThan(0);
    expect(Object.keys(got).length).toBeLessThan(30);
    // Only whole files, each byte-identical; no temporary file; the second job never started.
    for (const [p, b64] of Object.entries(got)) expect(b64).toBe(files[p]!.toString('base64'));
    expect(readdirSync(join(host, 's')).filter((n) => n.startsWith('.'))).toEqual([]);
    expect(existsSync(join(d, 'host2'))).toBe(false);
    const again = await medsync(['run', '--config', file, '--once'], { cwd: base });
    expect(again.code).toBe(0);
    expect(readTree(host)).toEqual(readTree(join(d, 'pacs')));
    expect(readTree(join(d, 'host2'))).toEqual(readTree(join(d, 'other')));
  }, 60_000);

  it('long-running: runs a never-run job at start, stays up, stops cleanly on SIGTERM', async () => {
    const d = dir('daemon');
    writeTree(join(d, 'pacs'), { 'a.dcm': 'a' });
    const file = config(d, [
      { id: 'j', source: 'pacs', destinations: ['host'], schedule: { intervalMinutes: 1 } },
    ]);
    // The job never ran, so the daemon runs it at start, then stays up until SIGTERM.
    const child = spawn(process.execPath, [BIN, 'run', '--config', file], { cwd: base });
    let stderr = '';
    child.stderr.on('data', (x) => (stderr += x));
    const deadline = Date.now() + 15_000;
    while (!stderr.includes('sync run finished') && Date.now() < deadline)
      await new Promise((r) => setTimeout(r, 50));
    expect(stderr).toContain('job scheduled');
    expect(stderr).toMatch(/sync run finished.*"status":"success"/);
    expect(readTree(join(d, 'host'))).toEqual(readTree(join(d, 'pacs')));
    await new Promise((r) => setTimeout(r, 300));
    expect(child.exitCode).toBeNull();
    child.kill('SIGTERM');
    const code = await new Promise((r) => child.on('exit', r));
    expect(code).toBe(0);
    expect(stderr).toContain('stopped cleanly');
  }, 30_000);
});

describe('medsync demo', () => {
  it('runs end to end in a fresh folder', () => {
    const d = dir('demo');
    const r = spawnSync(process.execPath, [BIN, 'demo', '--dir', join(d, 'demo')], {
      cwd: d,
      encoding: 'utf8',
    });
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/SUCCESS: 96 synced/);
    expect(r.stdout).toMatch(/SUCCESS: 0 synced .* 96 unchanged/);
    expect(r.stdout).toMatch(/SUCCESS: 1 synced .* 96 unchanged/);
    expect(r.stdout).toMatch(/3 syncs \(3 successful/);
  }, 60_000);
});
