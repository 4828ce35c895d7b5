import { readFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { LocalStorage, MedsyncError, SecretBox, type Storage } from '@medsync/core';
import type { Endpoint } from '@medsync/core/config';

/** Options that come with an endpoint from the command line or a config file. */
export interface EndpointOptions {
  /** Environment variable holding the password. */
  passwordEnv?: string | undefined;
  /** Encrypted password from a config file (msenc:v1:…). */
  password?: string | undefined;
  /** Base folder for relative paths (the config file's folder). */
  baseDir?: string | undefined;
  /** PEM file of the CA (or self-signed certificate) an FTPS server is trusted with. */
  caFile?: string | undefined;
  /** fsync each file before renaming it into place (local and SFTP destinations). Default true. */
  fsync?: boolean | undefined;
  /**
   * The job's parallel transfers: network destinations open this many connections (at most 64),
   * unless the config endpoint's `options.maxConnections` sets a per-destination limit.
   */
  connections?: number | undefined;
  /** SFTP: private key file (OpenSSH or PEM) to log in with. */
  identityFile?: string | undefined;
  /** SFTP: environment variable holding the passphrase of `identityFile`. */
  passphraseEnv?: string | undefined;
  /** SFTP: the server's host key fingerprint (`SHA256:…`). */
  hostFingerprint?: string | undefined;
  /** SFTP: known_hosts file to check the host key against (default: ~/.ssh/known_hosts). */
  knownHostsFile?: string | undefined;
  /** FTP/SFTP: `false` turns off the server digest check of uploads (`--no-server-digest`). */
  serverDigest?: boolean | undefined;
  env?: NodeJS.ProcessEnv;
}

const PLANNED: Record<string, string> = {
  'smb:': '@medsync/adapters-smb',
  'azure:': '@medsync/adapters-cloud',
  'dropbox:': '@medsync/adapters-cloud',
  'gdrive:': '@medsync/adapters-cloud',
};

/** The SFTP fields of a config-file endpoint (identityFile, passphraseEnv, hostFingerprint, knownHostsFile). */
function sftpFields(
  spec: Exclude<Endpoint, string>,
): Pick<EndpointOptions, 'identityFile' | 'passphraseEnv' | 'hostFingerprint' | 'knownHostsFile'> {
  const f = spec as Record<string, unknown>;
  const str = (k: string) => (typeof f[k] === 'string' ? (f[k] as string) : undefined);
  return {
    identityFile: str('identityFile'),
    passphraseEnv: str('passphraseEnv'),
    hostFingerprint: str('hostFingerprint'),
    knownHostsFile: str('knownHostsFile'),
  };
}

/** True when a string looks like a URL (scheme://…) rather than a path. */
function isUrl(s: string): boolean {
  return /^[a-z][a-z0-9+.-]*:\/\//i.test(s) || /^file:/i.test(s);
}

/**
 * Turns a path or URL into a Storage. Paths and `file:` URLs are local folders. Passwords are
 * never accepted inside a URL (they would land in shell history and process lists).
 */
export async function openEndpoint(spec: Endpoint, opts: EndpointOptions = {}): Promise<Storage> {
  const url = typeof spec === 'string' ? spec : spec.url;
  const o: EndpointOptions =
    typeof spec === 'string'
      ? opts
      : {
          ...opts,
          passwordEnv: spec.passwordEnv ?? opts.passwordEnv,
          caFile: spec.caFile ?? opts.caFile,
          password: spec.password ?? opts.password,
          identityFile: sftpFields(spec).identityFile ?? opts.identityFile,
          passphraseEnv: sftpFields(spec).passphraseEnv ?? opts.passphraseEnv,
          hostFingerprint: sftpFields(spec).hostFingerprint ?? opts.hostFingerprint,
          knownHostsFile: sftpFields(spec).knownHostsFile ?? opts.knownHostsFile,
        };
  const local = (root: string) => new LocalStorage({ root, fsync: o.fsync ?? true });
  // Adapter options from a config file's endpoint object, checked by the adapter (E_CONFIG naming
  // the field); the URL and the credentials come from their own fields.
  const extra = typeof spec === 'string' ? {} : (spec.options ?? {});
  for (const secret of ['password', 'privateKey', 'passphrase']) {
    if (secret in extra) {
      throw new MedsyncError(
        'E_CONFIG',
        `A destination's "options" may not hold "${secret}": config files keep secrets encrypted ("password": "msenc:v1:…") or in the environment ("passwordEnv", "passphraseEnv"), and keys in files ("identityFile").`,
      );
    }
  }
  const limit = typeof extra.maxConnections === 'number' ? extra.maxConnections : 64;
  const common = {
    maxConnections: Math.min(limit, Math.max(1, o.connections ?? 4)),
    ...(o.serverDigest === false ? { serverDigest: false } : {}),
  };
  if (!isUrl(url)) return local(resolve(opts.baseDir ?? process.cwd(), url));
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw new MedsyncError('E_CONFIG', 'The URL could not be parsed.');
  }
  if (u.password) {
    throw new MedsyncError(
      'E_CONFIG',
      'Passwords are not accepted in URLs (they end up in shell history and logs): use --password-env VAR or an encrypted password in the config file.',
    );
  }
  if (u.protocol === 'file:') return local(fileURLToPath(u));
  if (u.protocol === 'ftp:' || u.protocol === 'ftps:') {
    const user = decodeURIComponent(u.username) || 'anonymous';
    const password = (await resolvePassword(o)) ?? (user === 'anonymous' ? 'anonymous@' : undefined);
    if (password === undefined) {
      throw new MedsyncError('E_CONFIG', 'This FTP destination needs a password: pass --password-env VAR.');
    }
    if (u.protocol === 'ftp:' && typeof spec !== 'string' && spec.caFile) {
      throw new MedsyncError(
        'E_CONFIG',
        'A destination with "caFile" is plain ftp://, which sends the password unencrypted: use ftps:// (or drop caFile).',
      );
    }
    const { createFtpStorage } = await import('@medsync/adapters-ftp');
    let ca: string | undefined;
    if (o.caFile) {
      try {
        ca = readFileSync(resolve(opts.baseDir ?? process.cwd(), o.caFile), 'utf8');
      } catch {
        throw new MedsyncError('E_CONFIG', 'The CA file (--ca, or caFile in the config) could not be read.');
      }
    }
    return createFtpStorage({
      ...extra,
      ...common,
      host: u.hostname,
      ...(u.port ? { port: Number(u.port) } : {}),
      user,
      password,
      root: decodeURIComponent(u.pathname) || '/',
      ...(u.protocol === 'ftps:'
        ? {
            secure: 'explicit' as const,
            tls: { ...(typeof extra.tls === 'object' ? extra.tls : {}), ...(ca ? { ca } : {}) },
          }
        : {}),
    });
  }
  if (u.protocol === 'sftp:') return openSftp(u, o, { ...extra, ...common });
  const pkg = PLANNED[u.protocol];
  if (pkg) {
    // Resolve the secret now so a missing variable or key is reported before any work starts.
    await resolvePassword(o);
    throw new MedsyncError(
      'E_UNSUPPORTED',
      `${u.protocol.slice(0, -1)}:// destinations come with ${pkg}, which is not available in this release yet.`,
    );
  }
  throw new MedsyncError(
    'E_CONFIG',
    `Unknown URL scheme ${u.protocol}: use a path, file:, ftp:, ftps:, sftp:, smb:, azure:, dropbox: or gdrive:.`,
  );
}

