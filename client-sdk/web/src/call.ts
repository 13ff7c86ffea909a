// The browser call client: one member of one call.
//
// It speaks the signaling protocol (docs/protocol.md) over one WebSocket,
// runs the MLS agent (ts-mls) for the call's group, and holds one
// RTCPeerConnection to the SFU: a microphone, a camera and a screen-share
// sender, and fixed receive slots (3 audio, 6 video) the SFU fills with
// whoever is speaking or sharing. Every encoded frame goes through the SFrame
// worker (media-worker.ts) with keys exported from the current MLS epoch, so
// the SFU only ever relays ciphertext.

import type {
  CallEnded,
  CallEvents,
  CallOptions,
  CallPhase,
  CallStats,
  Member,
  RemoteVideo,
  Source,
  Verification,
} from "./call-types.js";
import { KidLayout, stream } from "./kid.js";
import { decodeServerFrame, type ServerMessage as ServerMsg } from "./signal.js";
import { MlsAgent, type DeviceIdentity, type EpochInfo, generateIdentity } from "./mls.js";
import type { FromWorker, StreamOptions, ToWorker } from "./media-worker.js";
import { safetyNumber } from "./verify.js";

export type * from "./call-types.js";

// ---------------------------------------------------------------------------
// REST helpers

/** A refused or failed API request, with the server's explanation. */
export class ApiError extends Error {
  readonly status: number;
  readonly code: string;
  constructor(status: number, code: string, message: string) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
  }
}

async function api<T>(server: string, path: string, body: unknown, token?: string): Promise<T> {
  const headers: Record<string, string> = { "content-type": "application/json" };
  if (token) headers.authorization = `Bearer ${token}`;
  let res: Response;
  try {
    res = await fetch(new URL(path, server), { method: "POST", headers, body: JSON.stringify(body) });
  } catch {
    throw new ApiError(0, "unreachable", "Can't reach the Conclave server. Check your connection and try again.");
  }
  const text = await res.text();
  let json: Record<string, unknown> = {};
  try {
    json = text ? (JSON.parse(text) as Record<string, unknown>) : {};
  } catch {
    // Not JSON: explained below by status.
  }
  if (!res.ok) {
    const message = typeof json.message === "string" ? json.message : `The server answered ${res.status}.`;
    throw new ApiError(res.status, typeof json.code === "string" ? json.code : "http", message);
  }
  return json as T;
}

/** Signs a user in with a password: a session token (15 minutes). */
export async function login(server: string, username: string, password: string): Promise<{ token: string; userId: string }> {
  const r = await api<{ token: string; user_id: string }>(server, "/api/login", { username, password });
  return { token: r.token, userId: r.user_id };
}

/** Trades an invitation code for a guest token good for the invitation's call. */
export async function guestToken(server: string, invitation: string): Promise<{ token: string; userId: string; callId: string | null }> {
  const r = await api<{ token: string; user_id: string }>(server, "/api/guest", { invitation });
  return { token: r.token, userId: r.user_id, callId: tokenCall(r.token) };
}

/** Creates a guest invitation to `callId` (the signed-in user's policy must allow guests). */
export async function createInvitation(server: string, token: string, callId: string): Promise<{ invitation: string; expiresIn: number }> {
  const r = await api<{ invitation: string; expires_in: number }>(server, "/api/invitations", { call_id: callId }, token);
  return { invitation: r.invitation, expiresIn: r.expires_in };
}

/** The `call` claim of a guest token (the only call it admits to), read without verifying. */
export function tokenCall(token: string): string | null {
  try {
    const part = token.split(".")[1] ?? "";
    const claims = JSON.parse(atob(part.replace(/-/g, "+").replace(/_/g, "/"))) as { call?: unknown };
    return typeof claims.call === "string" ? claims.call : null;
  } catch {
    return null;
  }
}

// ---------------------------------------------------------------------------
// Encoding helpers

