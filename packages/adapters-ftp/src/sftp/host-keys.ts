import { createHash, createHmac, timingSafeEqual } from 'node:crypto';

/** The SSH key type inside a public key blob (`ssh-ed25519`, `ssh-rsa`, `ecdsa-sha2-nistp256` …). */
export function keyTypeOf(blob: Buffer): string {
  if (blob.length < 4) return 'unknown';
  const n = blob.readUInt32BE(0);
  if (n === 0 || n > 64 || blob.length < 4 + n) return 'unknown';
  return blob.subarray(4, 4 + n).toString('latin1');
}

/** `SHA256:` and unpadded base64 of the key blob's SHA-256, as OpenSSH prints it. */
export function fingerprintOf(blob: Buffer): string {
  return `SHA256:${createHash('sha256').update(blob).digest('base64').replace(/=+$/, '')}`;
}

/** One line of a known_hosts file. */
export interface KnownHostEntry {
  marker?: 'revoked' | 'cert-authority';
  /** The host field: a comma-separated pattern list, or a hashed `|1|salt|hash` name. */
  hosts: string;
  keyType: string;
  key: Buffer;
}

/** Parses known_hosts text; malformed lines and comments are skipped, as OpenSSH does. */
export function parseKnownHosts(text: string): KnownHostEntry[] {
  const out: KnownHostEntry[] = [];
  for (const rawLine of text.split(/\r?\n/)) {
    const line = rawLine.trim();
    if (line === '' || line.startsWith('#')) continue;
    const fields = line.split(/\s+/);
    let marker: KnownHostEntry['marker'];
    if (fields[0]?.startsWith('@')) {
      const m = fields.shift()!;
      if (m === '@revoked') marker = 'revoked';
      else if (m === '@cert-authority') marker = 'cert-authority';
      else continue;
    }
    const [hosts, keyType, b64] = fields;
    if (!hosts || !keyType || !b64 || !/^[A-Za-z0-9+/]+=*$/.test(b64)) continue;
    const key = Buffer.from(b64, 'base64');
    if (keyTypeOf(key) !== keyType) continue;
    out.push({ ...(marker ? { marker } : {}), hosts, keyType, key });
  }
  return out;
}

/** The name a host is looked up under: `host` on port 22, `[host]:port` otherwise. */
export function knownHostsName(host: string, port: number): string {
  return port === 22 ? host : `[${host}]:${port}`;
}

/** OpenSSH's pattern match: `*` any run, `?` one character, case-insensitive for host names. */
function globMatch(pattern: string, name: string): boolean {
  const re = new RegExp(
    '^' +
      pattern
        .split('')
        .map((c) => (c === '*' ? '.*' : c === '?' ? '.' : c.replace(/[.+^${}()|[\]\\]/g, '\\$&')))
        .join('') +
      '$',
    'i',
  );
  return re.test(name);
}

/** True when the entry's host field names `host:port` (hashed names, patterns, negations). */
export function entryMatches(entry: KnownHostEntry, host: string, port: number): boolean {
  // ssh looks a host up by its lowercased name (`ssh -G HOST` prints it): hashed entries are
  // hashes of that.
  const name = knownHostsName(host.toLowerCase(), port);
  if (entry.hosts.startsWith('|1|')) {
    const [, , salt, hash] = entry.hosts.split('|');
    if (!salt || !hash) return false;
    const want = Buffer.from(hash, 'base64');
    const got = createHmac('sha1', Buffer.from(salt, 'base64')).update(name).digest();
    return want.length === got.length && timingSafeEqual(want, got);
  }
  let matched = false;
  for (const p of entry.hosts.split(',')) {
    if (p.startsWith('!')) {
      if (globMatch(p.slice(1), name)) return false;
    } else if (globMatch(p, name)) matched = true;
  }
  return matched;
}

/** The outcome of checking a server's host key. */
export type HostKeyCheck =
  | { ok: true; via: 'fingerprint' | 'known_hosts' | 'none (insecureSkipHostKeyCheck)' }
  | { ok: false; reason: 'revoked' | 'mismatch' | 'unknown' };

export interface HostKeyPolicy {
  fingerprints: readonly string[];
  knownHosts: readonly KnownHostEntry[] | undefined;
  insecure: boolean;
}

/**
 * Checks a host key blob against the pinned fingerprints and the known_hosts entries for
 * `host:port`. A `@revoked` key is refused even when pinned. `mismatch` means the configuration
 * knows this host under another key (possible attack, or a reinstalled server); `unknown` that it
 * does not know the host at all.
 */
export function checkHostKey(policy: HostKeyPolicy, host: string, port: number, blob: Buffer): HostKeyCheck {
  const entries = (policy.knownHosts ?? []).filter((e) => entryMatches(e, host, port));
  if (entries.some((e) => e.marker === 'revoked' && e.key.equals(blob)))
    return { ok: false, reason: 'revoked' };
  if (policy.insecure) return { ok: true, via: 'none (insecureSkipHostKeyCheck)' };
  if (policy.fingerprints.includes(fingerprintOf(blob))) return { ok: true, via: 'fingerprint' };
  const plain = entries.filter((e) => e.marker === undefined);
  if (plain.some((e) => e.key.equals(blob))) return { ok: true, via: 'known_hosts' };
  return { ok: false, reason: policy.fingerprints.length > 0 || plain.length > 0 ? 'mismatch' : 'unknown' };
}

/** ssh2's host key algorithms, in its default order of preference. */
const HOST_KEY_ALGORITHMS = [
  'ssh-ed25519',
  'ecdsa-sha2-nistp256',
  'ecdsa-sha2-nistp384',
  'ecdsa-sha2-nistp521',
  'rsa-sha2-512',
  'rsa-sha2-256',
  'ssh-rsa',
] as const;
export type HostKeyAlgorithm = (typeof HOST_KEY_ALGORITHMS)[number];

/**
 * The host key algorithms to offer, those of the keys known_hosts has for this host first (as
 * OpenSSH does): a server with both an RSA and an ed25519 key, of which known_hosts has only the
 * RSA one, then shows the RSA key instead of an ed25519 key nobody can check. Undefined: keep
 * ssh2's defaults.
 */
export function preferredHostKeyAlgorithms(
  entries: readonly KnownHostEntry[] | undefined,
  host: string,
  port: number,
): HostKeyAlgorithm[] | undefined {
  const types = new Set(
    (entries ?? [])
      .filter((e) => e.marker === undefined && entryMatches(e, host, port))
      .map((e) => e.keyType),
  );
  if (types.size === 0) return undefined;
  const known = HOST_KEY_ALGORITHMS.filter((a) =>
    a.startsWith('rsa-sha2-') ? types.has('ssh-rsa') : types.has(a),
  );
  if (known.length === 0) return undefined;
  return [...known, ...HOST_KEY_ALGORITHMS.filter((a) => !known.includes(a))];
}
