// The call screen: header (call name, lock badge with the phase, security
// code), the video stage, the roster panel and the controls. It owns one
// CallClient from start to 'ended' and renders from the client's events.
import { CallClient } from "../../src/call.js";
import type { CallEnded, CallPhase, CallStats, Member, RemoteVideo } from "../../src/call-types.js";
import type { Session } from "../session.js";
import { h, icon } from "../ui/dom.js";
import { icons, logo } from "../ui/icons.js";
import { namer, type Namer } from "../ui/names.js";
import { toast } from "../ui/toast.js";
import { errorWords, isApiError, phaseDetail, phaseWords } from "../words.js";
import { InviteDialog } from "./invite.js";
import { MISMATCH_TEXT, RECORDER_TEXT, Roster } from "./roster.js";
import { Stage } from "./stage.js";
import { VerifyDialog } from "./verify.js";

declare global {
  interface Window {
    /** The running call, for tests and support: `conclave.stats()`. */
    conclave?: { client: CallClient; stats: () => CallStats };
  }
}

export interface CallViewOptions {
  server: string;
  session: Session;
  callId: string;
  deviceId: string;
  audio: boolean;
  video: boolean;
  /** Called once, when the call is over for this client; `wasLive` if it ever got to "live". */
  onEnded: (e: CallEnded, wasLive: boolean) => void;
}

/** Wide windows show the roster beside the stage; narrow ones on demand, over it. */
const WIDE = "(min-width: 1100px)";

/** A control-bar button: icon and caption, an aria-label, and aria-pressed for toggles. */
function control(opts: { testid: string; label: string; svg: string; caption: string; toggle?: boolean; cls?: string }): HTMLButtonElement {
  return h(
    "button",
    {
      type: "button",
      class: `ctl ${opts.cls ?? ""}`,
      "data-testid": opts.testid,
      "aria-label": opts.label,
      title: opts.label,
      "aria-pressed": opts.toggle ? "false" : null,
    },
    icon(opts.svg),
    h("span", { class: "ctl-caption" }, opts.caption),
  );
}

function setControl(b: HTMLButtonElement, pressed: boolean, svg: string, caption: string, title: string): void {
  b.setAttribute("aria-pressed", String(pressed));
  b.title = title;
  b.classList.toggle("pressed", pressed);
  const old = b.querySelector("svg");
  if (old?.dataset.svg !== svg) {
    const next = icon(svg) as SVGElement;
    next.dataset.svg = svg;
    old?.replaceWith(next);
  }
  const cap = b.querySelector(".ctl-caption");
  if (cap) cap.textContent = caption;
}

export class CallView {
  readonly el: HTMLElement;
  private readonly client: CallClient;
  private readonly selfId: string;
  private readonly nameOf: Namer;
  /** Display names from the roster, by user id. */
  private readonly displayNames = new Map<string, string>();
  private members: Member[] = [];
  private videos: RemoteVideo[] = [];
  private speaker: string | null = null;
  private phase: CallPhase = "connecting";
  private liveSince: number | null = null;
  private finished = false;
  private recorderAnnounced = false;
  /** Who the key-mismatch banner names now (rebuilt only when that changes, so it is announced once). */
  private mismatchSig = "";
  /** A screen-share request is waiting for the browser's picker. */
  private screenBusy = false;

  private readonly stage: Stage;
  private readonly roster: Roster;
  private readonly verify: VerifyDialog;
  private readonly invite: InviteDialog | null;
  private readonly audio: HTMLAudioElement;
  private readonly body: HTMLElement;

  private readonly phaseEl: HTMLElement;
  private readonly phaseText: HTMLElement;
  private readonly epochBtn: HTMLButtonElement;
  private readonly epochEl: HTMLElement;
  private readonly recordedEl: HTMLElement;
  private readonly timerEl: HTMLElement;
  private readonly mismatchBanner: HTMLElement;
  private readonly sharingBanner: HTMLElement;
  private readonly soundBanner: HTMLElement;

  private readonly btn: Record<"mute" | "camera" | "screen" | "invite" | "verify" | "people" | "leave", HTMLButtonElement>;
  private readonly tick: ReturnType<typeof setInterval>;
  private readonly wide = matchMedia(WIDE);
  private readonly onPageHide = () => void this.client.leave().catch(() => undefined);

