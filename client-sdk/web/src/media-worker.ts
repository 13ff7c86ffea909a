// The SFrame worker: every encoded audio and video frame of a call passes
// through here, on its way to the packetizer (encrypt) or from the
// depacketizer (decrypt). Keys never leave this worker except as they arrive
// from the page's MLS agent (one base key per epoch).
//
// Frames reach it through RTCRtpScriptTransform (`rtctransform` events) or,
// where that is missing, as the readable/writable pair of
// createEncodedStreams posted by the page. Either way the options say what
// the stream is (see `StreamOptions`).
//
// A sender without a key for its epoch drops frames (nothing leaves in
// clear); a receiver passes only frames that authenticate, so the decoder
// never sees ciphertext, and counts the rest.

import { KeyRing, KidLayout } from "./kid.js";
import { type CipherSuite, type Codec, FrameEncryptor } from "./sframe.js";

/** What a transform carries (the options given to RTCRtpScriptTransform). */
export type StreamOptions =
  | { role: "send"; codec: Codec; context: number }
  | { role: "recv"; codec: Codec; slot: string };

/** Page → worker. */
export type ToWorker =
  | { type: "config"; suite: CipherSuite; epochBits: number; retentionMs: number }
  | { type: "epoch"; epoch: bigint; baseKey: Uint8Array; senderBits: number; members: number[]; leaf: number }
  | { type: "send"; epoch: bigint }
  | { type: "clear" }
  | { type: "stream"; options: StreamOptions; readable: ReadableStream; writable: WritableStream };

/** Who is in a receive slot now, from the KID of its last authentic frame. */
export interface SlotSender {
  slot: string;
  leaf: number;
  context: number;
  epoch: bigint;
}

/** Worker → page. */
export type FromWorker =
  | {
      type: "stats";
      encrypted: number;
      decrypted: number;
      /** Frames that failed to decrypt while this member held keys. */
      failures: number;
      /** Frames received before this member held any key (joining). */
      beforeKeys: number;
      /** Frames a sender dropped because it had no key yet. */
      unsentNoKey: number;
    }
  | ({ type: "slot" } & SlotSender)
  | { type: "error"; message: string };

interface EncodedFrame {
  data: ArrayBuffer;
  getMetadata?(): { rid?: string };
}

/** Camera simulcast layers have their own KID contexts (kid.ts): q → 1, h → 3, f → 4. */
function cameraContext(frame: EncodedFrame): number {
  const rid = frame.getMetadata?.().rid;
  return rid === "h" ? 3 : rid === "f" ? 4 : 1;
}

interface WorkerScope {
  postMessage(m: FromWorker): void;
  onmessage: ((ev: MessageEvent<ToWorker>) => void) | null;
  onrtctransform?: ((ev: { transformer: { readable: ReadableStream; writable: WritableStream; options: StreamOptions } }) => void) | null;
}
declare const self: WorkerScope;

let ring = new KeyRing();
/** Our leaf per installed epoch (stable in MLS, but recorded with each epoch). */
const leafOf = new Map<bigint, number>();
/** One encryptor per outbound context; counters survive key changes. */
const senders = new Map<number, FrameEncryptor>();
let sendEpoch: bigint | null = null;
const counts = { encrypted: 0, decrypted: 0, failures: 0, beforeKeys: 0, unsentNoKey: 0 };
const slotSenders = new Map<string, SlotSender>();
/** Serialises key changes with respect to each other. */
let keyChain: Promise<void> = Promise.resolve();

/** The bytes of `b` as an ArrayBuffer: its own buffer when it spans all of it (no copy). */
function ownBuffer(b: Uint8Array): ArrayBuffer {
  const whole = b.byteOffset === 0 && b.byteLength === b.buffer.byteLength;
  return (whole ? b.buffer : b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength)) as ArrayBuffer;
}

function report(e: unknown): void {
  self.postMessage({ type: "error", message: e instanceof Error ? `${e.name}: ${e.message}` : String(e) });
}

