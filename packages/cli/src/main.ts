import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { Command, CommanderError, Option } from 'commander';
import {
  getAllJobStatus,
  getJobStatus,
  MedsyncError,
  redactingLogger,
  Scheduler,
  SecretBox,
  SyncJob,
  toMedsyncError,
  type Logger,
  type Storage,
  type Store,
  type SyncMode,
} from '@medsync/core';
import { openSqliteStore } from '@medsync/adapters-db';
import { openEndpoint } from './endpoints.js';
import {
  EXIT,
  exitCodeFor,
  ProgressLine,
  retryText,
  statusText,
  syncJson,
  syncText,
  type CliIO,
} from './output.js';
import { runDemo } from './demo.js';

const collect = (v: string, prev: string[] = []) => [...prev, v];

function intArg(name: string, min: number, max: number) {
  return (v: string) => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < min || n > max)
      throw new MedsyncError('E_CONFIG', `${name} must be a whole number from ${min} to ${max}.`);
    return n;
  };
}

/** A share from 0 to 1, given as a fraction (0.05) or a percentage (5%). */
function shareArg(name: string) {
  return (v: string) => {
    const pct = /^\s*([\d.]+)\s*%\s*$/.exec(v);
    const n = pct ? Number(pct[1]) / 100 : Number(v);
    if (!Number.isFinite(n) || n < 0 || n > 1)
      throw new MedsyncError('E_CONFIG', `${name} must be a share from 0 to 1, or a percentage such as 5%.`);
    return n;
  };
}

/** Default job id for `medsync sync`: derived from the source and destinations, so re-runs resume. */
export function defaultJobId(source: Storage, dests: readonly Storage[]): string {
  const h = createHash('sha256')
    .update([source.id, ...dests.map((d) => d.id).sort()].join('\n'))
    .digest('hex');
  return `sync-${h.slice(0, 12)}`;
}

interface SyncFlags {
  state?: string;
  job?: string;
  mode: SyncMode;
  maxDelete?: number;
  concurrency?: number;
  bwlimit?: string;
  include?: string[];
  exclude?: string[];
  dryRun?: boolean;
  json?: boolean;
  passwordEnv?: string;
  retries?: number;
  readBack?: number;
  progress?: boolean;
  fsync?: boolean;
  ca?: string;
  identity?: string;
  passphraseEnv?: string;
  hostFingerprint?: string;
  knownHosts?: string;
  serverDigest?: boolean;
}

/** The SFTP flags `sync` and `test` take. */
type SftpFlags = Pick<
  SyncFlags,
  'identity' | 'passphraseEnv' | 'hostFingerprint' | 'knownHosts' | 'serverDigest'
>;

function addSftpOptions(cmd: Command): Command {
  return cmd
    .option('--identity <file>', 'private key file an SFTP destination is logged in with')
    .option('--passphrase-env <var>', 'environment variable holding the passphrase of --identity')
    .option(
      '--host-fingerprint <fp>',
      "the SFTP server's host key fingerprint (SHA256:…, from ssh-keygen -lf on the server)",
    )
    .option(
      '--known-hosts <file>',
      'known_hosts file to check the SFTP host key with (default: ~/.ssh/known_hosts)',
    )
    .option(
      '--no-server-digest',
      "FTP/SFTP: do not check uploads against the server's SHA-256 (HASH/XSHA256, or over SSH); sizes are still checked",
    );
}

function sftpEndpointOptions(f: SftpFlags) {
  return {
    identityFile: f.identity,
    passphraseEnv: f.passphraseEnv,
    hostFingerprint: f.hostFingerprint,
    knownHostsFile: f.knownHosts,
    serverDigest: f.serverDigest,
  };
}

function writeError(io: CliIO, e: MedsyncError, json: boolean | undefined): void {
  if (json)
    io.stdout.write(JSON.stringify({ status: 'failed', error: { code: e.code, message: e.message } }) + '\n');
  else io.stderr.write(`medsync: ${e.code}: ${e.message}\n`);
}

/**
 * Runs the CLI with `argv` (without node and script). Resolves to the exit code; never calls
 * process.exit itself (bin.ts does).
 */
