/**
 * A TCP proxy in front of a real FTP server (plain FTP only) that injects the network faults the
 * adapter must survive. It forwards the control connection, rewrites the server's passive replies
 * (227 PASV, 229 EPSV) to a data listener of its own, and forwards each data connection to the
 * server's passive port. Faults are armed one at a time:
 *
 * - `cutNextUpload(n)`: the next data connection that carries more than `n` bytes from the client
 *   is reset on both sides (TCP RST) in the middle of the upload, as a dropped link would. How
 *   much the server stored depends on how far it had read: the reset also throws away what still
 *   waited in the proxy's send queue (up to megabytes), so tests read the part's size instead of
 *   assuming `n`. With `serverBusy`, the server is also slower to notice than the client: the
 *   next command of that session is answered `500 Unknown command`, as pure-ftpd does to
 *   anything but ABOR and QUIT while it still reads an upload, and the server's reply to the
 *   upload after it becomes `451 Transfer aborted.` (pure-ftpd's answer to a dropped upload; a
 *   server that had read everything before the reset would say 226).
 * - `refuseNextStor()`: the next STOR is answered with `425 Can't open data connection` by the
 *   proxy itself, the way a server that could not open the data connection answers.
 * - `resetNextDataConnection()`: the next data connection is reset as soon as it is accepted.
 *
 * Replies the proxy makes itself come after the server's replies to commands sent before (a
 * client may send several commands in one write).
 *
 * It also records the verbs of the commands each session sent (`stats.commands`).
 */
import { createServer, connect, type Server, type Socket } from 'node:net';

export interface FaultProxy {
  host: string;
  port: number;
  stats: {
    controlConnections: number;
    dataConnections: number;
    cuts: number;
    refused: number;
    /** Bytes clients sent on data connections (uploads). */
    bytesUp: number;
    /** The same by data connection, in the order they opened (0 for a download or a listing). */
    uploads: number[];
    /**
     * The commands each control connection sent, by connection: the verb only (with the option's
     * name for OPTS), never an argument (a password).
     */
    commands: string[][];
    /** The same verbs by the chunk they arrived in (`TYPE + OPTS UTF8`: sent together), by connection. */
    chunks: string[][];
  };
  cutNextUpload(afterBytes: number, opts?: { serverBusy?: boolean }): void;
  refuseNextStor(): void;
  /**
   * The next data connection is reset by the proxy as soon as it is accepted (a firewall or a
   * server that ran out of data connections), before anything reaches the server.
   */
  resetNextDataConnection(): void;
  /**
   * Answers every command matching `command` with `reply` (e.g. `502 Not implemented.`) itself;
   * with `hangUp`, then closes that control connection (a server answering 421 and leaving).
   */
  refuseAlways(command: RegExp, reply: string, opts?: { hangUp?: boolean }): void;
  /**
   * Forwards the first command matching `command` of each connection, then leaves every later
   * command of that connection unanswered (a server that throws typed-ahead commands away, e.g.
   * after a refused login).
   */
  dropAfter(command: RegExp): void;
  close(): Promise<void>;
}

/** One control connection's state shared with its data connections. */
interface Session {
  /** After a `serverBusy` cut: the server's replies held back until the next command is refused. */
  held?: string[];
  /** After that refusal: the server's next reply (to the upload) is rewritten to a 451. */
  rewrite?: boolean;
}

function listen(server: Server): Promise<number> {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve((server.address() as { port: number }).port));
  });
}