  constructor(private readonly opts: CallViewOptions) {
    this.selfId = `${opts.session.userId}/${opts.deviceId}`;
    this.nameOf = namer(opts.session.userId, opts.session.name, this.displayNames);
    this.client = new CallClient({
      server: opts.server,
      token: opts.session.token,
      callId: opts.callId,
      deviceId: opts.deviceId,
      audio: opts.audio,
      video: opts.video,
    });

    // ----- header
    this.phaseText = h("span", { class: "phase-text" });
    this.phaseEl = h("div", { class: "phase", "data-testid": "phase", role: "status" }, icon(icons.lockOpen), this.phaseText);
    // The testid element holds exactly the code; its label sits beside it.
    this.epochEl = h("span", { class: "epoch-value", "data-testid": "epoch-code" });
    this.epochBtn = h(
      "button",
      { type: "button", class: "epoch", hidden: true, onclick: () => this.verify.open() },
      h("span", { class: "epoch-label" }, "Security code"),
      this.epochEl,
    );
    this.recordedEl = h(
      "span",
      { class: "pill pill-rec", "data-testid": "recorded", hidden: true, title: RECORDER_TEXT },
      icon(icons.record),
      "Recorded",
    );
    this.timerEl = h("span", { class: "timer", "aria-label": "Call duration" });
    const header = h(
      "header",
      { class: "call-head" },
      h(
        "div",
        { class: "call-title" },
        icon(logo, "brand-mark"),
        h("h1", { "data-testid": "call-title", title: opts.callId }, opts.callId),
        opts.session.kind === "guest" ? h("span", { class: "pill" }, "Guest") : null,
      ),
      h("div", { class: "call-status" }, this.phaseEl, this.epochBtn, this.recordedEl, this.timerEl),
    );

    // ----- stage, roster
    this.stage = new Stage(() => this.setRosterOpen(true));
    this.roster = new Roster(this.nameOf, () => this.setRosterOpen(false));
    this.body = h("div", { class: "call-body" }, this.stage.el, this.roster.el);

    this.mismatchBanner = h("div", { class: "banner banner-bad", role: "alert", hidden: true, "data-testid": "mismatch-banner" });
    this.sharingBanner = h(
      "div",
      { class: "banner banner-info", hidden: true },
      icon(icons.screen),
      h("span", {}, "You are sharing your screen with everyone in the call."),
      h("button", { type: "button", class: "btn btn-small btn-secondary", onclick: () => this.toggleScreen() }, "Stop sharing"),
    );
    this.soundBanner = h(
      "div",
      { class: "banner banner-warn", hidden: true },
      icon(icons.volume),
      h("span", {}, "Your browser is holding back the call's sound."),
      h("button", { type: "button", class: "btn btn-small btn-primary", "data-testid": "enable-sound", onclick: () => this.playAudio() }, "Turn on sound"),
    );
    this.stage.banners.append(this.mismatchBanner, this.soundBanner, this.sharingBanner);

    // ----- controls
    this.btn = {
      mute: control({ testid: "btn-mute", label: "Mute microphone", svg: icons.mic, caption: "Mute", toggle: true, cls: "ctl-mutable" }),
      camera: control({ testid: "btn-camera", label: "Turn camera off", svg: icons.camera, caption: "Camera", toggle: true, cls: "ctl-mutable" }),
      screen: control({ testid: "btn-screen", label: "Share screen", svg: icons.screen, caption: "Share", toggle: true }),
      invite: control({ testid: "btn-invite", label: "Invite people", svg: icons.invite, caption: "Invite" }),
      verify: control({ testid: "btn-verify", label: "Verify encryption", svg: icons.shield, caption: "Verify" }),
      people: control({ testid: "btn-people", label: "People", svg: icons.users, caption: "People" }),
      leave: control({ testid: "btn-leave", label: "Leave call", svg: icons.hangUp, caption: "Leave", cls: "ctl-leave" }),
    };
    this.btn.people.setAttribute("aria-controls", "roster");
    this.btn.mute.addEventListener("click", () => this.toggleMute("audio"));
    this.btn.camera.addEventListener("click", () => this.toggleMute("video"));
    this.btn.screen.addEventListener("click", () => this.toggleScreen());
    this.btn.verify.addEventListener("click", () => this.verify.open());
    this.btn.people.addEventListener("click", () => this.setRosterOpen(!this.body.classList.contains("roster-open")));
    this.btn.leave.addEventListener("click", () => void this.leave());
    // Guests cannot invite; their token admits them to this one call only.
    this.invite = opts.session.kind === "guest" ? null : new InviteDialog(opts.server, () => opts.session.token, opts.callId);
    if (this.invite) this.btn.invite.addEventListener("click", () => this.invite?.open());
    const controls = h(
      "footer",
      { class: "controls", role: "toolbar", "aria-label": "Call controls" },
      h(
        "div",
        { class: "controls-main" },
        this.btn.mute,
        this.btn.camera,
        this.btn.screen,
        this.invite ? this.btn.invite : null,
        this.btn.verify,
        this.btn.people,
      ),
      this.btn.leave,
    );

    this.verify = new VerifyDialog(this.client, this.nameOf, () => this.render());
    this.audio = h("audio", { autoplay: true, hidden: true, "data-testid": "remote-audio" });

    this.el = h(
      "div",
      { class: "call", "data-testid": "call" },
      header,
      this.body,
      controls,
      this.audio,
      this.verify.el,
      this.invite?.el ?? null,
    );
    this.setRosterOpen(this.wide.matches);
    this.setPhase("connecting");
    this.wire();
    this.tick = setInterval(() => this.onTick(), 1000);
    addEventListener("pagehide", this.onPageHide);
  }

