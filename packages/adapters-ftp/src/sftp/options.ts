import { MedsyncError, registerSecret } from '@medsync/core';
import { z } from 'zod';
import { CONTROL, rootSchema } from '../shared/options.js';
import { ssh2 } from './ssh2.js';

/** `SHA256:` and unpadded base64 of 32 bytes, as `ssh-keygen -lf` and `ssh` print it. */
const FINGERPRINT = /^SHA256:[A-Za-z0-9+/]{43}=?$/;

const fingerprintSchema = z
  .string()
  .trim()
  .refine(
    (f) => FINGERPRINT.test(f),
    'must be a SHA-256 fingerprint as OpenSSH prints it: "SHA256:" and 43 base64 characters (ssh-keygen -lf key.pub)',
  )
  .transform((f) => f.replace(/=$/, ''));

/** The options of {@link createSftpStorage}, validated with zod at the boundary. */
export const SftpStorageOptionsSchema = z
  .object({
    host: z
      .string()
      .trim()
      .min(1, 'is required')
      .refine((h) => !/[\s/@]/.test(h), 'must be a host name or IP address'),
    port: z.number().int().min(1).max(65535).default(22),
    user: z
      .string()
      .min(1, 'is required')
      .refine((u) => !CONTROL.test(u), 'may not contain NUL, CR or LF'),
    /** Password login. With `privateKey` too, the key is tried first. */
    password: z.string().min(1).optional().meta({ sensitive: true }),
    /** Private key (the contents of an OpenSSH or PEM key file, not its path). */
    privateKey: z.string().min(1).optional().meta({ sensitive: true }),
    /** Passphrase of an encrypted `privateKey`. */
    passphrase: z.string().min(1).optional().meta({ sensitive: true }),
    /** Absolute folder on the server that paths are relative to. */
    root: rootSchema.default('/'),
    /**
     * The server's host key fingerprint(s), `SHA256:…` as `ssh-keygen -lf` prints it. Several are
     * allowed (a key rotation, or one per key type).
     */
    hostFingerprint: z.union([fingerprintSchema, z.array(fingerprintSchema).min(1)]).optional(),
    /** Contents of a known_hosts file (plain, `[host]:port` and hashed `|1|` entries). */
    knownHosts: z.string().optional(),
    /**
     * Accept any host key (no protection against a man in the middle). Only for a lab; the
     * connection report says so in `details.hostKey.verified`.
     */
    insecureSkipHostKeyCheck: z.boolean().default(false),
    /** SSH connections in the pool (one SFTP session each). */
    maxConnections: z.number().int().min(1).max(64).default(4),
    /** Connect and login timeout, and the longest one SFTP request may take. */
    timeoutMs: z.number().int().min(1000).max(3_600_000).default(30_000),
    /** SSH keepalive interval; a connection is dropped after 3 unanswered. 0 turns it off. */
    keepaliveMs: z.number().int().min(0).max(3_600_000).default(15_000),
    /** fsync each file on the server before renaming it into place (where the server offers it). */
    fsync: z.boolean().default(true),
    /**
     * Check each upload against the server's own SHA-256 of the temporary file before the rename:
     * `sha256sum` run by one shell loop per connection (SFTP v3 servers compute no digests).
     * Accounts without a shell (sftp-only, chroot) are found at the first upload and checked by
     * size.
     */
    serverDigest: z.boolean().default(true),
  })
  .strict();

/** What callers pass to {@link createSftpStorage}. */
export type SftpStorageOptions = z.input<typeof SftpStorageOptionsSchema>;
/** The options after validation and defaults (`hostFingerprint` always a list). */
export type ResolvedSftpStorageOptions = Omit<
  z.output<typeof SftpStorageOptionsSchema>,
  'hostFingerprint'
> & {
  hostFingerprint: string[];
};

const fail = (msg: string) =>
  new MedsyncError('E_CONFIG', `Invalid SFTP options: ${msg}`, { adapter: 'sftp', retryable: false });

/**
 * Validates SFTP options. Registers the password, key and passphrase for redaction first, so no
 * message can carry them; checks that the private key can be read (with its passphrase) and that
 * the host key is verified somehow. Throws E_CONFIG naming the bad field.
 */
export function parseSftpOptions(input: unknown): ResolvedSftpStorageOptions {
  const raw = (input ?? {}) as { password?: unknown; privateKey?: unknown; passphrase?: unknown };
  for (const v of [raw.password, raw.passphrase, raw.privateKey]) {
    if (typeof v === 'string') registerSecret(v);
  }
  const r = SftpStorageOptionsSchema.safeParse(input);
  if (!r.success) {
    throw new MedsyncError('E_CONFIG', `Invalid SFTP options:\n${z.prettifyError(r.error)}`, {
      adapter: 'sftp',
    });
  }
  const o = r.data;
  if (o.password === undefined && o.privateKey === undefined) {
    throw fail('set `password` or `privateKey` (or both).');
  }
  if (o.passphrase !== undefined && o.privateKey === undefined) {
    throw fail('`passphrase` is set but `privateKey` is not.');
  }
  if (o.privateKey !== undefined) {
    const parsed = ssh2().utils.parseKey(o.privateKey, o.passphrase);
    const err = parsed instanceof Error ? parsed : undefined;
    if (err) {
      const text = err.message;
      if (/passphrase/i.test(text) && o.passphrase === undefined) {
        throw fail('`privateKey` is encrypted: pass its `passphrase`.');
      }
      if (/decrypt|passphrase|bad key|integrity/i.test(text)) {
        throw fail('`privateKey` could not be decrypted: check `passphrase`.');
      }
      throw fail(
        '`privateKey` is not a private key ssh2 can read: pass the contents of an OpenSSH or PEM private key file (not its path, not the .pub file).',
      );
    }
    const key = Array.isArray(parsed) ? parsed[0] : parsed;
    if (!key || key.getPrivatePEM() === null) {
      throw fail('`privateKey` holds a public key only: pass the private key file (without .pub).');
    }
  }
  const fingerprints =
    o.hostFingerprint === undefined
      ? []
      : Array.isArray(o.hostFingerprint)
        ? o.hostFingerprint
        : [o.hostFingerprint];
  const verifies = fingerprints.length > 0 || o.knownHosts !== undefined;
  if (!verifies && !o.insecureSkipHostKeyCheck) {
    throw fail(
      "the server's host key must be verified: set `hostFingerprint` (SHA256:… from `ssh-keygen -lf` on the server's host key) or `knownHosts` (the contents of a known_hosts file). `insecureSkipHostKeyCheck: true` turns the check off (a lab only).",
    );
  }
  if (verifies && o.insecureSkipHostKeyCheck) {
    throw fail(
      '`insecureSkipHostKeyCheck` is set together with `hostFingerprint` or `knownHosts`: remove one.',
    );
  }
  return { ...o, hostFingerprint: fingerprints };
}
