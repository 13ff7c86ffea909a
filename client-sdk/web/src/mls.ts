// The MLS group-key agent of one call member, on ts-mls 1.6.4 — the browser
// counterpart of client-sdk/src/agent.rs (mls-rs), interoperable with it and
// with the Conclave server (the group's external sender and delivery service).
//
// - Cipher suite 1 (X25519, AES-128-GCM, SHA-256, Ed25519).
// - Each device has an Ed25519 identity key; its basic credential is the UTF-8
//   string `u:<user_id>/<device_id>` (protocol/src/mls/identity.rs). The
//   server's is `s:<name>`, named as the group's only external sender.
// - Commits and proposals are PublicMessages so the server can check them.
// - Per epoch: `MLS-Exporter("SFrame 1.0 Base Key", "", Nk)` goes into a
//   KeyRing (kid.ts), which derives one SFrame key per sender and stream,
//   exactly as Rust's CallCrypto does; the epoch authenticator gives the
//   epoch code (verify.ts).
//
// ts-mls must carry scripts/patch-ts-mls.mjs (applied by `npm install`):
// unpatched, 1.6.4 mis-reads the RFC 9420 `external_senders` extension that
// the server and mls-rs use. `MlsAgent.create` checks the patch is present.

import {
  type CiphersuiteImpl,
  type ClientState,
  type Credential,
  type Extension,
  type KeyPackage,
  type MLSMessage,
  type PrivateKeyPackage,
  acceptAll,
  createCommit,
  createGroup,
  createGroupInfoWithExternalPubAndRatchetTree,
  decodeExternalSender,
  decodeMlsMessage,
  defaultCapabilities,
  emptyPskIndex,
  encodeExternalSender,
  encodeMlsMessage,
  generateKeyPackageWithKey,
  getCiphersuiteFromName,
  getCiphersuiteImpl,
  joinGroup,
  mlsExporter,
  processMessage,
} from "ts-mls";
import { makeKeyPackageRef } from "ts-mls/keyPackage.js";
import { senderFromExtension } from "ts-mls/publicMessage.js";
import { type CipherSuite, type Codec, DEFAULT_SUITE, FrameEncryptor } from "./sframe.js";
import { type DecryptedFrame, KeyRing, KidLayout, sframeBaseKey } from "./kid.js";
import { epochCode } from "./verify.js";

/** MLS cipher suite 1, the only one Conclave uses. */
export const MLS_CIPHER_SUITE = "MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519" as const;

const utf8 = new TextEncoder();
const utf8d = new TextDecoder("utf-8", { fatal: true });
const ID_RE = /^[A-Za-z0-9._@+-]{1,128}$/;

// ---------------------------------------------------------------------------
// Principals and credentials (protocol/src/mls/identity.rs)

/** Who a credential names. */
export type Principal =
  | { kind: "member"; userId: string; deviceId: string }
  | { kind: "server"; name: string };

/** Thrown for any MLS-level refusal; the group state is unchanged. */
export class MlsAgentError extends Error {
  constructor(
    readonly code:
      | "InvalidIdentity"
      | "NotInGroup"
      | "AlreadyInGroup"
      | "CommitPending"
      | "Malformed"
      | "UnexpectedMessage"
      | "NoMatchingKeyPackage"
      | "NoSuchMember"
      | "Unpatched"
      | "Mls",
    message?: string,
    options?: { cause?: unknown },
  ) {
    super(message ?? code, options);
    this.name = "MlsAgentError";
  }
}

/** The credential bytes of a principal: `u:<user>/<device>` or `s:<name>`. */
export function encodePrincipal(p: Principal): Uint8Array {
  if (p.kind === "member") {
    if (!ID_RE.test(p.userId) || !ID_RE.test(p.deviceId)) throw new MlsAgentError("InvalidIdentity");
    return utf8.encode(`u:${p.userId}/${p.deviceId}`);
  }
  if (!ID_RE.test(p.name)) throw new MlsAgentError("InvalidIdentity");
  return utf8.encode(`s:${p.name}`);
}