const b64 = (b: Uint8Array): string => {
  let s = "";
  for (let i = 0; i < b.length; i += 0x8000) s += String.fromCharCode(...b.subarray(i, i + 0x8000));
  return btoa(s);
};
const unb64 = (s: string): Uint8Array => Uint8Array.from(atob(s), (c) => c.charCodeAt(0));
const hex = (b: Uint8Array): string => Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
const sameBytes = (a: Uint8Array, b: Uint8Array): boolean => a.length === b.length && a.every((x, i) => x === b[i]);

/** Keeps a device's identity key across page loads, so safety numbers stay stable for this browser. */
async function deviceIdentity(userId: string, deviceId: string): Promise<DeviceIdentity> {
  const key = `conclave.identity.${userId}/${deviceId}`;
  try {
    const saved = JSON.parse(localStorage.getItem(key) ?? "null") as { pk: string; sk: string } | null;
    if (saved) return { userId, deviceId, publicKey: unb64(saved.pk), secretKey: unb64(saved.sk) };
  } catch {
    // Unreadable: make a new one.
  }
  const id = await generateIdentity(userId, deviceId);
  try {
    localStorage.setItem(key, JSON.stringify({ pk: b64(id.publicKey), sk: b64(id.secretKey) }));
  } catch {
    // Storage full or disabled: the identity lives for this page only.
  }
  return id;
}

const verifiedKey = (memberId: string): string => `conclave.verified.${memberId}`;

// ---------------------------------------------------------------------------
// Wire messages (the subset this client reads)

interface RosterWire {
  user_id: string;
  device_id: string;
  display_name?: string;
  leaf?: number;
  identity_key: string;
  audio_muted: boolean;
  video_muted: boolean;
  publishing?: Source[];
  recorder?: boolean;
}

interface DeviceRefWire {
  user_id: string;
  device_id: string;
}

/** A `roster_update` applied to the roster held: `gone` leave, each `changed` entry replaces its device's or joins at the end. */
function applyRosterUpdate(roster: RosterWire[], changed: RosterWire[], gone: DeviceRefWire[]): RosterWire[] {
  const same = (a: DeviceRefWire, b: DeviceRefWire): boolean => a.user_id === b.user_id && a.device_id === b.device_id;
  const out = roster.filter((r) => !gone.some((g) => same(r, g)));
  for (const c of changed) {
    const i = out.findIndex((r) => same(r, c));
    if (i >= 0) out[i] = c;
    else out.push(c);
  }
  return out;
}


const AUDIO_SLOTS = 3;
const VIDEO_SLOTS = 6;
const ENDED_WORDS: Record<string, string> = {
  left: "You left the call.",
  removed_by_admin: "An administrator removed you from this call.",
  disconnected: "The connection to the server was lost.",
};

type Handlers = { [K in keyof CallEvents]: CallEvents[K][] };

/** One member of one call, in a browser. */
export class CallClient {
  readonly options: Required<CallOptions>;
  private readonly handlers: Handlers = {
    phase: [], roster: [], videos: [], audio: [], epoch: [], speaker: [], notice: [], ended: [],
  };
  private phaseNow: CallPhase = "connecting";
  private ws: WebSocket | null = null;
  private userId = "";
  private externalSender: Uint8Array | null = null;
  private agent: MlsAgent | null = null;
  private chain: Promise<void> = Promise.resolve();
  private worker: Worker | null = null;
  private pc: RTCPeerConnection | null = null;
  private readonly scriptTransform = typeof RTCRtpScriptTransform !== "undefined";
  private senders: { audio?: RTCRtpSender; camera?: RTCRtpSender; screen?: RTCRtpSender } = {};
  private local: MediaStream | null = null;
  private cameraTrack: MediaStreamTrack | null = null;
  private screenTrack: MediaStreamTrack | null = null;
  private mutedNow = { audio: false, video: false };
  private serverRoster: RosterWire[] = [];
  private speakerId: string | null = null;
  private readonly videoSlots = new Map<string, { stream: MediaStream; leaf: number | null; context: number | null }>();
  /** Who is in each audio slot (leaf), from the decrypted KIDs. */
  private readonly audioSlots = new Map<string, number>();
  private readonly remoteAudio = new MediaStream();
  private workerStats = { encrypted: 0, decrypted: 0, failures: 0, beforeKeys: 0, unsentNoKey: 0 };
  private failuresAtReady = 0;
  private mediaUp = false;
  private endedOnce = false;
  private pendingEnd: CallEnded | null = null;

