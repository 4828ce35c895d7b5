#!/usr/bin/env node
// medsync benchmarks. Usage: node bench/run.mjs <bench> [options]   (see bench/README.md)
// Prints one JSON object on stdout; progress goes to stderr. Exit 1 if a run misbehaves,
// 2 on bad usage, 3 with --check when a target is missed.
import { spawn, spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import {
  cpSync,
  createReadStream,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  realpathSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import * as fsp from 'node:fs/promises';
import os from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { startLatencyProxy } from './latency-proxy.mjs';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const BUILT_CLI = join(ROOT, 'packages/cli/dist/bin.js');
let CLI = BUILT_CLI; // replaced by the snapshot's bin.js in main()
const TIME = '/usr/bin/time';
const KiB = 1024;
const MB = 1e6; // figures use MB = 1,000,000 bytes

/** Bench name -> { describe, run(ctx) }. */
const BENCHES = {
  sync: {
    describe: 'local -> local: medsync sync vs rclone copy (copy throughput, no-change re-run, peak RSS)',
    run: benchSync,
  },
  ftp: {
    describe:
      'local -> loopback pure-ftpd: medsync vs lftp mirror -R vs rclone copy (throughput, re-run, RSS)',
    run: benchFtp,
    rows: ['ftp-copy-256k', 'ftp-copy-4k', 'ftp-copy-big', 'ftp-no-change-rerun'],
  },
  scale: {
    describe:
      'local -> local, 200,000 files of 100 B: medsync vs rclone first copy and no-change re-run (time, peak RSS; informational)',
    run: benchScale,
  },
  sftp: {
    describe:
      'local -> loopback OpenSSH sshd: medsync vs rclone copy (sftp backend) vs OpenSSH sftp put -r (throughput, re-run, RSS)',
    run: benchSftp,
    rows: ['sftp-copy-256k', 'sftp-copy-4k', 'sftp-copy-big', 'sftp-no-change-rerun'],
  },
};

const USAGE = `usage: node bench/run.mjs <bench> [--concurrency N] [--trials N] [--small] [--keep] [--check]
  (or: npm run -s bench -- <bench> [options])
benches:
${Object.entries(BENCHES)
  .map(([k, b]) => `  ${k.padEnd(8)} ${b.describe}`)
  .join('\n')}
options:
  --concurrency N  medsync --concurrency N, rclone --transfers N, lftp --parallel=N (default 4; rclone --checkers stays 8)
  --trials N       runs of each timed measurement per tool; the best is kept (default 2)
  --small          small corpora for a quick check (also MEDSYNC_BENCH_SMALL=1)
  --only ROW,...   ftp and sftp: only these rows (the re-run row brings its 4 KiB row along)
  --keep           keep the temp folder (its path is printed on stderr)
  --check          exit 3 if a target is missed
  --no-fsync       run medsync with --no-fsync (rclone does not fsync either)
  --rtt MS         ftp, sftp: also time the no-change re-run through a proxy that adds this
                   round-trip time, as on a link between sites (row <bench>-no-change-rerun-rtt)
`;

// ---------------------------------------------------------------- helpers

const log = (msg) => process.stderr.write(`[bench] ${msg}\n`);

class BenchError extends Error {}

function fail(msg, extra) {
  throw new BenchError(extra ? `${msg}\n${extra}` : msg);
}

function parseArgs(argv) {
  const o = {
    name: undefined,
    concurrency: 4,
    trials: 2,
    small: process.env.MEDSYNC_BENCH_SMALL === '1',
    keep: false,
    check: false,
  };
  const int = (flag, v, min, max) => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < min || n > max)
      usage(`${flag} must be a whole number from ${min} to ${max}`);
    return n;
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--concurrency') o.concurrency = int(a, argv[++i], 1, 256);
    else if (a.startsWith('--concurrency=')) o.concurrency = int('--concurrency', a.slice(14), 1, 256);
    else if (a === '--trials') o.trials = int(a, argv[++i], 1, 20);
    else if (a.startsWith('--trials=')) o.trials = int('--trials', a.slice(9), 1, 20);
    else if (a === '--small') o.small = true;
    else if (a === '--keep') o.keep = true;
    else if (a === '--check') o.check = true;
    else if (a === '--no-fsync') o.noFsync = true;
    else if (a === '--rtt') o.rtt = int(a, argv[++i], 1, 1000);
    else if (a.startsWith('--rtt=')) o.rtt = int('--rtt', a.slice(6), 1, 1000);
    else if (a === '--only') o.only = (argv[++i] ?? '').split(',').filter(Boolean);
    else if (a.startsWith('--only=')) o.only = a.slice(7).split(',').filter(Boolean);
    else if (a === '-h' || a === '--help') {
      process.stdout.write(USAGE);
      process.exit(0);
    } else if (!a.startsWith('-') && o.name === undefined) o.name = a;
    else usage(`unknown argument: ${a}`);
  }
  if (!o.name) usage('no bench named');
  if (!Object.hasOwn(BENCHES, o.name)) usage(`unknown bench: ${o.name}`);
  if (o.rtt !== undefined && o.name !== 'ftp' && o.name !== 'sftp')
    usage('--rtt is for the ftp and sftp benches');
  if (o.rtt !== undefined && o.only && !o.only.includes(`${o.name}-no-change-rerun`))
    usage(`--rtt times the no-change re-run again: add ${o.name}-no-change-rerun to --only`);
  if (o.only) {
    const rows = BENCHES[o.name].rows;
    if (!rows) usage(`--only: the ${o.name} bench always runs all its rows`);
    const bad = o.only.filter((r) => !rows.includes(r));
    if (bad.length || o.only.length === 0) usage(`--only takes rows of ${o.name}: ${rows.join(', ')}`);
    // The re-run row runs over the 4 KiB row's destinations.
    const rerun = rows[3];
    if (o.only.includes(rerun) && !o.only.includes(rows[1])) o.only.push(rows[1]);
  }
  return o;
}

function usage(msg) {
  process.stderr.write(`bench: ${msg}\n${USAGE}`);
  process.exit(2);
}

const round = (n, d = 3) =>
  n === null || n === undefined || !Number.isFinite(n) ? null : Number(n.toFixed(d));
const kbToMB = (kb) => (kb === null ? null : round((kb * KiB) / MB, 1));

function which(cmd) {
  const r = spawnSync('sh', ['-c', `command -v ${cmd}`], { encoding: 'utf8' });
  return r.status === 0 ? r.stdout.trim() : null;
}

function aptInstall(pkg) {
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  const opts = { stdio: ['ignore', 2, 2], env };
  log(`installing ${pkg} with apt-get`);
  if (spawnSync('apt-get', ['install', '-y', pkg], opts).status === 0) return true;
  log('apt-get install failed; running apt-get update and retrying');
  spawnSync('apt-get', ['update'], opts);
  return spawnSync('apt-get', ['install', '-y', pkg], opts).status === 0;
}

