import { z } from 'zod';

/** Characters that would end or forge a command line (FTP) or a path (SFTP). */
export const CONTROL = /[\0\r\n]/;

/** An absolute server folder, normalized (no empty, `.` or trailing segments). */
export const rootSchema = z
  .string()
  .refine((r) => r.startsWith('/'), 'must be an absolute server path such as "/dicom"')
  .refine((r) => !CONTROL.test(r) && !r.includes('\\'), 'may not contain NUL, CR, LF or a backslash')
  .refine((r) => !r.split('/').includes('..'), 'may not contain ".."')
  .transform(
    (r) =>
      '/' +
      r
        .split('/')
        .filter((s) => s !== '' && s !== '.')
        .join('/'),
  );