/** Parses credential bytes with Rust's rules (`Principal::decode`). */
export function decodePrincipal(bytes: Uint8Array): Principal {
  let s: string;
  try {
    s = utf8d.decode(bytes);
  } catch {
    throw new MlsAgentError("InvalidIdentity");
  }
  if (s.startsWith("u:")) {
    const rest = s.slice(2);
    const slash = rest.indexOf("/");
    if (slash < 0) throw new MlsAgentError("InvalidIdentity");
    const userId = rest.slice(0, slash);
    const deviceId = rest.slice(slash + 1);
    if (!ID_RE.test(userId) || !ID_RE.test(deviceId)) throw new MlsAgentError("InvalidIdentity");
    return { kind: "member", userId, deviceId };
  }
  if (s.startsWith("s:")) {
    const name = s.slice(2);
    if (!ID_RE.test(name)) throw new MlsAgentError("InvalidIdentity");
    return { kind: "server", name };
  }
  throw new MlsAgentError("InvalidIdentity");
}

function principalOf(credential: Credential): Principal {
  if (credential.credentialType !== "basic") throw new MlsAgentError("InvalidIdentity");
  return decodePrincipal(credential.identity);
}

/** An MLS SigningIdentity (RFC 9420 §5.3): Ed25519 key and credential. */
export interface SigningIdentity {
  signaturePublicKey: Uint8Array;
  credential: Credential;
}

/** TLS-decodes a SigningIdentity, e.g. the `external_sender` of `ready`. */
export function decodeSigningIdentity(bytes: Uint8Array): SigningIdentity {
  let d: ReturnType<typeof decodeExternalSender>;
  try {
    d = decodeExternalSender(bytes, 0);
  } catch (e) {
    throw new MlsAgentError("Malformed", "not a SigningIdentity", { cause: e });
  }
  if (d === undefined || d[1] !== bytes.length) throw new MlsAgentError("Malformed", "not a SigningIdentity");
  return d[0];
}

/** TLS-encodes a SigningIdentity. */
export function encodeSigningIdentity(id: SigningIdentity): Uint8Array {
  return encodeExternalSender(id);
}

/** MLS variable-length integer (RFC 9420 §2.1.2). */
function varint(n: number): Uint8Array {
  if (n < 0x40) return Uint8Array.of(n);
  if (n < 0x4000) return Uint8Array.of(0x40 | (n >> 8), n & 0xff);
  if (n < 0x40000000) return Uint8Array.of(0x80 | (n >>> 24), (n >>> 16) & 0xff, (n >>> 8) & 0xff, n & 0xff);
  throw new RangeError("too long");
}

/**
 * The `external_senders` extension as RFC 9420 §12.1.8.1 and mls-rs encode
 * it: one extension holding the list `ExternalSender external_senders<V>`.
 */
export function externalSendersExtension(senders: SigningIdentity[]): Extension {
  const items = senders.map(encodeSigningIdentity);
  const len = items.reduce((n, i) => n + i.length, 0);
  const prefix = varint(len);
  const data = new Uint8Array(prefix.length + len);
  data.set(prefix);
  let at = prefix.length;
  for (const i of items) {
    data.set(i, at);
    at += i.length;
  }
  return { extensionType: "external_senders", extensionData: data };
}

function bytesEqual(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  let d = 0;
  for (let i = 0; i < a.length; i++) d |= a[i]! ^ b[i]!;
  return d === 0;
}

let patchChecked = false;