/** Runs a command; wall-clock seconds via performance.now() around the whole process. */
async function runTimed(cmd, args, { tmp, rssMethod, env }) {
  const rssFile = join(tmp, `rss-${process.pid}-${randomBytes(4).toString('hex')}.txt`);
  const [file, argv] = rssMethod === 'time' ? [TIME, ['-f', '%M', '-o', rssFile, cmd, ...args]] : [cmd, args];
  const out = [];
  const err = [];
  const t0 = performance.now();
  const child = spawn(file, argv, { stdio: ['ignore', 'pipe', 'pipe'], env: env ?? process.env });
  child.stdout.on('data', (c) => out.push(c));
  child.stderr.on('data', (c) => err.push(c));
  let polledKB = 0;
  let poll;
  if (rssMethod === 'proc') {
    // Fallback without /usr/bin/time: poll VmHWM (racy: may miss the last few ms).
    poll = setInterval(() => {
      try {
        const m = /VmHWM:\s+(\d+)/.exec(readFileSync(`/proc/${child.pid}/status`, 'utf8'));
        if (m) polledKB = Math.max(polledKB, Number(m[1]));
      } catch {
        /* exited */
      }
    }, 10);
  }
  const code = await new Promise((res, rej) => {
    child.on('error', rej);
    child.on('close', (c, sig) => res(sig ? 128 + (os.constants.signals[sig] ?? 0) : c));
  });
  const seconds = (performance.now() - t0) / 1000;
  if (poll) clearInterval(poll);
  let peakKB;
  if (rssMethod === 'time') {
    try {
      const lines = readFileSync(rssFile, 'utf8').trim().split('\n');
      const n = Number(lines[lines.length - 1]);
      peakKB = Number.isFinite(n) ? n : null;
    } catch {
      peakKB = null;
    }
    rmSync(rssFile, { force: true });
  } else peakKB = polledKB || null;
  return {
    code,
    seconds,
    peakKB,
    stdout: Buffer.concat(out).toString('utf8'),
    stderr: Buffer.concat(err).toString('utf8'),
  };
}

/** Drops nothing from the page cache (not allowed here), but flushes dirty pages so one tool's writeback does not slow the next. */
function flush() {
  spawnSync('sync', [], { stdio: 'ignore' });
}

/** Writes `files` random files of `size` bytes, spread over `dirs` folders (two levels, like patient/study). */
async function makeCorpus(root, { files, size, dirs }) {
  const folders = Array.from({ length: dirs }, (_, i) =>
    join(`patient-${String(Math.floor(i / 10)).padStart(3, '0')}`, `study-${i % 10}`),
  );
  for (const f of folders) await fsp.mkdir(join(root, f), { recursive: true });
  let next = 0;
  const worker = async () => {
    for (let i = next++; i < files; i = next++) {
      const p = join(root, folders[i % dirs], `IM${String(i).padStart(6, '0')}.dcm`);
      await fsp.writeFile(p, randomBytes(size));
    }
  };
  await Promise.all(Array.from({ length: 16 }, worker));
}

/** All regular files under root: count, bytes, newest ctime (ns), relative paths. */
async function walk(root) {
  const res = { count: 0, bytes: 0, maxCtimeNs: 0n, paths: [] };
  const stack = [''];
  while (stack.length) {
    const rel = stack.pop();
    for (const d of await fsp.readdir(join(root, rel), { withFileTypes: true })) {
      const r = rel ? join(rel, d.name) : d.name;
      if (d.isDirectory()) stack.push(r);
      else if (d.isFile()) {
        const s = await fsp.stat(join(root, r), { bigint: true });
        res.count++;
        res.bytes += Number(s.size);
        if (s.ctimeNs > res.maxCtimeNs) res.maxCtimeNs = s.ctimeNs;
        res.paths.push(r);
      }
    }
  }
  return res;
}

const sha = async (p) =>
  createHash('sha256')
    .update(await fsp.readFile(p))
    .digest('hex');

/** Checks that dst holds exactly the files of src (count, bytes, and content of a sample). */
async function verifyCopy(tool, src, dst, expect) {
  const w = await walk(dst);
  if (w.count !== expect.files || w.bytes !== expect.files * expect.size) {
    fail(
      `${tool}: destination holds ${w.count} files / ${w.bytes} bytes, expected ${expect.files} / ${expect.files * expect.size}`,
    );
  }
  const step = Math.max(1, Math.floor(w.paths.length / 20));
  for (let i = 0; i < w.paths.length; i += step) {
    const p = w.paths[i];
    if ((await sha(join(src, p))) !== (await sha(join(dst, p))))
      fail(`${tool}: ${p} differs from the source`);
  }
  return w;
}

/**
 * Freezes the built packages (package.json, dist, nested node_modules) into tmp/snap, with the
 * other dependencies linked from the root node_modules, and returns the frozen bin.js. A rebuild
 * of the work tree during the bench (tsup empties dist/) then cannot break or change the runs.
 */
function snapshotCli(tmp) {
  const snap = join(tmp, 'snap');
  const nm = join(snap, 'node_modules');
  mkdirSync(join(nm, '@medsync'), { recursive: true });
  for (const pkg of ['core', 'adapters-db', 'adapters-ftp', 'cli']) {
    if (!existsSync(join(ROOT, 'packages', pkg))) continue;
    const from = join(ROOT, 'packages', pkg);
    const to = join(snap, 'packages', pkg);
    for (const part of ['package.json', 'dist', 'node_modules']) {
      if (existsSync(join(from, part)))
        cpSync(join(from, part), join(to, part), { recursive: true, dereference: false });
    }
    symlinkSync(to, join(nm, '@medsync', pkg));
  }
  for (const e of readdirSync(join(ROOT, 'node_modules'))) {
    if (e === '@medsync' || e === '.bin') continue;
    symlinkSync(realpathSync(join(ROOT, 'node_modules', e)), join(nm, e));
  }
  const bin = join(snap, 'packages/cli/dist/bin.js');
  const r = spawnSync(process.execPath, [bin, '--version'], { encoding: 'utf8' });
  if (r.status !== 0)
    fail('The built CLI does not start (was dist/ being rebuilt? run npm run build again).', r.stderr);
  return bin;
}

function gitInfo() {
  const git = (...a) => spawnSync('git', ['-C', ROOT, ...a], { encoding: 'utf8' }).stdout?.trim() ?? '';
  const changed = git('status', '--porcelain', '--untracked-files=no', '--', 'packages')
    .split('\n')
    .filter(Boolean);
  return { commit: git('rev-parse', '--short', 'HEAD') || null, modifiedPackageFiles: changed.length };
}

// ---------------------------------------------------------------- tools

