import { MedsyncError } from '../errors/errors.js';
import type {
  AuditEvent,
  AuditStore,
  LockInfo,
  LockStore,
  ManifestEntry,
  ManifestListOptions,
  ManifestScope,
  ManifestStore,
  RunRecord,
  RunStats,
  RunStore,
  SettingsStore,
  Store,
} from './types.js';
import { emptyStats, addToStats } from './stats.js';

/** The data behind a memory store. Pass the same object to a new store to "reopen" it. */
export interface MemoryStoreData {
  manifest: Map<string, Map<string, ManifestEntry>>;
  runs: Map<string, RunRecord>;
  locks: Map<string, LockInfo>;
  settings: Map<string, string>;
  audit: AuditEvent[];
}

export function createMemoryStoreData(): MemoryStoreData {
  return { manifest: new Map(), runs: new Map(), locks: new Map(), settings: new Map(), audit: [] };
}

const clone = <T>(v: T): T => structuredClone(v);
const scopeKey = (s: ManifestScope) => `${s.jobId}\u0000${s.destination}`;

/** A Store in memory, for tests and throwaway runs. Values are copied in and out. */
export class MemoryStore implements Store {
  readonly kind = 'memory';
  readonly manifest: ManifestStore;
  readonly runs: RunStore;
  readonly locks: LockStore;
  readonly settings: SettingsStore;
  readonly audit: AuditStore;
  private closed = false;

  constructor(readonly data: MemoryStoreData = createMemoryStoreData()) {
    const live = () => {
      if (this.closed)
        throw new MedsyncError('E_CONFIG', 'This store was closed.', { adapter: 'memory-store' });
    };
    const d = data;
    const scopeMap = (s: ManifestScope, create: boolean) => {
      let m = d.manifest.get(scopeKey(s));
      if (!m && create) d.manifest.set(scopeKey(s), (m = new Map()));
      return m;
    };
    this.manifest = {
      async get(scope, path) {
        live();
        const e = scopeMap(scope, false)?.get(path);
        return e ? clone(e) : undefined;
      },
      async *list(scope: ManifestScope, opts: ManifestListOptions = {}) {
        live();
        const m = scopeMap(scope, false);
        if (!m) return;
        const keys = [...m.keys()].filter((k) => !opts.prefix || k.startsWith(opts.prefix)).sort(cmp);
        for (const k of keys) {
          const e = m.get(k);
          if (e) yield clone(e);
        }
      },
      async put(entries) {
        live();
        const list = Array.isArray(entries) ? entries : [entries as ManifestEntry];
        for (const e of list) scopeMap(e, true)!.set(e.path, clone(e));
      },
      async remove(scope, paths) {
        live();
        const m = scopeMap(scope, false);
        for (const p of paths) m?.delete(p);
      },
      async findBySha256(scope, sha256) {
        live();
        const m = scopeMap(scope, false);
        return m ? [...m.values()].filter((e) => e.sha256 === sha256).map(clone) : [];
      },
      async summary(scope) {
        live();
        const m = scopeMap(scope, false);
        let bytes = 0;
        for (const e of m?.values() ?? []) bytes += e.size;
        return { files: m?.size ?? 0, bytes };
      },
      async clear(scope) {
        live();
        d.manifest.delete(scopeKey(scope));
      },
    };
    this.runs = {
      async insert(run) {
        live();
        if (d.runs.has(run.id)) throw new MedsyncError('E_EXISTS', 'A run with this id exists.');
        d.runs.set(run.id, clone(run));
      },
      async update(run) {
        live();
        if (!d.runs.has(run.id)) throw new MedsyncError('E_NOT_FOUND', 'No run with this id.');
        d.runs.set(run.id, clone(run));
      },
      async get(id) {
        live();
        const r = d.runs.get(id);
        return r ? clone(r) : undefined;
      },
      async list(opts = {}) {
        live();
        return [...d.runs.values()]
          .filter(
            (r) => (!opts.jobId || r.jobId === opts.jobId) && (!opts.status || r.status === opts.status),
          )
          .sort((a, b) => b.startedAt - a.startedAt || cmp(b.id, a.id))
          .slice(0, opts.limit ?? Infinity)
          .map(clone);
      },
      async stats(jobId) {
        live();
        const s: RunStats = emptyStats();
        for (const r of d.runs.values()) if (!jobId || r.jobId === jobId) addToStats(s, r);
        return s;
      },
      async jobIds() {
        live();
        return [...new Set([...d.runs.values()].map((r) => r.jobId))].sort(cmp);
      },
    };
    this.locks = {
      async acquire(name, owner, ttlMs, now = Date.now()) {
        live();
        const cur = d.locks.get(name);
        if (cur && cur.owner !== owner && cur.expiresAt > now) return false;
        d.locks.set(name, { name, owner, expiresAt: now + ttlMs });
        return true;
      },
      async renew(name, owner, ttlMs, now = Date.now()) {
        live();
        const cur = d.locks.get(name);
        if (!cur || cur.owner !== owner) return false;
        cur.expiresAt = now + ttlMs;
        return true;
      },
      async release(name, owner) {
        live();
        if (d.locks.get(name)?.owner === owner) d.locks.delete(name);
      },
      async get(name, now = Date.now()) {
        live();
        const cur = d.locks.get(name);
        return cur && cur.expiresAt > now ? { ...cur } : undefined;
      },
    };
    this.settings = {
      async get<T>(key: string) {
        live();
        const v = d.settings.get(key);
        return v === undefined ? undefined : (JSON.parse(v) as T);
      },
      async set(key, value) {
        live();
        if (value === undefined) throw new MedsyncError('E_CONFIG', 'A setting value may not be undefined.');
        d.settings.set(key, JSON.stringify(value));
      },
      async delete(key) {
        live();
        d.settings.delete(key);
      },
      async list(prefix = '') {
        live();
        return [...d.settings.keys()]
          .filter((k) => k.startsWith(prefix))
          .sort(cmp)
          .map((key) => ({ key, value: JSON.parse(d.settings.get(key)!) as unknown }));
      },
    };
    this.audit = {
      async append(e) {
        live();
        d.audit.push({ ...clone(e), id: d.audit.length + 1 });
      },
      async list(opts = {}) {
        live();
        return d.audit
          .filter(
            (e) =>
              (opts.since === undefined || e.at >= opts.since) && (!opts.action || e.action === opts.action),
          )
          .reverse()
          .slice(0, opts.limit ?? Infinity)
          .map(clone);
      },
    };
  }

  async close(): Promise<void> {
    this.closed = true;
  }
}

function cmp(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

/** Creates a {@link MemoryStore}; pass `data` from a closed one to reopen it. */
export function createMemoryStore(data?: MemoryStoreData): MemoryStore {
  return new MemoryStore(data);
}
