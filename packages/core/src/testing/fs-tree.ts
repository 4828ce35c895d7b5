import { mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join, relative, sep } from 'node:path';

/** Writes `files` (relative POSIX path → content) below `root`, creating folders. */
export function writeTree(root: string, files: Record<string, Buffer | string>): void {
  for (const [p, data] of Object.entries(files)) {
    const abs = join(root, ...p.split('/'));
    mkdirSync(dirname(abs), { recursive: true });
    writeFileSync(abs, data);
  }
}

/** Every file below `root` as relative POSIX path → base64 content, for byte-identity checks. */
export function readTree(root: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (d: string) => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const abs = join(d, e.name);
      if (e.isDirectory()) walk(abs);
      else out[relative(root, abs).split(sep).join('/')] = readFileSync(abs).toString('base64');
    }
  };
  walk(root);
  return out;
}
