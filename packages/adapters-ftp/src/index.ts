export { FtpStorage, createFtpStorage } from './ftp/ftp-storage.js';
export {
  FtpStorageOptionsSchema,
  parseFtpOptions,
  type FtpStorageOptions,
  type ResolvedFtpStorageOptions,
} from './ftp/options.js';
export { toFtpError, type FtpOp } from './ftp/errors.js';
