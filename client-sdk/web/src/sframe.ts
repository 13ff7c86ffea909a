// SFrame (RFC 9605): end-to-end protection of media frames, byte-compatible
// with the Rust implementation in protocol/src/sframe/.
//
// Wire layout of a protected media frame:
//
//   | clear codec prefix | SFrame header | ciphertext | tag |
//
// The clear prefix (VP8: 10 bytes on a key frame, 3 on a delta frame; Opus:
// none) stays readable for packetizers and the SFU and is bound as the SFrame
// metadata: the AEAD's AAD is `header || prefix`.
//
// KIDs and counters are unsigned 64-bit values and are handled as bigint.

/** Why a frame could not be protected or unprotected (mirrors Rust's `SframeError`). */
export type SframeErrorCode =
  | "TruncatedHeader"
  | "TruncatedFrame"
  | "FrameTooLarge"
  | "MetadataTooLong"
  | "UnknownKid"
  | "AuthenticationFailed"
  | "Replayed"
  | "TooOld"
  | "CounterExhausted"
  | "UnsupportedSuite"
  | "BadKeyLength"
  | "KidOverflow"
  | "NoEpoch";

export class SframeError extends Error {
  readonly code: SframeErrorCode;
  constructor(code: SframeErrorCode, message?: string) {
    super(message ?? code);
    this.name = "SframeError";
    this.code = code;
  }
}

const U64_MAX = (1n << 64n) - 1n;

/** The longest header: one config byte, an 8-byte KID and an 8-byte CTR. */
export const MAX_HEADER_LEN = 17;
/** The longest metadata (clear prefix) a frame may bind. */
export const MAX_METADATA_LEN = 64;
/** The largest frame accepted (16 MiB). */
export const MAX_FRAME_LEN = 16 << 20;
/** Nonce length in bytes, the same for every suite. */
export const NONCE_LEN = 12;
/** The largest authentication tag of any suite. */
export const MAX_TAG_LEN = 16;
/** Bytes SFrame adds to a frame at most: the longest header and tag. */
export const MAX_OVERHEAD = MAX_HEADER_LEN + MAX_TAG_LEN;

function toU64(v: bigint | number, what: string): bigint {
  const b = typeof v === "bigint" ? v : BigInt(v);
  if (b < 0n || b > U64_MAX) {
    throw new RangeError(`${what} must be an unsigned 64-bit integer`);
  }
  return b;
}

// ---------------------------------------------------------------------------
// Header (RFC 9605 §4.3)
//
//  0 1 2 3 4 5 6 7
// +-+-+-+-+-+-+-+-+------------------------+------------------------+
// |X|  K  |Y|  C  |   KID... (length=K+1)  |   CTR... (length=C+1)  |
// +-+-+-+-+-+-+-+-+------------------------+------------------------+
//
// A value below 8 is carried in the config byte itself; otherwise the config
// byte holds its length minus one and the value follows big-endian, minimal.

/** A decoded SFrame header. */
export interface Header {
  kid: bigint;
  ctr: bigint;
}

/** Number of bytes needed to write `v` big-endian without leading zeros (at least 1). */
function minLen(v: bigint): number {
  let n = 1;
  while (v > 0xffn) {
    v >>= 8n;
    n++;
  }
  return n;
}

/** Config-byte bits and the number of extra bytes for one field. */
function field(v: bigint): [number, number] {
  if (v < 8n) return [Number(v), 0];
  const len = minLen(v);
  return [0x08 | (len - 1), len];
}

function putBe(v: bigint, len: number, out: Uint8Array, at: number): void {
  for (let i = len - 1; i >= 0; i--) {
    out[at + i] = Number(v & 0xffn);
    v >>= 8n;
  }
}

function getBe(buf: Uint8Array, at: number, len: number): bigint {
  let v = 0n;
  for (let i = 0; i < len; i++) v = (v << 8n) | BigInt(buf[at + i]!);
  return v;
}

