// Inline SVG icons drawn for Conclave (24×24, stroked with currentColor), so
// the app loads no images or icon fonts. Pass them to `icon()` in dom.ts.

const svg = (body: string, extra = ""): string =>
  `<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24" fill="none" stroke="currentColor" stroke-width="2" stroke-linecap="round" stroke-linejoin="round"${extra}>${body}</svg>`;

const slash = `<path d="M4 4l16 16"/>`;
const micBody = `<rect x="9" y="3" width="6" height="11" rx="3"/><path d="M5.5 11a6.5 6.5 0 0 0 13 0M12 17.5V21M9 21h6"/>`;
const camBody = `<rect x="3" y="6.5" width="12" height="11" rx="2"/><path d="M15 10.5l6-3.5v10l-6-3.5z"/>`;
const screenBody = `<rect x="3" y="4" width="18" height="12.5" rx="2"/><path d="M8.5 20.5h7M12 16.5v4"/>`;

export const icons = {
  mic: svg(micBody),
  micOff: svg(micBody + slash),
  camera: svg(camBody),
  cameraOff: svg(camBody + slash),
  screen: svg(screenBody + `<path d="M12 13.5v-6M9.25 10l2.75-2.75L14.75 10"/>`),
  screenStop: svg(screenBody + `<path d="M9.5 7.75l5 5M14.5 7.75l-5 5"/>`),
  invite: svg(`<circle cx="9" cy="8" r="3.75"/><path d="M2.5 20.5c0-3.6 2.9-6.5 6.5-6.5s6.5 2.9 6.5 6.5M19 7.5v6M16 10.5h6"/>`),
  shield: svg(`<path d="M12 2.75l7.75 3v5.75c0 4.6-3.25 8.4-7.75 9.75-4.5-1.35-7.75-5.15-7.75-9.75V5.75z"/><path d="M8.6 12.1l2.4 2.4 4.4-4.6"/>`),
  hangUp: svg(`<path d="M2.75 13.6c5.1-4.8 13.4-4.8 18.5 0l-2.2 2.6-3.6-1.2-.35-2.55a11 11 0 0 0-6.2 0L8.55 15l-3.6 1.2z"/>`),
  lock: svg(`<rect x="5" y="10.5" width="14" height="10.5" rx="2.25"/><path d="M8.25 10.5V7.25a3.75 3.75 0 0 1 7.5 0v3.25"/>`),
  lockOpen: svg(`<rect x="5" y="10.5" width="14" height="10.5" rx="2.25"/><path d="M8.25 10.5V7.25a3.75 3.75 0 0 1 7.1-1.7"/>`),
  check: svg(`<path d="M5 12.5l4.5 4.5L19 7.5"/>`),
  verified: svg(`<circle cx="12" cy="12" r="9"/><path d="M8 12.25l2.75 2.75L16.25 9.5"/>`),
  alert: svg(`<path d="M12 3.5L2.5 20h19z"/><path d="M12 10v4.5M12 17.25v.25"/>`),
  record: svg(`<circle cx="12" cy="12" r="9"/><circle cx="12" cy="12" r="4" fill="currentColor" stroke="none"/>`),
  users: svg(`<circle cx="9" cy="8" r="3.5"/><path d="M2.5 20c0-3.6 2.9-6.5 6.5-6.5s6.5 2.9 6.5 6.5M15.75 4.6a3.5 3.5 0 0 1 0 6.8M18.25 14.1c1.9.85 3.25 3.1 3.25 5.9"/>`),
  close: svg(`<path d="M6 6l12 12M18 6L6 18"/>`),
  copy: svg(`<rect x="9" y="9" width="11.5" height="11.5" rx="2"/><path d="M5.5 15H5a1.75 1.75 0 0 1-1.75-1.75V5A1.75 1.75 0 0 1 5 3.25h8.25A1.75 1.75 0 0 1 15 5v.5"/>`),
  volume: svg(`<path d="M4 9.25h3.5L12.5 5v14l-5-4.25H4z"/><path d="M16 8.75a4.75 4.75 0 0 1 0 6.5M18.75 6a8.5 8.5 0 0 1 0 12"/>`),
  signOut: svg(`<path d="M14.5 4H18a2 2 0 0 1 2 2v12a2 2 0 0 1-2 2h-3.5M10 16.25L5.75 12 10 7.75M5.75 12H16"/>`),
  info: svg(`<circle cx="12" cy="12" r="9"/><path d="M12 11v5.5M12 7.75V8"/>`),
  arrow: svg(`<path d="M5 12h14M13 6l6 6-6 6"/>`),
};

/** The product mark: a shield holding a lock, in the accent colour. */
export const logo = `<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><path d="M16 2.5l11 4.2v7.6c0 6.6-4.6 12.1-11 14.2C9.6 26.4 5 20.9 5 14.3V6.7z" fill="var(--accent)"/><rect x="11" y="14" width="10" height="7.5" rx="1.6" fill="#fff"/><path d="M13.25 14v-2.4a2.75 2.75 0 0 1 5.5 0V14" fill="none" stroke="#fff" stroke-width="1.8"/></svg>`;
