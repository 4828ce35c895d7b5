import { defineConfig, type Options } from 'tsup';

const base: Options = {
  entry: {
    index: 'src/index.ts',
    'testing/index': 'src/testing/index.ts',
    'config/index': 'src/config/index.ts',
  },
  dts: true,
  sourcemap: true,
  target: 'node20',
  silent: true,
};

export default defineConfig([
  { ...base, format: ['esm'] },
  // p-limit and p-retry ship ESM only; Node 20's require(esm) hands CommonJS a namespace object
  // that bundlers' default-import interop gets wrong, so the CommonJS build carries its own copy.
  { ...base, format: ['cjs'], noExternal: ['p-limit', 'p-retry', 'yocto-queue', 'is-network-error'] },
]);
