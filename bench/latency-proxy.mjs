/**
 * A TCP proxy in front of a plain FTP server that adds a round-trip time: every chunk waits half
 * of it on its way in each direction, as on a link between two sites. The passive replies
 * (227 PASV, 229 EPSV) are rewritten to a listener of the proxy's own, so data connections take
 * the same delay. Used by `bench ftp --rtt MS` for the no-change re-run, where round trips, not
 * bandwidth, decide the time. Not for throughput: it does not hold back a fast sender.
 */
import { connect, createServer } from 'node:net';

/** Sends what `from` receives to `to`, `delay()` ms later, in order; `rewrite` may change it. */
function forward(from, to, delay, rewrite) {
  let pending = '';
  // Each chunk is scheduled once the ones before it are (a rewrite may wait for a listener).
  let chain = Promise.resolve();
  const later = (fn) => {
    const ms = delay();
    chain = chain.then(() => {
      if (ms > 0) setTimeout(fn, ms);
      else fn();
    });
  };
  from.on('data', (chunk) => {
    let out = chunk;
    if (rewrite) {
      // Whole lines only: a reply may arrive in pieces.
      pending += chunk.toString('latin1');
      const end = pending.lastIndexOf('\n') + 1;
      if (end === 0) return;
      const lines = pending.slice(0, end);
      pending = pending.slice(end);
      out = rewrite(lines);
    }
    const ms = delay();
    chain = chain
      .then(() => out)
      .then((b) => {
        const send = () => {
          if (!to.destroyed) to.write(typeof b === 'string' ? Buffer.from(b, 'latin1') : b);
        };
        if (ms > 0) setTimeout(send, ms);
        else send();
      });
  });
  from.on('end', () => later(() => to.end()));
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
 * it applies to chunks sent from then on.
 */
export async function startLatencyProxy(target, rttMs = 0) {
  let rtt = rttMs;
  const half = () => rtt / 2;
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
      const up = track(connect(upstreamPort, target.host));
      forward(client, up, half);
      forward(up, client, half);
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
    const up = track(connect(target.port, target.host));
    forward(client, up, half);
    forward(up, client, half, rewrite);
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