/** Fails unless ts-mls carries scripts/patch-ts-mls.mjs (RFC external_senders list). */
export function checkTsMlsPatched(): void {
  if (patchChecked) return;
  const probe: SigningIdentity = {
    signaturePublicKey: new Uint8Array(32).fill(1),
    credential: { credentialType: "basic", identity: utf8.encode("s:probe") },
  };
  const second: SigningIdentity = { ...probe, signaturePublicKey: new Uint8Array(32).fill(2) };
  let got: SigningIdentity | undefined;
  try {
    got = senderFromExtension([externalSendersExtension([probe, second])], 1);
  } catch {
    got = undefined;
  }
  if (got === undefined || !bytesEqual(got.signaturePublicKey, second.signaturePublicKey)) {
    throw new MlsAgentError(
      "Unpatched",
      "ts-mls lacks the external_senders patch: run `npm install` (postinstall runs scripts/patch-ts-mls.mjs)",
    );
  }
  patchChecked = true;
}

// ---------------------------------------------------------------------------
// Device identity

/** A device's Ed25519 identity key (keep `secretKey` private; persist it to keep safety numbers stable). */
export interface DeviceIdentity {
  userId: string;
  deviceId: string;
  publicKey: Uint8Array;
  secretKey: Uint8Array;
}

let suiteImpl: Promise<CiphersuiteImpl> | null = null;

/** ts-mls's implementation of cipher suite 1 (WebCrypto + @noble/curves for Ed25519). */
export function cipherSuite(): Promise<CiphersuiteImpl> {
  suiteImpl ??= getCiphersuiteImpl(getCiphersuiteFromName(MLS_CIPHER_SUITE));
  return suiteImpl;
}

/** Generates a fresh Ed25519 identity key for `userId`'s device `deviceId`. */
export async function generateIdentity(userId: string, deviceId: string): Promise<DeviceIdentity> {
  encodePrincipal({ kind: "member", userId, deviceId });
  const cs = await cipherSuite();
  const { publicKey, signKey } = await cs.signature.keygen();
  return { userId, deviceId, publicKey, secretKey: signKey };
}

// ---------------------------------------------------------------------------
// The agent

/** Settings of an agent (the Rust `AgentConfig`). */
export interface AgentConfig {
  /** SFrame cipher suite of the call (Rust default: AES_256_GCM_SHA512_128, Nk = 32). */
  sframeSuite: CipherSuite;
  /** KID layout of the call. */
  layout: KidLayout;
  /** How long (ms) the previous epoch's receive keys are kept. */
  retentionMs: number;
  /** Key-package lifetime (seconds from now). */
  keyPackageLifetimeSecs: number;
}

/** What happened as a result of an input (the Rust `AgentEvent`). */
export type AgentEvent =
  | { type: "joined"; epoch: bigint }
  | { type: "proposalQueued" }
  | { type: "epochChanged"; epoch: bigint; added: number[]; removed: number[] }
  | { type: "sendingSwitched"; epoch: bigint }
  | { type: "keyFrameRequested" }
  | { type: "removed" };

/** A commit waiting for the delivery service's verdict. */
export interface CommitBundle {
  /** The epoch the commit was built in (it creates `epoch + 1`). */
  epoch: bigint;
  /** The commit (an MLSMessage carrying a PublicMessage). */
  commit: Uint8Array;
  /** The Welcome for members it adds, if any. */
  welcome?: Uint8Array;
}

/** One member of the group. */
export interface RosterEntry {
  leaf: number;
  principal: Principal;
  /** Ed25519 identity public key. */
  identityKey: Uint8Array;
}

/** What the agent exposes about the current epoch. */
export interface EpochInfo {
  epoch: bigint;
  /** This member's leaf index. */
  leaf: number;
  roster: RosterEntry[];
  /** `MLS-Exporter("SFrame 1.0 Base Key", "", Nk)`, Nk of the SFrame suite. */
  sframeBaseKey: Uint8Array;
  /** The MLS epoch authenticator. */
  epochAuthenticator: Uint8Array;
  /** The epoch code shown to users (verify.ts). */
  epochCode: string;
}

interface PendingKeyPackage {
  ref: Uint8Array;
  publicPackage: KeyPackage;
  privatePackage: PrivateKeyPackage;
}

interface PendingCommit {
  epoch: bigint;
  bytes: Uint8Array;
  newState: ClientState;
}