  constructor(opts: CallOptions) {
    this.options = {
      server: opts.server ?? (typeof location !== "undefined" ? location.origin : "http://127.0.0.1:8080"),
      token: opts.token,
      callId: opts.callId,
      deviceId: opts.deviceId,
      audio: opts.audio ?? true,
      video: opts.video ?? true,
    };
  }

  on<K extends keyof CallEvents>(event: K, fn: CallEvents[K]): void {
    this.handlers[event].push(fn);
  }

  private emit<K extends keyof CallEvents>(event: K, ...args: Parameters<CallEvents[K]>): void {
    for (const fn of this.handlers[event]) {
      try {
        (fn as (...a: Parameters<CallEvents[K]>) => void)(...args);
      } catch (e) {
        console.error(`conclave: ${event} handler failed`, e);
      }
    }
  }

  get phase(): CallPhase {
    return this.phaseNow;
  }

  private setPhase(p: CallPhase): void {
    if (this.phaseNow === p || this.phaseNow === "ended") return;
    this.phaseNow = p;
    this.emit("phase", p);
  }

  get localStream(): MediaStream | null {
    return this.local;
  }

  get muted(): { audio: boolean; video: boolean } {
    return { ...this.mutedNow };
  }

  get sharingScreen(): boolean {
    return this.screenTrack !== null;
  }

  /** Captures media, connects, joins the call and negotiates media. Resolves once the join is under way. */
  async start(): Promise<void> {
    this.worker = new Worker(new URL("./media-worker.js", import.meta.url), { type: "module" });
    this.worker.onmessage = (ev: MessageEvent<FromWorker>) => this.onWorker(ev.data);
    this.worker.onerror = (ev) => this.emit("notice", `The encryption worker failed: ${ev.message}`);
    const agent = await MlsAgent.create(await deviceIdentity(this.userIdFromToken(), this.options.deviceId));
    this.agent = agent;
    this.post({
      type: "config",
      suite: agent.config.sframeSuite,
      epochBits: agent.config.layout.epochBits,
      retentionMs: agent.config.retentionMs,
    });
    await this.capture();
    const url = new URL("/ws", this.options.server);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    url.searchParams.set("token", this.options.token);
    const ws = new WebSocket(url);
    this.ws = ws;
    ws.binaryType = "arraybuffer";
    ws.onmessage = (ev: MessageEvent<string | ArrayBuffer>) => {
      let m: ServerMsg;
      try {
        m = decodeServerFrame(ev.data);
      } catch (e) {
        console.warn("conclave: ignored an unreadable frame from the server:", e);
        return;
      }
      this.chain = this.chain.then(() => this.onMessage(m)).catch((e) => this.fail(`handling ${m.type}`, e));
    };
    ws.onclose = (ev) => {
      this.chain = this.chain.then(() => {
        if (this.pendingEnd) this.end(this.pendingEnd);
        else if (ev.code === 4000 && ev.reason) this.end({ reason: "disconnected", message: `The server closed the connection: ${ev.reason}.` });
        else this.end({ reason: "disconnected", message: ENDED_WORDS.disconnected! });
      });
    };
    await new Promise<void>((resolve, reject) => {
      ws.addEventListener("open", () => resolve(), { once: true });
      ws.addEventListener("error", () => reject(new Error("Can't reach the Conclave server.")), { once: true });
    });
  }

  private userIdFromToken(): string {
    try {
      const part = this.options.token.split(".")[1] ?? "";
      const claims = JSON.parse(atob(part.replace(/-/g, "+").replace(/_/g, "/"))) as { sub?: unknown };
      if (typeof claims.sub === "string") return claims.sub;
    } catch {
      // Fall through.
    }
    throw new Error("This sign-in is not valid any more. Sign in again.");
  }