/** Length of the header of (`kid`, `ctr`) once encoded. */
export function headerLen(kid: bigint | number, ctr: bigint | number): number {
  return 1 + field(toU64(kid, "KID"))[1] + field(toU64(ctr, "CTR"))[1];
}

/** Encodes an SFrame header. */
export function encodeHeader(kid: bigint | number, ctr: bigint | number): Uint8Array {
  const k = toU64(kid, "KID");
  const c = toU64(ctr, "CTR");
  const [kBits, kLen] = field(k);
  const [cBits, cLen] = field(c);
  const out = new Uint8Array(1 + kLen + cLen);
  out[0] = (kBits << 4) | cBits;
  putBe(k, kLen, out, 1);
  putBe(c, cLen, out, 1 + kLen);
  return out;
}

/** Decodes a header from the front of `buf`; returns it and its encoded length. */
export function decodeHeader(buf: Uint8Array): { header: Header; length: number } {
  if (buf.length < 1) throw new SframeError("TruncatedHeader");
  const config = buf[0]!;
  const kidField = config >> 4;
  const ctrField = config & 0x0f;
  const kidLen = kidField & 0x08 ? (kidField & 0x07) + 1 : 0;
  const ctrLen = ctrField & 0x08 ? (ctrField & 0x07) + 1 : 0;
  if (buf.length - 1 < kidLen + ctrLen) throw new SframeError("TruncatedHeader");
  const kid = kidLen === 0 ? BigInt(kidField) : getBe(buf, 1, kidLen);
  const ctr = ctrLen === 0 ? BigInt(ctrField) : getBe(buf, 1 + kidLen, ctrLen);
  return { header: { kid, ctr }, length: 1 + kidLen + ctrLen };
}

// ---------------------------------------------------------------------------
// Cipher suites (RFC 9605 §4.5) and key derivation (§4.4.2)

/** SFrame cipher suites (RFC 9605 §8.1 registry). */
export const CipherSuite = {
  AES_128_CTR_HMAC_SHA256_80: 0x0001,
  AES_128_CTR_HMAC_SHA256_64: 0x0002,
  AES_128_CTR_HMAC_SHA256_32: 0x0003,
  AES_128_GCM_SHA256_128: 0x0004,
  /** Conclave's default. */
  AES_256_GCM_SHA512_128: 0x0005,
} as const;
export type CipherSuite = (typeof CipherSuite)[keyof typeof CipherSuite];

/** Conclave's default suite, AES_256_GCM_SHA512_128. */
export const DEFAULT_SUITE: CipherSuite = CipherSuite.AES_256_GCM_SHA512_128;

interface SuiteParams {
  /** AEAD.Nk: length of sframe_key (and of the MLS-exported base key). */
  keyLen: number;
  /** AEAD.Nt: tag length. */
  tagLen: number;
  /** KDF hash. */
  hash: "SHA-256" | "SHA-512";
  gcm: boolean;
}

const SUITES: Record<number, SuiteParams> = {
  0x0001: { keyLen: 48, tagLen: 10, hash: "SHA-256", gcm: false },
  0x0002: { keyLen: 48, tagLen: 8, hash: "SHA-256", gcm: false },
  0x0003: { keyLen: 48, tagLen: 4, hash: "SHA-256", gcm: false },
  0x0004: { keyLen: 16, tagLen: 16, hash: "SHA-256", gcm: true },
  0x0005: { keyLen: 32, tagLen: 16, hash: "SHA-512", gcm: true },
};

function params(suite: number): SuiteParams {
  const p = SUITES[suite];
  if (!p) throw new SframeError("UnsupportedSuite", `unsupported SFrame cipher suite ${suite}`);
  return p;
}

/** Looks a suite up by its registry value. */
export function suiteFromId(id: number): CipherSuite {
  params(id);
  return id as CipherSuite;
}

/** AEAD.Nk of `suite`. */
export function suiteKeyLen(suite: CipherSuite): number {
  return params(suite).keyLen;
}

/** AEAD.Nt of `suite`. */
export function suiteTagLen(suite: CipherSuite): number {
  return params(suite).tagLen;
}