/** `extra.args` are appended to medsync's argv, `extra.env` replaces its environment (secrets go there). */
function medsyncRunner(ctx, extra = {}) {
  return async (src, dst, state, expect) => {
    const args = [
      CLI,
      'sync',
      src,
      dst,
      '--state',
      state,
      '--json',
      '--no-progress',
      '--concurrency',
      String(ctx.concurrency),
      ...(ctx.noFsync ? ['--no-fsync'] : []),
      ...(extra.args ?? []),
    ];
    const r = await runTimed(process.execPath, args, { ...ctx, env: extra.env });
    const line = r.stdout.trim().split('\n').pop() ?? '';
    let j;
    try {
      j = JSON.parse(line);
    } catch {
      fail(
        `medsync printed no JSON (exit ${r.code})`,
        `stdout: ${r.stdout.slice(-2000)}\nstderr: ${r.stderr.slice(-2000)}`,
      );
    }
    const bad = [];
    if (r.code !== 0) bad.push(`exit code ${r.code}`);
    if (j.status !== 'success') bad.push(`status ${j.status}`);
    if (j.filesSynced !== expect.synced) bad.push(`filesSynced ${j.filesSynced}, expected ${expect.synced}`);
    if (j.filesSkipped !== expect.skipped)
      bad.push(`filesSkipped ${j.filesSkipped}, expected ${expect.skipped}`);
    if (j.bytes !== expect.bytes) bad.push(`bytes ${j.bytes}, expected ${expect.bytes}`);
    if (bad.length)
      fail(
        `medsync run did not do what it should: ${bad.join('; ')}`,
        `json: ${line.slice(0, 2000)}\nstderr: ${r.stderr.slice(-2000)}`,
      );
    return { seconds: r.seconds, peakKB: r.peakKB, internalSeconds: j.durationMs / 1000 };
  };
}

/** `rclone copy SRC DST` with `config` (the bench's empty one for local paths, or a remote's). */
function rcloneRunner(ctx, config = ctx.rcloneConfig) {
  return async (src, dst) => {
    const args = [
      'copy',
      src,
      dst,
      '--config',
      config,
      '--transfers',
      String(ctx.concurrency),
      '--checkers',
      '8',
    ];
    const r = await runTimed(ctx.rclone, args, ctx);
    if (r.code !== 0) fail(`rclone copy exited ${r.code}`, `stderr: ${r.stderr.slice(-2000)}`);
    return { seconds: r.seconds, peakKB: r.peakKB };
  };
}

/** Runs `fns` (named) `trials` times, alternating which goes first; returns all results per name. */
async function alternate(trials, fns, before) {
  const names = Object.keys(fns);
  const out = Object.fromEntries(names.map((n) => [n, []]));
  for (let t = 0; t < trials; t++) {
    const order = t % 2 === 0 ? names : [...names].reverse();
    for (const n of order) {
      await before?.(n, t);
      flush();
      out[n].push(await fns[n](t));
    }
  }
  return out;
}

const best = (runs) => runs.reduce((a, b) => (b.seconds < a.seconds ? b : a));
const maxKB = (...runs) =>
  runs.some((r) => r.peakKB === null) ? null : Math.max(...runs.map((r) => r.peakKB));

// ---------------------------------------------------------------- sync bench

/** The `config` of a local -> local bench (sync, scale), with its corpora. */
const localConfig = (ctx, corpora) => ({
  concurrency: ctx.concurrency,
  medsyncFsync: !ctx.noFsync,
  rcloneCheckers: 8,
  trials: ctx.trials,
  keep: 'best (lowest wall-clock) of the trials; order alternates between trials',
  small: ctx.small,
  ...corpora,
  units: 'MB = 1,000,000 bytes; seconds are wall-clock around the whole process (start-up included)',
});

const sizeLabel = (bytes) => (bytes >= KiB ? `${bytes / KiB} KiB` : `${bytes} B`);

/**
 * Copies a fresh corpus once with each tool (timed), then times no-change re-runs over those
 * destinations; fails if a re-run rewrote anything. Returns both tools' figures.
 */
async function measureRerun(ctx, c, label) {
  const medsync = medsyncRunner(ctx);
  const rclone = rcloneRunner(ctx);
  const src = join(ctx.tmp, `${label}-src`);
  log(`${label}: generating ${c.files} x ${sizeLabel(c.size)} in ${c.dirs} folders`);
  await makeCorpus(src, c);
  const dstM = join(ctx.tmp, `${label}-dst-medsync`);
  const dstR = join(ctx.tmp, `${label}-dst-rclone`);
  const state = join(ctx.tmp, `${label}-state.db`);
  const bytes = c.files * c.size;
  flush();
  const firstM = await medsync(src, dstM, state, { synced: c.files, skipped: 0, bytes });
  log(`${label}: first copy medsync ${firstM.seconds.toFixed(2)} s`);
  const wM = await verifyCopy('medsync', src, dstM, c);
  flush();
  const firstR = await rclone(src, dstR);
  log(`${label}: first copy rclone  ${firstR.seconds.toFixed(2)} s`);
  const wR = await verifyCopy('rclone', src, dstR, c);
  const runs = await alternate(ctx.trials, {
    medsync: async (t) => {
      const r = await medsync(src, dstM, state, { synced: 0, skipped: c.files, bytes: 0 });
      log(`${label}: trial ${t + 1} medsync ${r.seconds.toFixed(3)} s`);
      return r;
    },
    rclone: async (t) => {
      const r = await rclone(src, dstR);
      log(`${label}: trial ${t + 1} rclone  ${r.seconds.toFixed(3)} s`);
      return r;
    },
  });
  // Nothing at either destination may have been rewritten by a re-run.
  for (const [tool, dst, before] of [
    ['medsync', dstM, wM],
    ['rclone', dstR, wR],
  ]) {
    const after = await walk(dst);
    if (after.count !== c.files || after.maxCtimeNs !== before.maxCtimeNs)
      fail(`${tool}: the no-change re-run changed the destination`);
  }
  const fig = (runs, first) => {
    const b = best(runs);
    return {
      seconds: round(b.seconds),
      filesPerSec: round(c.files / b.seconds, 0),
      peakRssMB: kbToMB(maxKB(first, ...runs)),
      rerunPeakRssMB: kbToMB(maxKB(...runs)),
      firstRunPeakRssMB: kbToMB(first.peakKB),
      firstRunSeconds: round(first.seconds),
      firstRunFilesPerSec: round(c.files / first.seconds, 0),
      trialsSeconds: runs.map((r) => round(r.seconds)),
      ...(b.internalSeconds !== undefined ? { runDurationSeconds: round(b.internalSeconds) } : {}),
    };
  };
  return { m: fig(runs.medsync, firstM), r: fig(runs.rclone, firstR) };
}

