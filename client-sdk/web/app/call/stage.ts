// The video stage: one tile per person (camera or, without video, initials),
// screen shares in a larger area of their own. Tiles are kept per key and
// reused across updates, so a <video> keeps playing while the roster changes.
import type { Member, RemoteVideo } from "../../src/call-types.js";
import { h, hue, icon, initials, replace } from "../ui/dom.js";
import { icons } from "../ui/icons.js";
import type { Namer } from "../ui/names.js";

/** Above this many tiles, people without video collapse into a "+N" tile. */
const MAX_GRID_TILES = 25;
const GAP = 10;

export interface StageState {
  selfId: string;
  nameOf: Namer;
  /** Our own camera preview (and microphone, never played). */
  localStream: MediaStream | null;
  selfVideoOff: boolean;
  selfAudioOff: boolean;
  members: Member[];
  videos: RemoteVideo[];
  speaker: string | null;
}

interface TileSpec {
  key: string;
  memberId: string;
  source: "camera" | "screen" | "none";
  stream: MediaStream | null;
  self: boolean;
  slot: string | null;
  member: Member | undefined;
  /** The name shown: the user id, with the device when that user has several. */
  name: string;
  /** Show initials instead of the video. */
  videoOff: boolean;
  /** Show the muted-microphone mark. */
  audioOff: boolean;
}

/** One tile; `update` changes only what differs. */
class Tile {
  readonly el: HTMLElement;
  private video: HTMLVideoElement | null = null;
  private readonly avatar: HTMLElement;
  private readonly label: HTMLElement;
  private labelSig = "";

  constructor(readonly key: string) {
    this.avatar = h("div", { class: "tile-avatar", "aria-hidden": "true" });
    this.label = h("div", { class: "tile-label" });
    this.el = h("div", { class: "tile", "data-testid": "tile" }, this.avatar, this.label);
  }

  update(t: TileSpec, speaking: boolean): void {
    const el = this.el;
    el.dataset.member = t.memberId;
    el.dataset.source = t.source;
    if (t.slot) el.dataset.slot = t.slot;
    else delete el.dataset.slot;
    el.toggleAttribute("data-self", t.self);
    el.classList.toggle("tile-screen", t.source === "screen");
    el.classList.toggle("speaking", speaking && t.source !== "screen");
    el.classList.toggle("mismatch", !!t.member?.keyMismatch);

    // Video: created once per tile, its stream replaced only when it changes.
    if (t.stream) {
      if (!this.video) {
        this.video = h("video", { autoplay: true, playsinline: true, "aria-hidden": "true" });
        this.video.muted = true; // sound comes through the call's one <audio> element
        el.prepend(this.video);
      }
      if (this.video.srcObject !== t.stream) {
        this.video.srcObject = t.stream;
        this.video.play().catch(() => {
          // Autoplay of muted video is always allowed; a failure here means no frames yet.
        });
      }
      this.video.classList.toggle("mirror", t.self && t.source === "camera");
    } else if (this.video) {
      this.video.srcObject = null;
      this.video.remove();
      this.video = null;
    }

    el.classList.toggle("video-off", t.videoOff);
    if (this.avatar.textContent !== initials(t.name)) {
      this.avatar.textContent = initials(t.name);
      this.avatar.style.setProperty("--hue", String(hue(t.name)));
    }

    const m = t.member;
    const sig = [t.name, t.self, t.source, m?.inGroup, m?.verified, m?.keyMismatch, t.audioOff].join("|");
    if (sig !== this.labelSig) {
      this.labelSig = sig;
      const who = t.source === "screen" ? `${t.self ? "Your" : t.name + "'s"} screen` : t.self ? `${t.name} (you)` : t.name;
      el.setAttribute("aria-label", who);
      el.setAttribute("role", "group");
      replace(this.label,
        m?.keyMismatch
          ? h("span", { class: "tile-badge tile-badge-bad", title: "Key mismatch: verify before trusting this call" }, icon(icons.alert))
          : m?.inGroup
            ? h("span", { class: "tile-badge", title: "End-to-end encrypted" }, icon(icons.lock))
            : null,
        h("span", { class: "tile-name" }, who),
        m?.verified && !t.self ? h("span", { class: "tile-badge tile-badge-ok", title: "Verified" }, icon(icons.verified)) : null,
        t.audioOff ? h("span", { class: "tile-badge tile-badge-muted", title: "Microphone off" }, icon(icons.micOff)) : null,
      );
    }
  }