function decodeMessage(bytes: Uint8Array): MLSMessage {
  let d: ReturnType<typeof decodeMlsMessage>;
  try {
    d = decodeMlsMessage(bytes, 0);
  } catch (e) {
    throw new MlsAgentError("Malformed", "not an MLS message", { cause: e });
  }
  if (d === undefined || d[1] !== bytes.length) throw new MlsAgentError("Malformed", "not an MLS message");
  return d[0];
}

function mlsError(e: unknown): MlsAgentError {
  if (e instanceof MlsAgentError) return e;
  return new MlsAgentError("Mls", e instanceof Error ? `${e.name}: ${e.message}` : String(e), { cause: e });
}

function rosterOf(state: ClientState): RosterEntry[] {
  const out: RosterEntry[] = [];
  state.ratchetTree.forEach((node, i) => {
    if (i % 2 !== 0 || node === undefined || node.nodeType !== "leaf") return;
    out.push({
      leaf: i / 2,
      principal: principalOf(node.leaf.credential),
      identityKey: node.leaf.signaturePublicKey,
    });
  });
  return out;
}

/**
 * The MLS agent of one device in one call. Every method that changes state
 * either succeeds completely or leaves the agent as it was.
 */
export class MlsAgent {
  readonly identity: DeviceIdentity;
  readonly config: AgentConfig;
  private readonly cs: CiphersuiteImpl;
  private state: ClientState | null = null;
  private keyPackages: PendingKeyPackage[] = [];
  private pending: PendingCommit | null = null;
  private info: EpochInfo | null = null;
  private readonly ring: KeyRing;
  private sendEpoch: bigint | null = null;
  private senders = new Map<bigint, FrameEncryptor>();
  private queue: Promise<unknown> = Promise.resolve();

  private constructor(identity: DeviceIdentity, config: AgentConfig, cs: CiphersuiteImpl) {
    this.identity = identity;
    this.config = config;
    this.cs = cs;
    this.ring = new KeyRing({ suite: config.sframeSuite, layout: config.layout, retentionMs: config.retentionMs });
  }

  /** An agent for `identity`, in no group yet. */
  static async create(identity: DeviceIdentity, config: Partial<AgentConfig> = {}): Promise<MlsAgent> {
    checkTsMlsPatched();
    encodePrincipal({ kind: "member", userId: identity.userId, deviceId: identity.deviceId });
    const full: AgentConfig = {
      sframeSuite: config.sframeSuite ?? DEFAULT_SUITE,
      layout: config.layout ?? new KidLayout(),
      retentionMs: config.retentionMs ?? 10_000,
      keyPackageLifetimeSecs: config.keyPackageLifetimeSecs ?? 90 * 24 * 3600,
    };
    return new MlsAgent(identity, full, await cipherSuite());
  }

  /** Serialises state changes: ts-mls is async, inputs must apply in order. */
  private serial<T>(f: () => Promise<T>): Promise<T> {
    const run = this.queue.then(f, f);
    this.queue = run.catch(() => undefined);
    return run;
  }

  private get credential(): Credential {
    return {
      credentialType: "basic",
      identity: encodePrincipal({ kind: "member", userId: this.identity.userId, deviceId: this.identity.deviceId }),
    };
  }

  /** A fresh single-use key package (an MLSMessage) for `join_call` or `upload_key_packages`. */
  keyPackage(): Promise<Uint8Array> {
    return this.serial(async () => {
      const now = BigInt(Math.floor(Date.now() / 1000));
      const { publicPackage, privatePackage } = await generateKeyPackageWithKey(
        this.credential,
        defaultCapabilities(),
        { notBefore: now - 3600n, notAfter: now + BigInt(this.config.keyPackageLifetimeSecs) },
        [],
        { signKey: this.identity.secretKey, publicKey: this.identity.publicKey },
        this.cs,
      );
      const ref = await makeKeyPackageRef(publicPackage, this.cs.hash);
      this.keyPackages.push({ ref, publicPackage, privatePackage });
      return encodeMlsMessage({ version: "mls10", wireformat: "mls_key_package", keyPackage: publicPackage });
    });
  }

