/**
 * The digest program's life on one SFTP session, with a scripted SSH client in place of ssh2's
 * (the real program and server are covered in sftp.servers.test.ts and sftp-digest-command.test.ts):
 * what a refused channel, a silent one, noise before the banner and a connection lost meanwhile
 * each do to this upload's digest and to the next.
 */
import { EventEmitter } from 'node:events';
import type { Client, SFTPWrapper } from 'ssh2';
import { describe, expect, it } from 'vitest';
import { SftpSession } from '../src/sftp/session.js';

const EMPTY = 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855';
const HEX = 'a'.repeat(64);

class FakeChannel extends EventEmitter {
  readonly stderr = { resume: () => undefined };
  readonly lines: string[] = [];
  closed = false;
  constructor(private readonly answer: (line: string, ch: FakeChannel) => void) {
    super();
  }
  setEncoding(): void {}
  write(data: string): boolean {
    for (const line of data.split('\n').slice(0, -1)) {
      this.lines.push(line);
      this.answer(line, this);
    }
    return true;
  }
  say(text: string): void {
    setImmediate(() => this.emit('data', text));
  }
  close(): void {
    this.closed = true;
    setImmediate(() => this.emit('close'));
  }
}

/** A program that answers like the real one: its banner, then `ok <hex>` for each path. */
const program = (banner = 'medsync-digest perl\n') => {
  const ch = new FakeChannel((line, c) => c.say(`ok ${line === '/dev/null' ? EMPTY : HEX}\n`));
  ch.say(banner);
  return ch;
};

class FakeClient extends EventEmitter {
  execs = 0;
  readonly _sock = { destroyed: false };
  constructor(private readonly onExec: (cb: (err: Error | undefined, ch?: FakeChannel) => void) => void) {
    super();
  }
  exec(_cmd: string, cb: (err: Error | undefined, ch?: FakeChannel) => void): void {
    this.execs++;
    this.onExec(cb);
  }
  end(): void {
    this._sock.destroyed = true;
  }
  destroy(): void {
    this._sock.destroyed = true;
  }
}

function sessionWith(client: FakeClient, timeoutMs = 200): SftpSession {
  const info = {
    hostKey: { algorithm: 'ssh-ed25519', fingerprint: 'SHA256:x', verified: 'fingerprint' },
    extensions: [],
  };
  return new SftpSession(
    client as unknown as Client,
    new EventEmitter() as unknown as SFTPWrapper,
    info,
    timeoutMs,
  );
}

describe('the SFTP digest program on one session', () => {
  it('skips what a login shell prints before the banner, then answers each path over one channel', async () => {
    const ch = program('Welcome to the archive\nlast login: never\nmedsync-digest sha256sum\n');
    const client = new FakeClient((cb) => cb(undefined, ch));
    const s = sessionWith(client);
    expect(await s.sha256('/a/b.dcm', 10)).toBe(HEX);
    expect(await s.sha256('/a/c.dcm', 10)).toBe(HEX);
    expect(client.execs).toBe(1);
    expect(ch.lines).toEqual(['/dev/null', '/a/b.dcm', '/a/c.dcm']);
    expect(await s.digestReport()).toBe('sha256 (sha256sum on the server)');
    s.close();
  });

  it('a refused channel means this account cannot run it: no digests, said to the storage', async () => {
    const client = new FakeClient((cb) =>
      setImmediate(() => cb(new Error('(SSH) Channel open failure: open failed'))),
    );
    const s = sessionWith(client);
    expect(await s.sha256('/a/b.dcm', 10)).toBeUndefined();
    expect(s.digestsUnavailable).toBe(true);
    expect(await s.sha256('/a/c.dcm', 10)).toBeUndefined();
    expect(client.execs).toBe(1);
    expect(await s.digestReport()).toMatch(/^none \(this account cannot run commands/);
    s.close();
  });

  it('a program that never answers: no digests on this connection only, and its channel is closed', async () => {
    const silent = new FakeChannel(() => undefined);
    const client = new FakeClient((cb) => cb(undefined, silent));
    const s = sessionWith(client, 150);
    expect(await s.sha256('/a/b.dcm', 10)).toBeUndefined();
    expect(s.digestsUnavailable).toBe(false);
    expect(silent.closed).toBe(true);
    expect(await s.digestReport()).toMatch(/did not answer in time/);
    s.close();
  });

  it('a channel that opens after the probe gave up is closed at once', async () => {
    const late = program();
    let open!: () => void;
    const client = new FakeClient((cb) => {
      open = () => cb(undefined, late);
    });
    const s = sessionWith(client, 100);
    expect(await s.sha256('/a/b.dcm', 10)).toBeUndefined();
    open();
    expect(late.closed).toBe(true);
    s.close();
  });

  it('the connection lost during the probe fails this digest as a lost connection, not as "no digests"', async () => {
    const client = new FakeClient(() => undefined);
    const s = sessionWith(client, 5_000);
    const first = s.sha256('/a/b.dcm', 10);
    client.emit('close');
    await expect(first).rejects.toMatchObject({ level: 'client-socket' });
    expect(s.digestsUnavailable).toBe(false);
  });

  it('an answer that does not come in time closes the session (the upload is retried)', async () => {
    // Answers the probe, then never again.
    const ch = new FakeChannel((line, c) => {
      if (line === '/dev/null') c.say(`ok ${EMPTY}\n`);
    });
    ch.say('medsync-digest perl\n');
    const s = sessionWith(new FakeClient((cb) => cb(undefined, ch)), 100);
    await expect(s.sha256('/a/b.dcm', 0)).rejects.toMatchObject({ level: 'client-timeout' });
    expect(s.closed).toBe(true);
  });
});
