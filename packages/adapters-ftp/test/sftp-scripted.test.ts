/**
 * SFTP behaviour that no OpenSSH server shows, on a scripted session: replacing a file without
 * posix-rename@openssh.com (a plain RENAME never replaces: SSH_FX_FAILURE when the target exists;
 * OpenSSH always offers posix-rename), and listings without times.
 */
import { describe, expect, it } from 'vitest';
import {
  createSftpStorage,
  SFTP_STATUS,
  SftpStatusError,
  type SftpStorage,
  type SftpStorageOptions,
} from '@medsync/adapters-ftp';

type Stat = { isDirectory(): boolean; isFile(): boolean };
const fileStat: Stat = { isDirectory: () => false, isFile: () => true };
const dirStat: Stat = { isDirectory: () => true, isFile: () => false };

/** The calls renameAbs makes on a session, over an in-memory tree. */
class ScriptedSession {
  readonly files = new Map<string, string>();
  readonly dirs = new Set<string>(['/', '/data', '/data/d']);
  /** Refuses the rename of `from` to `to` (besides the plain-rename rule). */
  refuse: (from: string, to: string) => boolean = () => false;
  has(): boolean {
    return false; // no posix-rename@openssh.com
  }
  async rename(from: string, to: string): Promise<void> {
    if (!this.files.has(from)) throw new SftpStatusError(SFTP_STATUS.NO_SUCH_FILE, 'No such file');
    if (this.files.has(to) || this.refuse(from, to))
      throw new SftpStatusError(SFTP_STATUS.FAILURE, 'Failure');
    this.files.set(to, this.files.get(from)!);
    this.files.delete(from);
  }
  async posixRename(): Promise<void> {
    throw new Error('not offered');
  }
  async lstat(p: string): Promise<Stat> {
    if (this.files.has(p)) return fileStat;
    if (this.dirs.has(p)) return dirStat;
    throw new SftpStatusError(SFTP_STATUS.NO_SUCH_FILE, 'No such file');
  }
  async stat(p: string): Promise<Stat> {
    return this.lstat(p);
  }
  async unlink(p: string): Promise<void> {
    if (!this.files.delete(p)) throw new SftpStatusError(SFTP_STATUS.NO_SUCH_FILE, 'No such file');
  }
}

/** An SFTP storage that never connects: each test scripts what its sessions answer. */
function offline(extra: Partial<SftpStorageOptions> = {}): SftpStorage {
  return createSftpStorage({
    host: '127.0.0.1',
    user: 'nobody',
    password: 'unused',
    hostFingerprint: 'SHA256:' + 'A'.repeat(43),
    root: '/data',
    ...extra,
  });
}

/** Runs the storage's session calls on `session` (a lost connection while `connected()` is false). */
function onSession(st: SftpStorage, session: object, connected = () => true): void {
  (st as unknown as { withSession: unknown }).withSession = (
    _op: string,
    _path: string | undefined,
    _signal: AbortSignal | undefined,
    fn: (s: object) => Promise<unknown>,
  ) => (connected() ? fn(session) : Promise.reject(new Error('Not connected: the SSH session was closed.')));
}

function renameOn(session: ScriptedSession, from: string, to: string): Promise<void> {
  const st = offline();
  const renameAbs = (
    st as unknown as {
      renameAbs(
        s: ScriptedSession,
        fromAbs: string,
        toAbs: string,
        fromRel: string,
        toRel: string,
      ): Promise<void>;
    }
  ).renameAbs.bind(st);
  return renameAbs(session, `/data/${from}`, `/data/${to}`, from, to);
}