async function benchSync(ctx) {
  const S = ctx.small
    ? { copy: { files: 200, size: 256 * KiB, dirs: 4 }, rerun: { files: 2000, size: 4 * KiB, dirs: 10 } }
    : { copy: { files: 2000, size: 256 * KiB, dirs: 20 }, rerun: { files: 20000, size: 4 * KiB, dirs: 100 } };
  const medsync = medsyncRunner(ctx);
  const rclone = rcloneRunner(ctx);
  const results = [];
  const rssTarget = 150;

  // Warm the binaries and modules so neither tool's first run pays for loading them from disk.
  spawnSync(process.execPath, [CLI, '--version'], { stdio: 'ignore' });
  spawnSync(ctx.rclone, ['version', '--config', ctx.rcloneConfig], { stdio: 'ignore' });

  // 1. Copy throughput: each trial copies into fresh destinations (and a fresh state file).
  {
    const c = S.copy;
    const src = join(ctx.tmp, 'copy-src');
    log(`copy: generating ${c.files} x ${c.size / KiB} KiB in ${c.dirs} folders`);
    await makeCorpus(src, c);
    const bytes = c.files * c.size;
    const runs = await alternate(ctx.trials, {
      medsync: async (t) => {
        const dst = join(ctx.tmp, `copy-dst-medsync-${t}`);
        const r = await medsync(src, dst, join(ctx.tmp, `copy-state-${t}.db`), {
          synced: c.files,
          skipped: 0,
          bytes,
        });
        log(`copy: trial ${t + 1} medsync ${r.seconds.toFixed(2)} s`);
        await verifyCopy('medsync', src, dst, c);
        return r;
      },
      rclone: async (t) => {
        const dst = join(ctx.tmp, `copy-dst-rclone-${t}`);
        const r = await rclone(src, dst);
        log(`copy: trial ${t + 1} rclone  ${r.seconds.toFixed(2)} s`);
        await verifyCopy('rclone', src, dst, c);
        return r;
      },
    });
    const fig = (runs) => {
      const b = best(runs);
      return {
        seconds: round(b.seconds),
        MBps: round(bytes / MB / b.seconds, 1),
        filesPerSec: round(c.files / b.seconds, 1),
        peakRssMB: kbToMB(maxKB(...runs)),
        trialsSeconds: runs.map((r) => round(r.seconds)),
        ...(b.internalSeconds !== undefined ? { runDurationSeconds: round(b.internalSeconds) } : {}),
      };
    };
    const m = fig(runs.medsync);
    const r = fig(runs.rclone);
    const ratio = round(m.MBps / r.MBps);
    results.push({
      name: 'copy',
      description: `${c.files} files x ${c.size / KiB} KiB (${round(bytes / MB, 1)} MB) in ${c.dirs} folders, local -> fresh local destination`,
      medsync: m,
      rclone: r,
      ratio,
      ratioDefinition: 'medsync MB/s / rclone MB/s',
      target: 'ratio >= 1 (at least as fast as rclone)',
      pass: ratio >= 1,
    });
    results.push({
      name: 'peak-rss-copy',
      description: 'peak RSS (VmHWM) of the medsync process over the copy runs',
      medsync: { peakRssMB: m.peakRssMB },
      rclone: { peakRssMB: r.peakRssMB },
      ratio: m.peakRssMB && r.peakRssMB ? round(m.peakRssMB / r.peakRssMB) : null,
      ratioDefinition: 'medsync MB / rclone MB (informational)',
      target: `medsync peak RSS < ${rssTarget} MB`,
      pass: m.peakRssMB !== null && m.peakRssMB < rssTarget,
    });
  }

  // 2. No-change re-run: each tool copies once into its own destination, then re-runs over it.
  {
    const c = S.rerun;
    const { m, r } = await measureRerun(ctx, c, 're-run');
    const ratio = round(r.seconds / m.seconds);
    results.push({
      name: 'no-change-rerun',
      description: `second run over ${c.files} files x ${c.size / KiB} KiB in ${c.dirs} folders, already copied (nothing to send)`,
      medsync: m,
      rclone: r,
      ratio,
      ratioDefinition: 'rclone seconds / medsync seconds (>1: medsync faster)',
      target: 'ratio >= 1.5 (re-run at least 1.5x faster than rclone)',
      pass: ratio >= 1.5,
    });
    results.push({
      name: 'peak-rss-rerun',
      description: `peak RSS (VmHWM) of the medsync process over the first copy of ${c.files} files and the re-runs`,
      medsync: {
        peakRssMB: m.peakRssMB,
        firstRunPeakRssMB: m.firstRunPeakRssMB,
        rerunPeakRssMB: m.rerunPeakRssMB,
      },
      rclone: {
        peakRssMB: r.peakRssMB,
        firstRunPeakRssMB: r.firstRunPeakRssMB,
        rerunPeakRssMB: r.rerunPeakRssMB,
      },
      ratio: m.peakRssMB && r.peakRssMB ? round(m.peakRssMB / r.peakRssMB) : null,
      ratioDefinition: 'medsync MB / rclone MB (informational)',
      target: `medsync peak RSS < ${rssTarget} MB`,
      pass: m.peakRssMB !== null && m.peakRssMB < rssTarget,
    });
  }

  return { config: localConfig(ctx, { corpora: S }), results };
}

// ---------------------------------------------------------------- scale bench

/** Many tiny files: how time and memory grow with the tree (informational rows, no targets). */
async function benchScale(ctx) {
  const c = ctx.small ? { files: 20000, size: 100, dirs: 200 } : { files: 200000, size: 100, dirs: 2000 };
  const { m, r } = await measureRerun(ctx, c, 'scale');
  const tree = `${c.files} files x ${sizeLabel(c.size)} in ${c.dirs} folders, local -> local`;
  const first = (f) => ({
    seconds: f.firstRunSeconds,
    filesPerSec: f.firstRunFilesPerSec,
    peakRssMB: f.firstRunPeakRssMB,
  });
  const rerun = (f) => ({
    seconds: f.seconds,
    filesPerSec: f.filesPerSec,
    peakRssMB: f.rerunPeakRssMB,
    trialsSeconds: f.trialsSeconds,
  });
  const results = [
    {
      name: 'scale-first-copy',
      description: `${tree}: first copy into a fresh destination (one run per tool)`,
      medsync: first(m),
      rclone: first(r),
      ratio: round(r.firstRunSeconds / m.firstRunSeconds),
      ratioDefinition: 'rclone seconds / medsync seconds (informational; medsync fsyncs unless --no-fsync)',
      target: null,
      pass: null,
    },
    {
      name: 'scale-no-change-rerun',
      description: `${tree}: run again with nothing to send`,
      medsync: rerun(m),
      rclone: rerun(r),
      ratio: round(r.seconds / m.seconds),
      ratioDefinition: 'rclone seconds / medsync seconds (informational)',
      target: null,
      pass: null,
    },
  ];
  return { config: localConfig(ctx, { corpus: c }), results };
}

/**
 * The no-change re-run row of a network bench: each of `tools` runs again over its last 4 KiB
 * destination (`kept`: name and state file) with nothing to send, through `runners`. Fails the
 * bench when a destination lost files or medsync rewrote any; another tool's rewrite is reported.
 * Returns the row (`ratio`: rclone seconds ÷ medsync seconds; `pass` against `o.minRatio`, null
 * without one).
 */
/** What a network re-run row measures, over `c` (the 4 KiB corpus already on the server). */
const rerunDescription = (c) =>
  `second run over the ${c.files} files x ${c.size / KiB} KiB already on the server (nothing to send)`;