  /** Creates the call's group with the id from `create_group`, the server (from `ready`) as only external sender. */
  createGroup(groupId: Uint8Array, externalSender: Uint8Array): Promise<AgentEvent[]> {
    return this.serial(async () => {
      if (this.state) throw new MlsAgentError("AlreadyInGroup");
      const server = decodeSigningIdentity(externalSender);
      if (principalOf(server.credential).kind !== "server") throw new MlsAgentError("InvalidIdentity");
      const now = BigInt(Math.floor(Date.now() / 1000));
      // The creator's own leaf comes from a key package that is never published.
      const { publicPackage, privatePackage } = await generateKeyPackageWithKey(
        this.credential,
        defaultCapabilities(),
        { notBefore: now - 3600n, notAfter: now + BigInt(this.config.keyPackageLifetimeSecs) },
        [],
        { signKey: this.identity.secretKey, publicKey: this.identity.publicKey },
        this.cs,
      );
      let state: ClientState;
      try {
        state = await createGroup(groupId, publicPackage, privatePackage, [externalSendersExtension([server])], this.cs);
      } catch (e) {
        throw mlsError(e);
      }
      return this.enter(state);
    });
  }

  /** Joins from the Welcome of a `welcome` message (the ratchet tree is inside). */
  join(welcome: Uint8Array): Promise<AgentEvent[]> {
    return this.serial(async () => {
      if (this.state) throw new MlsAgentError("AlreadyInGroup");
      const msg = decodeMessage(welcome);
      if (msg.wireformat !== "mls_welcome") throw new MlsAgentError("UnexpectedMessage", msg.wireformat);
      const ours = this.keyPackages.find((kp) => msg.welcome.secrets.some((s) => bytesEqual(s.newMember, kp.ref)));
      if (!ours) throw new MlsAgentError("NoMatchingKeyPackage");
      let state: ClientState;
      try {
        state = await joinGroup(msg.welcome, ours.publicPackage, ours.privatePackage, emptyPskIndex, this.cs);
      } catch (e) {
        throw mlsError(e);
      }
      // Single use: forget it.
      this.keyPackages = this.keyPackages.filter((kp) => kp !== ours);
      return this.enter(state);
    });
  }

  private async enter(state: ClientState): Promise<AgentEvent[]> {
    await this.install(state);
    const epoch = state.groupContext.epoch;
    await this.switchSendingNow(epoch);
    return [{ type: "joined", epoch }];
  }

  /** Exports the epoch's base key into the key ring and records the epoch's facts. */
  private async install(state: ClientState): Promise<void> {
    const roster = rosterOf(state);
    const exporter = (label: Uint8Array, context: Uint8Array, length: number) =>
      mlsExporter(state.keySchedule.exporterSecret, utf8d.decode(label), context, length, this.cs);
    const baseKey = await sframeBaseKey(exporter, this.config.sframeSuite);
    const width = roster.reduce((m, r) => Math.max(m, r.leaf + 1), 1);
    const epoch = state.groupContext.epoch;
    this.ring.installEpoch(
      { epoch, baseKey, senderBits: KidLayout.senderBits(width), members: new Set(roster.map((r) => r.leaf)) },
      Date.now(),
    );
    const auth = state.keySchedule.epochAuthenticator;
    this.state = state;
    this.info = {
      epoch,
      leaf: state.privatePath.leafIndex,
      roster,
      sframeBaseKey: baseKey,
      epochAuthenticator: auth,
      epochCode: epochCode(auth),
    };
  }

