/**
 * known_hosts matching, checked against OpenSSH's own: `ssh-keygen -F NAME -f FILE` says which
 * lines match a host, and the adapter must agree (plain names, `[host]:port`, patterns, negation,
 * hashed entries). Needs ssh-keygen (openssh-client); skipped with a note when it is missing.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import {
  checkHostKey,
  entryMatches,
  fingerprintOf,
  knownHostsName,
  parseKnownHosts,
  preferredHostKeyAlgorithms,
} from '../src/sftp/host-keys.js';

const hasKeygen = spawnSync('ssh-keygen', ['-?'], { stdio: 'ignore' }).error === undefined;
const dir = mkdtempSync(join(tmpdir(), 'medsync-kh-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** A fresh public key of `type` made by ssh-keygen: `type base64`. */
function newKey(type: 'ed25519' | 'ecdsa' | 'rsa', name: string): { line: string; fp: string } {
  const f = join(dir, name);
  execFileSync('ssh-keygen', [
    '-q',
    '-t',
    type,
    ...(type === 'rsa' ? ['-b', '2048'] : []),
    '-N',
    '',
    '-f',
    f,
  ]);
  const line = readFileSync(`${f}.pub`, 'utf8').split(' ').slice(0, 2).join(' ');
  const fp = execFileSync('ssh-keygen', ['-l', '-E', 'sha256', '-f', `${f}.pub`], { encoding: 'utf8' }).split(
    ' ',
  )[1]!;
  return { line, fp };
}

/** The 1-based line numbers ssh-keygen -F finds for `name` in `file`. */
function opensshMatches(file: string, name: string): number[] {
  const r = spawnSync('ssh-keygen', ['-F', name, '-f', file], { encoding: 'utf8' });
  return [...(r.stdout ?? '').matchAll(/found: line (\d+)/g)].map((m) => Number(m[1]));
}