  dispose(): void {
    if (this.video) this.video.srcObject = null;
    this.el.remove();
  }
}

/** A member's microphone is off: muted, or not publishing sound at all. */
function audioOff(m: Member | undefined): boolean {
  return !!m && !m.recorder && (m.audioMuted || !m.publishing.includes("audio"));
}

function hasLiveVideo(stream: MediaStream | null): boolean {
  return !!stream && stream.getVideoTracks().some((t) => t.readyState === "live" && t.enabled);
}

/** The largest tile size (given an aspect ratio) that fits `n` tiles into W×H. */
export function fit(n: number, width: number, height: number, aspect: number): { w: number; h: number } {
  let best = { w: 0, h: 0 };
  for (let cols = 1; cols <= Math.max(1, n); cols++) {
    const rows = Math.ceil(n / cols);
    let w = (width - GAP * (cols - 1)) / cols;
    let hgt = w / aspect;
    if (hgt * rows + GAP * (rows - 1) > height) {
      hgt = (height - GAP * (rows - 1)) / rows;
      w = hgt * aspect;
    }
    if (w > best.w) best = { w, h: hgt };
  }
  return { w: Math.max(0, Math.floor(best.w)), h: Math.max(0, Math.floor(best.h)) };
}

export class Stage {
  readonly el: HTMLElement;
  /** Warnings and prompts shown above the tiles. */
  readonly banners: HTMLElement;
  private readonly main: HTMLElement;
  private readonly focus: HTMLElement;
  private readonly grid: HTMLElement;
  private readonly more: HTMLButtonElement;
  private readonly tiles = new Map<string, Tile>();
  private readonly observer: ResizeObserver;

  constructor(onShowRoster: () => void) {
    this.banners = h("div", { class: "banners" });
    this.focus = h("div", { class: "stage-focus" });
    this.grid = h("div", { class: "stage-grid" });
    this.more = h("button", { type: "button", class: "tile tile-more", "data-testid": "tile-more", onclick: onShowRoster });
    this.main = h("div", { class: "stage-main" }, this.focus, this.grid);
    this.el = h("section", { class: "stage", "aria-label": "Video" }, this.banners, this.main);
    this.observer = new ResizeObserver(() => this.layout());
    this.observer.observe(this.focus);
    this.observer.observe(this.grid);
  }