  /** Processes a `proposal` or `commit` relayed by the server. On error the state is unchanged. */
  handle(message: Uint8Array): Promise<AgentEvent[]> {
    return this.serial(async () => {
      const state = this.state;
      if (!state) throw new MlsAgentError("NotInGroup");
      const msg = decodeMessage(message);
      if (msg.wireformat !== "mls_public_message" && msg.wireformat !== "mls_private_message") {
        throw new MlsAgentError("UnexpectedMessage", msg.wireformat);
      }
      const before = this.info?.roster ?? [];
      let next: ClientState;
      let kind: "proposal" | "commit";
      if (this.pending && bytesEqual(this.pending.bytes, message)) {
        // Our own commit, accepted by the delivery service.
        next = this.pending.newState;
        kind = "commit";
      } else {
        if (msg.wireformat === "mls_public_message") {
          const ct = msg.publicMessage.content.contentType;
          if (ct === "application") throw new MlsAgentError("UnexpectedMessage", "application message");
          kind = ct;
        } else {
          kind = "commit";
        }
        let res: Awaited<ReturnType<typeof processMessage>>;
        try {
          res = await processMessage(msg, state, emptyPskIndex, acceptAll, this.cs);
        } catch (e) {
          throw mlsError(e);
        }
        if (res.kind !== "newState") throw new MlsAgentError("UnexpectedMessage", "application message");
        next = res.newState;
        if (msg.wireformat === "mls_private_message") {
          kind = next.groupContext.epoch !== state.groupContext.epoch ? "commit" : "proposal";
        }
      }
      if (kind === "proposal") {
        this.state = next;
        return [{ type: "proposalQueued" }];
      }
      // A commit: any pending commit of ours lost (or won, above).
      this.pending = null;
      if (next.groupActiveState.kind === "removedFromGroup") {
        this.clear();
        return [{ type: "removed" }];
      }
      await this.install(next);
      const after = this.info!.roster;
      const same = (a: RosterEntry, b: RosterEntry) => a.leaf === b.leaf && bytesEqual(a.identityKey, b.identityKey);
      const added = after.filter((a) => !before.some((b) => same(a, b))).map((a) => a.leaf);
      const removed = before.filter((b) => !after.some((a) => a.leaf === b.leaf)).map((b) => b.leaf);
      return [{ type: "epochChanged", epoch: next.groupContext.epoch, added, removed }];
    });
  }

  /** Proposals received for the current epoch and not yet committed. */
  get pendingProposals(): number {
    return this.state ? Object.keys(this.state.unappliedProposals).length : 0;
  }

  /**
   * As the designated committer (`commit_request`): commits every queued
   * proposal by reference. `null` when nothing is queued, unless `heal`
   * (the server's request to refill this member's path). The commit takes
   * effect when the server relays it back through `handle`; if it loses
   * (`stale_epoch`, `not_committer`), call `discardPendingCommit`.
   */
  commitPending(heal = false): Promise<CommitBundle | null> {
    return this.serial(async () => {
      const state = this.state;
      if (!state) throw new MlsAgentError("NotInGroup");
      if (this.pending) throw new MlsAgentError("CommitPending");
      // With nothing queued, a heal request gets an empty commit: its update
      // path refills this member's blank nodes in the ratchet tree.
      if (Object.keys(state.unappliedProposals).length === 0 && !heal) return null;
      let res: Awaited<ReturnType<typeof createCommit>>;
      try {
        res = await createCommit(
          { state, cipherSuite: this.cs, pskIndex: emptyPskIndex },
          { wireAsPublicMessage: true, ratchetTreeExtension: true },
        );
      } catch (e) {
        throw mlsError(e);
      }
      const bytes = encodeMlsMessage(res.commit);
      this.pending = { epoch: state.groupContext.epoch, bytes, newState: res.newState };
      const bundle: CommitBundle = { epoch: state.groupContext.epoch, commit: bytes };
      if (res.welcome) {
        bundle.welcome = encodeMlsMessage({ version: "mls10", wireformat: "mls_welcome", welcome: res.welcome });
      }
      return bundle;
    });
  }

  /** Forgets a commit the server refused. */
  discardPendingCommit(): void {
    this.pending = null;
  }

  /** Whether a commit of ours awaits the server's verdict. */
  get hasPendingCommit(): boolean {
    return this.pending !== null;
  }

