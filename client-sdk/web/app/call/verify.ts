// The verify sheet: the call's security code (the same for everyone in the
// call at this epoch) and, per person, the pairwise safety number to compare
// out of band, with "Mark as verified".
import type { CallStats, Member, Verification } from "../../src/call-types.js";
import { h, icon } from "../ui/dom.js";
import { icons } from "../ui/icons.js";
import type { Namer } from "../ui/names.js";
import { avatar } from "../ui/parts.js";
import { MISMATCH_TEXT, RECORDER_TEXT } from "./roster.js";

/** Safety numbers cost thousands of hashes each: beyond this many people, compute on request. */
const AUTO_COMPUTE = 12;

export interface VerifySource {
  verification(): Verification | null;
  members(): Member[];
  stats(): CallStats;
}

/** "123451234512345…" or "12345 12345 …" → the 12 groups of 5 (or the text as it came, if it is not 60 digits). */
export function safetyGroups(text: string): string[] {
  const digits = text.replace(/\D/g, "");
  if (digits.length !== 60) return [text];
  const groups: string[] = [];
  for (let i = 0; i < 60; i += 5) groups.push(digits.slice(i, i + 5));
  return groups;
}

export class VerifyDialog {
  readonly el: HTMLDialogElement;
  private readonly body: HTMLElement;
  /** Safety numbers computed while the sheet is open, by member id (keys can change, so cleared on open). */
  private readonly numbers = new Map<string, Promise<string>>();
  private readonly resolved = new Map<string, string>();
  /** Whether the user opened the "Encryption details" section (kept across re-renders). */
  private statsOpen = false;
  /** What the last render showed, so roster updates that change nothing here (speaking, muting) skip it. */
  private shownSig = "";
  /** Members whose number the user asked for in a large call. */
  private readonly requested = new Set<string>();

  constructor(
    private readonly source: VerifySource,
    private readonly nameOf: Namer,
    private readonly onChanged: () => void,
  ) {
    this.body = h("div", { class: "sheet-body" });
    this.el = h(
      "dialog",
      { class: "sheet", "aria-labelledby": "verify-title", "data-testid": "verify-panel" },
      h(
        "div",
        { class: "panel-head" },
        h("h2", { id: "verify-title" }, icon(icons.shield), "Verify encryption"),
        h("button", { type: "button", class: "icon-btn", "aria-label": "Close", onclick: () => this.el.close() }, icon(icons.close)),
      ),
      this.body,
    );
    // A click on the backdrop (outside the sheet's box) closes it.
    this.el.addEventListener("click", (ev) => {
      if (ev.target === this.el) this.el.close();
    });
  }

  get isOpen(): boolean {
    return this.el.open;
  }

  open(): void {
    this.numbers.clear();
    this.resolved.clear();
    this.requested.clear();
    this.render();
    if (!this.el.open) this.el.showModal();
  }

  /** A new epoch can mean a changed key: recompute the numbers shown. */
  keysChanged(): void {
    this.numbers.clear();
    this.resolved.clear();
    this.refresh();
  }

  /** Re-renders when the roster changes while open. */
  refresh(): void {
    if (this.el.open && this.signature() !== this.shownSig) this.render();
  }

  private signature(): string {
    const v = this.source.verification();
    const people = this.source.members().map((m) => [m.id, m.verified, m.keyMismatch, m.recorder, m.self]);
    return JSON.stringify([v?.epoch ?? null, v?.epochCode ?? null, people]);
  }

  private render(): void {
    this.shownSig = this.signature();
    const v = this.source.verification();
    const scroll = this.body.scrollTop;
    // Re-rendering replaces the buttons: keep keyboard focus on the same one.
    const focused = document.activeElement instanceof HTMLElement && this.body.contains(document.activeElement) ? document.activeElement : null;
    const refocus = focused?.dataset.testid && focused.dataset.member ? `[data-testid="${focused.dataset.testid}"][data-member="${CSS.escape(focused.dataset.member)}"]` : null;
    if (!v) {
      this.body.replaceChildren(
        h("p", { class: "lead" }, "Encryption is still being set up. The codes appear as soon as you are in the call's encryption group."),
      );
      return;
    }
    // Anyone whose key does not match comes first: that is who to check.
    const rest = this.source.members().filter((m) => !m.self);
    const others = [...rest.filter((m) => m.keyMismatch), ...rest.filter((m) => !m.keyMismatch)];
    this.body.replaceChildren(
      h(
        "section",
        { class: "verify-code" },
        h("h3", {}, "Call security code"),
        h("p", { class: "code-big", "data-testid": "verify-epoch-code", "data-epoch": String(v.epoch) }, v.epochCode),
        h(
          "p",
          { class: "muted" },
          "Everyone in the call sees the same code. Read it out loud together: if someone sees a different code, the call may be intercepted. It changes when people join or leave.",
        ),
      ),
      h(
        "section",
        {},
        h("h3", {}, "Safety numbers"),
        h(
          "p",
          { class: "muted" },
          "Compare each person's safety number with them in person or over a channel you trust. If it matches, mark them as verified: you will be warned if their key ever changes.",
        ),
        others.length === 0
          ? h("p", { class: "empty" }, "No one else is in the call yet.")
          : h(
              "ul",
              { class: "verify-list" },
              others.map((m, i) => this.memberRow(v, m, i < AUTO_COMPUTE || this.requested.has(m.id))),
            ),
      ),
      this.statsDetails(),
    );
    this.body.scrollTop = scroll;
    if (refocus) this.body.querySelector<HTMLElement>(refocus)?.focus();
  }