function subtle(): SubtleCrypto {
  const s = globalThis.crypto?.subtle;
  if (!s) throw new Error("WebCrypto (crypto.subtle) is not available");
  return s;
}

const enc = new TextEncoder();

function concat(...parts: Uint8Array[]): Uint8Array {
  let n = 0;
  for (const p of parts) n += p.length;
  const out = new Uint8Array(n);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

function u64be(v: bigint): Uint8Array {
  const out = new Uint8Array(8);
  putBe(v, 8, out, 0);
  return out;
}

/** `prefix || KID (u64 BE) || suite (u16 BE)`. */
function label(prefix: string, kid: bigint, suite: CipherSuite): Uint8Array {
  return concat(enc.encode(prefix), u64be(kid), new Uint8Array([suite >> 8, suite & 0xff]));
}

/** The key-derivation labels of (`suite`, `kid`), as RFC 9605 §4.4.2 defines them. */
export function derivationLabels(
  suite: CipherSuite,
  kid: bigint | number,
): { keyLabel: Uint8Array; saltLabel: Uint8Array } {
  const k = toU64(kid, "KID");
  return {
    keyLabel: label("SFrame 1.0 Secret key ", k, suite),
    saltLabel: label("SFrame 1.0 Secret salt ", k, suite),
  };
}

/** Copies into a fresh ArrayBuffer-backed array (what WebCrypto's types want). */
function buf(b: Uint8Array): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(b.length);
  out.set(b);
  return out;
}

async function hkdf(
  hash: "SHA-256" | "SHA-512",
  ikm: Uint8Array,
  infos: Uint8Array[],
  lens: number[],
): Promise<Uint8Array[]> {
  const s = subtle();
  const base = await s.importKey("raw", buf(ikm), "HKDF", false, ["deriveBits"]);
  const out: Uint8Array[] = [];
  for (let i = 0; i < infos.length; i++) {
    const bits = await s.deriveBits(
      { name: "HKDF", hash, salt: new Uint8Array(0), info: buf(infos[i]!) },
      base,
      lens[i]! * 8,
    );
    out.push(new Uint8Array(bits));
  }
  return out;
}

/**
 * Derives `sframe_key` and `sframe_salt` for `kid` from `baseKey`:
 * `HKDF-Extract("", base_key)`, then `HKDF-Expand` with the labels
 * `"SFrame 1.0 Secret key " || KID || suite` and `"... salt " || KID || suite`.
 */
export async function deriveKeySalt(
  suite: CipherSuite,
  kid: bigint | number,
  baseKey: Uint8Array,
): Promise<{ key: Uint8Array; salt: Uint8Array }> {
  const p = params(suite);
  const { keyLabel, saltLabel } = derivationLabels(suite, kid);
  const [key, salt] = await hkdf(p.hash, baseKey, [keyLabel, saltLabel], [p.keyLen, NONCE_LEN]);
  return { key: key!, salt: salt! };
}

/** A keyed AEAD of one suite. */
export class AeadKey {
  readonly suite: CipherSuite;
  private readonly params: SuiteParams;
  private readonly gcmKey?: CryptoKey;
  private readonly ctrKey?: CryptoKey;
  private readonly macKey?: CryptoKey;

  private constructor(
    suite: CipherSuite,
    keys: { gcm?: CryptoKey; ctr?: CryptoKey; mac?: CryptoKey },
  ) {
    this.suite = suite;
    this.params = params(suite);
    this.gcmKey = keys.gcm;
    this.ctrKey = keys.ctr;
    this.macKey = keys.mac;
  }

