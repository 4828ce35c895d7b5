import {
  addToStats,
  emptyStats,
  MedsyncError,
  toMedsyncError,
  type AuditStore,
  type LockStore,
  type ManifestEntry,
  type ManifestListOptions,
  type ManifestScope,
  type ManifestStore,
  type RunRecord,
  type RunStore,
  type SettingsStore,
  type Store,
  type VerifiedBy,
  type RunTrigger,
  type RunStatus,
} from '@medsync/core';
import { Migrator, type CompiledQuery, type Kysely, type Selectable } from 'kysely';
import { migrationProvider, type Database, type ManifestTable, type RunsTable } from './schema.js';

/** What differs between SQL backends, as data (pg-boss style). */
export interface SqlCapabilities {
  /** `INSERT … ON CONFLICT` (SQLite, PostgreSQL) rather than `ON DUPLICATE KEY` (MySQL). */
  onConflict: boolean;
  /**
   * Runs compiled statements in one transaction. SQLite supplies a synchronous one: an async
   * transaction would hold the write lock across awaits and deadlock a second handle in the
   * same process. Default: a Kysely transaction.
   */
  executeBatch?: (queries: CompiledQuery[]) => Promise<void>;
  /** Runs one compiled SELECT and returns its rows (SQLite: synchronously, skipping the driver queue). */
  selectRows?: <R>(query: CompiledQuery) => Promise<R[]>;
}

const num = (v: unknown): number => (typeof v === 'bigint' ? Number(v) : Number(v ?? 0));
const opt = <T>(v: T | null): T | undefined => (v === null ? undefined : v);

function toEntry(r: Selectable<ManifestTable>): ManifestEntry {
  return {
    jobId: r.job_id,
    destination: r.destination,
    path: r.path,
    size: num(r.size),
    mtimeMs: num(r.mtime_ms),
    md5: opt(r.md5),
    sha256: opt(r.sha256),
    remoteId: opt(r.remote_id),
    verifiedBy: r.verified_by as VerifiedBy,
    deliveredAt: num(r.delivered_at),
  };
}

/** Manifest fields and their columns. */
const COLUMN = {
  jobId: 'job_id',
  destination: 'destination',
  path: 'path',
  size: 'size',
  mtimeMs: 'mtime_ms',
  md5: 'md5',
  sha256: 'sha256',
  remoteId: 'remote_id',
  verifiedBy: 'verified_by',
  deliveredAt: 'delivered_at',
} as const satisfies Record<keyof ManifestEntry, keyof ManifestTable>;

/** An entry from the columns a narrow list read: only those fields are set. */
function toPartialEntry(r: Partial<Selectable<ManifestTable>>, scope: ManifestScope): ManifestEntry {
  const e: Partial<ManifestEntry> = { path: r.path! };
  if (r.job_id !== undefined) e.jobId = scope.jobId;
  if (r.destination !== undefined) e.destination = scope.destination;
  if (r.size !== undefined) e.size = num(r.size);
  if (r.mtime_ms !== undefined) e.mtimeMs = num(r.mtime_ms);
  if (r.md5 !== undefined) e.md5 = opt(r.md5);
  if (r.sha256 !== undefined) e.sha256 = opt(r.sha256);
  if (r.remote_id !== undefined) e.remoteId = opt(r.remote_id);
  if (r.verified_by !== undefined) e.verifiedBy = r.verified_by as VerifiedBy;
  if (r.delivered_at !== undefined) e.deliveredAt = num(r.delivered_at);
  return e as ManifestEntry;
}

function fromEntry(e: ManifestEntry): ManifestTable {
  return {
    job_id: e.jobId,
    destination: e.destination,
    path: e.path,
    size: e.size,
    mtime_ms: Math.floor(e.mtimeMs),
    md5: e.md5 ?? null,
    sha256: e.sha256 ?? null,
    remote_id: e.remoteId ?? null,
    verified_by: e.verifiedBy,
    delivered_at: e.deliveredAt,
  };
}

