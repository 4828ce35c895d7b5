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
  const body = randomBytes(3_000_001);
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

  const perl = which('perl');
  (perl ? it : it.skip)("answers in order with Perl's Digest::SHA; names are never echoed", () => {
    expect(run(paths)).toEqual(['medsync-digest perl', ...expected]);
  });

  it('answers the same with the sha256sum loop where Perl is missing', () => {
    // A PATH with the few commands the loop needs, and no perl.
    const bin = join(dir, 'bin');
    mkdirSync(bin, { recursive: true });
    for (const cmd of ['sh', 'sha256sum']) {
      const at = which(cmd);
      expect(at).toBeDefined();
      symlinkSync(at!, join(bin, cmd));
    }
    expect(run(paths, { PATH: bin })).toEqual(['medsync-digest sha256sum', ...expected]);
  });
});
