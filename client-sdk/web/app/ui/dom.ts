// A tiny DOM builder: enough to write the UI as plain TypeScript without a
// framework. `h("button", { class: "btn", onclick: go }, "Join")`.

/** Attribute values: strings set attributes, booleans toggle them, functions on `on*` keys become listeners. */
export type Attrs = Record<string, string | number | boolean | null | undefined | EventListener>;
export type Child = Node | string | null | undefined | false;

export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Attrs = {},
  ...children: (Child | Child[])[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

export function setAttrs(el: Element, attrs: Attrs): void {
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) {
      if (!key.startsWith("on")) el.removeAttribute(key);
    } else if (typeof value === "function") {
      el.addEventListener(key.slice(2), value);
    } else if (value === true) {
      el.setAttribute(key, "");
    } else {
      el.setAttribute(key, String(value));
    }
  }
}

export function append(el: Node, children: (Child | Child[])[]): void {
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
  }
}

/** Replaces all children of `el`. */
export function replace(el: Node, ...children: (Child | Child[])[]): void {
  while (el.firstChild) el.removeChild(el.firstChild);
  append(el, children);
}

/** An inline SVG icon from markup we ship ourselves (see icons.ts); never user input. */
export function icon(svg: string, cls = "icon"): Element {
  const t = document.createElement("template");
  t.innerHTML = svg.trim();
  const el = t.content.firstElementChild as Element;
  el.setAttribute("class", cls);
  el.setAttribute("aria-hidden", "true");
  el.setAttribute("focusable", "false");
  return el;
}

/** Up to two initials for an avatar: "alice" → "A", "dr.jane.doe" → "JD". */
export function initials(name: string): string {
  let parts = name.split(/[._@+\-\s]+/).filter((p) => p.length > 0);
  // A leading title says little about who someone is.
  if (parts.length > 1 && /^(dr|mr|mrs|ms|prof)$/i.test(parts[0]!)) parts = parts.slice(1);
  if (parts.length === 0) return "?";
  const first = parts[0]!.slice(0, 1);
  const last = parts.length > 1 ? parts[parts.length - 1]!.slice(0, 1) : "";
  return (first + last).toUpperCase();
}

/** A stable hue per name so avatars are told apart at a glance. */
export function hue(name: string): number {
  let x = 0;
  for (let i = 0; i < name.length; i++) x = (x * 31 + name.charCodeAt(i)) >>> 0;
  return x % 360;
}