function toRun(r: Selectable<RunsTable>): RunRecord {
  return {
    id: r.id,
    jobId: r.job_id,
    trigger: r.trigger as RunTrigger,
    status: r.status as RunStatus,
    owner: r.owner,
    startedAt: num(r.started_at),
    finishedAt: r.finished_at === null ? undefined : num(r.finished_at),
    durationMs: r.duration_ms === null ? undefined : num(r.duration_ms),
    filesSynced: num(r.files_synced),
    filesSkipped: num(r.files_skipped),
    filesFailed: num(r.files_failed),
    filesDeleted: num(r.files_deleted),
    filesMoved: num(r.files_moved),
    bytes: num(r.bytes),
    errors: JSON.parse(r.errors) as RunRecord['errors'],
    errorCount: num(r.error_count),
    dryRun: num(r.dry_run) === 1,
  };
}

function fromRun(r: RunRecord): RunsTable {
  return {
    id: r.id,
    job_id: r.jobId,
    trigger: r.trigger,
    status: r.status,
    owner: r.owner,
    started_at: r.startedAt,
    finished_at: r.finishedAt ?? null,
    duration_ms: r.durationMs ?? null,
    files_synced: r.filesSynced,
    files_skipped: r.filesSkipped,
    files_failed: r.filesFailed,
    files_deleted: r.filesDeleted,
    files_moved: r.filesMoved,
    bytes: r.bytes,
    errors: JSON.stringify(r.errors),
    error_count: r.errorCount,
    dry_run: r.dryRun ? 1 : 0,
  };
}

/**
 * A Store on any Kysely database with the medsync schema. Backend specifics come from
 * {@link SqlCapabilities}; SQLite is wired up by `openSqliteStore`.
 */
export class SqlStore implements Store {
  readonly manifest: ManifestStore;
  readonly runs: RunStore;
  readonly locks: LockStore;
  readonly settings: SettingsStore;
  readonly audit: AuditStore;
  private closed = false;

