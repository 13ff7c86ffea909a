// The screens around a call: sign in, lobby, guest invitation, call ended.
import { guestToken, login } from "../src/call.js";
import type { CallEnded } from "../src/call-types.js";
import { h, icon, type Child } from "./ui/dom.js";
import { icons } from "./ui/icons.js";
import { brand, busy, e2eeNote, errorLine, field, toggle } from "./ui/parts.js";
import {
  callNameProblem,
  loadPrefs,
  savePrefs,
  saveSession,
  suggestCallName,
  type JoinPrefs,
  type Session,
} from "./session.js";
import { endedWords, errorWords, isApiError } from "./words.js";

/** The server is the page's origin: the server serves this app. */
export const server = (): string => location.origin;

/** A centred card on the light background, with the product mark above it. */
function authLayout(...card: Child[]): HTMLElement {
  return h(
    "main",
    { class: "auth" },
    h("div", { class: "auth-inner" }, brand(), h("div", { class: "card" }, ...card), e2eeNote()),
  );
}

// ---------------------------------------------------------------- sign in

export function signInScreen(opts: {
  pendingCall: string | null;
  message: string | null;
  onSignedIn: (session: Session) => void;
}): HTMLElement {
  const username = h("input", {
    type: "text",
    name: "username",
    autocomplete: "username",
    autocapitalize: "none",
    spellcheck: "false",
    required: true,
    "data-testid": "signin-username",
  });
  const password = h("input", {
    type: "password",
    name: "password",
    autocomplete: "current-password",
    required: true,
    "data-testid": "signin-password",
  });
  const error = errorLine();
  const submit = h("button", { type: "submit", class: "btn btn-primary btn-block", "data-testid": "signin-submit" }, "Sign in");

  const form = h(
    "form",
    { class: "form", novalidate: true },
    field({ id: "signin-username", label: "Username", input: username }),
    field({ id: "signin-password", label: "Password", input: password }),
    error.el,
    submit,
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const user = username.value.trim();
    if (!user || !password.value) {
      error.show("Enter your username and password.");
      (user ? password : username).focus();
      return;
    }
    error.show(null);
    void busy(submit, async () => {
      try {
        const r = await login(server(), user, password.value);
        opts.onSignedIn(saveSession(r.token, r.userId, user));
      } catch (e) {
        error.show(isApiError(e) && e.status === 401 ? "Wrong username or password." : errorWords(e));
        password.select();
        password.focus();
      }
    });
  });

  const lead = opts.pendingCall
    ? h("p", { class: "lead" }, "Sign in to join ", h("strong", {}, opts.pendingCall), ".")
    : h("p", { class: "lead" }, "Sign in with your organisation account.");
  const notice = opts.message ? h("p", { class: "banner banner-info", role: "status" }, icon(icons.info), opts.message) : null;
  const screen = authLayout(h("h1", {}, "Sign in"), lead, notice, form);
  queueMicrotask(() => username.focus());
  return screen;
}

// ---------------------------------------------------------------- lobby

/** The camera and microphone switches, remembered for next time. */
function joinToggles(): { el: HTMLElement; prefs(): JoinPrefs } {
  const initial = loadPrefs();
  const cam = toggle({ label: "Camera on when I join", svg: icons.camera, checked: initial.video, testid: "toggle-camera" });
  const mic = toggle({ label: "Microphone on when I join", svg: icons.mic, checked: initial.audio, testid: "toggle-mic" });
  const prefs = (): JoinPrefs => ({ audio: mic.input.checked, video: cam.input.checked });
  const save = () => savePrefs(prefs());
  cam.input.addEventListener("change", save);
  mic.input.addEventListener("change", save);
  return { el: h("div", { class: "switches" }, cam.el, mic.el), prefs };
}

export function lobbyScreen(opts: {
  session: Session;
  message: string | null;
  initialCall: string;
  onJoin: (callId: string, prefs: JoinPrefs) => void;
  onSignOut: () => void;
}): HTMLElement {
  const name = h("input", {
    type: "text",
    name: "call",
    autocomplete: "off",
    autocapitalize: "none",
    spellcheck: "false",
    maxlength: "200",
    placeholder: "e.g. clinic-room-4",
    "data-testid": "call-name",
  });
  name.value = opts.initialCall;
  const error = errorLine();
  const toggles = joinToggles();
  const join = h(
    "button",
    { type: "submit", class: "btn btn-primary btn-block", "data-testid": "join-call" },
    icon(icons.arrow),
    "Join call",
  );

  const form = h(
    "form",
    { class: "form", novalidate: true },
    field({
      id: "call-name",
      label: "Call name",
      input: name,
      hint: "Everyone who joins with the same name is in the same call. Use letters, digits and . _ @ + - (up to 128).",
    }),
    error.el,
    toggles.el,
    join,
  );
  name.addEventListener("input", () => error.show(null));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const id = name.value.trim();
    const problem = callNameProblem(id);
    if (problem) {
      const suggestion = suggestCallName(id);
      error.show(suggestion && suggestion !== id && !callNameProblem(suggestion) ? `${problem} Try “${suggestion}”.` : problem);
      name.focus();
      return;
    }
    opts.onJoin(id, toggles.prefs());
  });

  const notice = opts.message ? h("p", { class: "banner banner-info", role: "status" }, icon(icons.info), opts.message) : null;
  const topbar = h(
    "header",
    { class: "topbar" },
    brand(),
    h(
      "div",
      { class: "topbar-user" },
      h("span", { class: "muted" }, "Signed in as "),
      h("strong", { "data-testid": "signed-in-user", title: opts.session.userId }, opts.session.name),
      h(
        "button",
        { type: "button", class: "btn btn-ghost btn-small", "data-testid": "sign-out", onclick: () => opts.onSignOut() },
        icon(icons.signOut),
        "Sign out",
      ),
    ),
  );
  const screen = h(
    "div",
    { class: "lobby-page" },
    topbar,
    h(
      "main",
      { class: "lobby" },
      h(
        "div",
        { class: "card card-wide" },
        h("h1", {}, "Start or join a call"),
        h("p", { class: "lead" }, "Type a call name and share it, or invite people with a link once you are in."),
        ...(notice ? [notice] : []),
        form,
      ),
      e2eeNote(),
    ),
  );
  queueMicrotask(() => name.focus());
  return screen;
}

