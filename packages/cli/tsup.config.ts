import { defineConfig } from 'tsup';

export default defineConfig([
  {
    entry: { index: 'src/index.ts' },
    format: ['esm', 'cjs'],
    dts: true,
    clean: true,
    sourcemap: true,
    target: 'node20',
    silent: true,
  },
  {
    // The `medsync` command is one bundled file (better-sqlite3, a native addon, stays outside, and
    // so does ssh2: its optional native and wasm crypto find their files next to its own):
    // start-up reads one module instead of a few hundred.
    entry: { bin: 'src/bin.ts' },
    format: ['esm'],
    sourcemap: true,
    target: 'node20',
    silent: true,
    noExternal: [/^(?!(?:better-sqlite3|ssh2)$).*/],
    splitting: true,
    minify: true,
    // Libraries read constructor names (basic-ftp's FTPError sets name from it).
    keepNames: true,
    banner: {
      js: "import { createRequire as __medsyncCreateRequire } from 'node:module'; const require = __medsyncCreateRequire(import.meta.url);",
    },
  },
]);
