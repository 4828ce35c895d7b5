import { randomBytes } from 'node:crypto';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  MedsyncError,
  MemoryStore,
  createLocalStorage,
  isPartialName,
  normalizePath,
  parseRate,
  partialNameFor,
  redact,
  redactValue,
  redactingLogger,
  RetryPolicy,
  SecretBox,
  toMedsyncError,
  TokenBucket,
  type Logger,
} from '@medsync/core';
import { FakeClock } from '@medsync/core/testing';
import { parseConfig } from '@medsync/core/config';

describe('SecretBox', () => {
  const k1 = randomBytes(32).toString('base64');
  const k2 = randomBytes(32).toString('hex');

  it('encrypts with AES-256-GCM and decrypts; tampering and wrong context are refused', async () => {
    const box = new SecretBox({ keys: [k1] });
    const enc = await box.encrypt('ftp-password-123', 'dest.password');
    expect(enc).toMatch(/^msenc:v1:[0-9a-f]{8}:/);
    expect(enc).not.toContain('ftp-password-123');
    expect(await box.decrypt(enc, 'dest.password')).toBe('ftp-password-123');
    await expect(box.decrypt(enc, 'other.key')).rejects.toMatchObject({ code: 'E_SECRET' });
    const parts = enc.split(':');
    parts[5] = Buffer.from('tampered!').toString('base64url');
    await expect(box.decrypt(parts.join(':'), 'dest.password')).rejects.toMatchObject({ code: 'E_SECRET' });
    await expect(new SecretBox({ keys: [k2] }).decrypt(enc, 'dest.password')).rejects.toMatchObject({
      code: 'E_SECRET',
      message: expect.stringMatching(/MEDSYNC_SECRET_KEY_PREVIOUS/),
    });
  });

  it('rotates every stored secret to a new primary key', async () => {
    const store = new MemoryStore();
    const old = new SecretBox({ keys: [k1] });
    await old.setSecret(store.settings, 'ftp.password', 'hunter22');
    await store.settings.set('plain', { a: 1 });
    const rotated = new SecretBox({ keys: [k2, k1] });
    expect(await rotated.rotate(store.settings)).toBe(1);
    expect(await rotated.rotate(store.settings)).toBe(0);
    const onlyNew = new SecretBox({ keys: [k2] });
    expect(await onlyNew.getSecret(store.settings, 'ftp.password')).toBe('hunter22');
    await expect(old.getSecret(store.settings, 'ftp.password')).rejects.toMatchObject({ code: 'E_SECRET' });
    expect(await store.settings.get('plain')).toEqual({ a: 1 });
  });

  it('reads keys from the environment and from a provider; refuses bad keys', async () => {
    expect(() => SecretBox.fromEnv({})).toThrow(expect.objectContaining({ code: 'E_SECRET' }));
    const env = SecretBox.fromEnv({ MEDSYNC_SECRET_KEY: k2, MEDSYNC_SECRET_KEY_PREVIOUS: k1 });
    const enc = await new SecretBox({ keys: [k1] }).encrypt('x-secret');
    expect(await env.decrypt(enc)).toBe('x-secret');
    const viaProvider = new SecretBox({ provider: async () => [Buffer.from(k1, 'base64')] });
    expect(await viaProvider.decrypt(enc)).toBe('x-secret');
    expect(() => new SecretBox({ keys: ['too short'] })).toThrow(
      expect.objectContaining({ code: 'E_CONFIG' }),
    );
  });

  it('redacts decrypted secrets from errors and logs', async () => {
    const box = new SecretBox({ keys: [k1] });
    const secret = 'S3cr3t-' + randomBytes(4).toString('hex');
    await box.decrypt(await box.encrypt(secret));
    const e = new MedsyncError(
      'E_AUTH',
      `login failed with password ${secret} for ftp://bob:${secret}@host/x`,
    );
    expect(e.message).not.toContain(secret);
    expect(e.message).toContain('***');
    const lines: string[] = [];
    const sink: Logger = {
      debug: () => {},
      info: (m, f) => lines.push(m + JSON.stringify(f)),
      warn: () => {},
      error: () => {},
    };
    redactingLogger(sink).info(`connecting with ${secret}`, { password: 'anything', detail: `x ${secret}` });
    expect(lines.join('\n')).not.toContain(secret);
    expect(lines.join('\n')).not.toContain('anything');
    // An Error in the fields (a library's, echoing a URL) is redacted too, without its stack.
    const libError = Object.assign(new Error(`connect to ftp://bob:${secret}@host failed`), {
      code: 'ECONNREFUSED',
    });
    redactingLogger(sink).error('failed', { error: libError });
    expect(lines.join('\n')).not.toContain(secret);
    expect(redactValue({ error: libError })).toEqual({
      error: { name: 'Error', message: 'connect to ftp://bob:***@host failed', code: 'ECONNREFUSED' },
    });
  });

  it('hides URL passwords that hold "/" or "@" (unencoded)', () => {
    for (const pw of ['pa/ss', 'p@ss', 'a:b/c@d', "pa'ss", 'pa"ss<']) {
      const out = redact(`ftp://bob:${pw}@archive.example.org/in and sftp://u:${pw}@h:22/x`);
      expect(out).not.toContain(pw);
      expect(out).toContain('ftp://bob:***@');
      expect(out).toContain('sftp://u:***@');
    }
    expect(redact('see "ftp://bob:pw1234@h/x", then "mail a@b"')).toBe(
      'see "ftp://bob:***@h/x", then "mail a@b"',
    );
    expect(redact('plain ftp://host/path@v2 stays')).toBe('plain ftp://host/path@v2 stays');
  });
});