// ---------------------------------------------------------------- guest

export function guestScreen(opts: {
  /** The call named in the link (the token's own call claim wins if they differ). */
  callId: string | null;
  invite: string | null;
  /** A still-valid guest session for this call, e.g. after a reload. */
  guestSession: Session | null;
  /** Signed in with an account: offer to join as that user instead. */
  user: Session | null;
  onJoin: (session: Session, callId: string, prefs: JoinPrefs) => void;
  onJoinAsUser: (callId: string, prefs: JoinPrefs) => void;
}): HTMLElement {
  const error = errorLine();
  const toggles = joinToggles();
  const join = h(
    "button",
    { type: "button", class: "btn btn-primary btn-block", "data-testid": "join-call" },
    icon(icons.arrow),
    "Join as guest",
  );
  join.addEventListener("click", () => {
    error.show(null);
    void busy(join, async () => {
      try {
        let session = opts.guestSession;
        if (!session) {
          if (!opts.invite) throw new Error("This link is incomplete. Ask for a new invitation link.");
          const r = await guestToken(server(), opts.invite);
          session = saveSession(r.token, r.userId);
        }
        // The token names the one call it admits to; the link's call is a fallback.
        const callId = session.call ?? opts.callId;
        if (!callId) throw new Error("This link does not say which call to join. Ask for a new invitation link.");
        opts.onJoin(session, callId, toggles.prefs());
      } catch (e) {
        const expired = isApiError(e) && e.status >= 400 && e.status < 500 && e.status !== 429;
        error.show(expired ? "This invitation has expired or is not valid any more. Ask for a new link." : errorWords(e));
      }
    });
  });

  const asUser =
    opts.user && opts.callId
      ? h(
          "button",
          {
            type: "button",
            class: "btn btn-link",
            "data-testid": "join-as-user",
            onclick: () => opts.onJoinAsUser(opts.callId!, toggles.prefs()),
          },
          `Join as ${opts.user.name} instead`,
        )
      : null;

  return authLayout(
    h("h1", {}, "You're invited to a call"),
    opts.callId
      ? h("p", { class: "lead" }, "Join ", h("strong", { "data-testid": "invited-call" }, opts.callId), " as a guest. No account needed.")
      : h("p", { class: "lead" }, "Join as a guest. No account needed."),
    h("div", { class: "form" }, toggles.el, error.el, join, asUser),
  );
}

// ---------------------------------------------------------------- ended

export function endedScreen(opts: {
  callId: string;
  ended: CallEnded;
  /** The call got going before it ended (else: joining failed). */
  wasLive: boolean;
  /** Signed-in users go back to the lobby; guests have none. */
  canLobby: boolean;
  onRejoin: () => void;
  onLobby: () => void;
}): HTMLElement {
  const words = endedWords(opts.ended);
  // The engine's message adds detail only where our words do not already say
  // it: for errors, and for a server's reason for closing ("…: rate limit exceeded").
  const msg = opts.ended.message;
  const detail =
    msg && (opts.ended.reason === "error" ? msg !== words : opts.ended.reason === "disconnected" && msg.includes(":"))
      ? msg
      : null;
  const rejoin = h(
    "button",
    { type: "button", class: `btn ${opts.canLobby ? "btn-secondary" : "btn-primary"}`, "data-testid": "rejoin", onclick: () => opts.onRejoin() },
    "Rejoin",
  );
  const lobby = opts.canLobby
    ? h("button", { type: "button", class: "btn btn-primary", "data-testid": "back-to-lobby", onclick: () => opts.onLobby() }, "Back to lobby")
    : null;
  const screen = authLayout(
    h("div", { class: `ended-icon ${opts.ended.reason === "left" ? "" : "ended-icon-warn"}` }, icon(opts.ended.reason === "left" ? icons.hangUp : icons.alert)),
    h("h1", { class: "center" }, opts.wasLive || opts.ended.reason === "left" ? "Call ended" : "Couldn't join the call"),
    h("p", { class: "lead center", "data-testid": "ended-reason" }, words),
    detail ? h("p", { class: "muted center" }, detail) : null,
    h("p", { class: "muted center small" }, "Call: ", h("strong", {}, opts.callId)),
    h("div", { class: "btn-row" }, rejoin, lobby),
  );
  queueMicrotask(() => (lobby ?? rejoin).focus());
  return screen;
}
