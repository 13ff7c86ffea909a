// Keys for SFrame from MLS (RFC 9605 §5.2), byte-compatible with
// protocol/src/sframe/keyring.rs and client-sdk/src/{agent,crypto}.rs.
//
//   base_key = MLS-Exporter("SFrame 1.0 Base Key", "", AEAD.Nk)      (per epoch)
//   KID      = context << (S + E) | leaf_index << E | epoch mod 2^E
//
// E is fixed for a deployment (default 8). S is the smallest number of bits
// with `width < 2^S`, where width is the highest member leaf index + 1 in the
// epoch (what the Rust agent passes), so S can change between epochs.
// Context bits name the sender's stream (audio, camera, screen, layers).

import {
  type CipherSuite,
  type Codec,
  DEFAULT_SUITE,
  FrameKey,
  ReplayWindow,
  SframeError,
  parseProtected,
  suiteKeyLen,
} from "./sframe.js";

/** The exporter label of RFC 9605 §5.2. */
export const SFRAME_EXPORTER_LABEL = "SFrame 1.0 Base Key";

/** Stream contexts carried in the KID's context bits (client-sdk/src/crypto.rs). */
export const stream = {
  /** Microphone audio. */
  AUDIO: 0n,
  /** Camera video (simulcast layer 0; layers 1 and 2 use 3 and 4). */
  CAMERA: 1n,
  /** Screen share. */
  SCREEN: 2n,
} as const;

const U64_MAX = (1n << 64n) - 1n;

function u64(v: bigint | number, what: string): bigint {
  const b = typeof v === "bigint" ? v : BigInt(v);
  if (b < 0n || b > U64_MAX) throw new RangeError(`${what} must be an unsigned 64-bit integer`);
  return b;
}

function u32(v: number, what: string): number {
  if (!Number.isInteger(v) || v < 0 || v > 0xffffffff) {
    throw new RangeError(`${what} must be an unsigned 32-bit integer`);
  }
  return v;
}

/** A KID taken apart. */
export interface KidParts {
  context: bigint;
  leaf: number;
  epochLow: bigint;
}

/** How the bits of a KID are shared between context, sender and epoch. */
export class KidLayout {
  readonly epochBits: number;

  /** A layout carrying `epochBits` (1–16) low bits of the epoch; Conclave's default is 8. */
  constructor(epochBits = 8) {
    if (!Number.isInteger(epochBits) || epochBits < 1 || epochBits > 16) {
      throw new SframeError("KidOverflow", "epoch bits must be 1-16");
    }
    this.epochBits = epochBits;
  }

  /** S for a group of `width` leaves: the smallest S with `width < 2^S` (at most 32). */
  static senderBits(width: number): number {
    u32(width, "width");
    return width === 0 ? 0 : 32 - Math.clz32(width);
  }

  private get epochMask(): bigint {
    return (1n << BigInt(this.epochBits)) - 1n;
  }

  /** The low E bits of `epoch`, as carried in a KID. */
  epochLow(epoch: bigint | number): bigint {
    return u64(epoch, "epoch") & this.epochMask;
  }

  /** The low epoch bits of a KID. */
  kidEpochLow(kid: bigint): bigint {
    return kid & this.epochMask;
  }

  /** Builds the KID of (`context`, `leaf`) in `epoch`. */
  kid(epoch: bigint | number, senderBits: number, leaf: number, context: bigint | number): bigint {
    const e = BigInt(this.epochBits);
    const ctx = u64(context, "context");
    u32(leaf, "leaf");
    if (!Number.isInteger(senderBits) || senderBits < 0 || senderBits > 32) {
      throw new SframeError("KidOverflow", "value does not fit the KID layout");
    }
    const s = BigInt(senderBits);
    if (BigInt(leaf) >> s !== 0n) throw new SframeError("KidOverflow", "leaf does not fit the KID layout");
    const shift = e + s;
    let contextPart = 0n;
    if (ctx !== 0n) {
      if (shift >= 64n || ctx >> (64n - shift) !== 0n) {
        throw new SframeError("KidOverflow", "context does not fit the KID layout");
      }
      contextPart = ctx << shift;
    }
    return contextPart | (BigInt(leaf) << e) | this.epochLow(epoch);
  }

  /** Splits a KID given the epoch's sender bits. */
  split(kid: bigint, senderBits: number): KidParts {
    const e = BigInt(this.epochBits);
    const s = BigInt(Math.min(senderBits, 32));
    return {
      context: kid >> (e + s),
      leaf: Number((kid >> e) & ((1n << s) - 1n)),
      epochLow: kid & this.epochMask,
    };
  }
}

// ---------------------------------------------------------------------------
// The per-epoch base key

/**
 * An MLS exporter of one epoch: `MLS-Exporter(label, context, length)`
 * (RFC 9420 §8.5), e.g. ts-mls's exporter bound to a group state.
 */
export type MlsExporter = (label: Uint8Array, context: Uint8Array, length: number) => Promise<Uint8Array>;

const utf8 = new TextEncoder();

/**
 * The epoch's SFrame base key, exactly as the Rust agent exports it:
 * `MLS-Exporter("SFrame 1.0 Base Key", "", AEAD.Nk)`.
 */
export async function sframeBaseKey(exporter: MlsExporter, suite: CipherSuite = DEFAULT_SUITE): Promise<Uint8Array> {
  return exporter(utf8.encode(SFRAME_EXPORTER_LABEL), new Uint8Array(0), suiteKeyLen(suite));
}

// ---------------------------------------------------------------------------
// Key ring: receive keys per epoch and sender, with replay windows

