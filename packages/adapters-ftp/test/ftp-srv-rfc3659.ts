import { utimesSync } from 'node:fs';
import { createRequire } from 'node:module';

/**
 * Teaches ftp-srv 4.6.3 the RFC 3659 commands it lacks and that proftpd and pure-ftpd have: MLSD
 * (machine-readable listings with exact mtimes), MLST (one file's facts) and MFMT (set a file's
 * mtime). ftp-srv keeps its commands in one module-level registry, so this changes every ftp-srv
 * server of the process: call it only in a test file of its own (vitest runs each file in its
 * own process here).
 */
export function enableRfc3659(): void {
  const require = createRequire(import.meta.url);
  const registry = require('ftp-srv/src/commands/registry') as Record<string, unknown>;
  if (registry.MLSD) return;

  type Stat = { name: string; size: number; mtime: Date; isDirectory(): boolean };
  type Conn = {
    fs: {
      get(p: string): Promise<Stat>;
      list(p: string): Promise<Stat[]>;
      _resolvePath(p: string): { fsPath: string; clientPath: string };
    };
    connector: { waitForConnection(): Promise<unknown>; socket: unknown; end(): void };
    commandSocket: { pause(): void; resume(): void };
    reply(opts: unknown, ...letters: unknown[]): Promise<unknown>;
  };
  type Args = { command: { arg: string | null } };
  const timeVal = (d: Date) => d.toISOString().replace(/[-:T]/g, '').replace('Z', '');
  const facts = (s: Stat) =>
    `type=${s.isDirectory() ? 'dir' : 'file'};size=${s.size};modify=${timeVal(s.mtime)}; ${s.name}`;

  registry.MLSD = {
    directive: 'MLSD',
    handler: async function (this: Conn, { command }: Args) {
      const path = command.arg || '.';
      try {
        await this.connector.waitForConnection();
        this.commandSocket.pause();
        const stat = await this.fs.get(path);
        if (!stat.isDirectory()) {
          await this.reply(501, 'Not a directory');
          return;
        }
        const files = await this.fs.list(path);
        await this.reply(150);
        const socket = this.connector.socket;
        if (files.length)
          await this.reply({}, ...files.map((f) => ({ raw: true, message: facts(f), socket })));
        else await this.reply({ socket, useEmptyMessage: true });
        await this.reply(226);
      } catch (e) {
        await this.reply(550, (e as Error).message);
      } finally {
        this.connector.end();
        this.commandSocket.resume();
      }
    },
    syntax: '{{cmd}} [<path>]',
    description: 'Machine-readable listing of a folder',
  };

  registry.MLST = {
    directive: 'MLST',
    handler: async function (this: Conn, { command }: Args) {
      const path = command.arg || '.';
      try {
        const stat = await this.fs.get(path);
        const clientPath = this.fs._resolvePath(path).clientPath;
        await this.reply(
          250,
          'Listing',
          {
            raw: true,
            message: ` ${facts({ ...stat, isDirectory: () => stat.isDirectory(), name: clientPath })}`,
          },
          'End',
        );
      } catch (e) {
        await this.reply(550, (e as Error).message);
      }
    },
    syntax: '{{cmd}} [<path>]',
    description: 'Facts of one file',
    flags: { feat: 'MLST type*;size*;modify*;' },
  };

  registry.MFMT = {
    directive: 'MFMT',
    handler: async function (this: Conn, { command }: Args) {
      const arg = command.arg ?? '';
      const m = /^(\d{4})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2}) (.+)$/.exec(arg);
      if (!m) {
        await this.reply(501, 'Syntax: MFMT YYYYMMDDHHMMSS path');
        return;
      }
      const [, y, mo, d, h, mi, s, path] = m;
      try {
        const t = Date.UTC(+y!, +mo! - 1, +d!, +h!, +mi!, +s!) / 1000;
        utimesSync(this.fs._resolvePath(path!).fsPath, t, t);
        await this.reply(213, `Modify=${arg.slice(0, 14)}; ${path}`);
      } catch (e) {
        await this.reply(550, (e as Error).message);
      }
    },
    syntax: '{{cmd}} <time> <path>',
    description: 'Set the modification time of a file',
    flags: { feat: 'MFMT' },
  };
}
