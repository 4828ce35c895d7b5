import { createHash, randomBytes } from 'node:crypto';
import { Readable } from 'node:stream';
import { resolveTestApi, type TestApi } from './test-api.js';
import type { Storage, StorageEntry } from '../storage/types.js';

export interface StorageConformanceOptions {
  /** Test-runner functions; default: the runner's globals (see {@link TestApi}). */
  api?: TestApi;
  /** Shown in test names. */
  name: string;
  /** A fresh storage rooted in an empty scratch folder. */
  create(): Promise<Storage>;
  /** Called after each test with the storage (already closed). */
  cleanup?(storage: Storage): Promise<void>;
  /** Bytes for the large-file test. Default 64 MiB. */
  largeFileBytes?: number;
  /** The adapter keeps whole files in memory by design (memory storage): skip the memory bound. */
  buffersWrites?: boolean;
  /** Skip names with non-ASCII characters (a backend that cannot store them). */
  skipUnicodeNames?: boolean;
  /** Per-test timeout. Default 60 s. */
  timeoutMs?: number;
}

/** A stream of `size` pseudo-random bytes made on demand (never held whole in memory). */
export function generatedStream(size: number, seed = 1, chunk = 64 * 1024): Readable {
  let sent = 0;
  let x = seed >>> 0 || 1;
  return new Readable({
    highWaterMark: chunk,
    read() {
      if (sent >= size) {
        this.push(null);
        return;
      }
      const n = Math.min(chunk, size - sent);
      const b = Buffer.allocUnsafe(n);
      for (let i = 0; i < n; i += 4) {
        x ^= x << 13;
        x ^= x >>> 17;
        x ^= x << 5;
        b.writeUInt32LE(x >>> 0, i <= n - 4 ? i : n - 4);
      }
      sent += n;
      this.push(b);
    },
  });
}

/** SHA-256 of a stream and its length. */
export async function digestOf(
  stream: NodeJS.ReadableStream,
): Promise<{ sha256: string; md5: string; size: number }> {
  const h = createHash('sha256');
  const m = createHash('md5');
  let size = 0;
  for await (const c of stream as AsyncIterable<Buffer>) {
    h.update(c);
    m.update(c);
    size += c.length;
  }
  return { sha256: h.digest('hex'), md5: m.digest('hex'), size };
}

async function readAll(s: Storage, p: string, range?: { start?: number; end?: number }): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const c of await s.read(p, range ?? {})) parts.push(c as Buffer);
  return Buffer.concat(parts);
}

async function listAll(s: Storage, prefix = ''): Promise<StorageEntry[]> {
  const out: StorageEntry[] = [];
  for await (const e of s.list(prefix)) out.push(e);
  return out.sort((a, b) => (a.path < b.path ? -1 : 1));
}

const put = (s: Storage, p: string, data: string | Buffer, mtimeMs?: number) =>
  s.write(p, Readable.from([Buffer.from(data)]), {
    size: Buffer.byteLength(data),
    ...(mtimeMs !== undefined ? { mtimeMs } : {}),
  });

/**
 * The Storage contract, as named vitest tests. Every adapter runs it against a real backend:
 * `describeStorageConformance({ name: 'local', create: async () => new LocalStorage({ root: tmp() }) })`.
 */