async function rerunRow(ctx, o) {
  const c = o.corpus;
  const before = {};
  for (const tool of o.tools) before[tool] = await walk(join(o.root, o.kept[tool].name));
  const fns = {};
  for (const tool of o.tools) {
    fns[tool] = async (t) => {
      const r = await o.runners[tool](o.src, o.kept[tool].name, o.kept[tool].state, {
        synced: 0,
        skipped: c.files,
        bytes: 0,
      });
      log(`${o.row}: trial ${t + 1} ${tool.padEnd(7)} ${r.seconds.toFixed(3)} s`);
      return r;
    };
  }
  const runs = await alternate(ctx.trials, fns);
  o.medsyncRuns.push(...runs.medsync);
  const rewrote = {};
  for (const tool of o.tools) {
    const after = await walk(join(o.root, o.kept[tool].name));
    if (after.count !== c.files || after.bytes !== c.files * c.size)
      fail(`${tool}: after the re-run the destination holds ${after.count} files / ${after.bytes} bytes`);
    rewrote[tool] = after.maxCtimeNs !== before[tool].maxCtimeNs;
  }
  if (rewrote.medsync) fail('medsync: the no-change re-run changed the destination');
  for (const tool of o.tools.filter((t) => t !== 'medsync'))
    if (rewrote[tool]) log(`WARNING: ${tool}'s no-change re-run rewrote files at its destination`);
  const fig = (rs, tool) => {
    const b = best(rs);
    return {
      seconds: round(b.seconds),
      filesPerSec: round(c.files / b.seconds, 0),
      peakRssMB: kbToMB(maxKB(...rs)),
      trialsSeconds: rs.map((r) => round(r.seconds)),
      rewroteFiles: rewrote[tool],
      ...(b.internalSeconds !== undefined ? { runDurationSeconds: round(b.internalSeconds) } : {}),
    };
  };
  const f = Object.fromEntries(o.tools.map((t) => [t, fig(runs[t], t)]));
  const ratio = round(f.rclone.seconds / f.medsync.seconds);
  return {
    name: o.row,
    description: o.description ?? rerunDescription(c),
    ...f,
    ratio,
    ratioDefinition: 'rclone seconds / medsync seconds (>1: medsync faster)',
    ...(f.lftp ? { lftpRatio: round(f.lftp.seconds / f.medsync.seconds) } : {}),
    // Rows without a target (through the latency proxy: the ratio grows with the round-trip
    // time, so no one figure fits every --rtt) count for nothing in the overall pass.
    target: o.minRatio === undefined ? null : o.target,
    pass: o.minRatio === undefined ? null : ratio >= o.minRatio,
  };
}

/**
 * The re-run row again through a proxy before `o.server` that adds `ctx.rtt` ms of round-trip
 * time (bench/latency-proxy.mjs). medsync keys its manifest by the destination's address, so
 * through the proxy the files already there are another destination's: one untimed medsync run
 * adopts them (a listing) before the round-trip time is switched on.
 */
async function rerunThroughLatency(ctx, o) {
  const proxy = await startLatencyProxy(o.server, { ftp: o.ftp });
  try {
    const via = o.runnersFor(proxy, '-rtt');
    const k = o.base.kept.medsync;
    await via.medsync(o.base.src, k.name, k.state, { synced: 0, skipped: o.base.corpus.files, bytes: 0 });
    proxy.setRtt(ctx.rtt);
    const description = `${rerunDescription(o.base.corpus)}, through a proxy adding ${ctx.rtt} ms of round-trip time`;
    return await rerunRow(ctx, { ...o.base, row: o.row, description, runners: via, minRatio: undefined });
  } finally {
    await proxy.close();
  }
}

// ---------------------------------------------------------------- ftp bench

const SERVICES = join(ROOT, 'scripts/services.sh');
let runningServer = null; // stopped by main()'s signal handler too

/** Writes one file of `size` random bytes in 16 MiB chunks (a 1 GiB buffer would dwarf the tools' RSS). */
async function makeBigFile(path, size) {
  await fsp.mkdir(dirname(path), { recursive: true });
  const fh = await fsp.open(path, 'w');
  try {
    const chunk = 16 * KiB * KiB;
    for (let off = 0; off < size; off += chunk) await fh.write(randomBytes(Math.min(chunk, size - off)));
  } finally {
    await fh.close();
  }
}

const shaStream = (p) =>
  new Promise((res, rej) => {
    const h = createHash('sha256');
    createReadStream(p)
      .on('error', rej)
      .on('data', (c) => h.update(c))
      .on('end', () => res(h.digest('hex')));
  });

/** Checks, in the server's local root folder, that dst holds exactly the files of src (count, bytes, sampled content). */
async function verifyFtpCopy(tool, src, dst, expect) {
  if (!existsSync(dst)) fail(`${tool}: destination ${dst} does not exist on the server`);
  const w = await walk(dst);
  const bytes = expect.files * expect.size;
  if (w.count !== expect.files || w.bytes !== bytes)
    fail(`${tool}: ${dst} holds ${w.count} files / ${w.bytes} bytes, expected ${expect.files} / ${bytes}`);
  w.paths.sort();
  const step = Math.max(1, Math.floor(w.paths.length / 20));
  for (let i = 0; i < w.paths.length; i += step) {
    const p = w.paths[i];
    if (!existsSync(join(src, p))) fail(`${tool}: ${p} is on the server but not in the source`);
    if ((await shaStream(join(src, p))) !== (await shaStream(join(dst, p))))
      fail(`${tool}: ${p} differs from the source`);
  }
  return w;
}

function startPureFtpd(tmp) {
  // mkdtemp made tmp 0700: the FTP user (uid 65534) must be able to reach its root folder inside it.
  spawnSync('chmod', ['755', tmp]);
  const dir = join(tmp, 'services');
  mkdirSync(dir, { recursive: true });
  log('starting pure-ftpd with scripts/services.sh');
  runningServer = { dir };
  const r = spawnSync('bash', [SERVICES, 'start', 'pure-ftpd', dir], { stdio: ['ignore', 2, 2] });
  if (r.status !== 0) {
    stopServices(runningServer);
    fail(`scripts/services.sh start pure-ftpd exited ${r.status}`);
  }
  const info = JSON.parse(readFileSync(join(dir, 'pure-ftpd.json'), 'utf8'));
  return { ...info, dir };
}

function stopServices(server) {
  log(`stopping the servers in ${server.dir}`);
  spawnSync('bash', [SERVICES, 'stop', server.dir], { stdio: ['ignore', 2, 2] });
  runningServer = null;
}

function lftpRunner(ctx, server) {
  return async (src, remoteDir) => {
    // The password goes in a 0600 script file, not argv.
    const script = join(ctx.tmp, `lftp-${randomBytes(4).toString('hex')}.lftp`);
    const q = (s) => `"${String(s).replace(/["\\]/g, '\\$&')}"`;
    writeFileSync(
      script,
      [
        'set cmd:fail-exit yes',
        'set ftp:ssl-allow no',
        'set net:max-retries 3',
        'set net:reconnect-interval-base 1',
        `open -u ${q(server.user)},${q(server.password)} -p ${server.port} ${server.host}`,
        `mirror -R --parallel=${ctx.concurrency} ${q(src)} ${q(remoteDir)}`,
        '',
      ].join('\n'),
      { mode: 0o600 },
    );
    const r = await runTimed(ctx.lftp, ['-f', script], ctx);
    rmSync(script, { force: true });
    if (r.code !== 0) fail(`lftp exited ${r.code}`, `stderr: ${r.stderr.slice(-2000)}`);
    return { seconds: r.seconds, peakKB: r.peakKB };
  };
}

