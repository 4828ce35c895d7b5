/**
 * Vitest global setup: installs, once and before any test file runs, the Debian packages of the
 * test servers (scripts/services.sh install). Test files then start their servers without waiting
 * on apt's lock. Under CI=true a failed install fails the run; elsewhere the suites that need a
 * server skip and print how to enable them.
 */
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const SCRIPT = fileURLToPath(new URL('../scripts/services.sh', import.meta.url));
const SERVERS = ['pure-ftpd', 'proftpd', 'vsftpd', 'sshd'];

export default function setup(): void {
  try {
    execFileSync('bash', [SCRIPT, 'install', ...SERVERS], {
      stdio: ['ignore', 'ignore', 'pipe'],
      timeout: 900_000,
    });
  } catch (e) {
    const stderr = (e as { stderr?: Buffer }).stderr?.toString() ?? String(e);
    if (process.env.CI === 'true') {
      throw new Error(`scripts/services.sh install ${SERVERS.join(' ')} failed under CI=true:\n${stderr}`, {
        cause: e,
      });
    }
    console.log(
      `[medsync] test servers could not be installed (${stderr.trim().split('\n').pop()}): suites that need them will skip; run scripts/services.sh install ${SERVERS.join(' ')} as root to enable them`,
    );
  }
}
