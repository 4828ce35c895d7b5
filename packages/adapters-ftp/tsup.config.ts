import { defineConfig } from 'tsup';

export default defineConfig({
  entry: { index: 'src/index.ts' },
  format: ['esm', 'cjs'],
  dts: true,
  clean: true,
  sourcemap: true,
  target: 'node20',
  silent: true,
  // import.meta.url in the CJS build (sftp/ssh2.ts loads ssh2 lazily with createRequire).
  shims: true,
});
