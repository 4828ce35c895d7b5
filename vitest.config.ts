import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vitest/config';

const src = (p: string) => fileURLToPath(new URL(`./packages/${p}`, import.meta.url));

export default defineConfig({
  resolve: {
    alias: [
      { find: /^@medsync\/core\/testing$/, replacement: src('core/src/testing/index.ts') },
      { find: /^@medsync\/core\/config$/, replacement: src('core/src/config/index.ts') },
      { find: /^@medsync\/core$/, replacement: src('core/src/index.ts') },
      { find: /^@medsync\/adapters-db$/, replacement: src('adapters-db/src/index.ts') },
      { find: /^@medsync\/adapters-ftp$/, replacement: src('adapters-ftp/src/index.ts') },
    ],
  },
  test: {
    include: ['packages/*/test/**/*.test.ts'],
    globalSetup: ['./test/global-setup.ts'],
    testTimeout: 60_000,
    hookTimeout: 120_000,
    pool: 'forks',
    globals: true,
    maxWorkers: 2,
  },
});
