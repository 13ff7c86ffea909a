// The browser call client's public surface (implemented in call.ts): what a
// web app needs to render a call. Everything here is plain data; the client
// keeps MLS state, WebRTC and the SFrame worker to itself.

/** Where the call stands, as the app should present it. */
export type CallPhase =
  /** Opening the WebSocket and signing the session in. */
  | "connecting"
  /** Joined on the server; waiting for the MLS group (create or Welcome). */
  | "joining"
  /** In the MLS group; media is negotiating or the first epoch is settling. */
  | "securing"
  /** Keys agreed and media connected: the call is end-to-end encrypted. */
  | "live"
  /** The call ended for this client (see `CallEnded`). */
  | "ended";

/** Why the call ended for this client. */
export interface CallEnded {
  /** `left` (you left), `removed_by_admin`, `disconnected`, `error`. */
  reason: string;
  /** Words for the user. */
  message: string;
}

/** A media source a member can publish. */
export type Source = "audio" | "camera" | "screen";

/** One member of the call, merged from the server roster and the MLS group. */
export interface Member {
  /** `user_id/device_id`: stable while the member is in the call. */
  id: string;
  userId: string;
  deviceId: string;
  /** The account's display name from the server ("Guest" for guests; empty if unknown). Not bound to the key: verify by safety number. */
  displayName: string;
  /** This browser's own entry. */
  self: boolean;
  /** Leaf index in the MLS group; null while the member is still joining. */
  leaf: number | null;
  /** The server's roster key matches the key in the MLS group ("lock" shown). */
  inGroup: boolean;
  /** The roster's identity key differs from the one in the MLS group: possible man in the middle. */
  keyMismatch: boolean;
  /** This user verified the member's safety number (remembered per identity key in localStorage). */
  verified: boolean;
  audioMuted: boolean;
  videoMuted: boolean;
  /** Sources whose media reaches the SFU. */
  publishing: Source[];
  /** The organisation's retention recorder. */
  recorder: boolean;
  /** Currently the loudest speaker. */
  speaking: boolean;
}

/** A remote video the app should show. */
export interface RemoteVideo {
  /** Stable per receive slot. */
  slot: string;
  /** The member whose frames are in this slot now (from the decrypted KID), or null before the first frame. */
  memberId: string | null;
  /** "camera" or "screen". */
  source: "camera" | "screen" | null;
  stream: MediaStream;
}

/** What the verify panel shows. */
export interface Verification {
  /** The current MLS epoch. */
  epoch: number;
  /** Short code every member sees for the same epoch (compare aloud). */
  epochCode: string;
  /** Safety number between this device and `memberId` (60 digits in 12 groups of 5). */
  safetyNumber(memberId: string): Promise<string>;
  /** Marks `memberId`'s current identity key as verified (or not) on this browser. */
  setVerified(memberId: string, verified: boolean): void;
}

/** Counters the app (and tests) can read. */
export interface CallStats {
  /** The newest MLS epoch this client holds keys for. */
  epoch: number | null;
  /** The epoch its frames are sent in: behind `epoch` until the server says every member holds it. */
  sendingEpoch: number | null;
  /** Frames this client encrypted and sent. */
  framesEncrypted: number;
  /** Frames received and decrypted. */
  framesDecrypted: number;
  /** Frames received that did not decrypt (unknown key, bad tag, replay). */
  decryptFailures: number;
  /** Decrypt failures since the current epoch became ready. */
  decryptFailuresThisEpoch: number;
  /** Members whose voice is in this client's audio slots now (from the decrypted KIDs). */
  hearing: string[];
}

/** Events the client emits (`client.on(name, fn)`). */
export interface CallEvents {
  phase: (phase: CallPhase) => void;
  roster: (members: Member[]) => void;
  videos: (videos: RemoteVideo[]) => void;
  /** Remote audio (all receive slots mixed by the browser): attach once to an <audio autoplay>. */
  audio: (stream: MediaStream) => void;
  epoch: (v: { epoch: number; epochCode: string }) => void;
  /** `memberId` of the loudest speaker. */
  speaker: (memberId: string | null) => void;
  /** A problem worth telling the user about, in words; the call may carry on. */
  notice: (message: string) => void;
  ended: (e: CallEnded) => void;
}

/** How to start a call client. */
export interface CallOptions {
  /** Server base URL, e.g. `http://127.0.0.1:8080` (the page's origin by default). */
  server?: string;
  /** Session token from `/api/login` or `/api/guest`. */
  token: string;
  callId: string;
  /** This browser's device id (kept in localStorage by the app). */
  deviceId: string;
  /** Capture and publish the microphone / camera at once (default true). */
  audio?: boolean;
  video?: boolean;
}
