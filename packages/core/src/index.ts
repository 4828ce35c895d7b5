export * from './errors/index.js';
export * from './storage/types.js';
export * from './storage/paths.js';
export { LocalStorage, createLocalStorage, type LocalStorageOptions } from './storage/local.js';
export { type GroupSyncOptions, type SyncFileSystem } from './util/group-sync.js';
export {
  MemoryStorage,
  MemoryFaults,
  createMemoryStorage,
  type MemoryStorageOptions,
  type MemoryOp,
} from './storage/memory.js';
export * from './store/types.js';
export {
  MemoryStore,
  createMemoryStore,
  createMemoryStoreData,
  type MemoryStoreData,
} from './store/memory.js';
export { emptyStats, addToStats } from './store/stats.js';
export * from './sync/types.js';
export {
  SyncJob,
  createSyncJob,
  type SyncJobOptions,
  type SyncRunOptions,
  type SyncMode,
} from './sync/sync-job.js';
export { getJobStatus, getAllJobStatus, type JobStatus } from './sync/status.js';
export * from './scheduler/scheduler.js';
export {
  SecretBox,
  parseKey,
  type SecretBoxOptions,
  type KeyProvider,
  type SecretKey,
} from './secrets/secret-box.js';
export { redact, redactValue, registerSecret } from './secrets/redact.js';
export { RetryPolicy, type RetryPolicyOptions, type RetryEvent, type RetryRunOptions } from './util/retry.js';
export { systemClock, type Clock } from './util/clock.js';
export { noopLogger, redactingLogger, type Logger } from './util/logger.js';
export { HashingStream, TokenBucket, parseRate, hashStream } from './util/streams.js';
export type { OffThreadHasher } from './util/streams.js';