  private async capture(): Promise<void> {
    const want = { audio: this.options.audio, video: this.options.video };
    if (!want.audio && !want.video) return;
    try {
      this.local = await navigator.mediaDevices.getUserMedia({
        audio: want.audio ? { echoCancellation: true, noiseSuppression: true } : false,
        video: want.video ? { width: { ideal: 640 }, height: { ideal: 360 }, frameRate: { ideal: 24 } } : false,
      });
    } catch (e) {
      const name = e instanceof DOMException ? e.name : "";
      this.emit(
        "notice",
        name === "NotAllowedError"
          ? "Camera and microphone are blocked for this site. You can still listen and watch; allow them in the browser to be seen and heard."
          : "No camera or microphone could be opened. You can still listen and watch.",
      );
      this.local = null;
    }
    this.cameraTrack = this.local?.getVideoTracks()[0] ?? null;
  }

  private send(type: string, fields: Record<string, unknown> = {}, id?: number): void {
    if (this.ws?.readyState !== WebSocket.OPEN) return;
    const msg: Record<string, unknown> = { v: 1, type, ...fields };
    if (id !== undefined) msg.id = id;
    this.ws.send(JSON.stringify(msg));
  }

  private post(m: ToWorker, transfer: Transferable[] = []): void {
    this.worker?.postMessage(m, transfer);
  }

  private fail(what: string, e: unknown): void {
    const msg = e instanceof Error ? e.message : String(e);
    console.error(`conclave: ${what}:`, e);
    this.emit("notice", `Something went wrong while ${what}: ${msg}`);
  }

  // -------------------------------------------------------------------------
  // Signaling and MLS

  private async onMessage(m: ServerMsg): Promise<void> {
    const agent = this.agent;
    if (!agent) return;
    // After `removed` the server may still relay the batch that removes us.
    if ((m.type === "proposal" || m.type === "commit" || m.type === "commit_request") && agent.epoch === null) return;
    switch (m.type) {
      case "ready": {
        this.userId = String(m.user_id);
        this.externalSender = unb64(String(m.external_sender));
        this.send(
          "join_call",
          { call_id: this.options.callId, device_id: this.options.deviceId, key_package: b64(await agent.keyPackage()) },
          1,
        );
        break;
      }
      case "joined":
        this.setPhase("joining");
        await this.negotiate();
        break;
      case "create_group": {
        if (!this.externalSender) throw new Error("no server identity");
        await agent.createGroup(unb64(String(m.group_id)), this.externalSender);
        this.send("group_created", { call_id: this.options.callId, group_info: b64(await agent.groupInfo()) });
        this.installKeys(true);
        break;
      }
      case "proposal":
        await agent.handle(m.message as Uint8Array);
        break;
      case "commit_request": {
        if (agent.epoch !== BigInt(Number(m.epoch))) break;
        agent.discardPendingCommit();
        const b = await agent.commitPending(m.heal === true);
        if (b) {
          const fields: Record<string, unknown> = { call_id: this.options.callId, epoch: Number(b.epoch), commit: b64(b.commit) };
          if (b.welcome) fields.welcome = b64(b.welcome);
          this.send("commit", fields);
        }
        break;
      }
      case "commit": {
        const ev = await agent.handle(m.message as Uint8Array);
        if (ev.some((e) => e.type === "removed")) {
          this.post({ type: "clear" });
          break;
        }
        this.installKeys(false);
        this.send("epoch_ack", { call_id: this.options.callId, epoch: Number(agent.epoch) });
        break;
      }
      case "welcome":
        await agent.join(m.message as Uint8Array);
        this.installKeys(true);
        this.send("epoch_ack", { call_id: this.options.callId, epoch: Number(agent.epoch) });
        break;
      case "epoch_ready": {
        if (agent.epoch === null) break;
        const epoch = BigInt(Number(m.epoch));
        await agent.switchSending(epoch);
        this.post({ type: "send", epoch });
        this.failuresAtReady = this.workerStats.failures;
        this.maybeLive();
        break;
      }
      case "roster":
        this.serverRoster = (m.members as RosterWire[]) ?? [];
        this.emitRoster();
        break;
      case "roster_update":
        this.serverRoster = applyRosterUpdate(
          this.serverRoster,
          (m.changed as RosterWire[] | undefined) ?? [],
          (m.gone as DeviceRefWire[] | undefined) ?? [],
        );
        this.emitRoster();
        break;
      case "active_speaker": {
        const id = `${String(m.user_id)}/${String(m.device_id)}`;
        if (id !== this.speakerId) {
          this.speakerId = id;
          this.emit("speaker", id);
          this.emitRoster();
        }
        break;
      }
      case "media_answer":
        await this.pc?.setRemoteDescription({ type: "answer", sdp: String(m.sdp) });
        break;
      case "media_closed":
        this.emit("notice", "The media connection dropped; reconnecting…");
        this.mediaUp = false;
        await this.negotiate();
        break;
      case "removed":
        this.pendingEnd = {
          reason: String(m.reason),
          message: ENDED_WORDS[String(m.reason)] ?? `You are no longer in the call (${String(m.reason)}).`,
        };
        this.end(this.pendingEnd);
        break;
      case "error":
        if (m.code === "stale_epoch" || m.code === "not_committer") {
          agent.discardPendingCommit();
        } else if (m.id === 1) {
          // The join itself was refused.
          this.pendingEnd = { reason: String(m.code), message: joinRefusal(String(m.code), String(m.message)) };
          this.end(this.pendingEnd);
        } else {
          this.emit("notice", `The server refused a request: ${String(m.message)}`);
        }
        break;
      default:
        break;
    }
  }