async function benchFtp(ctx) {
  const S = ctx.small
    ? {
        files256k: { files: 200, size: 256 * KiB, dirs: 4 },
        files4k: { files: 2000, size: 4 * KiB, dirs: 10 },
        bigFile: { files: 1, size: 64 * KiB * KiB, dirs: 1 },
      }
    : {
        files256k: { files: 2000, size: 256 * KiB, dirs: 20 },
        files4k: { files: 20000, size: 4 * KiB, dirs: 100 },
        bigFile: { files: 1, size: 1024 * KiB * KiB, dirs: 1 },
      };
  const rssTarget = 150;
  const rerunTarget = 5;

  let lftp = which('lftp');
  if (!lftp) {
    if (!aptInstall('lftp') || !(lftp = which('lftp')))
      fail('lftp is missing and apt-get install -y lftp failed.');
  }
  const lftpVersion = (spawnSync(lftp, ['--version'], { encoding: 'utf8' }).stdout ?? '')
    .split('\n')[0]
    .trim();
  const ctx2 = { ...ctx, lftp };

  const server = startPureFtpd(ctx.tmp);
  try {
    const ob = spawnSync(ctx.rclone, ['obscure', '-', '--config', ctx.rcloneConfig], {
      input: server.password,
      encoding: 'utf8',
    });
    if (ob.status !== 0 || !ob.stdout.trim()) fail('rclone obscure failed', ob.stderr);
    const medsyncEnv = { ...process.env, MEDSYNC_BENCH_FTP_PASSWORD: server.password };
    const medsync = medsyncRunner(ctx2, {
      args: ['--password-env', 'MEDSYNC_BENCH_FTP_PASSWORD'],
      env: medsyncEnv,
    });
    /** Each tool's run against the server at `at` (the server itself, or a proxy before it). */
    const runnersFor = (at, tag) => {
      const rcloneFtpConfig = join(ctx.tmp, `rclone-ftp${tag}.conf`);
      writeFileSync(
        rcloneFtpConfig,
        `[benchftp]\ntype = ftp\nhost = ${at.host}\nport = ${at.port}\nuser = ${server.user}\npass = ${ob.stdout.trim()}\n`,
        { mode: 0o600 },
      );
      const medsyncUrl = (name) => `ftp://${encodeURIComponent(server.user)}@${at.host}:${at.port}/${name}`;
      const lftpRun = lftpRunner(ctx2, { ...server, host: at.host, port: at.port });
      const rcloneRun = rcloneRunner(ctx2, rcloneFtpConfig);
      return {
        medsync: (src, name, state, expect) => medsync(src, medsyncUrl(name), state, expect),
        lftp: (src, name) => lftpRun(src, `/${name}`),
        rclone: (src, name) => rcloneRun(src, `benchftp:/${name}`),
      };
    };
    const tools = ['medsync', 'lftp', 'rclone'];
    const run = runnersFor(server, '');

    // Warm the binaries and modules so no tool's first run pays for loading them from disk.
    spawnSync(process.execPath, [CLI, '--version'], { stdio: 'ignore' });
    spawnSync(ctx.rclone, ['version', '--config', ctx.rcloneConfig], { stdio: 'ignore' });
    spawnSync(lftp, ['--version'], { stdio: 'ignore' });

    const results = [];
    const medsyncRuns = [];
    const kept = {}; // tool -> { name, state } of the last trial of the 4 KiB case, re-used by the re-run
    const copyCase = async (key, row, c, keepLast) => {
      const src = join(ctx.tmp, `ftp-src-${key}`);
      log(`${row}: generating ${c.files} x ${c.size / KiB} KiB`);
      if (c.files === 1) await makeBigFile(join(src, 'patient-000/study-0/IM000000.dcm'), c.size);
      else await makeCorpus(src, c);
      const bytes = c.files * c.size;
      const fns = {};
      for (const tool of tools) {
        fns[tool] = async (t) => {
          const name = `dst-${tool}-${key}-${t}`;
          const state = join(ctx.tmp, `ftp-state-${key}-${t}.db`);
          const r = await run[tool](src, name, state, { synced: c.files, skipped: 0, bytes });
          log(`${row}: trial ${t + 1} ${tool.padEnd(7)} ${r.seconds.toFixed(2)} s`);
          const dst = join(server.root, name);
          await verifyFtpCopy(tool, src, dst, c);
          if (keepLast && t === ctx.trials - 1) kept[tool] = { name, state };
          return r;
        };
      }
      const runs = await alternate(ctx.trials, fns);
      medsyncRuns.push(...runs.medsync);
      const fig = (rs) => {
        const b = best(rs);
        return {
          seconds: round(b.seconds),
          MBps: round(bytes / MB / b.seconds, 1),
          filesPerSec: round(c.files / b.seconds, 1),
          peakRssMB: kbToMB(maxKB(...rs)),
          trialsSeconds: rs.map((r) => round(r.seconds)),
          ...(b.internalSeconds !== undefined ? { runDurationSeconds: round(b.internalSeconds) } : {}),
        };
      };
      const f = Object.fromEntries(tools.map((t) => [t, fig(runs[t])]));
      results.push({
        name: row,
        description: `${c.files} file(s) x ${c.size / KiB} KiB (${round(bytes / MB, 1)} MB) in ${c.dirs} folder(s), local -> fresh folder on loopback pure-ftpd`,
        ...f,
        ratios: {
          filesPerSecVsLftp: round(f.medsync.filesPerSec / f.lftp.filesPerSec),
          MBpsVsLftp: round(f.medsync.MBps / f.lftp.MBps),
          MBpsVsRclone: round(f.medsync.MBps / f.rclone.MBps),
        },
        ratioDefinition: 'medsync files/s (MB/s) / other tool files/s (MB/s); > 1: medsync faster',
        // Issue 4: at least lftp's files/s and MB/s on every transfer row at the same parallelism.
        target: 'filesPerSecVsLftp >= 1 and MBpsVsLftp >= 1',
        pass: f.medsync.filesPerSec >= f.lftp.filesPerSec && f.medsync.MBps >= f.lftp.MBps,
      });
      return src;
    };

    // (a)-(c) transfers into fresh destination folders; (d) re-runs over the last 4 KiB destinations.
    const want = (row) => !ctx.only || ctx.only.includes(row);
    if (want('ftp-copy-256k')) await copyCase('256k', 'ftp-copy-256k', S.files256k, false);
    const src4k = want('ftp-copy-4k') ? await copyCase('4k', 'ftp-copy-4k', S.files4k, true) : undefined;
    if (want('ftp-copy-big')) await copyCase('1g', 'ftp-copy-big', S.bigFile, false);

    if (src4k && want('ftp-no-change-rerun')) {
      const base = {
        tools,
        kept,
        src: src4k,
        corpus: S.files4k,
        root: server.root,
        medsyncRuns,
        target: `ratio >= ${rerunTarget}`,
        minRatio: rerunTarget,
      };
      results.push(await rerunRow(ctx, { ...base, row: 'ftp-no-change-rerun', runners: run }));
      if (ctx.rtt) {
        const row = 'ftp-no-change-rerun-rtt';
        results.push(await rerunThroughLatency(ctx, { server, ftp: true, runnersFor, base, row }));
      }
    }

    const peak = kbToMB(maxKB(...medsyncRuns));
    results.push({
      name: 'ftp-peak-rss',
      description: 'peak RSS (max RSS of the process) of medsync over all its ftp runs',
      medsync: { peakRssMB: peak },
      lftp: { peakRssMB: Math.max(...results.filter((r) => r.lftp).map((r) => r.lftp.peakRssMB)) },
      rclone: { peakRssMB: Math.max(...results.filter((r) => r.rclone).map((r) => r.rclone.peakRssMB)) },
      target: `medsync peak RSS < ${rssTarget} MB`,
      pass: peak !== null && peak < rssTarget,
    });

    return {
      config: {
        concurrency: ctx.concurrency,
        medsyncFsync: !ctx.noFsync,
        ...(ctx.rtt ? { rttMs: ctx.rtt } : {}),
        rcloneCheckers: 8,
        lftp: `${lftpVersion}; mirror -R --parallel=${ctx.concurrency} (ftp:ssl-allow no)`,
        server: `pure-ftpd on ${server.host}:${server.port} (scripts/services.sh)`,
        trials: ctx.trials,
        keep: 'best (lowest wall-clock) of the trials; order alternates between trials',
        small: ctx.small,
        corpora: S,
        units: 'MB = 1,000,000 bytes; seconds are wall-clock around the whole process (start-up included)',
      },
      results,
    };
  } finally {
    stopServices(server);
  }
}

