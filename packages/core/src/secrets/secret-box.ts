import { createCipheriv, createDecipheriv, createHash, randomBytes } from 'node:crypto';
import { MedsyncError } from '../errors/errors.js';
import type { SettingsStore } from '../store/types.js';
import { registerSecret } from './redact.js';

const PREFIX = 'msenc:v1:';

/** A 32-byte key and its id (first 8 hex of its SHA-256). */
export interface SecretKey {
  id: string;
  key: Buffer;
}

/** Supplies keys: the first is the primary (used to encrypt); the others can still decrypt. */
export type KeyProvider = () => Buffer[] | Promise<Buffer[]>;

export interface SecretBoxOptions {
  /** Keys as 32-byte Buffers, 64 hex characters or 44 base64 characters; first is primary. */
  keys?: ReadonlyArray<Buffer | string>;
  /** Or a function returning the keys (a KMS, a vault). */
  provider?: KeyProvider;
}

/** Parses a key given as 64 hex characters, base64 of 32 bytes, or a 32-byte Buffer. */
export function parseKey(input: Buffer | string): Buffer {
  if (Buffer.isBuffer(input)) {
    if (input.length !== 32) throw new MedsyncError('E_CONFIG', 'A secret key must be 32 bytes.');
    return input;
  }
  const s = input.trim();
  if (/^[0-9a-fA-F]{64}$/.test(s)) return Buffer.from(s, 'hex');
  const b = Buffer.from(s, 'base64');
  if (b.length === 32 && /^[A-Za-z0-9+/_-]+={0,2}$/.test(s)) return b;
  throw new MedsyncError(
    'E_CONFIG',
    'A secret key must be 32 random bytes, as 64 hex characters or base64 (make one with: openssl rand -base64 32).',
  );
}

function keyId(key: Buffer): string {
  return createHash('sha256').update(key).digest('hex').slice(0, 8);
}

/**
 * Encrypts secrets at rest with AES-256-GCM. Values look like `msenc:v1:<keyId>:<iv>:<tag>:<data>`
 * (base64url), so a rotated key can still read older values. Decrypted values are registered for
 * redaction, so they never reach a log, event or error message.
 */
export class SecretBox {
  private keys: SecretKey[] | null = null;

  constructor(private readonly opts: SecretBoxOptions) {
    if (!opts.keys?.length && !opts.provider) {
      throw new MedsyncError('E_CONFIG', 'A SecretBox needs keys or a key provider.');
    }
    if (opts.keys) this.keys = opts.keys.map((k) => parseKey(k)).map((key) => ({ id: keyId(key), key }));
  }

  /** From `MEDSYNC_SECRET_KEY` (primary) and `MEDSYNC_SECRET_KEY_PREVIOUS` (comma-separated, older keys). */
  static fromEnv(env: NodeJS.ProcessEnv = process.env): SecretBox {
    const primary = env.MEDSYNC_SECRET_KEY;
    if (!primary) {
      throw new MedsyncError(
        'E_SECRET',
        'MEDSYNC_SECRET_KEY is not set: set it to 32 random bytes (openssl rand -base64 32) to read or store encrypted settings.',
      );
    }
    const previous = (env.MEDSYNC_SECRET_KEY_PREVIOUS ?? '').split(',').filter((s) => s.trim() !== '');
    return new SecretBox({ keys: [primary, ...previous] });
  }

  private async loaded(): Promise<SecretKey[]> {
    if (!this.keys) {
      const ks = await this.opts.provider!();
      if (!ks.length) throw new MedsyncError('E_SECRET', 'The key provider returned no key.');
      this.keys = ks.map((k) => parseKey(k)).map((key) => ({ id: keyId(key), key }));
    }
    return this.keys;
  }

  /** True for a string produced by {@link encrypt}. */
  static isEncrypted(value: unknown): value is string {
    return typeof value === 'string' && value.startsWith(PREFIX);
  }

