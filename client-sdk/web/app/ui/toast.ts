// Dismissible notices ("toasts") in a polite live region.
import { h, icon } from "./dom.js";
import { icons } from "./icons.js";

export type ToastKind = "info" | "warn" | "error";

function container(): HTMLElement {
  let el = document.getElementById("toasts");
  if (!el) {
    el = h("div", { id: "toasts", class: "toasts", role: "status", "aria-live": "polite" });
    document.body.appendChild(el);
  }
  return el;
}

/** Shows `message`; it closes itself after `timeoutMs` (0: stays until dismissed). */
export function toast(message: string, kind: ToastKind = "info", timeoutMs = 10000): () => void {
  const box = container();
  // The same notice twice in a row is shown once.
  const last = box.lastElementChild as HTMLElement | null;
  if (last?.dataset.message === message) last.remove();
  const close = () => el.remove();
  const el = h(
    "div",
    { class: `toast toast-${kind}`, "data-testid": "notice", "data-message": message },
    icon(kind === "info" ? icons.info : icons.alert, "icon toast-icon"),
    h("span", { class: "toast-text" }, message),
    h("button", { class: "icon-btn toast-close", type: "button", "aria-label": "Dismiss", onclick: close }, icon(icons.close)),
  );
  box.appendChild(el);
  // Keep a handful; old notices make way for new ones.
  while (box.children.length > 4) box.firstElementChild?.remove();
  if (timeoutMs > 0) setTimeout(close, timeoutMs);
  return close;
}

export function clearToasts(): void {
  container().replaceChildren();
}