export async function main(argv: string[], io: CliIO): Promise<number> {
  let code: number = EXIT.success;
  const program = new Command()
    .name('medsync')
    .description('Move hospital data reliably: sync DICOM folders, check connections, run schedules.')
    .version('0.1.0')
    .exitOverride()
    .configureOutput({ writeOut: (s) => io.stdout.write(s), writeErr: (s) => io.stderr.write(s) })
    .showHelpAfterError('(run medsync --help for usage)');

  const sync = program
    .command('sync')
    .description(
      'Copy or mirror SOURCE to one or more DESTINATIONS (paths or URLs); only new or changed files are sent.',
    )
    .argument('<source>', 'source folder or URL')
    .argument('<destinations...>', 'one or more destination folders or URLs')
    .option(
      '--state <file>',
      'SQLite state file (manifest, runs); default: medsync-state.db in the current folder',
    )
    .option('--job <id>', 'job id (default: derived from source and destinations)')
    .addOption(
      new Option('--mode <mode>', 'copy never deletes; mirror deletes what the source lost')
        .choices(['copy', 'mirror'])
        .default('copy'),
    )
    .option(
      '--max-delete <n>',
      'most files a mirror run may delete (default: half of what was delivered)',
      intArg('--max-delete', 0, Number.MAX_SAFE_INTEGER),
    )
    .option('--concurrency <n>', 'parallel transfers (default 4)', intArg('--concurrency', 1, 256))
    .option('--bwlimit <rate>', 'bandwidth limit, bytes/s with K/M/G suffix (e.g. 10M)')
    .option('--include <glob>', 'only sync matching files (repeatable)', collect)
    .option('--exclude <glob>', 'skip matching files (repeatable)', collect)
    .option('--retries <n>', 'retries per file (default 3)', intArg('--retries', 0, 20))
    .option(
      '--read-back <share>',
      'read back this share of delivered files and compare their SHA-256 (e.g. 5% or 1)',
      shareArg('--read-back'),
    )
    .option('--dry-run', 'print the plan, write nothing')
    .option('--json', 'print one JSON object on stdout')
    .option('--no-progress', 'no progress bar')
    .option(
      '--no-fsync',
      'do not fsync each file before renaming it into place (faster; a power cut may lose recent files)',
    )
    .option('--password-env <var>', 'environment variable holding the destination password')
    .option('--ca <file>', 'PEM certificate or CA an FTPS destination is trusted with');
  addSftpOptions(sync).action(async (source: string, destinations: string[], f: SyncFlags) => {
    code = await syncCommand(source, destinations, f, io);
  });

  program
    .command('status')
    .description('Last run, history, configuration and statistics of the jobs in a state file.')
    .requiredOption('--state <file>', 'SQLite state file')
    .option('--job <id>', 'only this job')
    .option('--history <n>', 'runs of history to show (default 20)', intArg('--history', 1, 10_000))
    .option('--json', 'print JSON')
    .action(async (f: { state: string; job?: string; json?: boolean; history?: number }) => {
      code = await statusCommand(f, io);
    });

  const test = program
    .command('test')
    .description('Test a destination: reachable, writable, latency, files in the folder.')
    .argument('<destination>', 'folder or URL')
    .option('--json', 'print JSON')
    .option('--password-env <var>', 'environment variable holding the password')
    .option('--ca <file>', 'PEM certificate or CA an FTPS server is trusted with');
  addSftpOptions(test).action(
    async (dest: string, f: { json?: boolean; passwordEnv?: string; ca?: string } & SftpFlags) => {
      code = await testCommand(dest, f, io);
    },
  );

  program
    .command('run')
    .description('Run the scheduler over the jobs of a config file until SIGTERM or SIGINT.')
    .requiredOption('--config <file>', 'medsync.config.json')
    .option('--once', 'run every enabled job once, then exit')
    .action(async (f: { config: string; once?: boolean }) => {
      code = await runCommand(f, io);
    });

  program
    .command('demo')
    .description(
      'Generate a sample study tree, sync it with SQLite state, print the status (no setup needed).',
    )
    .option('--dir <folder>', 'working folder', '.medsync-demo')
    .action(async (f: { dir: string }) => {
      code = await runDemo(resolve(io.cwd, f.dir), io);
    });

  const secret = program
    .command('secret')
    .description('Encrypt secrets for the config file (needs MEDSYNC_SECRET_KEY).');
  secret
    .command('encrypt')
    .description('Print the encrypted form of the value in an environment variable.')
    .requiredOption('--env <var>', 'environment variable holding the secret')
    .action(async (f: { env: string }) => {
      const v = io.env[f.env];
      if (!v) throw new MedsyncError('E_CONFIG', `The environment variable ${f.env} is not set.`);
      io.stdout.write((await SecretBox.fromEnv(io.env).encrypt(v, 'password')) + '\n');
    });
  secret
    .command('keygen')
    .description('Print a new random key for MEDSYNC_SECRET_KEY.')
    .action(async () => {
      const { randomBytes } = await import('node:crypto');
      io.stdout.write(randomBytes(32).toString('base64') + '\n');
    });

  try {
    await program.parseAsync(argv, { from: 'user' });
    return code;
  } catch (e) {
    if (e instanceof CommanderError) {
      if (
        e.code === 'commander.helpDisplayed' ||
        e.code === 'commander.version' ||
        e.code === 'commander.help'
      )
        return EXIT.success;
      return EXIT.usage;
    }
    const me = toMedsyncError(e);
    writeError(io, me, argv.includes('--json'));
    return me.code === 'E_CONFIG' || me.code === 'E_INVALID_PATH' || me.code === 'E_UNSUPPORTED'
      ? EXIT.usage
      : EXIT.failed;
  }
}