  /** Keys the suite's AEAD with `key` (AEAD.Nk bytes). */
  static async create(suite: CipherSuite, key: Uint8Array): Promise<AeadKey> {
    const p = params(suite);
    if (key.length !== p.keyLen) {
      throw new SframeError("BadKeyLength", `key must be ${p.keyLen} bytes, got ${key.length}`);
    }
    const s = subtle();
    if (p.gcm) {
      const gcm = await s.importKey("raw", buf(key), "AES-GCM", false, ["encrypt", "decrypt"]);
      return new AeadKey(suite, { gcm });
    }
    // RFC 9605 §4.5.1: the first 16 bytes key AES-CTR, the rest HMAC-SHA256.
    const ctr = await s.importKey("raw", buf(key.subarray(0, 16)), "AES-CTR", false, [
      "encrypt",
      "decrypt",
    ]);
    const mac = await s.importKey(
      "raw",
      buf(key.subarray(16)),
      { name: "HMAC", hash: "SHA-256" },
      false,
      ["sign"],
    );
    return new AeadKey(suite, { ctr, mac });
  }

  private async ctrHmacTag(nonce: Uint8Array, aad: Uint8Array, ct: Uint8Array): Promise<Uint8Array> {
    const authData = concat(
      u64be(BigInt(aad.length)),
      u64be(BigInt(ct.length)),
      u64be(BigInt(this.params.tagLen)),
      nonce,
      aad,
      ct,
    );
    const full = new Uint8Array(await subtle().sign("HMAC", this.macKey!, buf(authData)));
    return full.subarray(0, this.params.tagLen);
  }

  private async ctrKeystream(nonce: Uint8Array, data: Uint8Array): Promise<Uint8Array> {
    const counter = new Uint8Array(16);
    counter.set(nonce);
    return new Uint8Array(
      await subtle().encrypt({ name: "AES-CTR", counter, length: 32 }, this.ctrKey!, buf(data)),
    );
  }

  /** Encrypts `plaintext`; returns `ciphertext || tag`. */
  async seal(nonce: Uint8Array, aad: Uint8Array, plaintext: Uint8Array): Promise<Uint8Array> {
    if (this.gcmKey) {
      return new Uint8Array(
        await subtle().encrypt(
          { name: "AES-GCM", iv: buf(nonce), additionalData: buf(aad), tagLength: 128 },
          this.gcmKey,
          buf(plaintext),
        ),
      );
    }
    const ct = await this.ctrKeystream(nonce, plaintext);
    return concat(ct, await this.ctrHmacTag(nonce, aad, ct));
  }

  /** Authenticates and decrypts `ciphertext || tag`; returns the plaintext. */
  async open(nonce: Uint8Array, aad: Uint8Array, body: Uint8Array): Promise<Uint8Array> {
    const tagLen = this.params.tagLen;
    if (body.length < tagLen) throw new SframeError("TruncatedFrame");
    if (this.gcmKey) {
      try {
        return new Uint8Array(
          await subtle().decrypt(
            { name: "AES-GCM", iv: buf(nonce), additionalData: buf(aad), tagLength: 128 },
            this.gcmKey,
            buf(body),
          ),
        );
      } catch {
        throw new SframeError("AuthenticationFailed", "frame failed authentication");
      }
    }
    const ct = body.subarray(0, body.length - tagLen);
    const tag = body.subarray(body.length - tagLen);
    const expected = await this.ctrHmacTag(nonce, aad, ct);
    let diff = 0;
    for (let i = 0; i < tagLen; i++) diff |= expected[i]! ^ tag[i]!;
    if (diff !== 0) throw new SframeError("AuthenticationFailed", "frame failed authentication");
    return this.ctrKeystream(nonce, ct);
  }
}

// ---------------------------------------------------------------------------
// Frames (RFC 9605 §4.4) with codec-aware clear prefixes

/** The media codec of a frame, which decides its clear prefix. */
export type Codec = "opus" | "vp8" | "opaque";

/**
 * Length of the clear prefix of `frame` for `codec`: Opus and opaque data
 * none; VP8 10 bytes on a key frame (low bit of the first byte clear), else 3.
 * The bit is the same in the clear frame and in the protected one.
 */
export function clearPrefixLen(codec: Codec, frame: Uint8Array): number {
  switch (codec) {
    case "opus":
    case "opaque":
      return 0;
    case "vp8": {
      if (frame.length < 1) throw new SframeError("TruncatedFrame");
      const len = (frame[0]! & 0x01) === 0 ? 10 : 3;
      if (frame.length < len) throw new SframeError("TruncatedFrame");
      return len;
    }
    default:
      throw new TypeError(`unknown codec ${String(codec)}`);
  }
}