  update(s: StageState): void {
    const byId = new Map(s.members.map((m) => [m.id, m]));
    // Show the device next to the name when one user is in the call from several devices.
    const perUser = new Map<string, number>();
    for (const m of s.members) perUser.set(m.userId, (perUser.get(m.userId) ?? 0) + 1);
    const nameOf = (id: string, m: Member | undefined): string =>
      m
        ? (perUser.get(m.userId) ?? 0) > 1
          ? `${s.nameOf(m.userId)} (${m.deviceId})`
          : s.nameOf(m.userId)
        : s.nameOf(id.split("/")[0] ?? id);

    const self = byId.get(s.selfId);
    const screens: TileSpec[] = [];
    const cameras = new Map<string, TileSpec>();
    for (const v of s.videos) {
      if (!v.memberId) continue; // nothing to label until its first frame says whose it is
      const m = byId.get(v.memberId);
      const spec: TileSpec = {
        key: `slot:${v.slot}`,
        memberId: v.memberId,
        source: v.source === "screen" ? "screen" : "camera",
        stream: v.stream,
        self: false,
        slot: v.slot,
        member: m,
        name: nameOf(v.memberId, m),
        videoOff: v.source !== "screen" && !!m?.videoMuted,
        audioOff: v.source !== "screen" && audioOff(m),
      };
      if (spec.source === "screen") screens.push(spec);
      else if (!cameras.has(v.memberId)) cameras.set(v.memberId, spec);
    }

    // Self first, then everyone in roster order: their camera, or their initials.
    const grid: TileSpec[] = [
      {
        key: "self",
        memberId: s.selfId,
        source: "camera",
        stream: s.localStream,
        self: true,
        slot: null,
        member: self,
        name: nameOf(s.selfId, self),
        videoOff: s.selfVideoOff || !hasLiveVideo(s.localStream),
        audioOff: s.selfAudioOff,
      },
    ];
    const placeholders: TileSpec[] = [];
    for (const m of s.members) {
      if (m.self || m.id === s.selfId || m.recorder) continue; // the recorder is a badge, not a face
      const cam = cameras.get(m.id);
      if (cam) {
        grid.push(cam);
        cameras.delete(m.id);
      } else {
        const spec: TileSpec = {
          key: `member:${m.id}`,
          memberId: m.id,
          source: "none",
          stream: null,
          self: false,
          slot: null,
          member: m,
          name: nameOf(m.id, m),
          videoOff: true,
          audioOff: audioOff(m),
        };
        grid.push(spec);
        placeholders.push(spec);
      }
    }
    grid.push(...cameras.values()); // video from someone the roster has not listed yet

    // Large calls: drop initials tiles (keeping the speaker's) beyond the cap.
    let hidden = 0;
    let shown = grid;
    if (grid.length > MAX_GRID_TILES) {
      const excess = grid.length - (MAX_GRID_TILES - 1);
      const drop = new Set(
        placeholders
          .filter((p) => p.memberId !== s.speaker)
          .slice(-excess)
          .map((p) => p.key),
      );
      shown = grid.filter((t) => !drop.has(t.key));
      hidden = grid.length - shown.length;
    }

    const wanted = new Set([...screens, ...shown].map((t) => t.key));
    for (const [key, tile] of this.tiles) {
      if (!wanted.has(key)) {
        tile.dispose();
        this.tiles.delete(key);
      }
    }
    this.place(this.focus, screens, s.speaker);
    this.place(this.grid, shown, s.speaker);
    if (hidden > 0) {
      this.more.textContent = `+${hidden} more`;
      this.more.setAttribute("aria-label", `${hidden} more people without video: show everyone`);
      this.grid.appendChild(this.more);
    } else {
      this.more.remove();
    }
    this.main.classList.toggle("presenting", screens.length > 0);
    this.layout();
  }

  /** Puts tiles into `parent` in order, moving DOM nodes only where the order changed. */
  private place(parent: HTMLElement, specs: TileSpec[], speaker: string | null): void {
    let at: ChildNode | null = parent.firstChild;
    for (const spec of specs) {
      let tile = this.tiles.get(spec.key);
      if (!tile) {
        tile = new Tile(spec.key);
        this.tiles.set(spec.key, tile);
      }
      tile.update(spec, speaker !== null && spec.memberId === speaker);
      if (tile.el === at) at = at.nextSibling;
      else parent.insertBefore(tile.el, at);
    }
    // Anything left after the wanted tiles is stale (or the "+N" tile, re-added by the caller).
    while (at) {
      const next = at.nextSibling;
      if (at !== this.more) at.remove();
      at = next;
    }
  }

  /** Sizes the tiles to fill the space: called on updates and when the stage resizes. */
  private layout(): void {
    for (const area of [this.focus, this.grid]) {
      const n = area.children.length;
      if (n === 0) continue;
      if (area === this.grid && this.main.classList.contains("presenting")) {
        // A strip beside the shared screen: CSS sizes its tiles.
        area.style.removeProperty("--tile-w");
        area.style.removeProperty("--tile-h");
        continue;
      }
      const { width, height } = area.getBoundingClientRect();
      const aspect = area === this.focus ? 16 / 9 : width >= height * 0.9 ? 16 / 9 : 3 / 4;
      const size = fit(n, width, height, aspect);
      area.style.setProperty("--tile-w", `${size.w}px`);
      area.style.setProperty("--tile-h", `${size.h}px`);
    }
  }

  dispose(): void {
    this.observer.disconnect();
    for (const tile of this.tiles.values()) tile.dispose();
    this.tiles.clear();
  }
}