  constructor(
    readonly kind: string,
    readonly db: Kysely<Database>,
    readonly caps: SqlCapabilities,
    private readonly onClose: () => Promise<void>,
  ) {
    const live = () => {
      if (this.closed) throw new MedsyncError('E_CONFIG', 'This store was closed.', { adapter: kind });
    };
    const wrap = async <T>(what: string, fn: () => Promise<T>): Promise<T> => {
      live();
      try {
        return await fn();
      } catch (e) {
        throw this.toError(e, what);
      }
    };
    const where = (s: { jobId: string; destination: string }) =>
      db
        .selectFrom('medsync_manifest')
        .where('job_id', '=', s.jobId)
        .where('destination', '=', s.destination);

    this.manifest = {
      get: (scope, path) =>
        wrap('Reading the manifest', async () => {
          const r = await where(scope).selectAll().where('path', '=', path).executeTakeFirst();
          return r ? toEntry(r) : undefined;
        }),
      async *list(
        scope: ManifestScope,
        opts: ManifestListOptions & { fields?: readonly (keyof ManifestEntry)[] } = {},
      ) {
        const size = opts.pageSize ?? 5000;
        const columns = opts.fields
          ? [...new Set(['path' as const, ...opts.fields.map((f) => COLUMN[f])])]
          : undefined;
        let after: string | undefined;
        for (;;) {
          const page = await wrap('Listing the manifest', () => {
            let q = columns ? where(scope).select(columns) : where(scope).selectAll();
            if (opts.prefix)
              q = q.where('path', '>=', opts.prefix).where('path', '<', opts.prefix + '\uffff');
            if (after !== undefined) q = q.where('path', '>', after);
            const compiled = q.orderBy('path').limit(size).compile();
            return caps.selectRows
              ? caps.selectRows<Selectable<ManifestTable>>(compiled)
              : db.executeQuery(compiled).then((r) => r.rows);
          });
          if (columns) for (const r of page) yield toPartialEntry(r, scope);
          else for (const r of page) yield toEntry(r);
          if (page.length < size) return;
          after = page[page.length - 1]!.path;
        }
      },
      put: (entries) =>
        wrap('Writing the manifest', async () => {
          const list = Array.isArray(entries) ? entries : [entries as ManifestEntry];
          if (!list.length) return;
          const queries: CompiledQuery[] = [];
          for (let i = 0; i < list.length; i += 200) {
            const rows = list.slice(i, i + 200).map(fromEntry);
            queries.push(
              db
                .insertInto('medsync_manifest')
                .values(rows)
                .onConflict((oc) =>
                  oc.columns(['job_id', 'destination', 'path']).doUpdateSet((eb) => ({
                    size: eb.ref('excluded.size'),
                    mtime_ms: eb.ref('excluded.mtime_ms'),
                    md5: eb.ref('excluded.md5'),
                    sha256: eb.ref('excluded.sha256'),
                    remote_id: eb.ref('excluded.remote_id'),
                    verified_by: eb.ref('excluded.verified_by'),
                    delivered_at: eb.ref('excluded.delivered_at'),
                  })),
                )
                .compile(),
            );
          }
          await this.batch(queries);
        }),
      remove: (scope, paths) =>
        wrap('Removing from the manifest', async () => {
          for (let i = 0; i < paths.length; i += 500) {
            await db
              .deleteFrom('medsync_manifest')
              .where('job_id', '=', scope.jobId)
              .where('destination', '=', scope.destination)
              .where('path', 'in', paths.slice(i, i + 500))
              .execute();
          }
        }),
      findBySha256: (scope, sha256) =>
        wrap('Reading the manifest', async () =>
          (await where(scope).selectAll().where('sha256', '=', sha256).orderBy('path').execute()).map(
            toEntry,
          ),
        ),
      summary: (scope) =>
        wrap('Reading the manifest', async () => {
          const r = await where(scope)
            .select((eb) => [eb.fn.countAll().as('files'), eb.fn.sum<number>('size').as('bytes')])
            .executeTakeFirst();
          return { files: num(r?.files), bytes: num(r?.bytes) };
        }),
      clear: (scope) =>
        wrap('Clearing the manifest', async () => {
          await db
            .deleteFrom('medsync_manifest')
            .where('job_id', '=', scope.jobId)
            .where('destination', '=', scope.destination)
            .execute();
        }),
    };

    this.runs = {
      insert: (run) =>
        wrap('Recording a run', async () => {
          const exists = await db
            .selectFrom('medsync_runs')
            .select('id')
            .where('id', '=', run.id)
            .executeTakeFirst();
          if (exists) throw new MedsyncError('E_EXISTS', 'A run with this id exists.', { adapter: kind });
          await db.insertInto('medsync_runs').values(fromRun(run)).execute();
        }),
      update: (run) =>
        wrap('Recording a run', async () => {
          const { id: _id, ...rest } = fromRun(run);
          const r = await db
            .updateTable('medsync_runs')
            .set(rest)
            .where('id', '=', run.id)
            .executeTakeFirst();
          if (num(r.numUpdatedRows) === 0)
            throw new MedsyncError('E_NOT_FOUND', 'No run with this id.', { adapter: kind });
        }),
      get: (id) =>
        wrap('Reading runs', async () => {
          const r = await db.selectFrom('medsync_runs').selectAll().where('id', '=', id).executeTakeFirst();
          return r ? toRun(r) : undefined;
        }),
      list: (opts = {}) =>
        wrap('Reading runs', async () => {
          let q = db.selectFrom('medsync_runs').selectAll();
          if (opts.jobId) q = q.where('job_id', '=', opts.jobId);
          if (opts.status) q = q.where('status', '=', opts.status);
          q = q.orderBy('started_at', 'desc').orderBy('id', 'desc');
          if (opts.limit !== undefined) q = q.limit(opts.limit);
          return (await q.execute()).map(toRun);
        }),
      stats: (jobId) =>
        wrap('Reading run statistics', async () => {
          let q = db
            .selectFrom('medsync_runs')
            .select(['status', 'job_id'])
            .select((eb) => [
              eb.fn.countAll().as('n'),
              eb.fn.sum<number>('files_synced').as('synced'),
              eb.fn.sum<number>('files_failed').as('failed'),
              eb.fn.sum<number>('files_deleted').as('deleted'),
              eb.fn.sum<number>('bytes').as('bytes'),
              eb.fn.max('started_at').as('last'),
            ])
            .where('dry_run', '=', 0)
            .groupBy(['status', 'job_id']);
          if (jobId) q = q.where('job_id', '=', jobId);
          const s = emptyStats();
          for (const r of await q.execute()) {
            const n = num(r.n);
            const status = r.status as RunStatus;
            // Fold each group in as one synthetic run, then fix the run count.
            addToStats(s, {
              status,
              startedAt: num(r.last),
              filesSynced: num(r.synced),
              filesFailed: num(r.failed),
              filesDeleted: num(r.deleted),
              bytes: num(r.bytes),
              dryRun: false,
            } as RunRecord);
            s.totalRuns += n - 1;
            if (status in s && status !== 'running')
              (s as unknown as Record<string, number>)[status]! += n - 1;
          }
          return s;
        }),
      jobIds: () =>
        wrap('Reading runs', async () =>
          (await db.selectFrom('medsync_runs').select('job_id').distinct().orderBy('job_id').execute()).map(
            (r) => r.job_id,
          ),
        ),
    };

    this.locks = {
      acquire: (name, owner, ttlMs, now = Date.now()) =>
        wrap('Taking a lease', async () => {
          const r = await db
            .insertInto('medsync_locks')
            .values({ name, owner, expires_at: now + ttlMs })
            .onConflict((oc) =>
              oc
                .column('name')
                .doUpdateSet({ owner, expires_at: now + ttlMs })
                .where((eb) =>
                  eb.or([eb('medsync_locks.owner', '=', owner), eb('medsync_locks.expires_at', '<=', now)]),
                ),
            )
            .executeTakeFirst();
          return num(r.numInsertedOrUpdatedRows) > 0;
        }),
      renew: (name, owner, ttlMs, now = Date.now()) =>
        wrap('Renewing a lease', async () => {
          const r = await db
            .updateTable('medsync_locks')
            .set({ expires_at: now + ttlMs })
            .where('name', '=', name)
            .where('owner', '=', owner)
            .executeTakeFirst();
          return num(r.numUpdatedRows) > 0;
        }),
      release: (name, owner) =>
        wrap('Releasing a lease', async () => {
          await db.deleteFrom('medsync_locks').where('name', '=', name).where('owner', '=', owner).execute();
        }),
      get: (name, now = Date.now()) =>
        wrap('Reading a lease', async () => {
          const r = await db
            .selectFrom('medsync_locks')
            .selectAll()
            .where('name', '=', name)
            .where('expires_at', '>', now)
            .executeTakeFirst();
          return r ? { name: r.name, owner: r.owner, expiresAt: num(r.expires_at) } : undefined;
        }),
    };

    this.settings = {
      get: <T>(key: string) =>
        wrap('Reading a setting', async () => {
          const r = await db
            .selectFrom('medsync_settings')
            .select('value')
            .where('key', '=', key)
            .executeTakeFirst();
          return r ? (JSON.parse(r.value) as T) : undefined;
        }),
      set: (key, value) =>
        wrap('Writing a setting', async () => {
          if (value === undefined)
            throw new MedsyncError('E_CONFIG', 'A setting value may not be undefined.');
          const v = JSON.stringify(value);
          const at = Date.now();
          await db
            .insertInto('medsync_settings')
            .values({ key, value: v, updated_at: at })
            .onConflict((oc) => oc.column('key').doUpdateSet({ value: v, updated_at: at }))
            .execute();
        }),
      delete: (key) =>
        wrap('Deleting a setting', async () => {
          await db.deleteFrom('medsync_settings').where('key', '=', key).execute();
        }),
      list: (prefix = '') =>
        wrap('Reading settings', async () => {
          let q = db.selectFrom('medsync_settings').select(['key', 'value']);
          if (prefix) q = q.where('key', '>=', prefix).where('key', '<', prefix + '\uffff');
          return (await q.orderBy('key').execute()).map((r) => ({
            key: r.key,
            value: JSON.parse(r.value) as unknown,
          }));
        }),
    };

    this.audit = {
      append: (e) =>
        wrap('Writing the audit log', async () => {
          await db
            .insertInto('medsync_audit')
            .values({
              id: undefined,
              at: e.at,
              actor: e.actor,
              action: e.action,
              subject: e.subject ?? null,
              details: e.details ? JSON.stringify(e.details) : null,
            })
            .execute();
        }),
      list: (opts = {}) =>
        wrap('Reading the audit log', async () => {
          let q = db.selectFrom('medsync_audit').selectAll();
          if (opts.since !== undefined) q = q.where('at', '>=', opts.since);
          if (opts.action) q = q.where('action', '=', opts.action);
          q = q.orderBy('id', 'desc');
          if (opts.limit !== undefined) q = q.limit(opts.limit);
          return (await q.execute()).map((r) => ({
            id: num(r.id),
            at: num(r.at),
            actor: r.actor,
            action: r.action,
            subject: opt(r.subject),
            details: r.details ? (JSON.parse(r.details) as Record<string, unknown>) : undefined,
          }));
        }),
    };
  }

