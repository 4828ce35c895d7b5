import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';

const root = fileURLToPath(new URL('../../../', import.meta.url));
const work = mkdtempSync(join(tmpdir(), 'medsync-consumer-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));

const imports = {
  esm: [
    "import * as fs from 'node:fs';",
    "import { LocalStorage, SyncJob, isMedsyncError } from '@medsync/core';",
    "import { openSqliteStore } from '@medsync/adapters-db';",
    "import { FakeClock } from '@medsync/core/testing';",
  ],
  cjs: [
    "const fs = require('node:fs');",
    "const { LocalStorage, SyncJob, isMedsyncError } = require('@medsync/core');",
    "const { openSqliteStore } = require('@medsync/adapters-db');",
    "const { FakeClock } = require('@medsync/core/testing');",
  ],
};

const body = `
async function main() {
  const dir = process.argv[2];
  fs.mkdirSync(dir + '/src/a', { recursive: true });
  fs.writeFileSync(dir + '/src/a/1.dcm', 'one');
  fs.writeFileSync(dir + '/src/2.dcm', 'two');
  const store = await openSqliteStore({ path: dir + '/state.db' });
  const source = new LocalStorage({ root: dir + '/src' });
  const job = new SyncJob({ id: 'c', source, destinations: [new LocalStorage({ root: dir + '/dst' })], store });
  const r = await job.run();
  await store.close();
  const clock = typeof new FakeClock().now();
  console.log(JSON.stringify({ status: r.status, files: r.filesSynced, clock, brand: isMedsyncError(new Error('x')) }));
}
main().catch((e) => { console.error(e); process.exit(1); });
`;

describe('consumers of the packed packages', () => {
  it('npm pack → install in a fresh project → import from ESM and from CommonJS', () => {
    const packs = join(work, 'packs');
    mkdirSync(packs);
    for (const p of ['core', 'adapters-db']) {
      execFileSync('npm', ['pack', '--silent', '--pack-destination', packs], {
        cwd: join(root, 'packages', p),
        stdio: 'pipe',
      });
    }
    const tarballs = readdirSync(packs).map((f) => join(packs, f));
    expect(tarballs).toHaveLength(2);
    const app = join(work, 'app');
    mkdirSync(app);
    writeFileSync(
      join(app, 'package.json'),
      JSON.stringify({ name: 'consumer', version: '1.0.0', private: true }),
    );
    execFileSync(
      'npm',
      ['install', '--no-audit', '--no-fund', '--prefer-offline', '--ignore-scripts', ...tarballs],
      { cwd: app, stdio: 'pipe' },
    );
    // better-sqlite3 is an optional peer the host installs; reuse the native build from the repo.
    symlinkSync(
      join(root, 'node_modules', 'better-sqlite3'),
      join(app, 'node_modules', 'better-sqlite3'),
      'dir',
    );
    writeFileSync(join(app, 'esm.mjs'), imports.esm.join('\n') + body);
    writeFileSync(join(app, 'cjs.cjs'), imports.cjs.join('\n') + body);
    for (const file of ['esm.mjs', 'cjs.cjs']) {
      const out = execFileSync(process.execPath, [file, join(work, file)], { cwd: app, encoding: 'utf8' });
      expect(JSON.parse(out)).toEqual({ status: 'success', files: 2, clock: 'number', brand: false });
    }
  }, 180_000);
});