export function describeStorageConformance(o: StorageConformanceOptions): void {
  const timeout = o.timeoutMs ?? 60_000;
  const { describe, it, expect, beforeEach, afterEach } = resolveTestApi(o.api);
  describe(`${o.name} storage conformance`, () => {
    let s: Storage;
    beforeEach(async () => {
      s = await o.create();
    }, timeout);
    afterEach(async () => {
      await s.close();
      await o.cleanup?.(s);
    }, timeout);

    it(
      'StatMissing: stat of a missing file rejects with E_NOT_FOUND',
      async () => {
        await expect(s.stat('nope/missing.dcm')).rejects.toMatchObject({ code: 'E_NOT_FOUND' });
        await expect(s.read('missing.dcm')).rejects.toMatchObject({ code: 'E_NOT_FOUND' });
      },
      timeout,
    );

    it(
      'WriteReadRoundTrip: bytes, size and listing agree',
      async () => {
        const data = randomBytes(100_003);
        const w = await s.write('a/b/c.dcm', Readable.from([data]), { size: data.length });
        expect(w.path).toBe('a/b/c.dcm');
        expect(w.size).toBe(data.length);
        expect((await s.stat('a/b/c.dcm')).size).toBe(data.length);
        expect((await readAll(s, 'a/b/c.dcm')).equals(data)).toBe(true);
        expect((await listAll(s)).map((e) => e.path)).toEqual(['a/b/c.dcm']);
      },
      timeout,
    );

    it(
      'ListDeepTree: streams every file of a deep tree, by prefix too, and no folders',
      async () => {
        const paths: string[] = [];
        for (let d = 0; d < 6; d++) {
          const dir = Array.from({ length: d }, (_, i) => `lvl${i}`).join('/');
          for (let f = 0; f < 4; f++) paths.push(dir ? `${dir}/f${f}.dcm` : `f${f}.dcm`);
        }
        for (const p of paths) await put(s, p, `content of ${p}`);
        const iter = s.list('')[Symbol.asyncIterator]();
        const first = await iter.next();
        expect(first.done).toBe(false);
        await iter.return?.();
        const all = await listAll(s);
        expect(all.map((e) => e.path)).toEqual([...paths].sort());
        for (const e of all) expect(e.size).toBe(Buffer.byteLength(`content of ${e.path}`));
        const sub = await listAll(s, 'lvl0/lvl1');
        expect(sub.map((e) => e.path)).toEqual(paths.filter((p) => p.startsWith('lvl0/lvl1/')).sort());
        await expect(listAll(s, 'no/such/dir')).rejects.toMatchObject({ code: 'E_NOT_FOUND' });
      },
      timeout,
    );

    (o.skipUnicodeNames ? it.skip : it)(
      'UnicodeAndSpaces: names with unicode and spaces round-trip',
      async () => {
        const names = [
          'Müller Hans/CT Thorax 1.dcm',
          'été/naïve café.dcm',
          '患者/画像 01.dcm',
          'space at end /x y.dcm',
        ];
        for (const n of names) await put(s, n, n);
        const all = await listAll(s);
        expect(all.map((e) => e.path).sort()).toEqual([...names].sort());
        for (const n of names) expect((await readAll(s, n)).toString()).toBe(n);
      },
      timeout,
    );

    it(
      'ZeroByteFile: an empty file is written, listed and read',
      async () => {
        const w = await s.write('empty.dcm', Readable.from([]), { size: 0 });
        expect(w.size).toBe(0);
        expect((await s.stat('empty.dcm')).size).toBe(0);
        expect((await readAll(s, 'empty.dcm')).length).toBe(0);
        expect((await listAll(s)).map((e) => e.path)).toEqual(['empty.dcm']);
      },
      timeout,
    );

    it(
      'LargeFileStreamed: a large file streams through without being buffered',
      async () => {
        const size = o.largeFileBytes ?? 64 * 1024 * 1024;
        const src = generatedStream(size, 7);
        const expected = await digestOf(generatedStream(size, 7));
        const before = process.memoryUsage();
        let peak = 0;
        const timer = setInterval(() => {
          const m = process.memoryUsage();
          peak = Math.max(peak, m.arrayBuffers - before.arrayBuffers, m.rss - before.rss);
        }, 5);
        try {
          const w = await s.write('big/large.bin', src, { size });
          expect(w.size).toBe(size);
        } finally {
          clearInterval(timer);
        }
        if (!o.buffersWrites) expect(peak).toBeLessThan(Math.max(48 * 1024 * 1024, size / 2));
        const got = await digestOf(await s.read('big/large.bin'));
        expect(got).toEqual(expected);
      },
      timeout * 3,
    );

    it(
      'WriteBuffer: a buffer body is written like a stream; readBuffer returns the bytes',
      async () => {
        const data = randomBytes(70_001);
        const w = await s.write('buf/one.dcm', data, { size: data.length, mtimeMs: 1_700_000_000_000 });
        expect(w.size).toBe(data.length);
        expect((await readAll(s, 'buf/one.dcm')).equals(data)).toBe(true);
        await expect(s.write('buf/bad.dcm', data, { size: 5 })).rejects.toMatchObject({
          code: 'E_INTEGRITY',
        });
        await expect(s.stat('buf/bad.dcm')).rejects.toMatchObject({ code: 'E_NOT_FOUND' });
        if (s.readBuffer) {
          expect((await s.readBuffer('buf/one.dcm')).equals(data)).toBe(true);
          await expect(s.readBuffer('buf/missing.dcm')).rejects.toMatchObject({ code: 'E_NOT_FOUND' });
        }
      },
      timeout,
    );

    it(
      'Overwrite: writing an existing path replaces its content',
      async () => {
        await put(s, 'x/over.dcm', 'first version, longer');
        await put(s, 'x/over.dcm', 'second');
        expect((await readAll(s, 'x/over.dcm')).toString()).toBe('second');
        expect((await s.stat('x/over.dcm')).size).toBe(6);
        expect((await listAll(s)).length).toBe(1);
      },
      timeout,
    );

    it(
      'AtomicWrite: a file is invisible under its final name until complete',
      async () => {
        let release!: () => void;
        const gate = new Promise<void>((r) => (release = r));
        let pushed = 0;
        const body = new Readable({
          read() {
            if (pushed === 0) {
              pushed++;
              this.push(Buffer.alloc(1024, 1));
            } else if (pushed === 1) {
              pushed++;
              void gate.then(() => {
                this.push(Buffer.alloc(1024, 2));
                this.push(null);
              });
            }
          },
        });
        const writing = s.write('slow/file.dcm', body, { size: 2048 });
        await new Promise((r) => setTimeout(r, 150));
        await expect(s.stat('slow/file.dcm')).rejects.toMatchObject({ code: 'E_NOT_FOUND' });
        const during = await listAll(s).catch(() => []);
        expect(during.map((e) => e.path)).not.toContain('slow/file.dcm');
        release();
        await writing;
        expect((await s.stat('slow/file.dcm')).size).toBe(2048);
        expect((await listAll(s)).map((e) => e.path)).toEqual(['slow/file.dcm']);
      },
      timeout,
    );

    it(
      'AbortedWrite: an aborted or failed write leaves nothing under the final name',
      async () => {
        const ac = new AbortController();
        const body = generatedStream(8 * 1024 * 1024, 3, 16 * 1024);
        let n = 0;
        body.on('data', () => {
          if (++n === 4) ac.abort();
        });
        await expect(
          s.write('ab/aborted.bin', body, { size: 8 * 1024 * 1024, signal: ac.signal }),
        ).rejects.toMatchObject({
          code: 'E_ABORTED',
        });
        const broken = new Readable({
          read() {
            this.push(Buffer.alloc(4096));
            this.destroy(Object.assign(new Error('socket hang up'), { code: 'ECONNRESET' }));
          },
        });
        await expect(s.write('ab/broken.bin', broken, { size: 1_000_000 })).rejects.toMatchObject({
          name: 'MedsyncError',
        });
        await expect(
          put(s, 'ab/short.bin', 'abc').then(() =>
            s.write('ab/short2.bin', Readable.from([Buffer.from('abc')]), { size: 10 }),
          ),
        ).rejects.toMatchObject({
          code: 'E_INTEGRITY',
        });
        await expect(s.stat('ab/aborted.bin')).rejects.toMatchObject({ code: 'E_NOT_FOUND' });
        await expect(s.stat('ab/broken.bin')).rejects.toMatchObject({ code: 'E_NOT_FOUND' });
        await expect(s.stat('ab/short2.bin')).rejects.toMatchObject({ code: 'E_NOT_FOUND' });
        expect((await listAll(s)).map((e) => e.path)).toEqual(['ab/short.bin']);
      },
      timeout,
    );

    it(
      'InvalidPaths: "..", absolute, backslash and NUL paths are rejected with E_INVALID_PATH',
      async () => {
        const bad = [
          '../escape.dcm',
          'a/../../escape.dcm',
          '/etc/passwd',
          'a\0b.dcm',
          'a\\b.dcm',
          '',
          'C:/x.dcm',
        ];
        for (const p of bad) {
          await expect(s.stat(p)).rejects.toMatchObject({ code: 'E_INVALID_PATH' });
          await expect(s.write(p, Readable.from([Buffer.from('x')]))).rejects.toMatchObject({
            code: 'E_INVALID_PATH',
          });
          await expect(s.read(p)).rejects.toMatchObject({ code: 'E_INVALID_PATH' });
          await expect(s.remove(p)).rejects.toMatchObject({ code: 'E_INVALID_PATH' });
          await expect(s.rename('ok.dcm', p)).rejects.toMatchObject({ code: 'E_INVALID_PATH' });
        }
        await expect(listAll(s, '../up')).rejects.toMatchObject({ code: 'E_INVALID_PATH' });
        expect(await listAll(s)).toEqual([]);
      },
      timeout,
    );

    it(
      'ConcurrentWrites: parallel writes to many files and to one file stay whole',
      async () => {
        const files = Array.from({ length: 24 }, (_, i) => ({
          p: `c/${i % 4}/f${i}.dcm`,
          d: randomBytes(20_000 + i),
        }));
        await Promise.all(files.map((f) => s.write(f.p, Readable.from([f.d]), { size: f.d.length })));
        for (const f of files) expect((await readAll(s, f.p)).equals(f.d)).toBe(true);
        const versions = Array.from({ length: 6 }, () => randomBytes(150_000));
        await Promise.all(versions.map((v) => s.write('c/same.dcm', generatedFrom(v), { size: v.length })));
        const got = await readAll(s, 'c/same.dcm');
        expect(versions.some((v) => v.equals(got))).toBe(true);
      },
      timeout,
    );

    it(
      'RemoveIdempotent: removing a missing file succeeds; removing a file removes it',
      async () => {
        await s.remove('never/existed.dcm');
        await put(s, 'r/gone.dcm', 'x');
        await s.remove('r/gone.dcm');
        await expect(s.stat('r/gone.dcm')).rejects.toMatchObject({ code: 'E_NOT_FOUND' });
        await s.remove('r/gone.dcm');
      },
      timeout,
    );

    it(
      'Rename: moves a file into a new folder, replacing the target; a missing source is E_NOT_FOUND',
      async () => {
        await put(s, 'm/a.dcm', 'AAA');
        await put(s, 'n/b.dcm', 'BBBB');
        await s.rename('m/a.dcm', 'n/b.dcm');
        expect((await readAll(s, 'n/b.dcm')).toString()).toBe('AAA');
        await expect(s.stat('m/a.dcm')).rejects.toMatchObject({ code: 'E_NOT_FOUND' });
        await s.rename('n/b.dcm', 'deep/new/place.dcm');
        expect((await readAll(s, 'deep/new/place.dcm')).toString()).toBe('AAA');
        await expect(s.rename('m/missing.dcm', 'x.dcm')).rejects.toMatchObject({ code: 'E_NOT_FOUND' });
      },
      timeout,
    );

    it(
      'CapabilitiesHonest: mtimes, hashes and range reads are as advertised',
      async () => {
        const caps = s.capabilities;
        const mtime = Date.UTC(2024, 4, 17, 10, 30, 15, 0);
        const data = Buffer.from('0123456789abcdefghij');
        const w = await put(s, 'cap/file.dcm', data, mtime);
        const st = await s.stat('cap/file.dcm');
        if (caps.preservesMtime) {
          expect(caps.mtimePrecisionMs).not.toBeNull();
          expect(Math.abs((st.mtimeMs ?? 0) - mtime)).toBeLessThan(caps.mtimePrecisionMs!);
        }
        const sha = createHash('sha256').update(data).digest('hex');
        const md5 = createHash('md5').update(data).digest('hex');
        for (const kind of caps.hashes) {
          const want = kind === 'sha256' ? sha : md5;
          expect(st.hashes?.[kind]).toBe(want);
          expect(w.hashes?.[kind]).toBe(want);
        }
        if (caps.rangeReads)
          expect((await readAll(s, 'cap/file.dcm', { start: 5, end: 9 })).toString()).toBe('56789');
        expect(caps.maxConcurrency).toBeGreaterThan(0);
        expect(typeof s.id).toBe('string');
        expect(s.id).not.toMatch(/:[^/@]*:[^@]+@/);
      },
      timeout,
    );

    it(
      'ConnectionTest: test() reports ok, writable and latency',
      async () => {
        await put(s, 'top.dcm', 'x');
        const r = await s.test();
        expect(r.ok).toBe(true);
        expect(r.writable).toBe(true);
        expect(r.latencyMs).toBeGreaterThanOrEqual(0);
        expect(r.kind).toBe(s.kind);
        expect((await listAll(s)).map((e) => e.path)).toEqual(['top.dcm']);
      },
      timeout,
    );
  });
}

function generatedFrom(buf: Buffer): Readable {
  const chunks: Buffer[] = [];
  for (let i = 0; i < buf.length; i += 16_384) chunks.push(buf.subarray(i, i + 16_384));
  return Readable.from(chunks);
}