  private async batch(queries: CompiledQuery[]): Promise<void> {
    if (this.caps.executeBatch) return this.caps.executeBatch(queries);
    await this.db.transaction().execute(async (trx) => {
      for (const q of queries) await trx.executeQuery(q);
    });
  }

  /** Applies pending migrations (idempotent; concurrent callers are serialised by Kysely's lock). */
  async migrate(): Promise<void> {
    const migrator = new Migrator({
      db: this.db,
      provider: migrationProvider,
      migrationTableName: 'medsync_migration',
      migrationLockTableName: 'medsync_migration_lock',
    });
    const { error } = await migrator.migrateToLatest();
    if (error) throw this.toError(error, 'Migrating the database schema');
  }

  protected toError(e: unknown, what: string): MedsyncError {
    const code = (e as { code?: string }).code ?? '';
    if (code === 'SQLITE_BUSY' || code === 'SQLITE_LOCKED') {
      return new MedsyncError('E_TRANSIENT', `${what}: the database is busy; retry.`, {
        cause: e,
        adapter: this.kind,
      });
    }
    if (code === 'SQLITE_READONLY' || code === 'SQLITE_CANTOPEN' || code === 'SQLITE_PERM') {
      return new MedsyncError(
        'E_PERMISSION',
        `${what}: the database file cannot be written; check its folder and mode.`,
        { cause: e, adapter: this.kind },
      );
    }
    if (code === 'SQLITE_FULL')
      return new MedsyncError('E_QUOTA', `${what}: the disk is full.`, { cause: e, adapter: this.kind });
    if (code === 'SQLITE_CORRUPT' || code === 'SQLITE_NOTADB') {
      return new MedsyncError(
        'E_INTEGRITY',
        `${what}: the database file is damaged or not a medsync database.`,
        { cause: e, adapter: this.kind, retryable: false },
      );
    }
    return toMedsyncError(e, what, { adapter: this.kind });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.onClose();
  }
}
