/**
 * A TCP proxy in front of a server (plain FTP, or SSH) that adds a round-trip time: every chunk
 * waits half of it on its way in each direction, and a new connection one more before anything
 * passes, as on a link between two sites. For FTP, the passive replies (227 PASV, 229 EPSV) are
 * rewritten to a listener of the proxy's own, so data connections take the same delay. Used by
 * `bench ftp|sftp --rtt MS` for the no-change re-run, where round trips, not bandwidth, decide the
 * time. Not for throughput: it does not hold back a fast sender.
 */
import { connect, createServer } from 'node:net';
import { performance } from 'node:perf_hooks';

/**
 * Sends what `from` receives to `to` half a round trip later, in order; `rewrite` may change it
 * (and may wait, for a data listener). Nothing arrives before `first` round trips after
 * `openedAt`: on a real link the handshake takes a round trip before the client can send (its
 * first bytes arrive after 1.5) and the server accepts only after 1.5 (its first bytes, a greeting,
 * arrive after 2), which the proxy's own accept does not charge.
 */
function forward(from, to, rtt, openedAt, first, rewrite) {
  let pending = '';
  const queue = [];
  let timer;
  const pump = () => {
    timer = undefined;
    while (queue.length > 0 && queue[0].due <= performance.now()) queue.shift().fn();
    if (queue.length > 0) timer = setTimeout(pump, Math.max(0, queue[0].due - performance.now()));
  };
  const later = (fn) => {
    const now = performance.now();
    const last = queue.length > 0 ? queue[queue.length - 1].due : 0;
    queue.push({ due: Math.max(now + rtt() / 2, openedAt + rtt() * first, last), fn });
    if (timer === undefined) timer = setTimeout(pump, Math.max(0, queue[0].due - now));
  };
  // Chunks are queued in arrival order, each once its rewrite (if any) is done.
  let chain = Promise.resolve();
  from.on('data', (chunk) => {
    let out = chunk;
    if (rewrite) {
      // Whole lines only: a reply may arrive in pieces.
      pending += chunk.toString('latin1');
      const end = pending.lastIndexOf('\n') + 1;
      if (end === 0) return;
      const lines = pending.slice(0, end);
      pending = pending.slice(end);
      out = rewrite(lines).then((text) => Buffer.from(text, 'latin1'));
    }
    chain = chain
      .then(() => out)
      .then((b) => later(() => to.destroyed || to.write(b)))
      .catch(() => to.destroy());
  });
  from.on('end', () => {
    chain = chain.then(() => later(() => to.end()));
  });
  // A reset (not an orderly end) is passed on at once.
  from.on('close', (hadError) => hadError && to.destroy());
  from.on('error', () => to.destroy());
}

function listen(server) {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve(server.address().port));
  });
}

/**
 * Starts the proxy for `target` ({ host, port }). `rttMs` may be changed later with `setRtt`;
 * it applies to chunks sent from then on. `ftp`: rewrite the passive replies of an FTP control
 * connection (else the bytes pass as they are: SSH, SFTP).
 */
export async function startLatencyProxy(target, { rttMs = 0, ftp = false } = {}) {
  let rtt = rttMs;
  const getRtt = () => rtt;
  const sockets = new Set();
  const servers = new Set();
  const track = (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
    return s;
  };
  const dataListener = async (upstreamPort) => {
    const srv = createServer((client) => {
      srv.close();
      servers.delete(srv);
      track(client);
      const openedAt = performance.now();
      const up = track(connect(upstreamPort, target.host));
      forward(client, up, getRtt, openedAt, 1.5);
      forward(up, client, getRtt, openedAt, 2);
    });
    servers.add(srv);
    return listen(srv);
  };
  const rewrite = async (lines) => {
    let out = '';
    for (const line of lines.split(/(?<=\n)/)) {
      const pasv = /^227 .*?\((\d+),(\d+),(\d+),(\d+),(\d+),(\d+)\)/.exec(line);
      const epsv = /^229 .*?\(\|\|\|(\d+)\|\)/.exec(line);
      if (pasv) {
        const port = await dataListener(Number(pasv[5]) * 256 + Number(pasv[6]));
        out += `227 Entering Passive Mode (127,0,0,1,${port >> 8},${port & 255}).\r\n`;
      } else if (epsv) {
        const port = await dataListener(Number(epsv[1]));
        out += `229 Entering Extended Passive Mode (|||${port}|)\r\n`;
      } else out += line;
    }
    return out;
  };
  const control = createServer((client) => {
    track(client);
    const openedAt = performance.now();
    const up = track(connect(target.port, target.host));
    forward(client, up, getRtt, openedAt, 1.5);
    forward(up, client, getRtt, openedAt, 2, ftp ? rewrite : undefined);
  });
  servers.add(control);
  const port = await listen(control);
  return {
    host: '127.0.0.1',
    port,
    setRtt(ms) {
      rtt = ms;
    },
    async close() {
      for (const s of sockets) s.destroy();
      await Promise.all([...servers].map((s) => new Promise((r) => s.close(() => r()))));
    },
  };
}
