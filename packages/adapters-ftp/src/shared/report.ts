import { MedsyncError } from '@medsync/core';

/**
 * What `test()` says about the root folder's rights, for FTP and SFTP alike. A root the account
 * may write but not list (a drop folder) is a working destination; one it may neither list nor
 * write is not (E_PERMISSION). `entries` is undefined when the listing was refused.
 */
export function rootAccess(
  adapter: string,
  entries: number | undefined,
  writable: boolean,
): { advice?: string } {
  if (entries === undefined && !writable) {
    throw new MedsyncError(
      'E_PERMISSION',
      'This account may neither list nor write the root folder: check its rights on it.',
      { adapter, retryable: false },
    );
  }
  if (!writable)
    return { advice: 'The root folder is readable but this account may not write to it: check its rights.' };
  if (entries === undefined) {
    return {
      advice:
        'The root folder takes uploads but this account may not list it (a drop folder): files are sent, but a lost job state cannot be rebuilt from it.',
    };
  }
  return {};
}
