/**
 * Process-wide redaction of secrets. Every secret medsync decrypts or receives (passwords, keys,
 * tokens) is registered here, and every error message, event payload and log line passes through
 * {@link redact} before it leaves the SDK.
 */
const secrets = new Set<string>();

/** Registers a value that must never appear in messages. Values shorter than 4 characters are ignored. */
export function registerSecret(value: string | undefined | null): void {
  if (value && value.length >= 4) secrets.add(value);
}

/** Replaces every registered secret, and the password part of URLs, with `***`. */
export function redact(text: string): string {
  // A password may hold quotes, or "/" and "@" (unencoded): the first pass takes one without
  // "/" and "@", the second one up to the URL's last "@" (a path with an "@" is hidden along with
  // it: too much hidden beats a password shown).
  let out = text
    .replace(/(\b[a-z][a-z0-9+.-]*:\/\/[^:/@\s]*:)[^@\s/]+@/gi, '$1***@')
    .replace(/(\b[a-z][a-z0-9+.-]*:\/\/[^:/@\s"'<>]*:)[^\s"'<>]*@/gi, '$1***@');
  for (const s of secrets) {
    if (out.includes(s)) out = out.split(s).join('***');
  }
  return out;
}

/** Deep-copies plain data, redacting strings and dropping keys that look like secrets. */
export function redactValue<T>(value: T): T {
  return redactInner(value, 0) as T;
}

const SECRET_KEY = /pass(word)?|secret|token|private.?key|credential|api.?key/i;

function redactInner(v: unknown, depth: number): unknown {
  if (typeof v === 'string') return redact(v);
  if (depth > 8 || v === null || typeof v !== 'object') return v;
  if (Array.isArray(v)) return v.map((x) => redactInner(x, depth + 1));
  if (v instanceof Date) return v;
  if (v instanceof Error) {
    // Its message may hold a secret (a library's error echoing a URL); its stack, paths.
    const code = (v as { code?: unknown }).code;
    return { name: v.name, message: redact(v.message), ...(code !== undefined ? { code } : {}) };
  }
  const out: Record<string, unknown> = {};
  for (const [k, x] of Object.entries(v)) {
    out[k] =
      SECRET_KEY.test(k) && x !== undefined && x !== null && x !== '' ? '***' : redactInner(x, depth + 1);
  }
  return out;
}