  /** Hands the current epoch's keys to the worker (and starts sending in it after a join). */
  private installKeys(sendNow: boolean): void {
    const info = this.agent?.epochInfo;
    if (!info) return;
    const width = info.roster.reduce((m, r) => Math.max(m, r.leaf + 1), 1);
    this.post({
      type: "epoch",
      epoch: info.epoch,
      baseKey: info.sframeBaseKey,
      senderBits: KidLayout.senderBits(width),
      members: info.roster.map((r) => r.leaf),
      leaf: info.leaf,
    });
    if (sendNow) {
      this.post({ type: "send", epoch: info.epoch });
      this.failuresAtReady = this.workerStats.failures;
    }
    this.emit("epoch", { epoch: Number(info.epoch), epochCode: info.epochCode });
    this.emitRoster();
    this.setPhase("securing");
    this.maybeLive();
    this.refreshVideos();
  }

  private maybeLive(): void {
    if (this.mediaUp && this.agent?.epochInfo) this.setPhase("live");
  }

  // -------------------------------------------------------------------------
  // Media

  private transform(options: StreamOptions): RTCRtpScriptTransform | null {
    if (!this.worker) return null;
    return this.scriptTransform ? new RTCRtpScriptTransform(this.worker, options) : null;
  }

  /** Attaches the SFrame transform to a sender or receiver, before negotiation. */
  private protect(end: RTCRtpSender | RTCRtpReceiver, options: StreamOptions): void {
    const t = this.transform(options);
    if (t) {
      end.transform = t;
      return;
    }
    // Fallback: Chrome's encoded streams (the connection has encodedInsertableStreams).
    const pair = (end as unknown as { createEncodedStreams(): { readable: ReadableStream; writable: WritableStream } }).createEncodedStreams();
    this.post({ type: "stream", options, readable: pair.readable, writable: pair.writable }, [
      pair.readable as unknown as Transferable,
      pair.writable as unknown as Transferable,
    ]);
  }

