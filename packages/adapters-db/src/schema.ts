import { type Kysely, type Migration, type MigrationProvider } from 'kysely';

/**
 * The one schema every SQL Store shares (SQLite now; PostgreSQL and MySQL next). Portable types
 * only: text, bigint, integer flags; JSON is stored as text. Identifier columns are bounded
 * varchars so MySQL can index them; a manifest path may hold 1,024 characters.
 */
export interface ManifestTable {
  job_id: string;
  destination: string;
  path: string;
  size: number;
  mtime_ms: number;
  md5: string | null;
  sha256: string | null;
  remote_id: string | null;
  verified_by: string;
  delivered_at: number;
}

export interface RunsTable {
  id: string;
  job_id: string;
  trigger: string;
  status: string;
  owner: string;
  started_at: number;
  finished_at: number | null;
  duration_ms: number | null;
  files_synced: number;
  files_skipped: number;
  files_failed: number;
  files_deleted: number;
  files_moved: number;
  bytes: number;
  errors: string;
  error_count: number;
  dry_run: number;
}

export interface LocksTable {
  name: string;
  owner: string;
  expires_at: number;
}

export interface SettingsTable {
  key: string;
  value: string;
  updated_at: number;
}

export interface AuditTable {
  id: number | undefined;
  at: number;
  actor: string;
  action: string;
  subject: string | null;
  details: string | null;
}

export interface Database {
  medsync_manifest: ManifestTable;
  medsync_runs: RunsTable;
  medsync_locks: LocksTable;
  medsync_settings: SettingsTable;
  medsync_audit: AuditTable;
}

/** Versioned migrations, applied in name order by Kysely's Migrator. Never edit a released one. */
export const migrations: Record<string, Migration> = {
  '0001_foundation': {
    async up(db: Kysely<any>) {
      await db.schema
        .createTable('medsync_manifest')
        .addColumn('job_id', 'varchar(100)', (c) => c.notNull())
        .addColumn('destination', 'varchar(255)', (c) => c.notNull())
        .addColumn('path', 'varchar(1024)', (c) => c.notNull())
        .addColumn('size', 'bigint', (c) => c.notNull())
        .addColumn('mtime_ms', 'bigint', (c) => c.notNull())
        .addColumn('md5', 'varchar(32)')
        .addColumn('sha256', 'varchar(64)')
        .addColumn('remote_id', 'varchar(255)')
        .addColumn('verified_by', 'varchar(16)', (c) => c.notNull())
        .addColumn('delivered_at', 'bigint', (c) => c.notNull())
        .addPrimaryKeyConstraint('medsync_manifest_pk', ['job_id', 'destination', 'path'])
        .execute();
      await db.schema
        .createIndex('medsync_manifest_sha256')
        .on('medsync_manifest')
        .columns(['job_id', 'destination', 'sha256'])
        .execute();
      await db.schema
        .createTable('medsync_runs')
        .addColumn('id', 'varchar(36)', (c) => c.primaryKey())
        .addColumn('job_id', 'varchar(100)', (c) => c.notNull())
        .addColumn('trigger', 'varchar(16)', (c) => c.notNull())
        .addColumn('status', 'varchar(16)', (c) => c.notNull())
        .addColumn('owner', 'varchar(255)', (c) => c.notNull())
        .addColumn('started_at', 'bigint', (c) => c.notNull())
        .addColumn('finished_at', 'bigint')
        .addColumn('duration_ms', 'bigint')
        .addColumn('files_synced', 'bigint', (c) => c.notNull())
        .addColumn('files_skipped', 'bigint', (c) => c.notNull())
        .addColumn('files_failed', 'bigint', (c) => c.notNull())
        .addColumn('files_deleted', 'bigint', (c) => c.notNull())
        .addColumn('files_moved', 'bigint', (c) => c.notNull())
        .addColumn('bytes', 'bigint', (c) => c.notNull())
        .addColumn('errors', 'text', (c) => c.notNull())
        .addColumn('error_count', 'bigint', (c) => c.notNull())
        .addColumn('dry_run', 'integer', (c) => c.notNull())
        .execute();
      await db.schema
        .createIndex('medsync_runs_job')
        .on('medsync_runs')
        .columns(['job_id', 'started_at'])
        .execute();
      await db.schema.createIndex('medsync_runs_status').on('medsync_runs').columns(['status']).execute();
      await db.schema
        .createTable('medsync_locks')
        .addColumn('name', 'varchar(255)', (c) => c.primaryKey())
        .addColumn('owner', 'varchar(255)', (c) => c.notNull())
        .addColumn('expires_at', 'bigint', (c) => c.notNull())
        .execute();
      await db.schema
        .createTable('medsync_settings')
        .addColumn('key', 'varchar(255)', (c) => c.primaryKey())
        .addColumn('value', 'text', (c) => c.notNull())
        .addColumn('updated_at', 'bigint', (c) => c.notNull())
        .execute();
      await db.schema
        .createTable('medsync_audit')
        .addColumn('id', 'integer', (c) => c.primaryKey().autoIncrement())
        .addColumn('at', 'bigint', (c) => c.notNull())
        .addColumn('actor', 'varchar(255)', (c) => c.notNull())
        .addColumn('action', 'varchar(100)', (c) => c.notNull())
        .addColumn('subject', 'varchar(255)')
        .addColumn('details', 'text')
        .execute();
      await db.schema.createIndex('medsync_audit_at').on('medsync_audit').columns(['at']).execute();
    },
    async down(db: Kysely<any>) {
      for (const t of [
        'medsync_audit',
        'medsync_settings',
        'medsync_locks',
        'medsync_runs',
        'medsync_manifest',
      ]) {
        await db.schema.dropTable(t).ifExists().execute();
      }
    },
  },
};

/** Kysely migration provider over {@link migrations}. */
export const migrationProvider: MigrationProvider = {
  async getMigrations() {
    return migrations;
  },
};
