// The roster side panel: everyone in the call, with what the user needs to
// judge the call's security (lock, key mismatch, verified, recorder) and
// what they are doing (muted, sharing, speaking).
import type { Member } from "../../src/call-types.js";
import { h, icon } from "../ui/dom.js";
import { icons } from "../ui/icons.js";
import type { Namer } from "../ui/names.js";
import { avatar } from "../ui/parts.js";

export const MISMATCH_TEXT = "This person's key changed or does not match — do not trust this call until you verify.";
export const RECORDER_TEXT = "This call is recorded by your organisation.";

function badge(cls: string, svg: string, text: string, title: string): HTMLElement {
  return h("span", { class: `badge ${cls}`, title }, icon(svg), text);
}

function mediaIcon(svg: string, label: string, cls: string): HTMLElement {
  return h("span", { class: `media-icon ${cls}`, title: label, role: "img", "aria-label": label }, icon(svg));
}

function row(m: Member, speaking: boolean, name: string): HTMLElement {
  const audioOff = m.audioMuted || !m.publishing.includes("audio");
  const videoOff = m.videoMuted || !m.publishing.includes("camera");
  const badges: HTMLElement[] = [];
  if (m.keyMismatch) badges.push(badge("badge-bad", icons.alert, "Key mismatch", MISMATCH_TEXT));
  else if (m.inGroup) badges.push(badge("badge-lock", icons.lock, "Encrypted", "In the call's encryption group"));
  else badges.push(badge("badge-pending", icons.lockOpen, "Joining", "Not yet in the call's encryption group"));
  if (m.verified && !m.self) badges.push(badge("badge-ok", icons.verified, "Verified", "You verified this person's safety number"));
  if (m.recorder) badges.push(badge("badge-rec", icons.record, "Recorder", RECORDER_TEXT));

  const media = m.recorder
    ? []
    : [
        mediaIcon(audioOff ? icons.micOff : icons.mic, audioOff ? "Microphone off" : "Microphone on", audioOff ? "off" : ""),
        mediaIcon(videoOff ? icons.cameraOff : icons.camera, videoOff ? "Camera off" : "Camera on", videoOff ? "off" : ""),
        m.publishing.includes("screen") ? mediaIcon(icons.screen, "Sharing screen", "on") : null,
      ];

  return h(
    "li",
    {
      class: `member${speaking ? " speaking" : ""}${m.keyMismatch ? " mismatch" : ""}`,
      "data-testid": "roster-member",
      "data-member": m.id,
      "data-in-group": String(m.inGroup),
      "data-verified": String(m.verified),
      "data-key-mismatch": String(m.keyMismatch),
      "data-recorder": String(m.recorder),
      "data-speaking": String(speaking),
    },
    h("div", { class: "member-avatar" }, avatar(name), speaking ? h("span", { class: "speaking-ring" }) : null),
    h(
      "div",
      { class: "member-main" },
      h(
        "div",
        { class: "member-name" },
        h("span", { class: "member-user", title: m.userId }, name),
        m.self ? h("span", { class: "muted" }, " (you)") : null,
      ),
      h("div", { class: "member-device" }, m.deviceId),
      h("div", { class: "badges" }, badges),
      m.keyMismatch ? h("p", { class: "member-warning", role: "alert" }, MISMATCH_TEXT) : null,
      m.recorder ? h("p", { class: "member-note" }, RECORDER_TEXT) : null,
    ),
    h(
      "div",
      { class: "member-media" },
      speaking ? h("span", { class: "speaking-bars", title: "Speaking", role: "img", "aria-label": "Speaking" }, h("i"), h("i"), h("i")) : null,
      media,
    ),
  );
}

export class Roster {
  readonly el: HTMLElement;
  private readonly list: HTMLUListElement;
  private readonly count: HTMLElement;
  /** Rows by member id with a signature of what they show, to rebuild only what changed. */
  private readonly rows = new Map<string, { el: HTMLElement; sig: string }>();

  constructor(
    private readonly nameOf: Namer,
    onClose: () => void,
  ) {
    this.count = h("span", { class: "roster-count", "data-testid": "roster-count" }, "0");
    this.list = h("ul", { class: "member-list", "aria-label": "People in this call" });
    this.el = h(
      "aside",
      { class: "roster", id: "roster", "aria-label": "People" },
      h(
        "div",
        { class: "panel-head" },
        h("h2", {}, "People ", this.count),
        h("button", { type: "button", class: "icon-btn", "aria-label": "Close people panel", onclick: onClose }, icon(icons.close)),
      ),
      this.list,
    );
  }

  update(members: Member[], speaker: string | null): void {
    // You first, then anyone whose key does not match (a warning must not scroll away), then the rest in roster order.
    const ordered = [
      ...members.filter((m) => m.self),
      ...members.filter((m) => !m.self && m.keyMismatch),
      ...members.filter((m) => !m.self && !m.keyMismatch),
    ];
    this.count.textContent = String(members.length);
    const seen = new Set<string>();
    let at: ChildNode | null = this.list.firstChild;
    for (const m of ordered) {
      seen.add(m.id);
      const speaking = m.speaking || m.id === speaker;
      const sig = JSON.stringify([m, speaking]);
      let r = this.rows.get(m.id);
      if (!r || r.sig !== sig) {
        const el = row(m, speaking, this.nameOf(m.userId));
        if (r) {
          if (r.el === at) at = el;
          r.el.replaceWith(el);
        }
        r = { el, sig };
        this.rows.set(m.id, r);
      }
      if (r.el === at) at = at.nextSibling;
      else this.list.insertBefore(r.el, at);
    }
    for (const [id, r] of this.rows) {
      if (!seen.has(id)) {
        r.el.remove();
        this.rows.delete(id);
      }
    }
  }
}
