// Everything the app says about the engine's states and errors, in words.
import type { CallEnded, CallPhase } from "../src/call-types.js";

export const phaseWords: Record<CallPhase, string> = {
  connecting: "Connecting…",
  joining: "Joining the call…",
  securing: "Setting up encryption…",
  live: "End-to-end encrypted",
  ended: "Call ended",
};

/** A longer explanation for the lock badge's tooltip. */
export const phaseDetail: Record<CallPhase, string> = {
  connecting: "Connecting to the server.",
  joining: "Waiting to be let into the call's encryption group.",
  securing: "Agreeing keys with everyone in the call. Media stays encrypted with keys the server never sees.",
  live: "Sound, video and screen shares are encrypted on each device with keys only the people in this call hold. The server cannot see or hear them.",
  ended: "You are no longer in this call.",
};

export function endedWords(e: CallEnded): string {
  switch (e.reason) {
    case "left":
      return "You left the call";
    case "removed_by_admin":
      return "An administrator removed you from this call";
    case "disconnected":
      return "Connection lost";
    default:
      return e.message || "The call ended because of an error";
  }
}

/** Something to say about an error from the engine, the server or the browser. */
export function errorWords(e: unknown): string {
  if (e instanceof DOMException || (e instanceof Error && /^(NotAllowed|NotFound|NotReadable|Overconstrained|Abort)Error$/.test(e.name))) {
    const err = e as Error;
    switch (err.name) {
      case "NotAllowedError":
        return "The browser blocked the camera or microphone. Allow access (the icon in the address bar), or join with them turned off.";
      case "NotFoundError":
        return "No camera or microphone was found. Join with them turned off, or connect one.";
      case "NotReadableError":
        return "The camera or microphone is in use by another app. Close it, or join with them turned off.";
      case "OverconstrainedError":
        return "The camera does not support the requested settings.";
      case "AbortError":
        return "The camera or microphone could not be started.";
    }
  }
  if (isApiError(e)) {
    if (e.status === 0) return "Can't reach the server. Check your connection and try again.";
    if (e.status === 401) return "Your session has expired. Sign in again.";
    if (e.status === 403) return e.message || "You are not allowed to do that.";
    if (e.status === 429) return "Too many attempts. Wait a minute and try again.";
    if (e.status >= 500) return "The server had a problem. Try again in a moment.";
    return e.message;
  }
  if (e instanceof TypeError) return "Can't reach the server. Check your connection and try again.";
  if (e instanceof Error && e.message) return e.message;
  return "Something went wrong.";
}

/** Duck-typed so this module does not need the engine: ApiError has a numeric `status`. */
export function isApiError(e: unknown): e is Error & { status: number } {
  return e instanceof Error && typeof (e as { status?: unknown }).status === "number";
}

/** "in 10 minutes", "in 1 hour", "in 2 days". */
export function durationWords(seconds: number): string {
  const units: [number, string][] = [
    [86400, "day"],
    [3600, "hour"],
    [60, "minute"],
  ];
  for (const [size, name] of units) {
    if (seconds >= size) {
      const n = Math.round(seconds / size);
      return `${n} ${name}${n === 1 ? "" : "s"}`;
    }
  }
  return `${Math.max(1, Math.round(seconds))} seconds`;
}
