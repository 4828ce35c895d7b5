/**
 * The program SFTP uploads are checked with on the server (one per connection, fed one path per
 * line; it first names itself), run here through a local `sh -c` exactly as sshd runs an exec
 * request: with Perl's Digest::SHA, and with the sha256sum loop used where Perl is missing.
 */
import { execFileSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { DIGEST_COMMAND } from '../src/sftp/session.js';

const dir = mkdtempSync(join(tmpdir(), 'medsync-digest-cmd-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const which = (cmd: string): string | undefined => {
  try {
    return execFileSync('sh', ['-c', `command -v ${cmd}`], { encoding: 'utf8' }).trim() || undefined;
  } catch {
    return undefined;
  }
};

function run(paths: string[], env?: NodeJS.ProcessEnv): string[] {
  const out = execFileSync('sh', ['-c', DIGEST_COMMAND], {
    input: paths.map((p) => `${p}\n`).join(''),
    encoding: 'utf8',
    ...(env ? { env } : {}),
  });
  return out.split('\n').slice(0, -1);
}

describe('the server-side digest program', () => {
  const odd = join(dir, 'it\'s a "name" with $HOME, `x` and \\ spaces ');
  const big = join(dir, 'big.bin');
  // Over 4 MiB: hashed by openssl where the Perl program finds it.
  const body = randomBytes(5_000_001);
  writeFileSync(odd, 'hello');
  writeFileSync(big, body);
  const dash = join(dir, '-n');
  const space = join(dir, ' leading space');
  writeFileSync(dash, 'dash');
  writeFileSync(space, 'space');
  mkdirSync(join(dir, 'folder'));
  const sha = (b: Buffer | string) => createHash('sha256').update(b).digest('hex');
  const paths = ['/dev/null', odd, dash, space, join(dir, 'missing'), join(dir, 'folder'), big];
  const expected = [
    `ok ${sha('')}`,
    `ok ${sha('hello')}`,
    `ok ${sha('dash')}`,
    `ok ${sha('space')}`,
    'err',
    'err',
    `ok ${sha(body)}`,
  ];

  /** A PATH holding only these commands (symlinks to the real ones). */
  const pathWith = (name: string, cmds: string[]): string => {
    const bin = join(dir, name);
    mkdirSync(bin, { recursive: true });
    for (const cmd of cmds) {
      const at = which(cmd);
      expect(at).toBeDefined();
      symlinkSync(at!, join(bin, cmd));
    }
    return bin;
  };

  const perl = which('perl');
  const openssl = which('openssl');
  (perl && openssl ? it : it.skip)(
    "answers in order with Perl's Digest::SHA (openssl for large files); names are never echoed",
    () => {
      expect(run(paths)).toEqual(['medsync-digest perl openssl', ...expected]);
    },
  );

  (perl ? it : it.skip)('answers the same with Perl alone', () => {
    expect(run(paths, { PATH: pathWith('perl-only', ['sh', 'perl']) })).toEqual([
      'medsync-digest perl',
      ...expected,
    ]);
  });

  (perl ? it : it.skip)('hands files of 4 MiB or more to openssl, smaller ones to Digest::SHA', () => {
    // An "openssl" that answers a recognisable digest shows which files went to it.
    const bin = pathWith('fake-openssl', ['sh', 'perl']);
    writeFileSync(join(bin, 'openssl'), `#!/bin/sh\necho "${'f'.repeat(64)} *$4"\n`, { mode: 0o755 });
    const out = run(paths, { PATH: bin });
    expect(out[0]).toBe('medsync-digest perl openssl');
    expect(out.slice(1)).toEqual([...expected.slice(0, -1), `ok ${'f'.repeat(64)}`]);
  });

  it('answers the same with the sha256sum loop where Perl is missing', () => {
    expect(run(paths, { PATH: pathWith('no-perl', ['sh', 'sha256sum']) })).toEqual([
      'medsync-digest sha256sum',
      ...expected,
    ]);
  });
});