  private async negotiate(): Promise<void> {
    this.pc?.close();
    this.videoSlots.clear();
    this.audioSlots.clear();
    const config: RTCConfiguration & { encodedInsertableStreams?: boolean } = {
      bundlePolicy: "max-bundle",
      rtcpMuxPolicy: "require",
    };
    if (!this.scriptTransform) config.encodedInsertableStreams = true;
    const pc = new RTCPeerConnection(config);
    this.pc = pc;
    const vp8Only = (t: RTCRtpTransceiver): void => {
      const caps = RTCRtpReceiver.getCapabilities("video")?.codecs ?? [];
      const vp8 = caps.filter((c) => c.mimeType.toLowerCase() === "video/vp8");
      if (vp8.length > 0 && typeof t.setCodecPreferences === "function") t.setCodecPreferences(vp8);
    };
    const mic = pc.addTransceiver(this.local?.getAudioTracks()[0] ?? "audio", { direction: "sendonly" });
    this.protect(mic.sender, { role: "send", codec: "opus", context: Number(stream.AUDIO) });
    // The camera goes out as three simulcast layers (rids q, h, f, lowest
    // first): the SFU gives each viewer the layer its bandwidth allows.
    const cam = pc.addTransceiver(this.mutedNow.video ? "video" : this.cameraTrack ?? "video", {
      direction: "sendonly",
      sendEncodings: [
        { rid: "q", scaleResolutionDownBy: 4, maxBitrate: 150_000 },
        { rid: "h", scaleResolutionDownBy: 2, maxBitrate: 500_000 },
        { rid: "f", maxBitrate: 1_200_000 },
      ],
    });
    vp8Only(cam);
    this.protect(cam.sender, { role: "send", codec: "vp8", context: Number(stream.CAMERA) });
    const screen = pc.addTransceiver(this.screenTrack ?? "video", { direction: "sendonly" });
    vp8Only(screen);
    this.protect(screen.sender, { role: "send", codec: "vp8", context: Number(stream.SCREEN) });
    this.senders = { audio: mic.sender, camera: cam.sender, screen: screen.sender };
    for (let i = 0; i < AUDIO_SLOTS; i++) {
      const t = pc.addTransceiver("audio", { direction: "recvonly" });
      this.protect(t.receiver, { role: "recv", codec: "opus", slot: `a${i}` });
      this.remoteAudio.addTrack(t.receiver.track);
    }
    for (let i = 0; i < VIDEO_SLOTS; i++) {
      const t = pc.addTransceiver("video", { direction: "recvonly" });
      vp8Only(t);
      const slot = `v${i}`;
      this.protect(t.receiver, { role: "recv", codec: "vp8", slot });
      this.videoSlots.set(slot, { stream: new MediaStream([t.receiver.track]), leaf: null, context: null });
    }
    this.emit("audio", this.remoteAudio);
    pc.onconnectionstatechange = () => {
      if (pc !== this.pc) return;
      if (pc.connectionState === "connected") {
        this.mediaUp = true;
        this.maybeLive();
      } else if (pc.connectionState === "failed") {
        this.mediaUp = false;
        this.emit("notice", "The media connection failed. Trying again…");
        this.chain = this.chain.then(() => this.negotiate()).catch((e) => this.fail("reconnecting media", e));
      }
    };
    const offer = await pc.createOffer();
    await pc.setLocalDescription(offer);
    await gathered(pc, 2000);
    const sources = [
      { mid: mic.mid, source: "audio" },
      { mid: cam.mid, source: "camera" },
      { mid: screen.mid, source: "screen" },
    ].filter((s) => s.mid !== null);
    this.send("media_offer", { call_id: this.options.callId, sdp: pc.localDescription?.sdp ?? offer.sdp, sources }, 4);
  }

  private onWorker(m: FromWorker): void {
    switch (m.type) {
      case "stats":
        this.workerStats = { ...m };
        break;
      case "slot": {
        if (m.slot.startsWith("a")) {
          this.audioSlots.set(m.slot, m.leaf);
          break;
        }
        const s = this.videoSlots.get(m.slot);
        if (s && (s.leaf !== m.leaf || s.context !== m.context)) {
          s.leaf = m.leaf;
          s.context = m.context;
          this.refreshVideos();
        }
        break;
      }
      case "error":
        console.warn("conclave worker:", m.message);
        break;
    }
  }