  /** Joins the call. Failures end the call view with the reason in words. */
  async start(): Promise<void> {
    window.conclave = { client: this.client, stats: () => this.client.stats() };
    try {
      await this.client.start();
      this.render();
    } catch (e) {
      this.finish({ reason: "error", message: isApiError(e) && e.status === 401 ? "Your sign-in has expired. Sign in again to rejoin." : errorWords(e) });
    }
  }

  private wire(): void {
    const c = this.client;
    c.on("phase", (p) => this.setPhase(p));
    c.on("roster", (members) => {
      this.members = members;
      for (const m of members) if (m.displayName) this.displayNames.set(m.userId, m.displayName);
      this.render();
    });
    c.on("videos", (videos) => {
      this.videos = videos;
      this.renderStage();
    });
    c.on("audio", (stream) => {
      this.audio.srcObject = stream;
      this.playAudio();
    });
    c.on("epoch", ({ epoch, epochCode }) => {
      this.epochEl.textContent = epochCode;
      this.epochEl.dataset.epoch = String(epoch);
      this.epochBtn.hidden = false;
      this.epochBtn.setAttribute("aria-label", `Security code ${epochCode}. Open verification.`);
      this.verify.keysChanged();
    });
    c.on("speaker", (id) => {
      this.speaker = id;
      this.renderStage();
      this.roster.update(this.members, this.speaker);
    });
    c.on("notice", (message) => toast(message, "warn"));
    c.on("ended", (e) => this.finish(e));
  }

  private setPhase(p: CallPhase): void {
    this.phase = p;
    this.phaseEl.dataset.phase = p;
    this.phaseText.textContent = phaseWords[p];
    this.phaseEl.title = phaseDetail[p];
    const svg = p === "live" ? icons.lock : p === "ended" ? icons.close : icons.lockOpen;
    this.phaseEl.querySelector("svg")?.replaceWith(icon(svg));
    if (p === "live" && this.liveSince === null) this.liveSince = Date.now();
    this.render();
  }

  /** Everything that depends on the roster: stage, roster, banners, badges, controls. */
  private render(): void {
    if (this.finished) return;
    this.renderStage();
    this.roster.update(this.members, this.speaker);
    this.verify.refresh();

    const mismatched = this.members.filter((m) => m.keyMismatch);
    this.mismatchBanner.hidden = mismatched.length === 0;
    const sig = mismatched.map((m) => m.id).join(" ");
    if (mismatched.length > 0 && sig !== this.mismatchSig) {
      const listed = mismatched.slice(0, 3).map((m) => `${this.nameOf(m.userId)} (${m.deviceId})`);
      if (mismatched.length > 3) listed.push(`${mismatched.length - 3} more`);
      const names = listed.join(", ");
      this.mismatchBanner.replaceChildren(
        icon(icons.alert),
        h("span", {}, h("strong", {}, `Key mismatch: ${names}. `), MISMATCH_TEXT),
        h("button", { type: "button", class: "btn btn-small btn-secondary", onclick: () => this.verify.open() }, "Verify"),
      );
    }
    this.mismatchSig = sig;

    const recorded = this.members.some((m) => m.recorder);
    this.recordedEl.hidden = !recorded;
    if (recorded && !this.recorderAnnounced) {
      this.recorderAnnounced = true;
      toast(RECORDER_TEXT, "info");
    }
    this.renderControls();
  }

  private renderStage(): void {
    if (this.finished) return;
    this.stage.update({
      selfId: this.members.find((m) => m.self)?.id ?? this.selfId,
      nameOf: this.nameOf,
      localStream: this.client.localStream,
      selfVideoOff: this.client.muted.video,
      selfAudioOff: this.client.muted.audio || !this.client.localStream?.getAudioTracks().length,
      members: this.members,
      videos: this.videos,
      speaker: this.speaker,
    });
  }

