import { randomBytes } from 'node:crypto';
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { getJobStatus, LocalStorage, SyncJob } from '@medsync/core';
import { openSqliteStore } from '@medsync/adapters-db';
import { formatBytes, statusText, syncText, type CliIO } from './output.js';

/** A small file that starts like a DICOM Part-10 file (128-byte preamble + "DICM"), then noise. */
function fakeInstance(size: number): Buffer {
  const b = randomBytes(size);
  b.fill(0, 0, 128);
  b.write('DICM', 128, 'latin1');
  return b;
}

/**
 * Generates an anonymised study tree (patients / studies / series / instances), syncs it to a
 * destination folder with SQLite state, syncs again to show that nothing is resent, and prints
 * the status. Everything lives under `dir`.
 */
export async function runDemo(dir: string, io: CliIO): Promise<number> {
  const say = (s: string) => io.stdout.write(s + '\n');
  rmSync(dir, { recursive: true, force: true });
  const srcDir = join(dir, 'pacs-storage');
  const dstDir = join(dir, 'hosting-server');
  const state = join(dir, 'state.db');
  let files = 0;
  let bytes = 0;
  for (let p = 1; p <= 3; p++) {
    for (let st = 1; st <= 2; st++) {
      for (let se = 1; se <= 2; se++) {
        const folder = join(srcDir, `PAT${String(p).padStart(4, '0')}`, `STUDY ${st}`, `SERIES ${se}`);
        mkdirSync(folder, { recursive: true });
        for (let i = 1; i <= 8; i++) {
          const data = fakeInstance(16_384 + ((p * 7 + st * 3 + se + i) % 5) * 4096);
          writeFileSync(join(folder, `IM${String(i).padStart(5, '0')}.dcm`), data);
          files++;
          bytes += data.length;
        }
      }
    }
  }
  say(
    `medsync demo: generated ${files} DICOM-like files (${formatBytes(bytes)}) in ${relative(io.cwd, srcDir) || srcDir}`,
  );
  const store = await openSqliteStore({ path: state });
  const source = new LocalStorage({ root: srcDir });
  const dest = new LocalStorage({ root: dstDir });
  try {
    const job = new SyncJob({
      id: 'demo-pacs-to-host',
      source,
      destinations: [dest],
      store,
      eventPaths: true,
    });
    say(
      `\n1) First sync to ${relative(io.cwd, dstDir) || dstDir} (state in ${relative(io.cwd, state) || state}):`,
    );
    io.stdout.write(syncText(await job.run()));
    say('\n2) Second sync (nothing changed, so nothing is sent):');
    io.stdout.write(syncText(await job.run()));
    writeFileSync(join(srcDir, 'PAT0004-new.dcm'), fakeInstance(20_000));
    say('\n3) One new file arrives; third sync sends only it:');
    io.stdout.write(syncText(await job.run()));
    say('\nStatus (medsync status --state ' + (relative(io.cwd, state) || state) + '):');
    io.stdout.write(statusText([await getJobStatus(store, 'demo-pacs-to-host')]));
    say(
      `\nTry: npx medsync sync ${relative(io.cwd, srcDir)} /tmp/medsync-copy --state /tmp/medsync-copy.db --json`,
    );
    return 0;
  } finally {
    await store.close();
  }
}
