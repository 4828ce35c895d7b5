/**
 * Socket errors that a reconnect may cure, for FTP and SFTP alike (ECONNREFUSED is not here:
 * both adapters answer it first with advice about the server and port).
 */
export const TRANSIENT_ERRNO: ReadonlySet<string> = new Set([
  'ECONNRESET',
  'ECONNABORTED',
  'ETIMEDOUT',
  'EPIPE',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'ENETDOWN',
  'EAI_AGAIN',
]);
