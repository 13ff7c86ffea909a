// The invite sheet: creates a guest invitation for this call and shows the
// link to copy. Guests need no account; the link admits them to this call only.
import { createInvitation } from "../../src/call.js";
import { h, icon } from "../ui/dom.js";
import { icons } from "../ui/icons.js";
import { busy } from "../ui/parts.js";
import { durationWords, errorWords, isApiError } from "../words.js";

export function inviteLink(callId: string, invitation: string): string {
  return `${location.origin}/?call=${encodeURIComponent(callId)}&invite=${encodeURIComponent(invitation)}`;
}

export class InviteDialog {
  readonly el: HTMLDialogElement;
  private readonly body: HTMLElement;

  constructor(
    private readonly server: string,
    private readonly token: () => string,
    private readonly callId: string,
  ) {
    this.body = h("div", { class: "sheet-body" });
    this.el = h(
      "dialog",
      { class: "sheet sheet-small", "aria-labelledby": "invite-title", "data-testid": "invite-panel" },
      h(
        "div",
        { class: "panel-head" },
        h("h2", { id: "invite-title" }, icon(icons.invite), "Invite people"),
        h("button", { type: "button", class: "icon-btn", "aria-label": "Close", onclick: () => this.el.close() }, icon(icons.close)),
      ),
      this.body,
    );
    this.el.addEventListener("click", (ev) => {
      if (ev.target === this.el) this.el.close();
    });
  }

  open(): void {
    if (!this.el.open) this.el.showModal();
    void this.create();
  }

  private async create(): Promise<void> {
    this.body.replaceChildren(h("p", { class: "muted", role: "status" }, "Creating an invitation link…"));
    try {
      const inv = await createInvitation(this.server, this.token(), this.callId);
      this.showLink(inviteLink(this.callId, inv.invitation), inv.expiresIn);
    } catch (e) {
      const msg =
        isApiError(e) && e.status === 401
          ? "Your sign-in has expired, so a new link cannot be made now. Sign in again after the call, or ask someone else in the call to invite."
          : errorWords(e);
      this.body.replaceChildren(
        h("p", { class: "form-error", role: "alert", "data-testid": "error" }, icon(icons.alert), h("span", {}, msg)),
        h("div", { class: "btn-row" }, h("button", { type: "button", class: "btn btn-secondary", onclick: () => void this.create() }, "Try again")),
      );
    }
  }

  private showLink(link: string, expiresIn: number): void {
    const input = h("input", {
      type: "text",
      readonly: true,
      class: "invite-input",
      "data-testid": "invite-link",
      "aria-label": "Invitation link",
      value: link,
    });
    input.value = link;
    input.addEventListener("focus", () => input.select());
    const status = h("span", { class: "copy-status", role: "status" });
    const copy = h("button", { type: "button", class: "btn btn-primary", "data-testid": "copy-invite" }, icon(icons.copy), "Copy link");
    copy.addEventListener("click", async () => {
      status.textContent = (await copyText(input)) ? "Copied" : "Select the link and copy it";
    });
    const again = h("button", { type: "button", class: "btn btn-ghost" }, "New link");
    again.addEventListener("click", () => void busy(again, () => this.create()));
    this.body.replaceChildren(
      h(
        "p",
        {},
        "Anyone with this link can join ",
        h("strong", {}, this.callId),
        ` as a guest, without an account. The link works for ${durationWords(expiresIn)}.`,
      ),
      h("div", { class: "invite-row" }, input, copy),
      h("div", { class: "invite-foot" }, status, again),
      h(
        "p",
        { class: "muted small" },
        icon(icons.lock),
        " Guests join the encrypted call like everyone else and appear in the list of people. Send the link only to the people you mean to invite.",
      ),
    );
    input.focus();
  }
}

async function copyText(input: HTMLInputElement): Promise<boolean> {
  try {
    await navigator.clipboard.writeText(input.value);
    return true;
  } catch {
    // The clipboard API needs a secure context and permission; fall back to the selection.
    input.select();
    try {
      return document.execCommand("copy");
    } catch {
      return false;
    }
  }
}
