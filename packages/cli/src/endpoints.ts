import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
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
  /** fsync each file before renaming it into place (local destinations). Default true. */
  fsync?: boolean | undefined;
  env?: NodeJS.ProcessEnv;
}

const PLANNED: Record<string, string> = {
  'sftp:': '@medsync/adapters-ftp',
  'smb:': '@medsync/adapters-smb',
  'azure:': '@medsync/adapters-cloud',
  'dropbox:': '@medsync/adapters-cloud',
  'gdrive:': '@medsync/adapters-cloud',
};

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
          password: spec.password ?? opts.password,
        };
  const local = (root: string) => new LocalStorage({ root, fsync: o.fsync ?? true });
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
    const { createFtpStorage } = await import('@medsync/adapters-ftp');
    let ca: string | undefined;
    if (o.caFile) {
      try {
        ca = readFileSync(resolve(opts.baseDir ?? process.cwd(), o.caFile), 'utf8');
      } catch {
        throw new MedsyncError('E_CONFIG', 'The --ca file could not be read.');
      }
    }
    return createFtpStorage({
      host: u.hostname,
      ...(u.port ? { port: Number(u.port) } : {}),
      user,
      password,
      root: decodeURIComponent(u.pathname) || '/',
      ...(u.protocol === 'ftps:' ? { secure: 'explicit' as const, tls: ca ? { ca } : {} } : {}),
    });
  }
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
