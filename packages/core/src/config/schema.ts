import { z } from 'zod';
import { MedsyncError } from '../errors/errors.js';
import { parseRate } from '../util/streams.js';

const Rate = z.union([z.number().positive(), z.string()]).refine((v) => {
  try {
    parseRate(v);
    return true;
  } catch {
    return false;
  }
}, 'a rate like 10M, 512K or 1G (bytes per second)');

/** A source or destination: a path or URL, with optional credentials by reference or encrypted. */
export const EndpointSchema = z.union([
  z.string().min(1),
  z
    .object({
      url: z.string().min(1),
      /** Name of an environment variable holding the password. */
      passwordEnv: z.string().optional(),
      /** The password encrypted with `medsync secret encrypt` (msenc:v1:…). */
      password: z
        .string()
        .regex(/^msenc:v1:/, 'must be encrypted: use `medsync secret encrypt`, or passwordEnv')
        .optional()
        .meta({ sensitive: true }),
      options: z.record(z.string(), z.unknown()).optional(),
      /** FTPS: PEM file of the CA or self-signed certificate to trust (relative to the config file). */
      caFile: z.string().min(1).optional(),
      /** SFTP: private key file to log in with (relative to the config file). */
      identityFile: z.string().min(1).optional(),
      /** SFTP: name of an environment variable holding the passphrase of `identityFile`. */
      passphraseEnv: z.string().min(1).optional(),
      /** SFTP: the server's host key fingerprint, `SHA256:…` as `ssh-keygen -lf` prints it. */
      hostFingerprint: z.string().min(1).optional(),
      /** SFTP: known_hosts file to check the host key with (default: ~/.ssh/known_hosts). */
      knownHostsFile: z.string().min(1).optional(),
    })
    // A misspelt key (`hostfingerprint`) would otherwise be dropped without a word.
    .strict(),
]);

/** True for a time zone this runtime knows (IANA names such as Europe/Berlin, and UTC). */
function isTimeZone(tz: string): boolean {
  try {
    new Intl.DateTimeFormat('en-US', { timeZone: tz });
    return true;
  } catch {
    return false;
  }
}

const ScheduleSchema = z.union([
  z.object({ intervalMinutes: z.number().int().min(1).max(1440) }).strict(),
  z
    .object({
      cron: z.string().min(1),
      timezone: z
        .string()
        .refine(isTimeZone, 'an IANA time zone such as "Europe/Berlin" or "UTC"')
        .optional(),
    })
    .strict(),
]);

/** One sync job in a config file. */
export const SyncJobConfigSchema = z
  .object({
    id: z.string().regex(/^[A-Za-z0-9._-]{1,100}$/, 'letters, digits, dot, dash and underscore, at most 100'),
    source: EndpointSchema,
    destinations: z.array(EndpointSchema).min(1),
    mode: z.enum(['copy', 'mirror']).default('copy'),
    schedule: ScheduleSchema.default({ intervalMinutes: 120 }),
    enabled: z.boolean().default(true),
    include: z.array(z.string()).default([]),
    exclude: z.array(z.string()).default([]),
    concurrency: z.number().int().min(1).max(256).default(4),
    maxDelete: z.number().int().min(0).optional(),
    bwlimit: Rate.optional(),
    retries: z.number().int().min(0).max(20).default(3),
    /** Share of delivered files read back and compared with the SHA-256 sent (0 to 1). */
    readBack: z.number().min(0).max(1).optional(),
    /** fsync each delivered file before renaming it into place (local destinations). */
    fsync: z.boolean().default(true),
  })
  .strict();

/** The file `medsync run --config` reads. */
export const MedsyncConfigSchema = z
  .object({
    /** The Store: a SQLite file path (relative to the config file). */
    state: z.string().min(1).default('medsync.db'),
    jobs: z.array(SyncJobConfigSchema).min(1),
  })
  .strict()
  .superRefine((c, ctx) => {
    const seen = new Set<string>();
    for (const [i, j] of c.jobs.entries()) {
      if (seen.has(j.id))
        ctx.addIssue({ code: 'custom', path: ['jobs', i, 'id'], message: `duplicate job id ${j.id}` });
      seen.add(j.id);
    }
  });

export type MedsyncConfig = z.output<typeof MedsyncConfigSchema>;
export type MedsyncConfigInput = z.input<typeof MedsyncConfigSchema>;
export type SyncJobConfig = z.output<typeof SyncJobConfigSchema>;
export type Endpoint = z.output<typeof EndpointSchema>;

/** Validates a config object; throws E_CONFIG listing every problem by path. */
export function parseConfig(input: unknown): MedsyncConfig {
  const r = MedsyncConfigSchema.safeParse(input);
  if (!r.success)
    throw new MedsyncError('E_CONFIG', `The configuration is invalid:\n${z.prettifyError(r.error)}`);
  return r.data;
}
