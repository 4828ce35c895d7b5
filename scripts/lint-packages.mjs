#!/usr/bin/env node
// Checks each published package's build and exports map with publint and
// @arethetypeswrong/cli (attw), as consumers on ESM and CommonJS would see them.
import { spawnSync } from 'node:child_process';

const packages = ['packages/core', 'packages/adapters-db', 'packages/adapters-ftp', 'packages/cli'];
let failed = false;
for (const dir of packages) {
  for (const [name, args] of [
    ['publint', ['publint', dir, '--strict']],
    ['attw', ['attw', '--pack', dir, '--profile', 'node16', '--format', 'ascii']],
  ]) {
    const r = spawnSync('npx', ['--no-install', ...args], { stdio: 'inherit' });
    if (r.status !== 0) {
      console.error(`lint-packages: ${name} failed for ${dir}`);
      failed = true;
    }
  }
}
process.exit(failed ? 1 : 0);