// ---------------------------------------------------------------- sftp bench

function startSshd(tmp) {
  // mkdtemp made tmp 0700: the SFTP user must be able to reach its home folder inside it.
  spawnSync('chmod', ['755', tmp]);
  const dir = join(tmp, 'services-sshd');
  mkdirSync(dir, { recursive: true });
  log('starting sshd with scripts/services.sh');
  runningServer = { dir };
  const r = spawnSync('bash', [SERVICES, 'start', 'sshd', dir], { stdio: ['ignore', 2, 2] });
  if (r.status !== 0) {
    stopServices(runningServer);
    fail(`scripts/services.sh start sshd exited ${r.status}`);
  }
  const info = JSON.parse(readFileSync(join(dir, 'sshd.json'), 'utf8'));
  const knownHosts = join(dir, 'known_hosts');
  writeFileSync(knownHosts, `${info.knownHostsLine}\n`);
  return { ...info, dir, knownHosts };
}

/** OpenSSH's own client: `sftp -b` with `put -r` (one connection, one file at a time). */
function opensshSftpRunner(ctx, server) {
  return async (src, remoteDir) => {
    const batch = join(ctx.tmp, `sftp-${randomBytes(4).toString('hex')}.batch`);
    writeFileSync(batch, `put -r "${src}" "${remoteDir}"\n`);
    const args = [
      '-q',
      '-b',
      batch,
      '-i',
      server.privateKey,
      '-P',
      String(server.port),
      '-o',
      `UserKnownHostsFile=${server.knownHosts}`,
      '-o',
      'StrictHostKeyChecking=yes',
      '-o',
      'BatchMode=yes',
      `${server.user}@${server.host}`,
    ];
    const r = await runTimed(ctx.sftp, args, ctx);
    rmSync(batch, { force: true });
    if (r.code !== 0) fail(`sftp exited ${r.code}`, `stderr: ${r.stderr.slice(-2000)}`);
    return { seconds: r.seconds, peakKB: r.peakKB };
  };
}

async function benchSftp(ctx) {
  const S = ctx.small
    ? {
        files256k: { files: 200, size: 256 * KiB, dirs: 4 },
        files4k: { files: 2000, size: 4 * KiB, dirs: 10 },
        bigFile: { files: 1, size: 64 * KiB * KiB, dirs: 1 },
      }
    : {
        files256k: { files: 2000, size: 256 * KiB, dirs: 20 },
        files4k: { files: 20000, size: 4 * KiB, dirs: 100 },
        bigFile: { files: 1, size: 1024 * KiB * KiB, dirs: 1 },
      };
  const rssTarget = 150;

  const sftp = which('sftp');
  if (!sftp) fail('OpenSSH sftp is missing (apt-get install openssh-client).');
  const sshVersion = (spawnSync('ssh', ['-V'], { encoding: 'utf8' }).stderr ?? '').trim();
  const ctx2 = { ...ctx, sftp };

  const server = startSshd(ctx.tmp);
  try {
    const medsync = medsyncRunner(ctx2, {
      args: ['--identity', server.privateKey, '--host-fingerprint', server.hostFingerprint],
    });
    /** medsync's and rclone's runs against the server at `at` (the server itself, or a proxy). */
    const runnersFor = (at, tag) => {
      // rclone checks the host key against the address it dials.
      const knownHosts = join(ctx.tmp, `known_hosts${tag}`);
      const key = server.knownHostsLine.split(' ').slice(1).join(' ');
      writeFileSync(knownHosts, `[${at.host}]:${at.port} ${key}\n`);
      const rcloneSftpConfig = join(ctx.tmp, `rclone-sftp${tag}.conf`);
      writeFileSync(
        rcloneSftpConfig,
        `[benchsftp]\ntype = sftp\nhost = ${at.host}\nport = ${at.port}\nuser = ${server.user}\nkey_file = ${server.privateKey}\nknown_hosts_file = ${knownHosts}\n`,
        { mode: 0o600 },
      );
      const medsyncUrl = (name) =>
        `sftp://${encodeURIComponent(server.user)}@${at.host}:${at.port}${server.root}/${name}`;
      const rcloneRun = rcloneRunner(ctx, rcloneSftpConfig);
      return {
        medsync: (src, name, state, expect) => medsync(src, medsyncUrl(name), state, expect),
        rclone: (src, name) => rcloneRun(src, `benchsftp:${server.root}/${name}`),
      };
    };
    const opensshRun = opensshSftpRunner(ctx2, server);
    const run = {
      ...runnersFor(server, ''),
      openssh: (src, name) => opensshRun(src, `${server.root}/${name}`),
    };
    spawnSync(process.execPath, [CLI, '--version'], { stdio: 'ignore' });
    spawnSync(ctx.rclone, ['version', '--config', ctx.rcloneConfig], { stdio: 'ignore' });

    const results = [];
    const medsyncRuns = [];
    const kept = {};
    const copyCase = async (key, row, c, tools, keepLast) => {
      const src = join(ctx.tmp, `sftp-src-${key}`);
      log(`${row}: generating ${c.files} x ${c.size / KiB} KiB`);
      if (c.files === 1) await makeBigFile(join(src, 'patient-000/study-0/IM000000.dcm'), c.size);
      else await makeCorpus(src, c);
      const bytes = c.files * c.size;
      const fns = {};
      for (const tool of tools) {
        fns[tool] = async (t) => {
          const name = `dst-${tool}-${key}-${t}`;
          const state = join(ctx.tmp, `sftp-state-${key}-${t}.db`);
          const r = await run[tool](src, name, state, { synced: c.files, skipped: 0, bytes });
          log(`${row}: trial ${t + 1} ${tool.padEnd(7)} ${r.seconds.toFixed(2)} s`);
          const dst = join(server.root, name);
          await verifyFtpCopy(tool, src, dst, c);
          if (keepLast && t === ctx.trials - 1) kept[tool] = { name, state };
          return r;
        };
      }
      const runs = await alternate(ctx.trials, fns);
      medsyncRuns.push(...runs.medsync);
      const fig = (rs) => {
        const b = best(rs);
        return {
          seconds: round(b.seconds),
          MBps: round(bytes / MB / b.seconds, 1),
          filesPerSec: round(c.files / b.seconds, 1),
          peakRssMB: kbToMB(maxKB(...rs)),
          trialsSeconds: rs.map((r) => round(r.seconds)),
          ...(b.internalSeconds !== undefined ? { runDurationSeconds: round(b.internalSeconds) } : {}),
        };
      };
      const f = Object.fromEntries(tools.map((t) => [t, fig(runs[t])]));
      results.push({
        name: row,
        description: `${c.files} file(s) x ${c.size / KiB} KiB (${round(bytes / MB, 1)} MB) in ${c.dirs} folder(s), local -> fresh folder on loopback OpenSSH sshd`,
        ...f,
        ratios: {
          MBpsVsRclone: round(f.medsync.MBps / f.rclone.MBps),
          ...(f.openssh ? { MBpsVsOpenssh: round(f.medsync.MBps / f.openssh.MBps) } : {}),
        },
        ratioDefinition: 'medsync MB/s / other tool MB/s; > 1: medsync faster',
        // The issue names no SFTP figure beyond "the same bench": the FTP target, with rclone
        // (the SFTP anchor) in lftp's place.
        target: 'MBpsVsRclone >= 1 (the FTP target applied to the SFTP anchor)',
        pass: f.medsync.MBps >= f.rclone.MBps,
      });
      return src;
    };

    const all = ['medsync', 'rclone', 'openssh'];
    const want = (row) => !ctx.only || ctx.only.includes(row);
    if (want('sftp-copy-256k')) await copyCase('256k', 'sftp-copy-256k', S.files256k, all, false);
    const src4k = want('sftp-copy-4k')
      ? await copyCase('4k', 'sftp-copy-4k', S.files4k, ['medsync', 'rclone', 'openssh'], true)
      : undefined;
    if (want('sftp-copy-big')) await copyCase('1g', 'sftp-copy-big', S.bigFile, all, false);

    if (src4k && want('sftp-no-change-rerun')) {
      // OpenSSH's sftp has no incremental mode: the re-run compares medsync and rclone.
      const base = {
        tools: ['medsync', 'rclone'],
        kept,
        src: src4k,
        corpus: S.files4k,
        root: server.root,
        medsyncRuns,
        target: 'ratio >= 5 (the FTP re-run target applied to SFTP)',
        minRatio: 5,
      };
      results.push(await rerunRow(ctx, { ...base, row: 'sftp-no-change-rerun', runners: run }));
      if (ctx.rtt) {
        const row = 'sftp-no-change-rerun-rtt';
        results.push(await rerunThroughLatency(ctx, { server, ftp: false, runnersFor, base, row }));
      }
    }

    const peak = kbToMB(maxKB(...medsyncRuns));
    results.push({
      name: 'sftp-peak-rss',
      description: 'peak RSS (max RSS of the process) of medsync over all its sftp runs',
      medsync: { peakRssMB: peak },
      rclone: { peakRssMB: Math.max(...results.filter((r) => r.rclone).map((r) => r.rclone.peakRssMB)) },
      target: `medsync peak RSS < ${rssTarget} MB`,
      pass: peak !== null && peak < rssTarget,
    });

    return {
      config: {
        concurrency: ctx.concurrency,
        medsyncFsync: !ctx.noFsync,
        medsync:
          'sync … sftp://… --identity KEY --host-fingerprint SHA256:… (fsync@openssh.com before each rename unless --no-fsync)',
        rclone: `copy … --transfers ${ctx.concurrency} --checkers 8, sftp backend (key_file, known_hosts_file; rclone's defaults otherwise)`,
        openssh: `${sshVersion}: sftp -b with put -r (one connection, one file at a time)`,
        server: `OpenSSH sshd on ${server.host}:${server.port} (scripts/services.sh start sshd)`,
        trials: ctx.trials,
        keep: 'best (lowest wall-clock) of the trials; order alternates between trials',
        small: ctx.small,
        corpora: S,
        units: 'MB = 1,000,000 bytes; seconds are wall-clock around the whole process (start-up included)',
      },
      results,
    };
  } finally {
    stopServices(server);
  }
}

