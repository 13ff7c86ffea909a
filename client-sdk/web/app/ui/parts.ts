// Small pieces shared by several screens.
import { h, icon, initials, hue } from "./dom.js";
import { icons, logo } from "./icons.js";

/** The product mark and name. */
export function brand(): HTMLElement {
  return h("div", { class: "brand" }, icon(logo, "brand-mark"), h("span", { class: "brand-name" }, "Conclave"));
}

/** A switch (a styled checkbox) with a label and an icon. */
export function toggle(opts: { label: string; svg: string; checked: boolean; testid: string; onchange?: (on: boolean) => void }): {
  el: HTMLElement;
  input: HTMLInputElement;
} {
  const input = h("input", { type: "checkbox", role: "switch", class: "switch-input", "data-testid": opts.testid });
  input.checked = opts.checked;
  input.addEventListener("change", () => opts.onchange?.(input.checked));
  const el = h(
    "label",
    { class: "switch" },
    icon(opts.svg, "icon switch-icon"),
    h("span", { class: "switch-label" }, opts.label),
    input,
    h("span", { class: "switch-track", "aria-hidden": "true" }, h("span", { class: "switch-thumb" })),
  );
  return { el, input };
}

/** A labelled text field with an optional hint; the hint is tied to the input for screen readers. */
export function field(opts: { id: string; label: string; input: HTMLInputElement; hint?: string }): HTMLElement {
  opts.input.id = opts.id;
  const hint = opts.hint ? h("p", { class: "field-hint", id: `${opts.id}-hint` }, opts.hint) : null;
  if (hint) opts.input.setAttribute("aria-describedby", hint.id);
  return h("div", { class: "field" }, h("label", { for: opts.id, class: "field-label" }, opts.label), opts.input, hint);
}

/** The error line of a form: empty (and silent) until `show` is called. */
export function errorLine(): { el: HTMLElement; show(msg: string | null): void } {
  const text = h("span");
  const el = h("p", { class: "form-error", "data-testid": "error", role: "alert", hidden: true }, icon(icons.alert), text);
  return {
    el,
    show(msg) {
      text.textContent = msg ?? "";
      el.hidden = !msg;
    },
  };
}

/** A round avatar with initials, coloured per name. */
export function avatar(name: string, cls = "avatar"): HTMLElement {
  const el = h("span", { class: cls, "aria-hidden": "true" }, initials(name));
  el.style.setProperty("--hue", String(hue(name)));
  return el;
}

/** Marks a button busy (disabled, spinner) while `work` runs. */
export async function busy<T>(button: HTMLButtonElement, work: () => Promise<T>): Promise<T> {
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  try {
    return await work();
  } finally {
    button.disabled = false;
    button.removeAttribute("aria-busy");
  }
}

/** A note with the lock icon about what end-to-end encryption means here. */
export function e2eeNote(): HTMLElement {
  return h(
    "p",
    { class: "e2ee-note" },
    icon(icons.lock),
    h("span", {}, "Calls are end-to-end encrypted on your device. The server relays them but can never see or hear them."),
  );
}