export async function startFaultProxy(target: { host: string; port: number }): Promise<FaultProxy> {
  const sockets = new Set<Socket>();
  const servers = new Set<Server>();
  const track = (s: Socket) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
    s.on('error', () => undefined);
    return s;
  };
  const stats = {
    controlConnections: 0,
    dataConnections: 0,
    cuts: 0,
    refused: 0,
    bytesUp: 0,
    uploads: [] as number[],
    commands: [] as string[][],
    chunks: [] as string[][],
  };
  let cutAfter: number | undefined;
  let cutBusy = false;
  let refuseStor = false;
  let refuseData = false;
  const refusals: Array<[RegExp, string, { hangUp?: boolean }]> = [];
  let dropAfter: RegExp | undefined;

  /** A one-shot data listener forwarding to the server's passive port `upstreamPort`. */
  const dataListener = async (upstreamPort: number, session: Session): Promise<number> => {
    const srv = createServer((client) => {
      srv.close();
      servers.delete(srv);
      stats.dataConnections++;
      track(client);
      if (refuseData) {
        refuseData = false;
        stats.refused++;
        client.resetAndDestroy();
        return;
      }
      const up = track(connect(upstreamPort, target.host));
      let fromClient = 0;
      const armed = cutAfter;
      const upload = stats.uploads.push(0) - 1;
      client.on('data', (chunk: Buffer) => {
        fromClient += chunk.length;
        stats.bytesUp += chunk.length;
        stats.uploads[upload] = fromClient;
        if (armed !== undefined && cutAfter === armed && fromClient > armed) {
          cutAfter = undefined;
          stats.cuts++;
          if (cutBusy) session.held = [];
          client.resetAndDestroy();
          up.resetAndDestroy();
          return;
        }
        if (!up.write(chunk)) client.pause();
      });
      up.on('drain', () => client.resume());
      up.pipe(client);
      client.on('end', () => up.end());
      client.on('close', () => up.destroyed || up.destroy());
      up.on('close', () => client.destroyed || client.destroy());
    });
    servers.add(srv);
    return listen(srv);
  };

  const control = createServer((client) => {
    stats.controlConnections++;
    const commands: string[] = [];
    stats.commands.push(commands);
    const chunks: string[] = [];
    stats.chunks.push(chunks);
    track(client);
    const up = track(connect(target.port, target.host));
    const session: Session = {};
    /** A server line to the client; after a `serverBusy` cut, its reply to the upload is a 451. */
    const toClient = (line: string) => {
      if (session.rewrite) {
        if (!/^\d{3} /.test(line)) return; // the lines of a multi-line reply before its last
        session.rewrite = false;
        line = '451 Transfer aborted.\r\n';
      }
      client.write(line, 'latin1');
    };
    /**
     * The replies owed, in the order of the commands (a client may send several in one write,
     * EPSV and STOR: replies come in that order, as from a server). A forwarded command's slot
     * takes the server's lines up to its final reply; a refused one holds the proxy's own reply.
     */
    type Slot = { server: true; lines: string[]; done: boolean } | { server: false; act: () => void };
    const slots: Slot[] = [];
    const out = (line: string) => (session.held ? session.held.push(line) : toClient(line));
    const flush = () => {
      while (slots.length > 0) {
        const head = slots[0]!;
        if (head.server) {
          for (const line of head.lines.splice(0)) out(line);
          if (!head.done) return;
          slots.shift();
        } else {
          slots.shift();
          head.act();
        }
      }
    };
    const answer = (act: () => void) => {
      slots.push({ server: false, act });
      flush();
    };
    /** After a refusal with `hangUp`: nothing more is forwarded. */
    let hungUp = false;
    /** After the command `dropAfter` matches: commands are recorded, never answered. */
    let dropping = false;
    let fromServer = '';
    let fromClient = '';
    // Replies are rewritten line by line, in order; passive replies get the proxy's own data port.
    let chain = Promise.resolve();
    up.on('data', (chunk: Buffer) => {
      fromServer += chunk.toString('latin1');
      chain = chain.then(async () => {
        let i: number;
        while ((i = fromServer.indexOf('\n')) >= 0) {
          let line = fromServer.slice(0, i + 1);
          fromServer = fromServer.slice(i + 1);
          const pasv = /^227 .*?\((\d+),(\d+),(\d+),(\d+),(\d+),(\d+)\)/.exec(line);
          const epsv = /^229 .*?\(\|\|\|(\d+)\|\)/.exec(line);
          if (pasv) {
            const port = await dataListener(Number(pasv[5]) * 256 + Number(pasv[6]), session);
            line = `227 Entering Passive Mode (127,0,0,1,${port >> 8},${port & 255}).\r\n`;
          } else if (epsv) {
            const port = await dataListener(Number(epsv[1]), session);
            line = `229 Extended Passive mode OK (|||${port}|)\r\n`;
          }
          // The greeting, or a reply no command waits for (421 before hanging up), goes at once.
          const slot = slots.find((x): x is Extract<Slot, { server: true }> => x.server && !x.done);
          if (!slot) {
            out(line);
            continue;
          }
          slot.lines.push(line);
          if (/^[2-5]\d\d /.test(line)) slot.done = true;
          flush();
        }
      });
    });
    client.on('data', (chunk: Buffer) => {
      const inChunk: string[] = [];
      fromClient += chunk.toString('latin1');
      let i: number;
      while ((i = fromClient.indexOf('\n')) >= 0) {
        const line = fromClient.slice(0, i + 1);
        fromClient = fromClient.slice(i + 1);
        const [verb = '', arg = ''] = line.trim().split(/\s+/);
        const name = verb.toUpperCase() === 'OPTS' ? `OPTS ${arg.toUpperCase()}` : verb.toUpperCase();
        commands.push(name);
        inChunk.push(name);
        if (dropping || hungUp) continue;
        if (session.held) {
          // Still "reading the upload": this command is refused, then the upload's reply follows.
          client.write('500 Unknown command\r\n');
          session.rewrite = true;
          for (const held of session.held.splice(0)) toClient(held);
          session.held = undefined;
          continue;
        }
        if (refuseStor && /^STOR /i.test(line)) {
          refuseStor = false;
          stats.refused++;
          answer(() => client.write("425 Can't open data connection.\r\n"));
          continue;
        }
        const refusal = refusals.find(([re]) => re.test(line));
        if (refusal) {
          stats.refused++;
          answer(() => {
            client.write(`${refusal[1]}\r\n`);
            if (refusal[2].hangUp) {
              client.end();
              up.destroy();
            }
          });
          if (refusal[2].hangUp) hungUp = true;
          continue;
        }
        slots.push({ server: true, lines: [], done: false });
        up.write(line, 'latin1');
        if (dropAfter?.test(line)) dropping = true;
      }
      if (inChunk.length > 0) chunks.push(inChunk.join(' + '));
    });
    client.on('close', () => up.destroy());
    up.on('close', () => client.destroy());
  });
  servers.add(control);
  const port = await listen(control);

  return {
    host: '127.0.0.1',
    port,
    stats,
    cutNextUpload(afterBytes, opts = {}) {
      cutAfter = afterBytes;
      cutBusy = opts.serverBusy ?? false;
    },
    refuseNextStor() {
      refuseStor = true;
    },
    resetNextDataConnection() {
      refuseData = true;
    },
    refuseAlways(command, reply, opts = {}) {
      refusals.push([command, reply, opts]);
    },
    dropAfter(command) {
      dropAfter = command;
    },
    async close() {
      for (const s of sockets) s.destroy();
      await Promise.all([...servers].map((s) => new Promise((r) => s.close(r))));
    },
  };
}