  /** Encrypts under the primary key. `context` (e.g. the setting's key) is bound as associated data. */
  async encrypt(plaintext: string, context = ''): Promise<string> {
    const [primary] = await this.loaded();
    registerSecret(plaintext);
    const iv = randomBytes(12);
    const c = createCipheriv('aes-256-gcm', primary!.key, iv);
    c.setAAD(Buffer.from(context));
    const data = Buffer.concat([c.update(plaintext, 'utf8'), c.final()]);
    const tag = c.getAuthTag();
    return `${PREFIX}${primary!.id}:${iv.toString('base64url')}:${tag.toString('base64url')}:${data.toString('base64url')}`;
  }

  /** Decrypts with whichever known key made it. Rejects with E_SECRET on a wrong key or tampering. */
  async decrypt(value: string, context = ''): Promise<string> {
    if (!SecretBox.isEncrypted(value))
      throw new MedsyncError('E_SECRET', 'The value is not an encrypted medsync secret.');
    const parts = value.slice(PREFIX.length).split(':');
    if (parts.length !== 4) throw new MedsyncError('E_SECRET', 'The encrypted secret is malformed.');
    const [kid, iv, tag, data] = parts as [string, string, string, string];
    const keys = await this.loaded();
    const k = keys.find((x) => x.id === kid);
    if (!k) {
      throw new MedsyncError(
        'E_SECRET',
        `The secret was encrypted with key ${kid}, which is not configured: add it to MEDSYNC_SECRET_KEY_PREVIOUS.`,
      );
    }
    try {
      const d = createDecipheriv('aes-256-gcm', k.key, Buffer.from(iv, 'base64url'));
      d.setAAD(Buffer.from(context));
      d.setAuthTag(Buffer.from(tag, 'base64url'));
      const out = Buffer.concat([d.update(Buffer.from(data, 'base64url')), d.final()]).toString('utf8');
      registerSecret(out);
      return out;
    } catch (e) {
      throw new MedsyncError(
        'E_SECRET',
        'The encrypted secret could not be decrypted: it was altered or belongs to another setting.',
        { cause: e },
      );
    }
  }

  /** The primary key's id. */
  async primaryKeyId(): Promise<string> {
    return (await this.loaded())[0]!.id;
  }

  /**
   * Re-encrypts every encrypted value in `settings` (at any depth of its JSON) under the primary
   * key. Returns how many values were re-encrypted. Run it after adding a new primary key.
   */
  async rotate(settings: SettingsStore): Promise<number> {
    const primary = await this.primaryKeyId();
    let count = 0;
    for (const { key, value } of await settings.list()) {
      let changed = false;
      const walk = async (v: unknown, path: string): Promise<unknown> => {
        if (SecretBox.isEncrypted(v)) {
          if (v.slice(PREFIX.length).startsWith(primary + ':')) return v;
          changed = true;
          count++;
          return this.encrypt(await this.decrypt(v, path), path);
        }
        if (Array.isArray(v)) return Promise.all(v.map((x, i) => walk(x, `${path}[${i}]`)));
        if (v && typeof v === 'object') {
          const out: Record<string, unknown> = {};
          for (const [k, x] of Object.entries(v)) out[k] = await walk(x, `${path}.${k}`);
          return out;
        }
        return v;
      };
      const next = await walk(value, key);
      if (changed) await settings.set(key, next);
    }
    return count;
  }

  /** Stores a secret setting, encrypted, bound to its key. */
  async setSecret(settings: SettingsStore, key: string, plaintext: string): Promise<void> {
    await settings.set(key, await this.encrypt(plaintext, key));
  }

  /** Reads a secret setting stored by {@link setSecret}; undefined when absent. */
  async getSecret(settings: SettingsStore, key: string): Promise<string | undefined> {
    const v = await settings.get<string>(key);
    if (v === undefined) return undefined;
    return this.decrypt(v, key);
  }
}