/** What a key ring needs to know about one epoch. */
export interface EpochSecret {
  /** The MLS epoch number. */
  epoch: bigint;
  /** `MLS-Exporter("SFrame 1.0 Base Key", "", AEAD.Nk)` of that epoch. */
  baseKey: Uint8Array;
  /** S for that epoch (`KidLayout.senderBits(width)`). */
  senderBits: number;
  /** Leaf indices of the members of that epoch. */
  members: ReadonlySet<number>;
}

/** Settings of a KeyRing. */
export interface KeyRingConfig {
  suite: CipherSuite;
  layout: KidLayout;
  /** How long (ms) an earlier epoch's receive keys stay usable after a newer one is installed. */
  retentionMs: number;
}

/** Facts about a frame that decrypted. */
export interface DecryptedFrame {
  /** `prefix || payload`. */
  frame: Uint8Array;
  kid: bigint;
  ctr: bigint;
  epoch: bigint;
  leaf: number;
  context: bigint;
}

interface EpochEntry {
  secret: EpochSecret;
  retireAt: number | null;
}

interface ReceiverKey {
  key: FrameKey;
  window: ReplayWindow;
  epoch: bigint;
}

/**
 * Receive keys for every sender of a call, per epoch (mirrors Rust's
 * `KeyRing`). Keys are derived on first use and cached only after a frame
 * authenticated under them.
 */
export class KeyRing {
  readonly config: KeyRingConfig;
  private epochs: EpochEntry[] = [];
  private keys = new Map<bigint, ReceiverKey>();
  private current: bigint | null = null;

  constructor(config: Partial<KeyRingConfig> = {}) {
    this.config = {
      suite: config.suite ?? DEFAULT_SUITE,
      layout: config.layout ?? new KidLayout(),
      retentionMs: config.retentionMs ?? 10_000,
    };
  }

  /** The newest installed epoch. */
  get currentEpoch(): bigint | null {
    return this.current;
  }

  /** Epochs whose keys are still usable, newest first. */
  liveEpochs(): bigint[] {
    return this.epochs.map((e) => e.secret.epoch).sort((a, b) => (a < b ? 1 : a > b ? -1 : 0));
  }

  /** Installs a new epoch; earlier ones stay usable for the retention from `now`. */
  installEpoch(secret: EpochSecret, now: number): void {
    const layout = this.config.layout;
    const low = layout.epochLow(secret.epoch);
    const dropped = new Set(this.epochs.filter((e) => layout.epochLow(e.secret.epoch) === low).map((e) => e.secret.epoch));
    this.epochs = this.epochs.filter((e) => !dropped.has(e.secret.epoch));
    for (const [kid, k] of this.keys) if (dropped.has(k.epoch)) this.keys.delete(kid);
    const retireAt = now + this.config.retentionMs;
    for (const e of this.epochs) if (e.retireAt === null) e.retireAt = retireAt;
    this.current = secret.epoch;
    this.epochs.push({ secret, retireAt: null });
  }

  /** Drops every key: the member left or was removed. */
  clear(): void {
    this.epochs = [];
    this.keys.clear();
    this.current = null;
  }

  /** Drops epochs whose retention ran out. */
  purge(now: number): void {
    const expired = new Set(this.epochs.filter((e) => e.retireAt !== null && now >= e.retireAt).map((e) => e.secret.epoch));
    if (expired.size === 0) return;
    this.epochs = this.epochs.filter((e) => !expired.has(e.secret.epoch));
    for (const [kid, k] of this.keys) if (expired.has(k.epoch)) this.keys.delete(kid);
  }

  /** The send key of `leaf`'s stream `context` in `epoch` (still held). */
  async senderKey(epoch: bigint, leaf: number, context: bigint | number): Promise<FrameKey> {
    const entry = this.epochs.find((e) => e.secret.epoch === epoch);
    if (!entry) throw new SframeError("NoEpoch", "no epoch keys installed");
    const kid = this.config.layout.kid(entry.secret.epoch, entry.secret.senderBits, leaf, context);
    return FrameKey.derive(this.config.suite, kid, entry.secret.baseKey);
  }

  /** Authenticates and decrypts a protected frame, restoring `prefix || payload`. */
  async decrypt(now: number, codec: Codec, frame: Uint8Array): Promise<DecryptedFrame> {
    this.purge(now);
    const p = parseProtected(codec, frame);
    const { kid, ctr } = p.header;
    const layout = this.config.layout;
    let payload: Uint8Array;
    let epoch: bigint;
    const cached = this.keys.get(kid);
    if (cached) {
      cached.window.check(ctr);
      payload = await cached.key.open(ctr, p.headerBytes, p.prefix, p.body);
      cached.window.accept(ctr);
      epoch = cached.epoch;
    } else {
      const entry = this.epochs.find((e) => layout.epochLow(e.secret.epoch) === layout.kidEpochLow(kid));
      if (!entry) throw new SframeError("UnknownKid", `unknown KID ${kid}`);
      const parts = layout.split(kid, entry.secret.senderBits);
      if (!entry.secret.members.has(parts.leaf)) throw new SframeError("UnknownKid", `unknown KID ${kid}`);
      const key = await FrameKey.derive(this.config.suite, kid, entry.secret.baseKey);
      payload = await key.open(ctr, p.headerBytes, p.prefix, p.body);
      const window = new ReplayWindow();
      window.accept(ctr);
      epoch = entry.secret.epoch;
      this.keys.set(kid, { key, window, epoch });
    }
    const senderBits = this.epochs.find((e) => e.secret.epoch === epoch)?.secret.senderBits ?? 0;
    const parts = layout.split(kid, senderBits);
    const out = new Uint8Array(p.prefix.length + payload.length);
    out.set(p.prefix);
    out.set(payload, p.prefix.length);
    return { frame: out, kid, ctr, epoch, leaf: parts.leaf, context: parts.context };
  }
}
