export { FakeClock } from './fake-clock.js';
export {
  describeStorageConformance,
  generatedStream,
  digestOf,
  type StorageConformanceOptions,
} from './storage-conformance.js';
export {
  describeStoreConformance,
  manifestEntry,
  runRecord,
  type StoreConformanceOptions,
  type StoreFixture,
} from './store-conformance.js';
export { MemoryStorage, MemoryFaults, createMemoryStorage } from '../storage/memory.js';
export { MemoryStore, createMemoryStore } from '../store/memory.js';
export { resolveTestApi, type TestApi } from './test-api.js';
export { writeTree, readTree } from './fs-tree.js';
