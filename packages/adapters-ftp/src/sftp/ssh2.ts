import { createRequire } from 'node:module';
import type * as Ssh2 from 'ssh2';

let loaded: typeof Ssh2 | undefined;

/**
 * ssh2, loaded at the first SFTP use rather than when the package is imported: an FTP-only
 * program (the `medsync` command syncing to ftp://) does not pay its ~45 ms of start-up.
 */
export function ssh2(): typeof Ssh2 {
  // ssh2 is CommonJS: require works from both builds (ESM and CJS, where tsup shims import.meta.url).
  loaded ??= createRequire(import.meta.url)('ssh2') as typeof Ssh2;
  return loaded;
}