/** Reads a file the user named; a failure names the flag, never the path (it may be private). */
function readUserFile(o: EndpointOptions, file: string, flag: string): string {
  try {
    return readFileSync(resolve(o.baseDir ?? process.cwd(), file), 'utf8');
  } catch {
    throw new MedsyncError('E_CONFIG', `The ${flag} file could not be read.`);
  }
}

/**
 * `sftp://user@host:port/path`: the path is absolute on the server (`sftp://u@h/srv/pacs` is
 * /srv/pacs). Login with --identity FILE (passphrase from --passphrase-env VAR) and/or a password
 * from --password-env VAR. The host key is checked against --host-fingerprint, --known-hosts FILE,
 * or else ~/.ssh/known_hosts, as OpenSSH does: a host it does not list is refused, and the
 * message shows the fingerprint to pin.
 */
async function openSftp(u: URL, o: EndpointOptions, extra: Record<string, unknown>): Promise<Storage> {
  const user = decodeURIComponent(u.username);
  if (!user) {
    throw new MedsyncError('E_CONFIG', 'An sftp:// URL needs a user name: sftp://user@host/path.');
  }
  const password = await resolvePassword(o);
  const privateKey = o.identityFile ? readUserFile(o, o.identityFile, '--identity') : undefined;
  let passphrase: string | undefined;
  if (o.passphraseEnv) {
    passphrase = (o.env ?? process.env)[o.passphraseEnv];
    if (!passphrase) {
      throw new MedsyncError(
        'E_CONFIG',
        `The environment variable ${o.passphraseEnv} (named by --passphrase-env) is not set.`,
      );
    }
  }
  if (password === undefined && privateKey === undefined) {
    throw new MedsyncError(
      'E_CONFIG',
      'This SFTP destination needs a login: pass --identity FILE (a private key) or --password-env VAR.',
    );
  }
  let knownHosts: string | undefined;
  if (o.knownHostsFile) knownHosts = readUserFile(o, o.knownHostsFile, '--known-hosts');
  else if (!o.hostFingerprint && extra.insecureSkipHostKeyCheck !== true) {
    const env = o.env ?? process.env;
    try {
      knownHosts = readFileSync(join(env.HOME || homedir(), '.ssh', 'known_hosts'), 'utf8');
    } catch {
      // No known_hosts: every host is unknown, and the refusal shows the fingerprint to pin.
      knownHosts = '';
    }
  }
  const { createSftpStorage } = await import('@medsync/adapters-ftp');
  return createSftpStorage({
    ...extra,
    host: u.hostname.replace(/^\[(.*)\]$/, '$1'),
    ...(u.port ? { port: Number(u.port) } : {}),
    user,
    ...(password !== undefined ? { password } : {}),
    ...(privateKey !== undefined ? { privateKey } : {}),
    ...(passphrase !== undefined ? { passphrase } : {}),
    ...(o.hostFingerprint ? { hostFingerprint: o.hostFingerprint } : {}),
    ...(knownHosts !== undefined ? { knownHosts } : {}),
    root: decodeURIComponent(u.pathname) || '/',
    fsync: o.fsync ?? true,
  });
}

/** Reads the password from the named environment variable or decrypts the config's value. */
export async function resolvePassword(o: EndpointOptions): Promise<string | undefined> {
  const env = o.env ?? process.env;
  if (o.passwordEnv) {
    const v = env[o.passwordEnv];
    if (v === undefined || v === '') {
      throw new MedsyncError(
        'E_CONFIG',
        `The environment variable ${o.passwordEnv} (named by --password-env) is not set.`,
      );
    }
    return v;
  }
  if (o.password) return SecretBox.fromEnv(env).decrypt(o.password, 'password');
  return undefined;
}