/** Whether a VP8 frame (clear or protected) is a key frame. */
export function vp8IsKeyFrame(frame: Uint8Array): boolean {
  return frame.length > 0 && (frame[0]! & 0x01) === 0;
}

/** `header || metadata`, the AAD of a frame. */
function aadOf(header: Uint8Array, metadata: Uint8Array): Uint8Array {
  if (metadata.length > MAX_METADATA_LEN) {
    throw new SframeError("MetadataTooLong", `metadata of ${metadata.length} bytes exceeds ${MAX_METADATA_LEN}`);
  }
  return concat(header, metadata);
}

/** The key and salt of one KID, ready to protect frames. */
export class FrameKey {
  readonly kid: bigint;
  readonly suite: CipherSuite;
  private readonly salt: Uint8Array;
  private readonly aead: AeadKey;

  private constructor(kid: bigint, suite: CipherSuite, salt: Uint8Array, aead: AeadKey) {
    this.kid = kid;
    this.suite = suite;
    this.salt = salt;
    this.aead = aead;
  }

  /** Derives the key and salt of `kid` from `baseKey` (RFC 9605 §4.4.2). */
  static async derive(suite: CipherSuite, kid: bigint | number, baseKey: Uint8Array): Promise<FrameKey> {
    const k = toU64(kid, "KID");
    const d = await deriveKeySalt(suite, k, baseKey);
    const aead = await AeadKey.create(suite, d.key);
    d.key.fill(0);
    return new FrameKey(k, suite, d.salt, aead);
  }

  /** `nonce = salt XOR encode_big_endian(ctr, Nn)`. */
  nonce(ctr: bigint | number): Uint8Array {
    const c = u64be(toU64(ctr, "CTR"));
    const n = this.salt.slice();
    for (let i = 0; i < 8; i++) n[NONCE_LEN - 8 + i]! ^= c[i]!;
    return n;
  }

  /** Protected length (without prefix) of a `plaintextLen`-byte payload under `ctr`. */
  protectedLen(ctr: bigint | number, plaintextLen: number): number {
    return headerLen(this.kid, ctr) + plaintextLen + suiteTagLen(this.suite);
  }

  /**
   * RFC 9605 §4.4.3: returns `header || ciphertext || tag`. `metadata` is
   * authenticated but not included.
   */
  async seal(ctr: bigint | number, metadata: Uint8Array, plaintext: Uint8Array): Promise<Uint8Array> {
    if (plaintext.length > MAX_FRAME_LEN) throw new SframeError("FrameTooLarge");
    const c = toU64(ctr, "CTR");
    const header = encodeHeader(this.kid, c);
    const aad = aadOf(header, metadata);
    const body = await this.aead.seal(this.nonce(c), aad, plaintext);
    return concat(header, body);
  }

  /**
   * RFC 9605 §4.4.4 after the header was parsed: `headerBytes` is the header
   * as on the wire, `body` is `ciphertext || tag`. Returns the plaintext.
   */
  async open(
    ctr: bigint | number,
    headerBytes: Uint8Array,
    metadata: Uint8Array,
    body: Uint8Array,
  ): Promise<Uint8Array> {
    if (body.length < suiteTagLen(this.suite)) throw new SframeError("TruncatedFrame");
    const aad = aadOf(headerBytes, metadata);
    return this.aead.open(this.nonce(ctr), aad, body);
  }
}

/** A protected frame split into its parts, without any key. */
export interface ParsedFrame {
  /** The clear codec prefix (the SFrame metadata). */
  prefix: Uint8Array;
  header: Header;
  /** The header as it was on the wire. */
  headerBytes: Uint8Array;
  /** `ciphertext || tag`. */
  body: Uint8Array;
}

