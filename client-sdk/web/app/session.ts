// What the app remembers between page loads:
// - the session token, in sessionStorage (per tab; tokens live 15 minutes),
// - this browser's device id and the camera/microphone choices, in localStorage.

export interface Session {
  token: string;
  userId: string;
  /** What to call this user on screen: the username typed at sign-in (user ids can be opaque). */
  name: string;
  /** "guest" sessions come from an invitation and may join only `call`. */
  kind: "user" | "guest";
  /** For guests: the one call the token admits. */
  call: string | null;
  /** Milliseconds since the epoch. */
  expiresAt: number;
}

const SESSION_KEY = "conclave.session";
const DEVICE_KEY = "conclave.device";
const PREFS_KEY = "conclave.joinPrefs";
/** How long tokens live when the token itself does not say. */
const TOKEN_LIFETIME_MS = 15 * 60 * 1000;
/** Treat a token as expired a little early, so a request never races its expiry. */
const EXPIRY_MARGIN_MS = 20 * 1000;

/** The claims we read from a session JWT. We never verify it: the server does. */
interface Claims {
  sub?: string;
  kind?: string;
  exp?: number;
  call?: string;
}

function claims(token: string): Claims {
  try {
    const part = token.split(".")[1] ?? "";
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const json = atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4));
    const value: unknown = JSON.parse(json);
    return typeof value === "object" && value !== null ? (value as Claims) : {};
  } catch {
    return {};
  }
}

/** Builds and stores a session from a token the server just issued. */
export function saveSession(token: string, userId: string, name = userId): Session {
  const c = claims(token);
  const session: Session = {
    token,
    userId,
    name,
    kind: c.kind === "guest" ? "guest" : "user",
    call: typeof c.call === "string" ? c.call : null,
    expiresAt: typeof c.exp === "number" ? c.exp * 1000 : Date.now() + TOKEN_LIFETIME_MS,
  };
  try {
    sessionStorage.setItem(SESSION_KEY, JSON.stringify(session));
  } catch {
    // Storage can be disabled (private modes); the session then lasts this page.
  }
  return session;
}

/** The stored session if it has not expired. */
export function loadSession(): Session | null {
  let raw: string | null = null;
  try {
    raw = sessionStorage.getItem(SESSION_KEY);
  } catch {
    return null;
  }
  if (!raw) return null;
  try {
    const s = JSON.parse(raw) as Session;
    if (typeof s.token !== "string" || typeof s.userId !== "string") throw new Error("bad session");
    if (typeof s.name !== "string") s.name = s.userId;
    if (!sessionValid(s)) {
      clearSession();
      return null;
    }
    return s;
  } catch {
    clearSession();
    return null;
  }
}

export function sessionValid(s: Session): boolean {
  return s.expiresAt - EXPIRY_MARGIN_MS > Date.now();
}

export function clearSession(): void {
  try {
    sessionStorage.removeItem(SESSION_KEY);
  } catch {
    // nothing stored
  }
}

const DEVICE_POOL_KEY = "conclave.devices";

function newDeviceId(): string {
  const alphabet = "abcdefghijkmnpqrstuvwxyz23456789";
  const bytes = crypto.getRandomValues(new Uint8Array(10));
  let id = "web-";
  for (const b of bytes) id += alphabet[b % alphabet.length];
  return id;
}

/** Takes the Web Lock named for `id` if no other tab holds it, and keeps it until this tab closes. */
function tryClaim(id: string): Promise<boolean> {
  return new Promise((resolve) => {
    navigator.locks
      .request(`conclave.device.${id}`, { ifAvailable: true }, (lock) => {
        resolve(lock !== null);
        // Held for the life of the tab.
        return lock ? new Promise<void>(() => {}) : undefined;
      })
      .catch(() => resolve(false));
  });
}

let claimed: Promise<string> | null = null;

/**
 * This tab's device id. Each open tab is its own device (the server admits a
 * device to a call once), so tabs share a pool of ids kept in localStorage
 * and each claims a free one with a Web Lock: one tab always gets the same
 * id (and so the same identity key and safety numbers), a second tab open at
 * the same time gets the next one. Without Web Locks, one id per browser.
 */
export function claimDeviceId(): Promise<string> {
  claimed ??= (async () => {
    if (!("locks" in navigator)) return deviceId();
    let pool: string[] = [];
    try {
      const parsed: unknown = JSON.parse(localStorage.getItem(DEVICE_POOL_KEY) ?? "[]");
      if (Array.isArray(parsed)) pool = parsed.filter((x): x is string => typeof x === "string" && isValidId(x));
    } catch {
      pool = [];
    }
    const legacy = localStorage.getItem(DEVICE_KEY);
    if (legacy && isValidId(legacy) && !pool.includes(legacy)) pool.unshift(legacy);
    for (const id of pool) if (await tryClaim(id)) return id;
    const id = newDeviceId();
    pool.push(id);
    try {
      localStorage.setItem(DEVICE_POOL_KEY, JSON.stringify(pool.slice(-16)));
    } catch {
      // not persisted: a new device id next time
    }
    await tryClaim(id);
    return id;
  })();
  return claimed;
}

/** This browser's device id: generated once, then kept in localStorage. */
export function deviceId(): string {
  try {
    const existing = localStorage.getItem(DEVICE_KEY);
    if (existing && isValidId(existing)) return existing;
  } catch {
    // fall through to a fresh id
  }
  const alphabet = "abcdefghijkmnpqrstuvwxyz23456789";
  const bytes = crypto.getRandomValues(new Uint8Array(10));
  let id = "web-";
  for (const b of bytes) id += alphabet[b % alphabet.length];
  try {
    localStorage.setItem(DEVICE_KEY, id);
  } catch {
    // not persisted: a new device id next time
  }
  return id;
}

export interface JoinPrefs {
  audio: boolean;
  video: boolean;
}

export function loadPrefs(): JoinPrefs {
  try {
    const p = JSON.parse(localStorage.getItem(PREFS_KEY) ?? "{}") as Partial<JoinPrefs>;
    return { audio: p.audio !== false, video: p.video !== false };
  } catch {
    return { audio: true, video: true };
  }
}

export function savePrefs(p: JoinPrefs): void {
  try {
    localStorage.setItem(PREFS_KEY, JSON.stringify(p));
  } catch {
    // not persisted
  }
}

/** Ids (call ids, user and device ids): 1–128 characters of `[A-Za-z0-9._@+-]`. */
export function isValidId(id: string): boolean {
  return /^[A-Za-z0-9._@+-]{1,128}$/.test(id);
}

/** Why `name` is not a valid call name, in words, or null when it is. */
export function callNameProblem(name: string): string | null {
  if (name.length === 0) return "Enter a call name.";
  if (name.length > 128) return `Call names can be at most 128 characters (this one has ${name.length}).`;
  const bad = [...new Set(name.replace(/[A-Za-z0-9._@+-]/g, ""))];
  if (bad.length === 0) return null;
  const shown = bad.map((c) => (c === " " ? "spaces" : `“${c}”`)).join(", ");
  return `Call names can use letters, digits and . _ @ + - only, not ${shown}.`;
}

/** A valid call name close to what someone typed: "Team standup" → "Team-standup". */
export function suggestCallName(name: string): string {
  return name
    .trim()
    .replace(/\s+/g, "-")
    .replace(/[^A-Za-z0-9._@+-]/g, "")
    .slice(0, 128);
}
