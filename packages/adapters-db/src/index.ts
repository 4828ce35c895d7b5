export { openSqliteStore, type SqliteStoreOptions } from './sqlite.js';
export { SqlStore, type SqlCapabilities } from './sql-store.js';
export { migrations, migrationProvider, type Database } from './schema.js';