// ---------------------------------------------------------------- main

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  if (!existsSync(BUILT_CLI)) fail(`${BUILT_CLI} is missing: run npm run build first (npm run bench does).`);

  let rclone = which('rclone');
  if (!rclone) {
    if (!aptInstall('rclone') || !(rclone = which('rclone')))
      fail('rclone is missing and apt-get install -y rclone failed.');
  }
  if (!existsSync(TIME)) aptInstall('time');
  const rssMethod = existsSync(TIME) ? 'time' : 'proc';
  if (rssMethod === 'proc')
    log(`${TIME} is unavailable: peak RSS is polled from /proc/PID/status VmHWM (may miss the last few ms)`);

  const tmp = mkdtempSync(join(os.tmpdir(), 'medsync-bench-'));
  const cleanup = () => {
    if (opts.keep) log(`kept ${tmp}`);
    else rmSync(tmp, { recursive: true, force: true });
  };
  const onSignal = (sig) => {
    if (runningServer) stopServices(runningServer);
    cleanup();
    process.exit(128 + os.constants.signals[sig]);
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  let out, rcloneVersion, git, loadStart;
  try {
    git = gitInfo();
    CLI = snapshotCli(tmp);
    const rcloneConfig = join(tmp, 'rclone.conf');
    writeFileSync(rcloneConfig, '');
    rcloneVersion = (
      spawnSync(rclone, ['version', '--config', rcloneConfig], { encoding: 'utf8' }).stdout ?? ''
    )
      .split('\n')[0]
      .trim();
    log(
      `bench ${opts.name}: ${rcloneVersion}, node ${process.version}, concurrency ${opts.concurrency}, ${opts.trials} trial(s)${opts.small ? ', small corpora' : ''}; temp ${tmp}`,
    );
    loadStart = os.loadavg()[0];
    out = await BENCHES[opts.name].run({ ...opts, tmp, rclone, rcloneConfig, rssMethod });
  } finally {
    cleanup();
  }
  const cpus = os.cpus();
  const report = {
    bench: opts.name,
    date: new Date().toISOString(),
    machine: {
      node: process.version,
      platform: `${os.platform()} ${os.release()} ${os.arch()}`,
      cpus: cpus.length,
      cpuModel: cpus[0]?.model ?? null,
      memoryGB: round(os.totalmem() / 1e9, 1),
      tmpdir: os.tmpdir(),
      rclone: rcloneVersion,
      loadavg1m: { start: round(loadStart, 2), end: round(os.loadavg()[0], 2) },
      medsync: git,
      rssMethod:
        rssMethod === 'time'
          ? '/usr/bin/time -f %M (max RSS of the child)'
          : '/proc/PID/status VmHWM polled every 10 ms',
    },
    ...out,
    pass: out.results.every((r) => r.pass !== false), // pass: null marks an informational row
  };
  process.stdout.write(JSON.stringify(report, null, 2) + '\n');
  if (opts.check && !report.pass) process.exitCode = 3;
}

main().catch((e) => {
  process.stderr.write(`bench: FAILED: ${e instanceof BenchError ? e.message : (e?.stack ?? String(e))}\n`);
  process.exitCode = 1;
});
