// Conclave web app: entry point and navigation between screens.
//
//   /                       sign in, then the lobby
//   /?call=<id>             join <id>: at once if signed in (e.g. a reload during the
//                           call), else sign in, then the lobby with <id> filled in
//   /?call=<id>&invite=<c>  guest link: join <id> as a guest, no account needed
//
// While in a call the address shows /?call=<id>, so a reload rejoins it.
import type { CallEnded } from "../src/call-types.js";
import { CallView } from "./call/view.js";
import { endedScreen, guestScreen, lobbyScreen, server, signInScreen } from "./screens.js";
import {
  clearSession,
  claimDeviceId,
  isValidId,
  loadPrefs,
  loadSession,
  sessionValid,
  type JoinPrefs,
  type Session,
} from "./session.js";
import { clearToasts } from "./ui/toast.js";

const root = document.getElementById("app") ?? document.body;

/** Shows one screen; moves focus to its heading unless the screen focused a field itself. */
function show(screen: HTMLElement, title: string): void {
  root.replaceChildren(screen);
  document.title = `${title} · Conclave`;
  queueMicrotask(() => {
    if (root.contains(document.activeElement)) return;
    const heading = root.querySelector("h1");
    heading?.setAttribute("tabindex", "-1");
    heading?.focus({ preventScroll: true });
  });
}

/** Keeps the address bar in step with the screen, without adding history entries. */
function setUrl(callId: string | null): void {
  const url = callId ? `${location.pathname}?call=${encodeURIComponent(callId)}` : location.pathname;
  history.replaceState(null, "", url);
}

function showSignIn(pendingCall: string | null, message: string | null = null): void {
  setUrl(pendingCall);
  show(
    signInScreen({
      pendingCall,
      message,
      // With a call in the link, the lobby opens with it filled in: one click
      // to join, after choosing camera and microphone.
      onSignedIn: (session) => showLobby(session, null, pendingCall ?? ""),
    }),
    "Sign in",
  );
}

function showLobby(session: Session, message: string | null = null, initialCall = ""): void {
  setUrl(null);
  show(
    lobbyScreen({
      session,
      message,
      initialCall,
      onJoin: (callId, prefs) => {
        // The lobby may have sat open longer than the token lives.
        if (!sessionValid(session)) {
          clearSession();
          showSignIn(callId, "Your sign-in expired. Sign in again to join.");
        } else {
          void joinCall(session, callId, prefs);
        }
      },
      onSignOut: () => {
        clearSession();
        showSignIn(null, "You signed out.");
      },
    }),
    "Lobby",
  );
}

function showGuest(callId: string | null, invite: string | null): void {
  const existing = loadSession();
  const guestSession = existing?.kind === "guest" && (!callId || existing.call === callId) && !invite ? existing : null;
  const user = existing?.kind === "user" ? existing : null;
  show(
    guestScreen({
      callId,
      invite,
      guestSession,
      user,
      onJoin: (session, id, prefs) => joinCall(session, id, prefs),
      onJoinAsUser: (id, prefs) => (user ? joinCall(user, id, prefs) : showSignIn(id)),
    }),
    "Invitation",
  );
}

async function joinCall(session: Session, callId: string, prefs: JoinPrefs): Promise<void> {
  clearToasts();
  setUrl(callId);
  const view = new CallView({
    server: server(),
    session,
    callId,
    deviceId: await claimDeviceId(),
    audio: prefs.audio,
    video: prefs.video,
    onEnded: (e, wasLive) => showEnded(session, callId, prefs, e, wasLive),
  });
  show(view.el, callId);
  void view.start();
}

function showEnded(session: Session, callId: string, prefs: JoinPrefs, ended: CallEnded, wasLive: boolean): void {
  clearToasts(); // the call's notices are about a call that is over
  const isGuest = session.kind === "guest";
  // A guest's way back in is this call's address; a user's is the lobby.
  setUrl(isGuest ? callId : null);
  show(
    endedScreen({
      callId,
      ended,
      wasLive,
      canLobby: !isGuest,
      onRejoin: () => {
        if (sessionValid(session)) void joinCall(session, callId, prefs);
        else if (isGuest) showGuest(callId, null);
        else {
          clearSession();
          showSignIn(callId, "Your sign-in expired. Sign in again to rejoin.");
        }
      },
      onLobby: () => {
        const s = loadSession();
        if (s?.kind === "user") showLobby(s, null, callId);
        else showSignIn(null, "Your sign-in expired. Sign in again.");
      },
    }),
    "Call ended",
  );
}

/** Decides the first screen from the address and the stored session. */
function boot(): void {
  const params = new URLSearchParams(location.search);
  const rawCall = params.get("call");
  const invite = params.get("invite");
  const callId = rawCall !== null && isValidId(rawCall) ? rawCall : null;
  const session = loadSession();

  if (invite !== null) {
    // Keep the invitation out of the address bar (it shows up in screen shares and history).
    setUrl(callId);
    showGuest(callId, invite);
    return;
  }
  if (session?.kind === "guest") {
    // A guest reloading the page: straight back into their call.
    if (session.call && (!callId || callId === session.call)) void joinCall(session, session.call, loadPrefs());
    else showGuest(callId, null);
    return;
  }
  if (rawCall !== null && callId === null) {
    // A malformed ?call= is most likely a mistyped link: explain it in the lobby.
    const message = "That link's call name is not valid. Check the link, or type the call name below.";
    if (session) showLobby(session, message);
    else showSignIn(null, message);
    return;
  }
  if (session) {
    if (callId) void joinCall(session, callId, loadPrefs());
    else showLobby(session);
  } else {
    showSignIn(callId);
  }
}

boot();