describe('sftp rename over an existing file without posix-rename', () => {
  it('moves the old file aside, renames the new one in, then removes the old one', async () => {
    const s = new ScriptedSession();
    s.files.set('/data/d/.a.dcm.x1.medsync-part', 'new');
    s.files.set('/data/d/a.dcm', 'old');
    await renameOn(s, 'd/.a.dcm.x1.medsync-part', 'd/a.dcm');
    expect([...s.files]).toEqual([['/data/d/a.dcm', 'new']]);
  });

  it('puts the old file back when the new one cannot go in: the final name never goes missing', async () => {
    const s = new ScriptedSession();
    s.files.set('/data/d/.a.dcm.x1.medsync-part', 'new');
    s.files.set('/data/d/a.dcm', 'old');
    // A virus scanner holds the new file: it cannot be renamed, even to a free name.
    s.refuse = (from) => from.endsWith('.x1.medsync-part');
    await expect(renameOn(s, 'd/.a.dcm.x1.medsync-part', 'd/a.dcm')).rejects.toMatchObject({
      path: 'd/a.dcm',
    });
    expect(s.files.get('/data/d/a.dcm')).toBe('old');
    expect([...s.files.keys()].sort()).toEqual(['/data/d/.a.dcm.x1.medsync-part', '/data/d/a.dcm']);
  });
});

describe('sftp cleanupPartials on a server whose listings carry no times', () => {
  it('keeps temporary files it cannot date (they may belong to a write in progress)', async () => {
    const st = offline();
    const unlinked: string[] = [];
    const S_IFREG = 0o100000;
    const session = {
      stat: async () => dirStat,
      readdir: async () => [
        { filename: '.a.dcm.x1.medsync-part', longname: '', attrs: { mode: S_IFREG | 0o644, size: 3 } },
        {
          filename: '.b.dcm.x2.medsync-part',
          longname: '',
          attrs: { mode: S_IFREG | 0o644, size: 3, mtime: 1, atime: 1 },
        },
      ],
      unlink: async (p: string) => void unlinked.push(p),
    };
    onSession(st, session);
    expect(await st.cleanupPartials('', { olderThanMs: Date.now() - 60_000 })).toBe(1);
    expect(unlinked).toEqual(['/data/.b.dcm.x2.medsync-part']);
  });
});

describe("sftp listings from a server that leaves out the entries' types", () => {
  it('stats each untyped entry: files listed, folders walked, an unreadable one listed as size -1', async () => {
    const st = offline();
    // No `mode` in any entry's attributes (they are optional in SFTP v3).
    const tree: Record<string, Array<{ filename: string; longname: string; attrs: object }>> = {
      '/data': [
        { filename: 'a.dcm', longname: '', attrs: { size: 3, mtime: 100 } },
        { filename: 'sub', longname: '', attrs: {} },
        { filename: 'gone', longname: '', attrs: {} },
      ],
      '/data/sub': [{ filename: 'b.dcm', longname: '', attrs: { size: 5, mtime: 200 } }],
    };
    const stats: Record<string, object> = {
      '/data': dirStat,
      '/data/a.dcm': { ...fileStat, size: 3, mtime: 100 },
      '/data/sub': dirStat,
      '/data/sub/b.dcm': { ...fileStat, size: 5, mtime: 200 },
    };
    const session = {
      readdir: async (p: string) => tree[p] ?? [],
      stat: async (p: string) => {
        if (p === '/data/gone') throw new SftpStatusError(SFTP_STATUS.PERMISSION_DENIED, 'Permission denied');
        const x = stats[p];
        if (!x) throw new SftpStatusError(SFTP_STATUS.NO_SUCH_FILE, 'No such file');
        return x;
      },
    };
    onSession(st, session);
    const listed = [];
    for await (const e of st.list('')) listed.push(e);
    expect(listed.sort((x, y) => x.path.localeCompare(y.path))).toEqual([
      { path: 'a.dcm', size: 3, mtimeMs: 100_000 },
      { path: 'gone', size: -1 },
      { path: 'sub/b.dcm', size: 5, mtimeMs: 200_000 },
    ]);
  });
});

