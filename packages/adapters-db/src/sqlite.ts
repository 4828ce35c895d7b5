import { mkdirSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { MedsyncError } from '@medsync/core';
import { Kysely, SqliteDialect, type CompiledQuery } from 'kysely';
import { migrations, type Database } from './schema.js';
import { SqlStore } from './sql-store.js';

export interface SqliteStoreOptions {
  /** The database file (created with its folder if missing), or `:memory:`. */
  path: string;
  /** How long to wait for another process's write lock, ms. Default 10,000. */
  busyTimeoutMs?: number;
  /** Open read-only (status readers). Default false. */
  readonly?: boolean;
  /**
   * Bytes of the file SQLite reads through a memory map instead of read calls (PRAGMA mmap_size):
   * planning a run reads every manifest row of the job, and a 20,000-file manifest comes back
   * ~10 % faster. 0 turns it off (for a state file on a network file system that another host
   * may truncate). Mapped pages count in the process RSS, hence the modest default: 64 MiB
   * (a manifest of ~150,000 files; beyond it SQLite reads the rest as usual).
   */
  mmapBytes?: number;
}

type BetterSqlite3 = typeof import('better-sqlite3');

/** Migrations in flight in this process, by database file. */
const migrating = new Map<string, Promise<void>>();

async function loadDriver(): Promise<BetterSqlite3> {
  try {
    const m = (await import('better-sqlite3')) as unknown as { default?: BetterSqlite3 } & BetterSqlite3;
    return m.default ?? m;
  } catch (e) {
    throw new MedsyncError(
      'E_DEPENDENCY_MISSING',
      'The SQLite store needs the better-sqlite3 package: npm install better-sqlite3',
      { cause: e, adapter: 'sqlite' },
    );
  }
}

/**
 * Opens (creating and migrating) the embedded SQLite Store: one file, WAL journal, nothing to run.
 * Several processes may share the file; writes wait up to `busyTimeoutMs` for each other.
 */
export async function openSqliteStore(opts: SqliteStoreOptions): Promise<SqlStore> {
  if (!opts?.path) throw new MedsyncError('E_CONFIG', 'openSqliteStore needs a path.', { adapter: 'sqlite' });
  const mmap = opts.mmapBytes ?? 64 * 1024 * 1024;
  if (!Number.isSafeInteger(mmap) || mmap < 0) {
    throw new MedsyncError('E_CONFIG', 'mmapBytes must be a whole number of bytes, 0 or more.', {
      adapter: 'sqlite',
    });
  }
  const Driver = await loadDriver();
  const file = opts.path === ':memory:' ? opts.path : resolve(opts.path);
  let raw: import('better-sqlite3').Database;
  try {
    if (file !== ':memory:' && !opts.readonly) mkdirSync(dirname(file), { recursive: true });
    raw = new Driver(file, { readonly: opts.readonly ?? false, timeout: opts.busyTimeoutMs ?? 10_000 });
    if (!opts.readonly) {
      raw.pragma('journal_mode = WAL');
      raw.pragma('synchronous = NORMAL');
    }
    raw.pragma('foreign_keys = ON');
    if (file !== ':memory:') raw.pragma(`mmap_size = ${mmap}`);
  } catch (e) {
    const code = (e as { code?: string }).code;
    throw new MedsyncError(
      code === 'SQLITE_NOTADB' ? 'E_INTEGRITY' : code === 'SQLITE_CANTOPEN' ? 'E_PERMISSION' : 'E_IO',
      code === 'SQLITE_NOTADB'
        ? 'The state file is not a SQLite database: check the --state path.'
        : 'The state database could not be opened: check the path and that its folder is writable.',
      { cause: e, adapter: 'sqlite', retryable: false },
    );
  }
  const db = new Kysely<Database>({ dialect: new SqliteDialect({ database: raw }) });
  const prepared = new Map<string, import('better-sqlite3').Statement>();
  const prepare = (text: string) => {
    let st = prepared.get(text);
    if (!st) {
      if (prepared.size > 100) prepared.clear();
      prepared.set(text, (st = raw.prepare(text)));
    }
    return st;
  };
  const executeBatch = async (queries: CompiledQuery[]): Promise<void> => {
    const run = raw.transaction(() => {
      for (const q of queries) prepare(q.sql).run(...(q.parameters as unknown[]));
    });
    run.immediate();
  };
  const selectRows = async <R>(q: CompiledQuery): Promise<R[]> =>
    prepare(q.sql).all(...(q.parameters as unknown[])) as R[];
  const store = new SqlStore('sqlite', db, { onConflict: true, executeBatch, selectRows }, async () => {
    await db.destroy();
  });
  // Migrations record their count in user_version, so an up-to-date file opens without the Migrator.
  const current = Object.keys(migrations).length;
  if (!opts.readonly && raw.pragma('user_version', { simple: true }) !== current) {
    // One IMMEDIATE transaction around the whole migration: SQLite's DDL is transactional, so a
    // crash leaves the old schema intact, and a second process opening the file at the same time
    // waits, then finds the schema current.
    // Handles in this process take turns first: a synchronous busy wait on a lock held by another
    // handle of the same thread would never end.
    const previous = migrating.get(file) ?? Promise.resolve();
    const mine = previous.then(async () => {
      raw.exec('BEGIN IMMEDIATE');
      try {
        if (raw.pragma('user_version', { simple: true }) !== current) {
          await store.migrate();
          raw.pragma(`user_version = ${current}`);
        }
        raw.exec('COMMIT');
      } catch (e) {
        if (raw.inTransaction) raw.exec('ROLLBACK');
        throw e;
      }
    });
    const settled = mine.catch(() => undefined);
    migrating.set(file, settled);
    try {
      await mine;
    } catch (e) {
      await store.close();
      throw e;
    } finally {
      if (migrating.get(file) === settled) migrating.delete(file);
    }
  }
  return store;
}