/** `--ca` only means something for ftps://: with plain ftp:// the password would go unencrypted. */
function checkCaFlag(ca: string | undefined, urls: string[]): void {
  if (ca !== undefined && !urls.some((u) => /^ftps:\/\//i.test(u))) {
    throw new MedsyncError(
      'E_CONFIG',
      '--ca trusts the certificate of an FTPS server, but no destination is ftps://: plain ftp:// sends the password unencrypted. Use ftps://host/path.',
    );
  }
}

async function syncCommand(source: string, destinations: string[], f: SyncFlags, io: CliIO): Promise<number> {
  checkCaFlag(f.ca, destinations);
  const src = await openEndpoint(source, { baseDir: io.cwd, env: io.env });
  const dests: Storage[] = [];
  for (const d of destinations)
    dests.push(
      await openEndpoint(d, {
        baseDir: io.cwd,
        passwordEnv: f.passwordEnv,
        env: io.env,
        fsync: f.fsync,
        caFile: f.ca,
        connections: f.concurrency ?? 4,
        ...sftpEndpointOptions(f),
      }),
    );
  const store = await openSqliteStore({ path: resolve(io.cwd, f.state ?? 'medsync-state.db') });
  const job = new SyncJob({
    id: f.job ?? defaultJobId(src, dests),
    source: src,
    destinations: dests,
    store,
    mode: f.mode,
    ...(f.maxDelete !== undefined ? { maxDelete: f.maxDelete } : {}),
    ...(f.concurrency !== undefined ? { concurrency: f.concurrency } : {}),
    ...(f.bwlimit !== undefined ? { bwlimit: f.bwlimit } : {}),
    ...(f.include ? { include: f.include } : {}),
    ...(f.exclude ? { exclude: f.exclude } : {}),
    ...(f.retries !== undefined ? { retry: { retries: f.retries } } : {}),
    ...(f.readBack !== undefined ? { readBack: f.readBack } : {}),
    eventPaths: true,
  });
  const bar =
    !f.json && f.progress !== false && io.stderr.isTTY && !f.dryRun ? new ProgressLine(io.stderr) : undefined;
  if (bar) job.on('progress', (p) => bar.update(p));
  let retries = 0;
  job.on('file:retry', (e) => {
    retries++;
    bar?.clear();
    io.stderr.write(retryText(e));
  });
  const hard = new AbortController();
  const soft = new AbortController();
  let signals = 0;
  const onSignal = () => {
    signals++;
    if (signals === 1) {
      soft.abort();
      io.stderr.write('\nmedsync: stopping after the files in flight (press Ctrl-C again to cancel now)\n');
    } else hard.abort();
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  try {
    const result = await job.run({
      signal: hard.signal,
      stopSignal: soft.signal,
      trigger: 'manual',
      dryRun: !!f.dryRun,
    });
    bar?.done();
    io.stdout.write(f.json ? JSON.stringify(syncJson(result, retries)) + '\n' : syncText(result, retries));
    return exitCodeFor(result.status);
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    await store.close();
    await Promise.all([src, ...dests].map((s) => s.close()));
  }
}

async function statusCommand(
  f: { state: string; job?: string; json?: boolean; history?: number },
  io: CliIO,
): Promise<number> {
  const path = resolve(io.cwd, f.state);
  if (!existsSync(path)) {
    throw new MedsyncError(
      'E_CONFIG',
      'The state file does not exist: pass the --state used by sync or run.',
    );
  }
  const store: Store = await openSqliteStore({ path });
  try {
    const opts = { historyLimit: f.history ?? 20 };
    const all = f.job ? [await getJobStatus(store, f.job, opts)] : await getAllJobStatus(store, opts);
    io.stdout.write(
      f.json ? JSON.stringify(f.job ? all[0] : { jobs: all }, null, 2) + '\n' : statusText(all),
    );
    return EXIT.success;
  } finally {
    await store.close();
  }
}

async function testCommand(
  dest: string,
  f: { json?: boolean; passwordEnv?: string; ca?: string } & SftpFlags,
  io: CliIO,
): Promise<number> {
  checkCaFlag(f.ca, [dest]);
  const s = await openEndpoint(dest, {
    baseDir: io.cwd,
    passwordEnv: f.passwordEnv,
    env: io.env,
    caFile: f.ca,
    ...sftpEndpointOptions(f),
  });
  try {
    const r = await s.test();
    if (f.json) io.stdout.write(JSON.stringify(r, null, 2) + '\n');
    else {
      io.stdout.write(`${r.ok ? 'OK' : 'FAILED'}: ${r.kind} ${r.id} (${r.latencyMs} ms)\n`);
      if (r.ok)
        io.stdout.write(
          `  writable: ${r.writable ? 'yes' : 'no'}; entries in folder: ${r.entries ?? (r.details?.listable === false ? 'not listable' : '?')}${r.freeBytes !== undefined ? `; free: ${Math.round(r.freeBytes / 1e9)} GB` : ''}\n`,
        );
      if (r.error) io.stdout.write(`  ${r.error.code}: ${r.error.message}\n`);
      if (r.advice) io.stdout.write(`  advice: ${r.advice}\n`);
    }
    return r.ok ? EXIT.success : EXIT.failed;
  } finally {
    await s.close();
  }
}

async function runCommand(f: { config: string; once?: boolean }, io: CliIO): Promise<number> {
  const file = resolve(io.cwd, f.config);
  let raw: unknown;
  try {
    raw = JSON.parse(readFileSync(file, 'utf8'));
  } catch (e) {
    throw new MedsyncError(
      'E_CONFIG',
      `The config file could not be read as JSON: ${(e as Error).message.replace(file, '<config>')}`,
    );
  }
  // zod and the schemas load only for `run`: other commands start faster without them.
  const { parseConfig } = await import('@medsync/core/config');
  const config = parseConfig(raw);
  const baseDir = dirname(file);
  const store = await openSqliteStore({ path: resolve(baseDir, config.state) });
  const log = (msg: string, fields: Record<string, unknown> | undefined = {}) =>
    io.stderr.write(JSON.stringify({ at: new Date().toISOString(), msg, ...fields }) + '\n');
  const storages: Storage[] = [];
  const logger: Logger = redactingLogger({
    debug: () => undefined,
    info: (msg, fields) => log(msg, fields),
    warn: (msg, fields) => log(msg, { level: 'warn', ...fields }),
    error: (msg, fields) => log(msg, { level: 'error', ...fields }),
  });
  const scheduler = new Scheduler({ store, logger });
  try {
    const jobs: SyncJob[] = [];
    for (const j of config.jobs) {
      const src = await openEndpoint(j.source, { baseDir, env: io.env });
      const dests: Storage[] = [];
      for (const d of j.destinations)
        dests.push(
          await openEndpoint(d, { baseDir, env: io.env, fsync: j.fsync, connections: j.concurrency }),
        );
      storages.push(src, ...dests);
      const job = new SyncJob({
        id: j.id,
        source: src,
        destinations: dests,
        store,
        mode: j.mode,
        include: j.include,
        exclude: j.exclude,
        concurrency: j.concurrency,
        ...(j.maxDelete !== undefined ? { maxDelete: j.maxDelete } : {}),
        ...(j.bwlimit !== undefined ? { bwlimit: j.bwlimit } : {}),
        retry: { retries: j.retries },
        scheduledRetry: { retries: j.retries },
        ...(j.readBack !== undefined ? { readBack: j.readBack } : {}),
        logger,
      });
      job.on('run:done', ({ result }) =>
        log('sync run finished', {
          job: j.id,
          status: result.status,
          filesSynced: result.filesSynced,
          filesFailed: result.filesFailed,
          bytes: result.bytes,
          durationMs: result.durationMs,
        }),
      );
      jobs.push(job);
      await scheduler.add({
        id: j.id,
        schedule: j.schedule,
        enabled: j.enabled,
        run: (ctx) => job.run({ trigger: ctx.trigger, signal: ctx.signal, stopSignal: ctx.stopSignal }),
      });
    }
    if (f.once) {
      // As in the daemon: a first SIGTERM/SIGINT finishes the files in flight and starts no
      // further job; a second one cancels at once.
      let signals = 0;
      const onSignal = (sig: NodeJS.Signals) => {
        if (++signals === 1) {
          log('stopping: finishing the files in flight', { signal: sig });
          void scheduler.stop();
        } else {
          log('second signal: cancelling running jobs now', { signal: sig });
          void scheduler.stop({ timeoutMs: 0 });
        }
      };
      process.on('SIGTERM', onSignal);
      process.on('SIGINT', onSignal);
      try {
        let worst: number = EXIT.success;
        for (const j of config.jobs) {
          if (!j.enabled) continue;
          if (signals > 0) {
            log('job not started: stopping', { job: j.id });
            worst = worst === EXIT.failed ? worst : EXIT.cancelled;
            continue;
          }
          let c: number;
          try {
            const r = (await scheduler.runNow(j.id)) as { status: string } | undefined;
            // undefined: another instance holds the job's lease and runs it.
            if (!r) log('job skipped: running on another instance', { job: j.id });
            c = r ? exitCodeFor(r.status) : EXIT.success;
          } catch (e) {
            const me = toMedsyncError(e);
            log('job failed', { job: j.id, code: me.code, error: me.message });
            c = EXIT.failed;
          }
          if (c === EXIT.failed) worst = c;
          else if (c === EXIT.cancelled && worst !== EXIT.failed) worst = c;
          else if (c === EXIT.partial && worst === EXIT.success) worst = c;
        }
        return worst;
      } finally {
        process.off('SIGTERM', onSignal);
        process.off('SIGINT', onSignal);
      }
    }
    scheduler.on('task:error', (e) =>
      log('job failed', { job: e.id, code: e.error.code, error: e.error.message }),
    );
    scheduler.on('task:skipped', (e) => log('job skipped', { job: e.id, reason: e.reason }));
    scheduler.start();
    for (const s of scheduler.state())
      log('job scheduled', {
        job: s.id,
        enabled: s.enabled,
        nextRunAt: s.nextRunAt ? new Date(s.nextRunAt).toISOString() : null,
      });
    // Scheduler timers are unref'd (an embedding host decides its own lifetime); the daemon
    // keeps itself alive until a signal arrives.
    const keepAlive = setInterval(() => undefined, 1 << 30);
    await new Promise<void>((resolveStop) => {
      let stopping = false;
      const stop = (sig: string) => {
        if (stopping) {
          log('second signal: cancelling running jobs now', { signal: sig });
          void scheduler.stop({ timeoutMs: 0 });
          return;
        }
        stopping = true;
        log('stopping: finishing the files in flight', { signal: sig });
        void scheduler.stop().then(() => resolveStop());
      };
      process.on('SIGTERM', () => stop('SIGTERM'));
      process.on('SIGINT', () => stop('SIGINT'));
    });
    clearInterval(keepAlive);
    log('stopped cleanly');
    return EXIT.success;
  } finally {
    await store.close().catch(() => undefined);
    await Promise.all(storages.map((s) => s.close().catch(() => undefined)));
  }
}