  private memberRow(v: Verification, m: Member, compute: boolean): HTMLElement {
    const number = h("div", { class: "safety-number", "data-testid": "safety-number", "data-member": m.id, "aria-busy": "true" });
    const show = (text: string) => {
      const groups = safetyGroups(text);
      // Spaces between the groups keep the text (copy, screen readers, tests) as "12345 67890 …".
      number.replaceChildren(...groups.flatMap((g, i) => [...(i > 0 ? [" "] : []), h("span", { class: "group" }, g)]));
      number.removeAttribute("aria-busy");
      number.setAttribute("aria-label", `Safety number ${groups.join(" ")}`);
    };
    const known = this.resolved.get(m.id);
    if (known !== undefined) {
      show(known);
    } else if (compute) {
      let p = this.numbers.get(m.id);
      if (!p) {
        p = v.safetyNumber(m.id);
        this.numbers.set(m.id, p);
        p.then(
          (text) => this.resolved.set(m.id, text),
          () => this.numbers.delete(m.id),
        );
      }
      number.append(h("span", { class: "muted" }, "Computing…"));
      p.then(show, () => {
        number.replaceChildren(h("span", { class: "muted" }, "This person's key is not available yet."));
        number.removeAttribute("aria-busy");
      });
    } else {
      number.append(
        h(
          "button",
          {
            type: "button",
            class: "btn btn-secondary btn-small",
            onclick: () => {
              this.requested.add(m.id);
              this.render();
            },
          },
          "Show safety number",
        ),
      );
    }

    const mark = h(
      "button",
      {
        type: "button",
        class: `btn btn-small ${m.verified ? "btn-secondary" : "btn-primary"}`,
        "data-testid": "verify-member",
        "data-member": m.id,
        "aria-pressed": String(m.verified),
      },
      m.verified ? "Unmark" : "Mark as verified",
    );
    mark.addEventListener("click", () => {
      v.setVerified(m.id, !m.verified);
      this.onChanged();
      this.render();
    });

    return h(
      "li",
      { class: `verify-member${m.keyMismatch ? " mismatch" : ""}`, "data-member": m.id },
      h(
        "div",
        { class: "verify-who" },
        avatar(this.nameOf(m.userId)),
        h(
          "div",
          { class: "verify-names" },
          h("div", { class: "member-user" }, this.nameOf(m.userId)),
          // The exact identity being verified: user id and device.
          h("div", { class: "member-device verify-id" }, `${m.userId} / ${m.deviceId}`),
        ),
        m.verified ? h("span", { class: "badge badge-ok" }, icon(icons.verified), "Verified") : null,
        m.recorder ? h("span", { class: "badge badge-rec", title: RECORDER_TEXT }, icon(icons.record), "Recorder") : null,
      ),
      m.keyMismatch ? h("p", { class: "member-warning", role: "alert" }, icon(icons.alert), MISMATCH_TEXT) : null,
      number,
      h("div", { class: "verify-actions" }, mark),
    );
  }

  /** Counters for the curious (and for support): is media really flowing encrypted? */
  private statsDetails(): HTMLElement {
    const s = this.source.stats();
    const row = (k: string, v: string | number | null) => h("div", {}, h("dt", {}, k), h("dd", {}, v === null ? "—" : String(v)));
    const details = h(
      "details",
      { class: "stats", open: this.statsOpen },
      h("summary", {}, "Encryption details"),
      h(
        "dl",
        {},
        row("Key epoch", s.epoch),
        row("Frames encrypted and sent", s.framesEncrypted),
        row("Frames received and decrypted", s.framesDecrypted),
        row("Frames that failed to decrypt", s.decryptFailures),
        row("… since the current keys", s.decryptFailuresThisEpoch),
      ),
    );
    details.addEventListener("toggle", () => (this.statsOpen = details.open));
    return details;
  }
}