async function setSendEpoch(epoch: bigint): Promise<void> {
  const leaf = leafOf.get(epoch);
  if (leaf === undefined) throw new Error(`no keys for epoch ${epoch}`);
  for (const [context, enc] of senders) enc.setKey(await ring.senderKey(epoch, leaf, context));
  sendEpoch = epoch;
}

async function encryptorFor(context: number): Promise<FrameEncryptor | null> {
  let enc = senders.get(context);
  if (enc) return enc;
  if (sendEpoch === null) return null;
  const leaf = leafOf.get(sendEpoch);
  if (leaf === undefined) return null;
  enc = new FrameEncryptor(await ring.senderKey(sendEpoch, leaf, context));
  senders.set(context, enc);
  return enc;
}

function pipe(options: StreamOptions, readable: ReadableStream, writable: WritableStream): void {
  const transform =
    options.role === "send"
      ? async (frame: EncodedFrame, out: TransformStreamDefaultController<EncodedFrame>) => {
          const context = options.context === 1 && options.codec === "vp8" ? cameraContext(frame) : options.context;
          const enc = await encryptorFor(context);
          if (!enc || sendEpoch === null) {
            counts.unsentNoKey++;
            return;
          }
          const protectedFrame = await enc.encrypt(options.codec, new Uint8Array(frame.data));
          frame.data = ownBuffer(protectedFrame);
          counts.encrypted++;
          out.enqueue(frame);
        }
      : async (frame: EncodedFrame, out: TransformStreamDefaultController<EncodedFrame>) => {
          if (frame.data.byteLength === 0) return;
          if (ring.currentEpoch === null) {
            counts.beforeKeys++;
            return;
          }
          let d;
          try {
            d = await ring.decrypt(Date.now(), options.codec, new Uint8Array(frame.data));
          } catch {
            counts.failures++;
            return;
          }
          frame.data = ownBuffer(d.frame);
          counts.decrypted++;
          const context = Number(d.context);
          const prev = slotSenders.get(options.slot);
          if (!prev || prev.leaf !== d.leaf || prev.context !== context || prev.epoch !== d.epoch) {
            const s: SlotSender = { slot: options.slot, leaf: d.leaf, context, epoch: d.epoch };
            slotSenders.set(options.slot, s);
            self.postMessage({ type: "slot", ...s });
          }
          out.enqueue(frame);
        };
  readable
    .pipeThrough(
      new TransformStream<EncodedFrame, EncodedFrame>({
        transform: (frame, out) =>
          transform(frame, out).catch((e) => {
            // A frame that cannot be processed is dropped; the stream goes on.
            if (options.role === "send") counts.unsentNoKey++;
            else counts.failures++;
            report(e);
          }),
      }),
    )
    .pipeTo(writable)
    .catch(() => {
      // The transceiver stopped: nothing to do.
    });
}

self.onrtctransform = (ev) => {
  const t = ev.transformer;
  pipe(t.options, t.readable, t.writable);
};

self.onmessage = (ev) => {
  const m = ev.data;
  switch (m.type) {
    case "config":
      ring = new KeyRing({ suite: m.suite, layout: new KidLayout(m.epochBits), retentionMs: m.retentionMs });
      break;
    case "epoch":
      keyChain = keyChain.then(() => {
        leafOf.set(m.epoch, m.leaf);
        ring.installEpoch(
          { epoch: m.epoch, baseKey: m.baseKey, senderBits: m.senderBits, members: new Set(m.members) },
          Date.now(),
        );
      });
      break;
    case "send":
      keyChain = keyChain.then(() => setSendEpoch(m.epoch)).catch(report);
      break;
    case "clear":
      keyChain = keyChain.then(() => {
        ring.clear();
        leafOf.clear();
        senders.clear();
        sendEpoch = null;
      });
      break;
    case "stream":
      pipe(m.options, m.readable, m.writable);
      break;
  }
};

setInterval(() => self.postMessage({ type: "stats", ...counts }), 250);