  private memberIdOfLeaf(leaf: number): string | null {
    const r = this.agent?.epochInfo?.roster.find((e) => e.leaf === leaf);
    if (!r || r.principal.kind !== "member") return null;
    return `${r.principal.userId}/${r.principal.deviceId}`;
  }

  private refreshVideos(): void {
    const out: RemoteVideo[] = [];
    for (const [slot, s] of this.videoSlots) {
      out.push({
        slot,
        memberId: s.leaf === null ? null : this.memberIdOfLeaf(s.leaf),
        source: s.context === null ? null : s.context === Number(stream.SCREEN) ? "screen" : "camera",
        stream: s.stream,
      });
    }
    this.emit("videos", out);
  }

  // -------------------------------------------------------------------------
  // Roster and verification

  /** The roster merged with the MLS group: who is really in the encrypted group, and with which key. */
  members(): Member[] {
    const info = this.agent?.epochInfo ?? null;
    const self = `${this.userId}/${this.options.deviceId}`;
    const seenLeaves = new Set<number>();
    const out: Member[] = this.serverRoster.map((r) => {
      const id = `${r.user_id}/${r.device_id}`;
      const leaf = r.leaf ?? null;
      const inTree = leaf === null ? undefined : info?.roster.find((e) => e.leaf === leaf);
      if (leaf !== null) seenLeaves.add(leaf);
      const rosterKey = unb64(r.identity_key);
      const sameIdentity =
        inTree !== undefined &&
        inTree.principal.kind === "member" &&
        inTree.principal.userId === r.user_id &&
        inTree.principal.deviceId === r.device_id &&
        sameBytes(inTree.identityKey, rosterKey);
      return {
        id,
        userId: r.user_id,
        deviceId: r.device_id,
        displayName: r.display_name ?? "",
        self: id === self,
        leaf,
        inGroup: sameIdentity,
        keyMismatch: inTree !== undefined && !sameIdentity,
        verified: id === self || this.isVerified(id, rosterKey),
        audioMuted: r.audio_muted,
        videoMuted: r.video_muted,
        publishing: r.publishing ?? [],
        recorder: r.recorder ?? false,
        speaking: id === this.speakerId,
      };
    });
    // A member of the encrypted group the server's roster does not show is
    // someone listening in: show it, flagged.
    for (const e of info?.roster ?? []) {
      if (seenLeaves.has(e.leaf) || e.principal.kind !== "member") continue;
      const id = `${e.principal.userId}/${e.principal.deviceId}`;
      out.push({
        id,
        userId: e.principal.userId,
        deviceId: e.principal.deviceId,
        displayName: "",
        self: id === self,
        leaf: e.leaf,
        inGroup: true,
        keyMismatch: id !== self,
        verified: id === self,
        audioMuted: true,
        videoMuted: true,
        publishing: [],
        recorder: false,
        speaking: false,
      });
    }
    return out;
  }

  private isVerified(memberId: string, key: Uint8Array): boolean {
    try {
      return localStorage.getItem(verifiedKey(memberId)) === hex(key);
    } catch {
      return false;
    }
  }

  private emitRoster(): void {
    this.emit("roster", this.members());
  }

  verification(): Verification | null {
    const info: EpochInfo | null = this.agent?.epochInfo ?? null;
    const agent = this.agent;
    if (!info || !agent) return null;
    const keyOf = (memberId: string) => {
      const e = info.roster.find(
        (r) => r.principal.kind === "member" && `${r.principal.userId}/${r.principal.deviceId}` === memberId,
      );
      if (!e || e.principal.kind !== "member") throw new Error("That member is not in the encrypted group.");
      return { userId: e.principal.userId, key: e.identityKey };
    };
    return {
      epoch: Number(info.epoch),
      epochCode: info.epochCode,
      safetyNumber: async (memberId) => {
        const them = keyOf(memberId);
        return safetyNumber(this.userId, agent.identity.publicKey, them.userId, them.key);
      },
      setVerified: (memberId, verified) => {
        const them = keyOf(memberId);
        try {
          if (verified) localStorage.setItem(verifiedKey(memberId), hex(them.key));
          else localStorage.removeItem(verifiedKey(memberId));
        } catch {
          this.emit("notice", "This browser could not remember the verification (storage is disabled).");
        }
        this.emitRoster();
      },
    };
  }