  private renderControls(): void {
    // Joined without a camera or microphone (switched off in the lobby, or
    // refused by the browser): there is no track to unmute in this call.
    const local = this.client.localStream;
    const hasMic = !!local && local.getAudioTracks().length > 0;
    const hasCam = !!local && local.getVideoTracks().length > 0;
    const audio = this.client.muted.audio || !hasMic;
    const video = this.client.muted.video || !hasCam;
    const sharing = this.client.sharingScreen;
    setControl(this.btn.mute, audio, audio ? icons.micOff : icons.mic, audio ? "Unmute" : "Mute", audio ? "Unmute microphone" : "Mute microphone");
    setControl(this.btn.camera, video, video ? icons.cameraOff : icons.camera, video ? "Start video" : "Stop video", video ? "Turn camera on" : "Turn camera off");
    setControl(this.btn.screen, sharing, sharing ? icons.screenStop : icons.screen, sharing ? "Stop sharing" : "Share", sharing ? "Stop sharing your screen" : "Share your screen");
    const starting = this.phase === "connecting" && !local;
    this.btn.mute.disabled = !hasMic && !starting;
    this.btn.camera.disabled = !hasCam && !starting;
    if (!hasMic && !starting) this.btn.mute.title = "No microphone in this call: rejoin with the microphone on to speak";
    if (!hasCam && !starting) this.btn.camera.title = "No camera in this call: rejoin with the camera on to be seen";
    this.sharingBanner.hidden = !sharing;
    // Sharing and the security code make sense once we are in the encrypted group.
    const inCall = this.phase === "securing" || this.phase === "live";
    this.btn.screen.disabled = !inCall || this.screenBusy;
  }

  private toggleMute(kind: "audio" | "video"): void {
    try {
      this.client.setMuted(kind, !this.client.muted[kind]);
    } catch (e) {
      toast(errorWords(e), "error");
    }
    this.renderControls();
    this.renderStage();
  }

  private async toggleScreen(): Promise<void> {
    if (this.client.sharingScreen) {
      this.client.stopScreenShare();
    } else {
      this.screenBusy = true;
      this.renderControls();
      try {
        await this.client.startScreenShare();
      } catch (e) {
        const cancelled = e instanceof Error && e.name === "NotAllowedError";
        toast(cancelled ? "Screen sharing was cancelled or blocked by the browser." : e instanceof Error && !isApiError(e) ? e.message : errorWords(e), "warn");
      } finally {
        this.screenBusy = false;
      }
    }
    this.renderControls();
  }

  private playAudio(): void {
    this.audio.play().then(
      () => (this.soundBanner.hidden = true),
      // Autoplay policy: sound needs a click on the page first.
      () => (this.soundBanner.hidden = !this.audio.srcObject),
    );
  }

  private setRosterOpen(open: boolean): void {
    this.body.classList.toggle("roster-open", open);
    this.btn.people.setAttribute("aria-expanded", String(open));
    this.btn.people.classList.toggle("pressed", open);
  }

  private onTick(): void {
    if (this.liveSince !== null && this.phase !== "ended") {
      const s = Math.floor((Date.now() - this.liveSince) / 1000);
      const hh = Math.floor(s / 3600);
      const mm = String(Math.floor((s % 3600) / 60)).padStart(hh > 0 ? 2 : 1, "0");
      const ss = String(s % 60).padStart(2, "0");
      this.timerEl.textContent = hh > 0 ? `${hh}:${mm}:${ss}` : `${mm}:${ss}`;
    }
    // The browser's own "Stop sharing" bar ends a share without telling us: keep the controls true.
    this.renderControls();
  }

  private async leave(): Promise<void> {
    this.btn.leave.disabled = true;
    try {
      await this.client.leave();
    } catch {
      // Leaving locally always works; the server notices the closed session.
    }
    this.finish({ reason: "left", message: "You left the call" });
  }

  /** Ends the view once: the first of 'ended', a failed start or leave() wins. */
  private finish(e: CallEnded): void {
    if (this.finished) return;
    this.finished = true;
    this.setPhase("ended");
    this.dispose();
    this.opts.onEnded(e, this.liveSince !== null);
  }

  dispose(): void {
    this.finished = true;
    clearInterval(this.tick);
    removeEventListener("pagehide", this.onPageHide);
    this.stage.dispose();
    this.audio.srcObject = null;
    if (this.verify.isOpen) this.verify.el.close();
    if (this.invite?.el.open) this.invite.el.close();
  }

  /** Leaves the call if it is still on (e.g. the user signs out). */
  async close(): Promise<void> {
    if (!this.finished) {
      this.dispose();
      await this.client.leave().catch(() => undefined);
    }
  }
}