(hasKeygen ? describe : describe.skip)('known_hosts matching (against ssh-keygen -F)', () => {
  it('agrees with OpenSSH on plain, [host]:port, wildcard, negated and hashed entries', () => {
    const k = newKey('ed25519', 'k1');
    const lines = [
      `archive.example.org ${k.line}`,
      `[archive.example.org]:2222 ${k.line}`,
      `*.pacs.example.org,!evil.pacs.example.org ${k.line}`,
      `10.0.0.? ${k.line}`,
      `[10.1.2.3]:* ${k.line}`,
      `ARCHIVE2.Example.org,archive3.example.org ${k.line}`,
    ];
    const file = join(dir, 'known_hosts');
    writeFileSync(file, lines.join('\n') + '\n');
    const hashedFile = join(dir, 'known_hosts_hashed');
    writeFileSync(hashedFile, `archive.example.org ${k.line}\n[archive.example.org]:2222 ${k.line}\n`);
    execFileSync('ssh-keygen', ['-H', '-f', hashedFile], { stdio: 'ignore' });
    const entries = parseKnownHosts(readFileSync(file, 'utf8'));
    const hashed = parseKnownHosts(readFileSync(hashedFile, 'utf8'));
    expect(entries).toHaveLength(lines.length);
    expect(hashed.every((e) => e.hosts.startsWith('|1|'))).toBe(true);
    // The oracle answers (a comparison of two empty lists would prove nothing).
    expect(opensshMatches(file, 'archive.example.org')).toEqual([1]);
    expect(opensshMatches(file, 'ct.pacs.example.org')).toEqual([3]);
    expect(opensshMatches(hashedFile, '[archive.example.org]:2222')).toEqual([2]);
    const probes: [string, number][] = [
      ['archive.example.org', 22],
      ['archive.example.org', 2222],
      ['archive.example.org', 2200],
      ['ct.pacs.example.org', 22],
      ['evil.pacs.example.org', 22],
      ['10.0.0.7', 22],
      ['10.0.0.17', 22],
      ['10.1.2.3', 2022],
      ['10.1.2.3', 22],
      ['archive2.example.org', 22],
      ['other.example.org', 22],
    ];
    for (const [host, port] of probes) {
      const name = knownHostsName(host, port);
      const ours = entries.flatMap((e, i) => (entryMatches(e, host, port) ? [i + 1] : []));
      expect({ name, lines: ours }).toEqual({ name, lines: opensshMatches(file, name) });
      const oursHashed = hashed.flatMap((e, i) => (entryMatches(e, host, port) ? [i + 1] : []));
      expect({ name, hashed: oursHashed }).toEqual({ name, hashed: opensshMatches(hashedFile, name) });
    }
  });

  it('looks a host up by its lowercased name, as ssh does (hashed entries too)', () => {
    const k = newKey('ed25519', 'k2');
    const hashedFile = join(dir, 'known_hosts_case');
    writeFileSync(hashedFile, `pacs.example.org ${k.line}\n[pacs.example.org]:2222 ${k.line}\n`);
    execFileSync('ssh-keygen', ['-H', '-f', hashedFile], { stdio: 'ignore' });
    const [hashed22, hashed2222] = parseKnownHosts(readFileSync(hashedFile, 'utf8'));
    expect(entryMatches(hashed22!, 'PACS.Example.org', 22)).toBe(true);
    expect(entryMatches(hashed2222!, 'Pacs.Example.ORG', 2222)).toBe(true);
    expect(entryMatches(hashed22!, 'pacs.example.net', 22)).toBe(false);
  });

  it('checks keys: fingerprint as ssh-keygen prints it, known key, mismatch, unknown, revoked', () => {
    const a = newKey('ed25519', 'a');
    const b = newKey('ecdsa', 'b');
    const blobA = Buffer.from(a.line.split(' ')[1]!, 'base64');
    const blobB = Buffer.from(b.line.split(' ')[1]!, 'base64');
    expect(fingerprintOf(blobA)).toBe(a.fp);
    expect(fingerprintOf(blobB)).toBe(b.fp);
    const kh = parseKnownHosts(`[h.example]:2222 ${a.line}\n@revoked * ${b.line}\n# comment\nbroken line\n`);
    const policy = (fingerprints: string[] = [], insecure = false) => ({
      fingerprints,
      knownHosts: kh,
      insecure,
    });
    expect(checkHostKey(policy(), 'h.example', 2222, blobA)).toEqual({ ok: true, via: 'known_hosts' });
    expect(checkHostKey(policy(), 'h.example', 22, blobA)).toEqual({ ok: false, reason: 'unknown' });
    expect(checkHostKey(policy([a.fp]), 'h.example', 22, blobA)).toEqual({ ok: true, via: 'fingerprint' });
    expect(checkHostKey(policy([b.fp]), 'h.example', 22, blobA)).toEqual({ ok: false, reason: 'mismatch' });
    expect(checkHostKey(policy([b.fp]), 'h.example', 22, blobB)).toEqual({ ok: false, reason: 'revoked' });
    expect(checkHostKey(policy([], true), 'x', 22, blobB)).toEqual({ ok: false, reason: 'revoked' });
    expect(checkHostKey(policy([], true), 'x', 22, blobA).ok).toBe(true);
  });

  it('offers the algorithms of the keys known_hosts has for the host first', () => {
    const rsa = newKey('rsa', 'r');
    const ec = newKey('ecdsa', 'e');
    const kh = parseKnownHosts(`srv ${rsa.line}\nother ${ec.line}\n`);
    expect(preferredHostKeyAlgorithms(kh, 'srv', 22)?.slice(0, 3)).toEqual([
      'rsa-sha2-512',
      'rsa-sha2-256',
      'ssh-rsa',
    ]);
    expect(preferredHostKeyAlgorithms(kh, 'other', 22)?.[0]).toBe('ecdsa-sha2-nistp256');
    expect(preferredHostKeyAlgorithms(kh, 'unknown', 22)).toBeUndefined();
    expect(preferredHostKeyAlgorithms(undefined, 'srv', 22)).toBeUndefined();
  });
});
