export { FtpStorage, createFtpStorage } from './ftp/ftp-storage.js';
export {
  FtpStorageOptionsSchema,
  parseFtpOptions,
  type FtpStorageOptions,
  type ResolvedFtpStorageOptions,
} from './ftp/options.js';
export { toFtpError, type FtpOp } from './ftp/errors.js';
export { SftpStorage, createSftpStorage } from './sftp/sftp-storage.js';
export {
  SftpStorageOptionsSchema,
  parseSftpOptions,
  type SftpStorageOptions,
  type ResolvedSftpStorageOptions,
} from './sftp/options.js';
export { toSftpError, SftpStatusError, SFTP_STATUS, type SftpOp } from './sftp/errors.js';
