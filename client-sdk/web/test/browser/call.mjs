#!/usr/bin/env node
// Drives real browsers through a Conclave call, the way people use the web
// app: sign in, join, watch, share a screen, and get removed. Started by
// cli/tests/browser.rs, which runs the server (with the SFU), a Rust bot that
// publishes audio and VP8 video, and checks what the SFU forwarded.
//
// Config: the JSON in $CONCLAVE_BROWSER_TEST:
//   {server, call, browsers: [names], passwords: {name: pw, admin: pw},
//    ids: {name: user id}, bot: "<user id>/<device>", victim: name,
//    fallback: name (its page has no RTCRtpScriptTransform),
//    sameProfile: [names] (tabs of one browser profile),
//    artifacts: dir, chromium: path}
// stdout: one JSON object per line; the last is {"event":"passed",...} or
// {"event":"failed","error":...} (exit status 1).
import { mkdirSync } from "node:fs";
import { join as pathJoin } from "node:path";
import { chromium } from "playwright-core";
import { decodeServerFrame } from "../../dist/conclave.mjs";

const cfg = JSON.parse(process.env.CONCLAVE_BROWSER_TEST ?? "{}");
const log = (o) => process.stdout.write(`${JSON.stringify(o)}\n`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const t0 = Date.now();
const since = () => Date.now() - t0;

const FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--use-fake-device-for-media-stream",
  "--use-fake-ui-for-media-stream",
  "--autoplay-policy=no-user-gesture-required",
  "--allow-loopback-in-peer-connection",
];

