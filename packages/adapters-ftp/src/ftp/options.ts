import { MedsyncError, registerSecret } from '@medsync/core';
import { z } from 'zod';
import { CONTROL, rootSchema } from '../shared/options.js';

/** The options of {@link createFtpStorage}, validated with zod at the boundary. */
export const FtpStorageOptionsSchema = z
  .object({
    host: z
      .string()
      .trim()
      .min(1, 'is required')
      .refine((h) => !/[\s/@]/.test(h), 'must be a host name or IP address'),
    port: z.number().int().min(1).max(65535).default(21),
    user: z
      .string()
      .min(1, 'is required (use "anonymous" for anonymous FTP)')
      .refine((u) => !CONTROL.test(u), 'may not contain NUL, CR or LF'),
    password: z
      .string()
      .refine((p) => !CONTROL.test(p), 'may not contain NUL, CR or LF')
      .meta({ sensitive: true }),
    root: rootSchema.default('/'),
    secure: z.union([z.literal(false), z.literal('explicit')]).default(false),
    tls: z
      .object({
        ca: z.string().min(1).optional(),
        rejectUnauthorized: z.boolean().default(true),
      })
      .strict()
      .prefault({}),
    maxConnections: z.number().int().min(1).max(64).default(4),
    timeoutMs: z.number().int().min(1000).max(3_600_000).default(30_000),
    /**
     * Ask the server for a digest of each uploaded file (HASH, XSHA256 or XMD5, where FEAT offers
     * one) and compare it with the one computed while sending, before the rename into place.
     */
    serverDigest: z.boolean().default(true),
    /**
     * Resume a large upload (8 MiB or more) whose connection dropped: the partial temporary file
     * is kept and the retry appends the rest (APPE) instead of sending it all again.
     */
    resume: z.boolean().default(true),
    /**
     * Upload to a hidden temporary name and rename it into place (default). `false` writes straight
     * to the final name, for servers that refuse RNFR/RNTO: a reader may then see a file while it
     * is written, and a failed upload removes the file under that name (old version included).
     */
    atomicUpload: z.boolean().default(true),
  })
  .strict();

/** What callers pass to {@link createFtpStorage}. */
export type FtpStorageOptions = z.input<typeof FtpStorageOptionsSchema>;
/** The options after validation and defaults. */
export type ResolvedFtpStorageOptions = z.output<typeof FtpStorageOptionsSchema>;

/**
 * Validates FTP options. Registers the password for redaction first, so no message can carry it.
 * Throws E_CONFIG naming the bad field.
 */
export function parseFtpOptions(input: unknown): ResolvedFtpStorageOptions {
  const raw = input as {
    password?: unknown;
    secure?: unknown;
    tls?: { ca?: unknown; rejectUnauthorized?: unknown };
  };
  if (raw && typeof raw.password === 'string') registerSecret(raw.password);
  const r = FtpStorageOptionsSchema.safeParse(input);
  if (!r.success) {
    throw new MedsyncError('E_CONFIG', `Invalid FTP options:\n${z.prettifyError(r.error)}`, {
      adapter: 'ftp',
    });
  }
  if (
    r.data.secure === false &&
    raw.tls !== undefined &&
    (raw.tls.ca !== undefined || raw.tls.rejectUnauthorized !== undefined)
  ) {
    throw new MedsyncError(
      'E_CONFIG',
      'Invalid FTP options: `tls` is set but `secure` is false, so nothing would be encrypted. Set `secure: "explicit"` for FTPS, or remove `tls`.',
      { adapter: 'ftp' },
    );
  }
  return r.data;
}