/** Splits a protected frame into prefix, header and body. */
export function parseProtected(codec: Codec, frame: Uint8Array): ParsedFrame {
  if (frame.length > MAX_FRAME_LEN + MAX_OVERHEAD + MAX_METADATA_LEN) {
    throw new SframeError("FrameTooLarge");
  }
  const plen = clearPrefixLen(codec, frame);
  const rest = frame.subarray(plen);
  const { header, length } = decodeHeader(rest);
  return {
    prefix: frame.subarray(0, plen),
    header,
    headerBytes: rest.subarray(0, length),
    body: rest.subarray(length),
  };
}

/** Protects one frame with `key` under counter `ctr`: `prefix || header || ct || tag`. */
export async function protectFrame(
  key: FrameKey,
  ctr: bigint | number,
  codec: Codec,
  frame: Uint8Array,
): Promise<Uint8Array> {
  const plen = clearPrefixLen(codec, frame);
  const prefix = frame.subarray(0, plen);
  const sealed = await key.seal(ctr, prefix, frame.subarray(plen));
  return concat(prefix, sealed);
}

/** Decrypts a protected frame with a known key (no replay check): `prefix || payload`. */
export async function unprotectFrame(key: FrameKey, codec: Codec, frame: Uint8Array): Promise<Uint8Array> {
  const p = parseProtected(codec, frame);
  if (p.header.kid !== key.kid) throw new SframeError("UnknownKid", `unknown KID ${p.header.kid}`);
  const pt = await key.open(p.header.ctr, p.headerBytes, p.prefix, p.body);
  return concat(p.prefix, pt);
}

/**
 * A sender's frame protector: one outbound stream, one key at a time. The
 * counter is monotonic for the encryptor's lifetime, across key changes.
 */
export class FrameEncryptor {
  private key: FrameKey;
  private nextCtr = 0n;

  constructor(key: FrameKey) {
    this.key = key;
  }

  /** Switches to a new key; the counter keeps counting. */
  setKey(key: FrameKey): void {
    this.key = key;
  }

  get kid(): bigint {
    return this.key.kid;
  }

  /** The counter the next frame will carry. */
  get nextCounter(): bigint {
    return this.nextCtr;
  }

  /** Protects `frame`; the codec's clear prefix is copied ahead of the header and bound as metadata. */
  async encrypt(codec: Codec, frame: Uint8Array): Promise<Uint8Array> {
    const ctr = this.nextCtr;
    if (ctr === U64_MAX) throw new SframeError("CounterExhausted");
    // Reserve the counter before awaiting so concurrent calls never share one.
    this.nextCtr = ctr + 1n;
    try {
      return await protectFrame(this.key, ctr, codec, frame);
    } catch (e) {
      if (this.nextCtr === ctr + 1n) this.nextCtr = ctr;
      throw e;
    }
  }
}

/** Sliding replay window over one key's counters (128 counters wide). */
export class ReplayWindow {
  static readonly WIDTH = 128n;
  private highest: bigint | null = null;
  /** Bit i set: counter `highest - i` was seen. */
  private seen = 0n;

  /** Checks `ctr` without recording it. */
  check(ctr: bigint): void {
    if (this.highest === null || ctr > this.highest) return;
    const age = this.highest - ctr;
    if (age >= ReplayWindow.WIDTH) throw new SframeError("TooOld", `frame too old (counter ${ctr})`);
    if ((this.seen >> age) & 1n) throw new SframeError("Replayed", `replayed frame (counter ${ctr})`);
  }

  /** Records `ctr` as seen (only after the frame authenticated). */
  accept(ctr: bigint): void {
    const mask = (1n << ReplayWindow.WIDTH) - 1n;
    if (this.highest === null) {
      this.highest = ctr;
      this.seen = 1n;
    } else if (ctr > this.highest) {
      const shift = ctr - this.highest;
      this.seen = shift >= ReplayWindow.WIDTH ? 0n : (this.seen << shift) & mask;
      this.seen |= 1n;
      this.highest = ctr;
    } else {
      const age = this.highest - ctr;
      if (age < ReplayWindow.WIDTH) this.seen |= 1n << age;
    }
  }
}