  /** A GroupInfo (ratchet tree included) for `group_created`. */
  groupInfo(): Promise<Uint8Array> {
    return this.serial(async () => {
      const state = this.state;
      if (!state) throw new MlsAgentError("NotInGroup");
      const gi = await createGroupInfoWithExternalPubAndRatchetTree(state, [], this.cs);
      return encodeMlsMessage({ version: "mls10", wireformat: "mls_group_info", groupInfo: gi });
    });
  }

  /** The current epoch's facts, or `null` outside a group. */
  get epochInfo(): EpochInfo | null {
    return this.info;
  }

  /** The current MLS epoch. */
  get epoch(): bigint | null {
    return this.info?.epoch ?? null;
  }

  /** This member's leaf index. */
  get leafIndex(): number | null {
    return this.info?.leaf ?? null;
  }

  /** The members of the current epoch. */
  roster(): RosterEntry[] {
    if (!this.info) throw new MlsAgentError("NotInGroup");
    return this.info.roster;
  }

  /** The call's epoch code (from the MLS epoch authenticator). */
  epochCode(): string {
    if (!this.info) throw new MlsAgentError("NotInGroup");
    return this.info.epochCode;
  }

  /** `MLS-Exporter(label, context, length)` of the current epoch. */
  exportSecret(label: string, context: Uint8Array, length: number): Promise<Uint8Array> {
    const state = this.state;
    if (!state) return Promise.reject(new MlsAgentError("NotInGroup"));
    return mlsExporter(state.keySchedule.exporterSecret, label, context, length, this.cs);
  }

  // -------------------------------------------------------------------------
  // Frame protection (Rust's CallCrypto)

  /** The epoch frames are sent in. */
  get sendingEpoch(): bigint | null {
    return this.sendEpoch;
  }

  /** The receive key ring (every sender, current and retained epochs). */
  get keyRing(): KeyRing {
    return this.ring;
  }

  /** `epoch_ready`: send in `epoch` from now on (also asks for a key frame). */
  switchSending(epoch: bigint): Promise<AgentEvent[]> {
    return this.serial(async () => {
      if (this.sendEpoch === epoch) return [];
      await this.switchSendingNow(epoch);
      return [{ type: "sendingSwitched", epoch }, { type: "keyFrameRequested" }];
    });
  }

  private async switchSendingNow(epoch: bigint): Promise<void> {
    const leaf = this.info?.leaf;
    if (leaf === undefined) throw new MlsAgentError("NotInGroup");
    const keys = await Promise.all([...this.senders.keys()].map((c) => this.ring.senderKey(epoch, leaf, c)));
    [...this.senders.values()].forEach((enc, i) => enc.setKey(keys[i]!));
    this.sendEpoch = epoch;
  }

  /** Protects one frame of outbound stream `context` (see `stream` in kid.ts). */
  encrypt(context: bigint, codec: Codec, frame: Uint8Array): Promise<Uint8Array> {
    return this.serial(async () => {
      let enc = this.senders.get(context);
      if (!enc) {
        const leaf = this.info?.leaf;
        if (this.sendEpoch === null || leaf === undefined) throw new MlsAgentError("NotInGroup");
        enc = new FrameEncryptor(await this.ring.senderKey(this.sendEpoch, leaf, context));
        this.senders.set(context, enc);
      }
      return enc.encrypt(codec, frame);
    });
  }

  /** Authenticates and decrypts a frame from any member. */
  decrypt(codec: Codec, frame: Uint8Array, now = Date.now()): Promise<DecryptedFrame> {
    return this.ring.decrypt(now, codec, frame);
  }

  /** The server says this member left or was removed (`removed`): drops the group and every key. */
  leave(): void {
    this.pending = null;
    this.keyPackages = [];
    this.clear();
  }

  private clear(): void {
    this.state = null;
    this.info = null;
    this.ring.clear();
    this.senders.clear();
    this.sendEpoch = null;
  }
}