describe('errors and paths', () => {
  it('maps errno codes to stable codes without leaking paths', () => {
    const native = Object.assign(new Error("EACCES: permission denied, open '/data/Doe John/1.dcm'"), {
      code: 'EACCES',
    });
    const e = toMedsyncError(native, 'Reading the source file');
    expect(e).toMatchObject({ code: 'E_PERMISSION', retryable: false });
    expect(e.message).not.toContain('Doe John');
    expect(toMedsyncError(Object.assign(new Error('x'), { code: 'ECONNRESET' })).retryable).toBe(true);
    expect(toMedsyncError(new Error("weird failure at '/srv/Doe John/x'")).message).not.toContain('Doe');
    // A foreign message is cut to its first line and 200 characters (a SyntaxError can carry code).
    const long = toMedsyncError(new Error(`Unexpected token\n${'const a=1;'.repeat(500)}`), 'Loading');
    expect(long.message).toBe('Loading: Unexpected token');
    expect(toMedsyncError(new Error('x'.repeat(1000))).message.length).toBeLessThanOrEqual(200);
    const abort = new DOMException('aborted', 'AbortError');
    expect(toMedsyncError(abort).code).toBe('E_ABORTED');
  });

  it('normalises paths and rejects dangerous ones before any I/O', () => {
    expect(normalizePath('a//b/./c.dcm')).toBe('a/b/c.dcm');
    expect(normalizePath('', { allowRoot: true })).toBe('');
    // Paths that are normal already come back unchanged; the rest are rewritten.
    const cases: Array<[string, string]> = [
      ['a/b/c.dcm', 'a/b/c.dcm'],
      ['.hidden/..x/x..', '.hidden/..x/x..'],
      ['a/...', 'a/...'],
      ['a/', 'a'],
      ['./a', 'a'],
      ['a/.', 'a'],
      ['a/./b', 'a/b'],
      ['a//b', 'a/b'],
    ];
    for (const [input, out] of cases) expect(normalizePath(input)).toBe(out);
    for (const bad of ['../x', 'a/../../x', 'a/..', '..', '.', '//x', '/abs', 'C:x', 'a\0b', 'a\\b', '']) {
      expect(() => normalizePath(bad)).toThrow(expect.objectContaining({ code: 'E_INVALID_PATH' }));
    }
  });

  it('normalises every short path exactly as its definition says (the fast path included)', () => {
    // Every string of up to 5 characters over an alphabet of the characters that matter.
    const alphabet = ['a', '.', '/', '\\', '\0', ':', 'C'];
    const expected = (p: string): string | 'E_INVALID_PATH' => {
      if (p.includes('\0') || p.includes('\\') || p.startsWith('/') || /^[a-zA-Z]:/.test(p))
        return 'E_INVALID_PATH';
      const segs = p.split('/');
      if (segs.includes('..')) return 'E_INVALID_PATH';
      const out = segs.filter((x) => x !== '' && x !== '.').join('/');
      return out === '' ? 'E_INVALID_PATH' : out;
    };
    let checked = 0;
    const visit = (p: string) => {
      if (p !== '') {
        let got: string;
        try {
          got = normalizePath(p);
        } catch (e) {
          got = (e as { code: string }).code;
        }
        if (got !== expected(p))
          expect({ input: JSON.stringify(p), got }).toEqual({ input: JSON.stringify(p), got: expected(p) });
        checked++;
      }
      if (p.length < 5) for (const c of alphabet) visit(p + c);
    };
    visit('');
    expect(checked).toBe(19_607);
  });

  it('temporary names stay within 255 bytes for the longest names, cut between characters', async () => {
    const bytes = (n: string) => Buffer.byteLength(n.slice(n.lastIndexOf('/') + 1));
    // 83 CJK characters (249 bytes), 62 emoji (248 bytes, surrogate pairs), 250 ASCII bytes.
    const names = ['患'.repeat(83) + '.dcm', '🩻'.repeat(62) + '.dcm', 'a'.repeat(250) + '.dcm'];
    for (const n of names) {
      expect(bytes(n)).toBeLessThanOrEqual(255);
      const tmp = partialNameFor(`study/${n}`, 'r0123456789abcdef');
      expect(tmp.startsWith('study/.')).toBe(true);
      expect(isPartialName(tmp.slice('study/'.length))).toBe(true);
      expect(bytes(tmp)).toBeLessThanOrEqual(255);
      // No lone surrogate: the name survives a UTF-8 round trip unchanged.
      expect(Buffer.from(tmp, 'utf8').toString('utf8')).toBe(tmp);
    }
    expect(partialNameFor('a/short.dcm', 'u1')).toBe('a/.short.dcm.u1.medsync-part');
    // And such files can be written: the temporary name used to overflow (ENAMETOOLONG).
    const root = mkdtempSync(join(tmpdir(), 'medsync-longname-'));
    try {
      const local = createLocalStorage({ root });
      for (const n of names) await local.write(`s/${n}`, Buffer.from(n));
      expect(readdirSync(join(root, 's')).sort()).toEqual([...names].sort());
      expect(readFileSync(join(root, 's', names[0]!), 'utf8')).toBe(names[0]);
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });
});

describe('RetryPolicy', () => {
  it('retries only retryable errors, with growing delays on the given clock', async () => {
    const clock = new FakeClock();
    const policy = new RetryPolicy({ retries: 3, initialDelayMs: 1000, multiplier: 2, jitter: 0 }, clock);
    const delays: number[] = [];
    let calls = 0;
    const p = policy.run(
      async () => {
        calls++;
        if (calls < 4) throw new MedsyncError('E_TRANSIENT', 'try again');
        return 'ok';
      },
      { onRetry: (e) => delays.push(e.delayMs) },
    );
    await clock.advance(10_000);
    expect(await p).toBe('ok');
    expect(delays).toEqual([1000, 2000, 4000]);
    let permanent = 0;
    await expect(
      policy.run(async () => {
        permanent++;
        throw new MedsyncError('E_AUTH', 'wrong password');
      }),
    ).rejects.toMatchObject({ code: 'E_AUTH' });
    expect(permanent).toBe(1);
  });

  it('numbers attempts and retries the same way from the first failure on, and stops on a cancel', async () => {
    const clock = new FakeClock();
    const policy = new RetryPolicy({ retries: 3, initialDelayMs: 100, multiplier: 2, jitter: 0 }, clock);
    const attempts: number[] = [];
    const events: Array<[number, number]> = [];
    const failing = policy.run(
      async (n) => {
        attempts.push(n);
        throw new MedsyncError('E_TRANSIENT', 'try again');
      },
      { onRetry: (e) => events.push([e.attempt, e.retriesLeft]) },
    );
    const settled = failing.catch((e: unknown) => e);
    await clock.advance(10_000);
    expect(await settled).toMatchObject({ code: 'E_TRANSIENT' });
    expect(attempts).toEqual([1, 2, 3, 4]);
    expect(events).toEqual([
      [1, 3],
      [2, 2],
      [3, 1],
    ]);
    expect(() => new RetryPolicy({ retries: 1.5 })).toThrow(expect.objectContaining({ code: 'E_CONFIG' }));
    // No retries: one attempt, no event.
    const once = new RetryPolicy({ retries: 0 }, clock);
    let calls = 0;
    await expect(
      once.run(async () => {
        calls++;
        throw new MedsyncError('E_TRANSIENT', 'x');
      }),
    ).rejects.toMatchObject({ code: 'E_TRANSIENT' });
    expect(calls).toBe(1);
    // Cancelled before it starts: not called. Cancelled during a wait: E_ABORTED, no more attempts.
    const ac = new AbortController();
    ac.abort();
    await expect(policy.run(async () => ++calls, { signal: ac.signal })).rejects.toMatchObject({
      code: 'E_ABORTED',
    });
    expect(calls).toBe(1);
    const ac2 = new AbortController();
    const waiting = policy
      .run(
        async () => {
          calls++;
          throw new MedsyncError('E_TRANSIENT', 'x');
        },
        { signal: ac2.signal, onRetry: () => ac2.abort() },
      )
      .catch((e: unknown) => e);
    await clock.advance(10_000);
    expect(await waiting).toMatchObject({ code: 'E_ABORTED' });
    expect(calls).toBe(2);
  });

  it('honours retryAfterMs and gives up after the last retry with the last error', async () => {
    const clock = new FakeClock();
    const policy = new RetryPolicy({ retries: 1, initialDelayMs: 10, jitter: 0 }, clock);
    const delays: number[] = [];
    const p = policy.run(
      async () => {
        throw new MedsyncError('E_RATE_LIMITED', 'slow down', { retryAfterMs: 30_000 });
      },
      { onRetry: (e) => delays.push(e.delayMs) },
    );
    const settled = p.catch((e: unknown) => e);
    await clock.advance(30_000);
    expect(await settled).toMatchObject({ code: 'E_RATE_LIMITED' });
    expect(delays).toEqual([30_000]);
  });
});

describe('rates and the token bucket', () => {
  it('parses rates', () => {
    expect(parseRate('10M')).toBe(10 * 1024 * 1024);
    expect(parseRate('512K')).toBe(512 * 1024);
    expect(parseRate('1.5G')).toBe(Math.floor(1.5 * 1024 ** 3));
    expect(parseRate('off')).toBeUndefined();
    expect(() => parseRate('fast')).toThrow(expect.objectContaining({ code: 'E_CONFIG' }));
  });

  it('holds transfers to the rate', async () => {
    const clock = new FakeClock();
    const bucket = new TokenBucket(100 * 1024, clock); // 100 KiB/s, burst 64 KiB
    await bucket.take(64 * 1024);
    let done = false;
    const p = bucket.take(64 * 1024).then(() => (done = true));
    await clock.advance(500);
    expect(done).toBe(false);
    await clock.advance(200);
    await p;
    expect(done).toBe(true);
  });
});

describe('config schema', () => {
  it('applies defaults and reports every problem by path', () => {
    const c = parseConfig({ jobs: [{ id: 'pacs', source: '/data/pacs', destinations: ['/mnt/backup'] }] });
    expect(c.jobs[0]).toMatchObject({
      mode: 'copy',
      schedule: { intervalMinutes: 120 },
      enabled: true,
      concurrency: 4,
      retries: 3,
    });
    expect(c.state).toBe('medsync.db');
    try {
      parseConfig({
        jobs: [{ id: 'bad id!', source: '', destinations: [], schedule: { intervalMinutes: 0 }, extra: 1 }],
      });
      expect.unreachable();
    } catch (e) {
      expect(e).toMatchObject({ code: 'E_CONFIG' });
      const m = (e as Error).message;
      expect(m).toMatch(/jobs\[0\]\.id/);
      expect(m).toMatch(/destinations/);
    }
    expect(() =>
      parseConfig({
        jobs: [{ id: 'a', source: 's', destinations: [{ url: 'ftp://h/x', password: 'plaintext' }] }],
      }),
    ).toThrow(expect.objectContaining({ message: expect.stringMatching(/encrypted/) }));
    // A misspelt endpoint key and an unknown time zone are errors, not silently dropped.
    const job = { id: 'a', source: 's' };
    expect(() =>
      parseConfig({
        jobs: [{ ...job, destinations: [{ url: 'sftp://u@h/x', hostfingerprint: 'SHA256:x' }] }],
      }),
    ).toThrow(
      expect.objectContaining({ code: 'E_CONFIG', message: expect.stringMatching(/hostfingerprint/) }),
    );
    expect(() =>
      parseConfig({
        jobs: [{ ...job, destinations: ['d'], schedule: { cron: '0 2 * * *', timezone: 'Europe/Atlantis' } }],
      }),
    ).toThrow(expect.objectContaining({ code: 'E_CONFIG', message: expect.stringMatching(/time zone/) }));
    expect(
      parseConfig({
        jobs: [{ ...job, destinations: ['d'], schedule: { cron: '0 2 * * *', timezone: 'Europe/Berlin' } }],
      }).jobs[0]!.schedule,
    ).toEqual({ cron: '0 2 * * *', timezone: 'Europe/Berlin' });
  });
});
