// Codes people compare out of band to detect a man in the middle,
// byte-compatible with client-sdk/src/verify.rs.
//
// - Safety number (pairwise): each side's fingerprint is SHA-512 over
//   `version (u16 BE) || len(key) (u32 BE) || key || len(user) (u32 BE) || user`
//   (user id as UTF-8), then FINGERPRINT_ITERATIONS rounds of
//   `SHA-512(digest || key)`; the first 30 bytes become six 5-digit groups
//   (5 bytes big-endian mod 100000 each). The two 30-digit fingerprints are
//   ordered (smaller string first), joined and shown as 12 groups of 5.
// - Epoch code (whole call): the first 8 bytes of the MLS epoch
//   authenticator big-endian (zero-padded if shorter), mod 10^16, shown as
//   4 groups of 4 digits.

/** Hash iterations per fingerprint. */
export const FINGERPRINT_ITERATIONS = 5200;
const FINGERPRINT_VERSION = 1;

function subtle(): SubtleCrypto {
  const s = globalThis.crypto?.subtle;
  if (!s) throw new Error("WebCrypto (crypto.subtle) is not available");
  return s;
}

function u32be(n: number): Uint8Array {
  return new Uint8Array([(n >>> 24) & 0xff, (n >>> 16) & 0xff, (n >>> 8) & 0xff, n & 0xff]);
}

function cat(...parts: Uint8Array[]): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** One side's 30-digit fingerprint, as a string of digits. */
export async function fingerprint(userId: string, identityKey: Uint8Array): Promise<string> {
  const user = new TextEncoder().encode(userId);
  const s = subtle();
  let digest = new Uint8Array(
    await s.digest(
      "SHA-512",
      cat(
        new Uint8Array([FINGERPRINT_VERSION >> 8, FINGERPRINT_VERSION & 0xff]),
        u32be(identityKey.length),
        identityKey,
        u32be(user.length),
        user,
      ),
    ),
  );
  for (let i = 0; i < FINGERPRINT_ITERATIONS; i++) {
    digest = new Uint8Array(await s.digest("SHA-512", cat(digest, identityKey)));
  }
  let out = "";
  for (let g = 0; g < 6; g++) {
    let v = 0n;
    for (let i = 0; i < 5; i++) v = (v << 8n) | BigInt(digest[g * 5 + i]!);
    out += (v % 100000n).toString().padStart(5, "0");
  }
  return out;
}

/** Splits a digit string into space-separated groups of `n`. */
function group(digits: string, n: number): string {
  const groups: string[] = [];
  for (let i = 0; i < digits.length; i += n) groups.push(digits.slice(i, i + n));
  return groups.join(" ");
}

/** The pairwise safety number of two identities: 12 groups of 5 digits, the same from either side. */
export async function safetyNumber(
  userA: string,
  keyA: Uint8Array,
  userB: string,
  keyB: Uint8Array,
): Promise<string> {
  const [a, b] = await Promise.all([fingerprint(userA, keyA), fingerprint(userB, keyB)]);
  const [first, second] = a <= b ? [a, b] : [b, a];
  return group(first + second, 5);
}

/** The short display code of an epoch authenticator: 4 groups of 4 digits. */
export function epochCode(epochAuthenticator: Uint8Array): string {
  let v = 0n;
  for (let i = 0; i < 8; i++) v = (v << 8n) | BigInt(epochAuthenticator[i] ?? 0);
  return group((v % 10_000_000_000_000_000n).toString().padStart(16, "0"), 4);
}