describe('sftp flush is best effort and never fails the run', () => {
  /** A storage whose sessions are scripted: `open`/`fsync` answers per folder. */
  function scripted(answer: {
    open?: (d: string) => Error | undefined;
    fsync?: (d: string) => Error | undefined;
  }) {
    const st = offline();
    const synced: string[] = [];
    let connected = true;
    const session = {
      has: () => true,
      open: async (d: string) => {
        const e = answer.open?.(d);
        if (e) throw e;
        return Buffer.from(d);
      },
      fsync: async (h: Buffer) => {
        const e = answer.fsync?.(h.toString());
        if (e) throw e;
        synced.push(h.toString());
      },
      closeHandle: async () => undefined,
    };
    onSession(st, session, () => connected);
    const dirty = (st as unknown as { dirty: Set<string> }).dirty;
    return { st, synced, dirty, setConnected: (c: boolean) => (connected = c) };
  }

  it('skips a folder the server will not open; stops for good where folders cannot be fsynced', async () => {
    const denied = scripted({
      open: (d) =>
        d.endsWith('/drop') ? new SftpStatusError(SFTP_STATUS.PERMISSION_DENIED, 'denied') : undefined,
    });
    denied.dirty.add('/data/drop').add('/data/a');
    await denied.st.flush();
    expect(denied.synced).toEqual(['/data/a']);
    denied.dirty.add('/data/b');
    await denied.st.flush();
    expect(denied.synced).toEqual(['/data/a', '/data/b']);

    // EINVAL from fsync on a folder (a file system that cannot) comes as BAD_MESSAGE.
    const einval = scripted({ fsync: () => new SftpStatusError(SFTP_STATUS.BAD_MESSAGE, 'Bad message') });
    einval.dirty.add('/data/a');
    await expect(einval.st.flush()).resolves.toBeUndefined();
    einval.dirty.add('/data/b');
    await einval.st.flush();
    expect(einval.dirty.size).toBe(0);
  });

  it('a lost connection keeps the folders for the next call', async () => {
    const s = scripted({});
    s.dirty.add('/data/a');
    s.setConnected(false);
    await expect(s.st.flush()).resolves.toBeUndefined();
    expect([...s.dirty]).toEqual(['/data/a']);
    s.setConnected(true);
    await s.st.flush();
    expect(s.synced).toEqual(['/data/a']);
  });
});

describe('sftp test() on a server that refuses the probe write', () => {
  it('reports the folder as not writable and closes the probe handle', async () => {
    const st = offline({ serverDigest: false });
    const open = new Set<string>();
    const session = {
      has: () => false,
      stat: async () => dirStat,
      readdir: async () => [],
      open: async (p: string) => (open.add(p), Buffer.from(p)),
      write: async () => {
        throw new SftpStatusError(SFTP_STATUS.FAILURE, 'No space left on device');
      },
      closeHandle: async (h: Buffer) => void open.delete(h.toString()),
      unlink: async () => undefined,
      info: { hostKey: {}, extensions: [] },
    };
    onSession(st, session);
    const report = await st.test();
    expect(report).toMatchObject({ ok: true, writable: false });
    expect(open.size).toBe(0);
  });
});

describe('sftp read() cancelled while the server has not answered the open', () => {
  it('ends at once with E_ABORTED (the session is closed: SFTP cannot cancel one request)', async () => {
    const st = offline();
    let fail: ((e: Error) => void) | undefined;
    const session = {
      closed: false,
      // A server that never answers this OPEN.
      open: () => new Promise<Buffer>((_resolve, reject) => (fail = reject)),
      close() {
        this.closed = true;
        fail?.(new Error('Not connected: the SSH session was closed.'));
      },
      closeHandle: async () => undefined,
    };
    let released: boolean | undefined;
    (st as unknown as { pool: unknown }).pool = {
      acquire: async () => ({ conn: session, reused: false }),
      release: (_s: unknown, broken?: boolean) => void (released = broken),
    };
    const ac = new AbortController();
    const reading = st.read('a.dcm', { signal: ac.signal });
    await new Promise((r) => setTimeout(r, 20));
    ac.abort();
    await expect(reading).rejects.toMatchObject({ code: 'E_ABORTED' });
    expect(session.closed).toBe(true);
    expect(released).toBe(true);
  });
});