  stats(): CallStats {
    const epoch = this.agent?.epoch;
    const sending = this.agent?.sendingEpoch;
    return {
      epoch: epoch === null || epoch === undefined ? null : Number(epoch),
      sendingEpoch: sending === null || sending === undefined ? null : Number(sending),
      framesEncrypted: this.workerStats.encrypted,
      framesDecrypted: this.workerStats.decrypted,
      decryptFailures: this.workerStats.failures,
      decryptFailuresThisEpoch: this.workerStats.failures - this.failuresAtReady,
      hearing: [
        ...new Set(
          [...this.audioSlots.values()].map((leaf) => this.memberIdOfLeaf(leaf)).filter((id): id is string => id !== null),
        ),
      ],
    };
  }

  // -------------------------------------------------------------------------
  // Controls

  setMuted(kind: "audio" | "video", muted: boolean): void {
    this.mutedNow[kind] = muted;
    if (kind === "audio") {
      for (const t of this.local?.getAudioTracks() ?? []) t.enabled = !muted;
    } else {
      // Stop sending video altogether while the camera is off.
      void this.senders.camera?.replaceTrack(muted ? null : this.cameraTrack);
      if (this.cameraTrack) this.cameraTrack.enabled = !muted;
    }
    this.send("set_mute", { call_id: this.options.callId, audio: this.mutedNow.audio, video: this.mutedNow.video });
  }

  async startScreenShare(): Promise<void> {
    if (this.screenTrack) return;
    let media: MediaStream;
    try {
      media = await navigator.mediaDevices.getDisplayMedia({ video: { frameRate: { ideal: 15 } }, audio: false });
    } catch (e) {
      const name = e instanceof DOMException ? e.name : "";
      throw new Error(
        name === "NotAllowedError" ? "Screen sharing was cancelled or is not allowed." : "Screen sharing is not available in this browser.",
      );
    }
    const track = media.getVideoTracks()[0];
    if (!track) throw new Error("No screen was chosen.");
    track.contentHint = "detail";
    track.onended = () => this.stopScreenShare();
    this.screenTrack = track;
    await this.senders.screen?.replaceTrack(track);
  }

  stopScreenShare(): void {
    const t = this.screenTrack;
    if (!t) return;
    this.screenTrack = null;
    t.onended = null;
    t.stop();
    void this.senders.screen?.replaceTrack(null);
  }

  /** Leaves the call: the others rekey without this device. */
  async leave(): Promise<void> {
    if (this.phaseNow === "ended") return;
    this.send("leave_call", { call_id: this.options.callId });
    // Wait briefly for `removed`; end locally either way.
    await new Promise((r) => setTimeout(r, 300));
    this.end({ reason: "left", message: ENDED_WORDS.left! });
  }

  private end(e: CallEnded): void {
    if (this.endedOnce) return;
    this.endedOnce = true;
    this.agent?.leave();
    this.post({ type: "clear" });
    this.stopScreenShare();
    for (const t of this.local?.getTracks() ?? []) t.stop();
    this.pc?.close();
    this.pc = null;
    this.ws?.close();
    this.worker?.terminate();
    this.worker = null;
    this.setPhase("ended");
    this.emit("ended", e);
  }
}

function joinRefusal(code: string, message: string): string {
  switch (code) {
    case "forbidden":
      return `You can't join this call: ${message}`;
    case "call_full":
      return "This call is full.";
    case "unauthorized":
      return "Your sign-in has expired. Sign in again.";
    default:
      return `The server refused to let you join: ${message}`;
  }
}

/** Waits until ICE gathering completes, or `ms`. */
function gathered(pc: RTCPeerConnection, ms: number): Promise<void> {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", check);
      resolve();
    };
    const check = () => {
      if (pc.iceGatheringState === "complete") done();
    };
    const timer = setTimeout(done, ms);
    pc.addEventListener("icegatheringstatechange", check);
  });
}