/** Polls `fn` until it returns a truthy value; throws `what` after `ms`. */
async function until(what, ms, fn, every = 200) {
  const end = Date.now() + ms;
  let last;
  for (;;) {
    last = await fn();
    if (last) return last;
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms: ${what}`);
    await sleep(every);
  }
}

const people = {}; // name -> {page, memberId}
/** Set when the administrator's removal of the victim begins. */
const victimRemoval = { started: false };

/** What a page shows: its tiles' video state, and the client's counters. */
function look(page) {
  return page.evaluate(() => {
    const tiles = [...document.querySelectorAll('[data-testid="tile"]')].map((t) => {
      const v = t.querySelector("video");
      return {
        member: t.dataset.member ?? null,
        source: t.dataset.source ?? null,
        self: t.hasAttribute("data-self"),
        width: v?.videoWidth ?? 0,
        frames: v?.getVideoPlaybackQuality?.().totalVideoFrames ?? 0,
      };
    });
    const c = window.conclave;
    return { tiles, stats: c ? c.stats() : null, phase: c?.client?.phase ?? null };
  });
}

/** The tiles of `page` whose video advanced between two looks `ms` apart: Map "member|source" -> {width, frames}. */
async function advancing(page, ms = 1500) {
  const a = await look(page);
  await sleep(ms);
  const b = await look(page);
  const out = new Map();
  for (const t of b.tiles) {
    if (t.self) continue;
    const before = a.tiles.find((x) => x.member === t.member && x.source === t.source);
    if (before && t.width > 0 && t.frames > before.frames) out.set(`${t.member}|${t.source}`, { width: t.width, frames: t.frames - before.frames });
  }
  return { moving: out, stats: b.stats };
}

let sharedContext = null;

async function join(browser, name) {
  // The names in cfg.sameProfile are two tabs of one browser profile (shared
  // localStorage): each tab must still be its own device in the call.
  const shared = (cfg.sameProfile ?? []).includes(name);
  if (shared) sharedContext ??= await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const ctx = shared ? sharedContext : await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await ctx.newPage();
  page.on("pageerror", (e) => log({ event: "pageerror", who: name, error: String(e) }));
  page.on("console", (m) => {
    if (m.type() === "error" || m.type() === "warning") log({ event: "console", who: name, type: m.type(), text: m.text() });
  });
  if (name === cfg.fallback) {
    // This browser takes the createEncodedStreams path (as one without
    // RTCRtpScriptTransform would), in the same call as the others.
    await page.addInitScript(() => {
      delete window.RTCRtpScriptTransform;
    });
  }
  if (name === cfg.victim) {
    // The evicted member's page must not learn it was removed (a client
    // that ignores removal, with a server that keeps relaying to it): drop
    // `removed` and, once the removal starts, the commit that removes it (an
    // honest page would drop its keys on it; this one keeps the old epoch's),
    // and keep the page's socket open when the server closes it.
    await page.routeWebSocket(/\/ws/, (ws) => {
      const server = ws.connectToServer();
      server.onMessage((m) => {
        try {
          // Text frames, and the binary frames that carry MLS messages.
          const type = decodeServerFrame(typeof m === "string" ? m : new Uint8Array(m)).type;
          if (type === "removed" || (type === "commit" && victimRemoval.started)) {
            log({ event: "hidden_from_victim", type, at: since() });
            return;
          }
        } catch {
          // Not a server message: pass it on.
        }
        ws.send(m);
      });
      server.onClose(() => log({ event: "victim_socket_closed_by_server", at: since() }));
      ws.onMessage((m) => server.send(m));
    });
  }
  const started = Date.now();
  await page.goto(`${cfg.server}/?call=${encodeURIComponent(cfg.call)}`);
  await page.getByTestId("signin-username").fill(name);
  await page.getByTestId("signin-password").fill(cfg.passwords[name]);
  await page.getByTestId("signin-submit").click();
  await page.getByTestId("join-call").click();
  await page.waitForFunction(() => window.conclave?.client?.phase === "live", null, { timeout: 45_000 });
  const { memberId, transform } = await page.evaluate(() => ({
    memberId: window.conclave.client.members().find((m) => m.self)?.id,
    transform: typeof RTCRtpScriptTransform === "undefined" ? "createEncodedStreams" : "RTCRtpScriptTransform",
  }));
  people[name] = { page, memberId };
  log({ event: "live", who: name, member: memberId, ms: Date.now() - started, transform });
}

async function main() {
  mkdirSync(cfg.artifacts, { recursive: true });
  const browser = await chromium.launch({ executablePath: cfg.chromium, headless: true, args: FLAGS });
  try {
    for (const name of cfg.browsers) await join(browser, name);
    const names = cfg.browsers;
    const publishers = () => [...names.map((n) => people[n].memberId), cfg.bot];

    // 1. Every browser decodes every other publisher's video.
    for (const name of names) {
      const others = publishers().filter((m) => m !== people[name].memberId);
      const got = await until(`${name} sees video from ${others.join(", ")}`, 40_000, async () => {
        const { moving } = await advancing(people[name].page, 1000);
        return others.every((m) => moving.has(`${m}|camera`)) ? moving : null;
      });
      log({ event: "decodes_all", who: name, videos: Object.fromEntries(got) });
    }

    // ... sees everyone by the name their organisation gave them ...
    for (const name of names) {
      const shown = await people[name].page.evaluate(() => window.conclave.client.members().map((m) => m.displayName));
      for (const want of [...names, "bot"]) {
        if (!shown.includes(want)) throw new Error(`${name}'s roster lacks the display name ${want}: ${JSON.stringify(shown)}`);
      }
    }

    // ... and hears every other publisher (voices in its audio slots, decrypted).
    for (const name of names) {
      const others = publishers().filter((m) => m !== people[name].memberId);
      const hearing = await until(`${name} hears ${others.join(", ")}`, 20_000, async () => {
        const h = (await look(people[name].page)).stats.hearing;
        return others.every((m) => h.includes(m)) ? h : null;
      });
      log({ event: "hears_all", who: name, hearing });
    }

    // 2. Once the epoch has settled: no decryption failures while media flows.
    const before = {};
    const widths = {};
    for (const name of names) before[name] = (await look(people[name].page)).stats;
    await sleep(5000);
    for (const name of names) {
      const seen = await look(people[name].page);
      const after = seen.stats;
      widths[name] = seen.tiles.filter((t) => !t.self && t.source === "camera").map((t) => t.width);
      const failures = after.decryptFailures - before[name].decryptFailures;
      const decrypted = after.framesDecrypted - before[name].framesDecrypted;
      log({ event: "settled", who: name, camera_widths: widths[name], epoch: after.epoch, decrypted_5s: decrypted, failures_5s: failures, total_failures: after.decryptFailures });
      if (failures !== 0) throw new Error(`${name}: ${failures} decryption failures in 5 s after the epoch settled`);
      if (decrypted < 100) throw new Error(`${name}: only ${decrypted} frames decrypted in 5 s`);
    }

    // Browsers send three simulcast layers (160, 320, 640 wide); viewers start
    // on the lowest and climb as the SFU's bandwidth estimate grows.
    const browserCams = await Promise.all(
      names.map((n) =>
        until(`${n} receives a browser camera above the lowest layer`, 20_000, async () => {
          const t = (await look(people[n].page)).tiles.filter((x) => !x.self && x.source === "camera" && x.member !== cfg.bot);
          const best = Math.max(0, ...t.map((x) => x.width));
          return best > 160 ? best : null;
        }),
      ),
    );
    log({ event: "simulcast_climbed", widest_browser_camera: Object.fromEntries(names.map((n, i) => [n, browserCams[i]])) });

    // 3. A screen share from the first browser reaches the others.
    const sharer = names[0];
    await people[sharer].page.getByTestId("btn-screen").click();
    for (const name of names.slice(1)) {
      const key = `${people[sharer].memberId}|screen`;
      const got = await until(`${name} sees ${sharer}'s screen`, 20_000, async () => {
        const { moving } = await advancing(people[name].page, 1000);
        return moving.get(key);
      });
      log({ event: "screen_share_seen", who: name, from: sharer, width: got.width, frames_1s: got.frames });
    }
    await sleep(1000);
    await people[names[1]].page.screenshot({ path: pathJoin(cfg.artifacts, "call.png") });
    log({ event: "screenshot", path: pathJoin(cfg.artifacts, "call.png") });

    // 4. Removal: an administrator removes the victim. The others move to a
    // new epoch, and once they send in it (epoch_ready, after every remaining
    // member acked) the victim's page decrypts nothing more, while the
    // others carry on. The SFU here keeps forwarding to the victim (the test
    // server's KeepsEvicted), so only the keys keep it out.
    const victim = people[cfg.victim];
    const stayers = names.filter((n) => n !== cfg.victim);
    const epochBefore = (await look(people[stayers[0]].page)).stats.epoch;
    const victimBefore = (await look(victim.page)).stats;
    const admin = await fetch(`${cfg.server}/api/login`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ username: "admin", password: cfg.passwords.admin }),
    }).then((r) => r.json());
    const removedAt = Date.now();
    victimRemoval.started = true;
    const res = await fetch(`${cfg.server}/admin/users/${cfg.ids[cfg.victim]}/remove`, {
      method: "POST",
      headers: { authorization: `Bearer ${admin.token}` },
    });
    if (!res.ok) throw new Error(`admin remove: HTTP ${res.status} ${await res.text()}`);
    const stayerStats = () => Promise.all(stayers.map(async (n) => (await look(people[n].page)).stats));
    await until("the others reach a new epoch", 10_000, async () => (await stayerStats()).every((s) => s.epoch > epochBefore), 20);
    const newEpochAt = Date.now();
    await until("the others send in the new epoch", 10_000, async () => (await stayerStats()).every((s) => s.sendingEpoch > epochBefore), 20);
    const switchedAt = Date.now();
    log({ event: "new_epoch", ms_after_remove: newEpochAt - removedAt, senders_switched_ms_after_remove: switchedAt - removedAt });
    const victimAtSwitch = (await look(victim.page)).stats;
    const victimNow = async () => {
      const s = (await look(victim.page)).stats;
      return { s, failures: s.decryptFailures - victimBefore.decryptFailures, decrypted: s.framesDecrypted - victimAtSwitch.framesDecrypted };
    };
    const climbed = await until("the victim's decrypt failures climb", 3000, async () => {
      const v = await victimNow();
      return v.failures >= 10 ? v.s : null;
    }, 20).catch(async (e) => {
      const v = await victimNow();
      throw new Error(`${e.message} (since the removal: ${v.failures} failures; since the senders switched: ${v.decrypted} frames decrypted)`);
    });
    log({ event: "victim_cannot_decrypt", ms_after_senders_switched: Date.now() - switchedAt, failures: climbed.decryptFailures - victimBefore.decryptFailures, epoch_it_holds: climbed.epoch });
    // Frames already in flight drain; then, for 2 s, no frame may decrypt
    // or reach the victim's video receivers. (Its decoders may still output
    // a few frames that sat in their jitter buffers from before the removal,
    // so neither framesDecoded nor the <video> frame counters are the
    // measure: framesReceived counts what came through the decrypting
    // transform.)
    await sleep(1500);
    const victimReceived = () =>
      victim.page.evaluate(async () => {
        let framesReceived = 0;
        let framesDecoded = 0;
        (await window.conclave.client.pc.getStats()).forEach((r) => {
          if (r.type === "inbound-rtp" && r.kind === "video") {
            framesReceived += r.framesReceived ?? 0;
            framesDecoded += r.framesDecoded ?? 0;
          }
        });
        return { framesReceived, framesDecoded, decrypted: window.conclave.stats().framesDecrypted };
      });
    const atStart = await victimReceived();
    const tiles = await advancing(victim.page, 2000);
    const atEnd = await victimReceived();
    log({
      event: "victim_window",
      decrypted: atEnd.decrypted - atStart.decrypted,
      video_frames_received: atEnd.framesReceived - atStart.framesReceived,
      video_frames_decoded_from_before: atEnd.framesDecoded - atStart.framesDecoded,
      failures_total: tiles.stats.decryptFailures,
    });
    if (atEnd.decrypted > atStart.decrypted) throw new Error(`the evicted member still decrypted ${atEnd.decrypted - atStart.decrypted} frames`);
    if (atEnd.framesReceived > atStart.framesReceived) throw new Error(`the evicted member still received ${atEnd.framesReceived - atStart.framesReceived} video frames`);
    for (const name of stayers) {
      // The rekey makes every publisher send a key frame at once; on a
      // loaded machine a stream may stall briefly before it recovers.
      const others = [...stayers.filter((n) => n !== name).map((n) => people[n].memberId), cfg.bot];
      const from = Date.now();
      const { moving, stats } = await until(`${name} keeps video from ${others.join(", ")} after the removal`, 20_000, async () => {
        const r = await advancing(people[name].page, 1000);
        return others.every((m) => r.moving.has(`${m}|camera`)) ? r : null;
      });
      log({ event: "carries_on", who: name, epoch: stats.epoch, moving: [...moving.keys()], ms_checked: Date.now() - from });
      if (stats.epoch <= epochBefore) throw new Error(`${name} did not move to the new epoch`);
    }
    log({ event: "passed", ms: since() });
  } catch (e) {
    for (const [name, p] of Object.entries(people)) {
      const rtp = await p.page
        .evaluate(async () => {
          const pc = window.conclave.client.pc;
          if (!pc) return null;
          const rows = [];
          (await pc.getStats()).forEach((r) => {
            if (r.type === "inbound-rtp" || r.type === "outbound-rtp") rows.push([r.type, r.kind, r.mid, r.packetsReceived ?? r.packetsSent, r.framesDecoded ?? r.framesEncoded ?? "", r.packetsLost ?? "", r.pliCount ?? "", r.nackCount ?? ""]);
          });
          return { state: pc.connectionState, rows, worker: window.conclave.client.workerStats };
        })
        .catch((x) => String(x));
      log({ event: "rtp", who: name, rtp });
      await p.page.screenshot({ path: pathJoin(cfg.artifacts, `failure-${name}.png`) }).catch(() => {});
      log({ event: "state", who: name, look: await look(p.page).catch((x) => String(x)) });
    }
    log({ event: "failed", error: String(e?.stack ?? e) });
    process.exitCode = 1;
  } finally {
    await browser.close();
  }
}

await main();
