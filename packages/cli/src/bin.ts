#!/usr/bin/env node
import './heap.js';
import { main } from './main.js';

main(process.argv.slice(2), {
  stdout: process.stdout,
  stderr: process.stderr,
  env: process.env,
  cwd: process.cwd(),
}).then(
  (code) => {
    process.exitCode = code;
  },
  (e: unknown) => {
    process.stderr.write(`medsync: unexpected error: ${(e as Error)?.message ?? String(e)}\n`);
    process.exitCode = 1;
  },
);
