// Signaling frames from the Conclave server (docs/protocol.md, "Frames").
//
// Most server messages are JSON text frames. `proposal`, `commit` and
// `welcome` carry an MLS message that a rekey fans out to every member, so
// they come as binary frames instead: a 4-byte big-endian length n, n bytes
// of the JSON object without its `message` field, then the MLS message as raw
// bytes. decodeServerFrame turns either kind into one object; for those three
// types `message` is then a Uint8Array.

/** A server message: `type` plus its fields. */
export type ServerMessage = { type: string; id?: number; call_id?: string; [k: string]: unknown };

/** The server's types whose `message` is an MLS message. */
const MLS_TYPES = new Set(["proposal", "commit", "welcome"]);

/** Why a frame from the server could not be read. */
export class FrameError extends Error {
  override name = "FrameError";
}

const base64ToBytes = (s: string): Uint8Array => Uint8Array.from(atob(s), (c) => c.charCodeAt(0));

function parseObject(text: string): ServerMessage {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (e) {
    throw new FrameError(`not JSON: ${e instanceof Error ? e.message : String(e)}`);
  }
  if (typeof v !== "object" || v === null || Array.isArray(v) || typeof (v as { type?: unknown }).type !== "string") {
    throw new FrameError("not a message object");
  }
  return v as ServerMessage;
}

/** Decodes one WebSocket frame from the server: a string (text) or bytes (binary). */
export function decodeServerFrame(data: string | ArrayBuffer | Uint8Array): ServerMessage {
  if (typeof data === "string") {
    const m = parseObject(data);
    if (MLS_TYPES.has(m.type)) {
      if (typeof m.message !== "string" || m.message === "") throw new FrameError(`${m.type} without its MLS message`);
      m.message = base64ToBytes(m.message);
    }
    return m;
  }
  const b = data instanceof Uint8Array ? data : new Uint8Array(data);
  if (b.length < 4) throw new FrameError("binary frame shorter than its length prefix");
  const n = new DataView(b.buffer, b.byteOffset, b.byteLength).getUint32(0);
  if (n > b.length - 4) throw new FrameError("binary frame header longer than the frame");
  const m = parseObject(new TextDecoder("utf-8", { fatal: true }).decode(b.subarray(4, 4 + n)));
  if (!MLS_TYPES.has(m.type)) throw new FrameError(`${m.type} does not come in a binary frame`);
  if ("message" in m || b.length === 4 + n) throw new FrameError("the MLS message must follow the header, and only there");
  m.message = b.slice(4 + n);
  return m;
}
