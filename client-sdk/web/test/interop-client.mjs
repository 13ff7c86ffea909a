#!/usr/bin/env node
// A Conclave call member in node, running the browser SDK's MLS agent
// (dist/conclave.mjs, ts-mls) against a real server. Driven by
// signaling/tests/web_mls.rs; usable by hand too:
//
//   node test/interop-client.mjs ws://127.0.0.1:8080/ws <token> <call> [device]
//
// stdout: one JSON object per line (what happened):
//   {"event":"joined","epoch":0}                         after create_group or a Welcome
//   {"event":"ready","epoch":N,"leaf":L,"epoch_code":"…","base_key":"hex",
//    "roster":[[leaf,"u:user/device","hex key"],…],"frame":"hex"}
//        on epoch_ready (and at once for epoch 0 of a group it created): `frame` is an Opus frame "web <user> epoch N"
//        SFrame-protected under this member's audio key of epoch N
//   {"event":"decrypted","ok":true,"payload":"hex","leaf":L,"epoch":N,"context":C}
//   {"event":"committed","epoch":N,"welcome":bool}        a commit was sent
//   {"event":"removed","reason":"…"} / {"event":"error",…} / {"event":"closed"}
// stdin: one JSON command per line:
//   {"cmd":"decrypt","codec":"opus","frame":"hex"}   {"cmd":"leave"}   {"cmd":"quit"}
import { createInterface } from "node:readline";
import WebSocket from "ws";
import { MlsAgent, decodeServerFrame, generateIdentity, stream } from "../dist/conclave.mjs";

const [url, token, callId, deviceId = "web1"] = process.argv.slice(2);
if (!url || !token || !callId) {
  console.error("usage: interop-client.mjs <ws-url> <token> <call> [device]");
  process.exit(2);
}

const out = (o) => process.stdout.write(`${JSON.stringify(o)}\n`);
const hex = (b) => Buffer.from(b).toString("hex");
const unhex = (s) => new Uint8Array(Buffer.from(s, "hex"));
const b64 = (b) => Buffer.from(b).toString("base64");
const unb64 = (s) => new Uint8Array(Buffer.from(s, "base64"));

const ws = new WebSocket(`${url}?token=${encodeURIComponent(token)}`);
let agent = null;
let userId = null;
let externalSender = null;

function send(type, fields, id) {
  const msg = { v: 1, type, ...fields };
  if (id !== undefined) msg.id = id;
  ws.send(JSON.stringify(msg));
}

function fail(what, e) {
  out({ event: "error", where: what, message: e instanceof Error ? `${e.name}: ${e.message}` : String(e) });
}

async function onMessage(m) {
  // After `removed` the server may still relay the batch that removes us.
  if (["proposal", "commit", "commit_request"].includes(m.type) && agent?.epoch === null) {
    out({ event: "ignored", type: m.type, why: "not in the group" });
    return;
  }
  switch (m.type) {
    case "ready": {
      userId = m.user_id;
      externalSender = unb64(m.external_sender);
      agent = await MlsAgent.create(await generateIdentity(userId, deviceId));
      send("join_call", { call_id: callId, device_id: deviceId, key_package: b64(await agent.keyPackage()) }, 1);
      break;
    }
    case "joined":
    case "roster":
    case "pong":
    case "active_speaker":
      break;
    case "create_group": {
      const ev = await agent.createGroup(unb64(m.group_id), externalSender);
      send("group_created", { call_id: callId, group_info: b64(await agent.groupInfo()) });
      out({ event: "joined", epoch: Number(ev[0].epoch) });
      // The creator sends in epoch 0 at once; no epoch_ready comes for it.
      await emitReady(ev[0].epoch);
      break;
    }
    case "proposal":
      try {
        await agent.handle(m.message);
      } catch (e) {
        fail("proposal", e);
      }
      break;
    case "commit_request":
      if (agent.epoch !== BigInt(m.epoch)) break;
      try {
        agent.discardPendingCommit();
        const b = await agent.commitPending();
        if (b) {
          const fields = { call_id: callId, epoch: Number(b.epoch), commit: b64(b.commit) };
          if (b.welcome) fields.welcome = b64(b.welcome);
          send("commit", fields);
          out({ event: "committed", epoch: Number(b.epoch), welcome: b.welcome !== undefined });
        }
      } catch (e) {
        fail("commit_request", e);
      }
      break;
    case "commit":
      try {
        const ev = await agent.handle(m.message);
        if (ev.some((e) => e.type === "removed")) {
          out({ event: "removed", reason: "commit" });
        } else {
          send("epoch_ack", { call_id: callId, epoch: Number(agent.epoch) });
        }
      } catch (e) {
        fail("commit", e);
      }
      break;
    case "welcome":
      try {
        const ev = await agent.join(m.message);
        send("epoch_ack", { call_id: callId, epoch: Number(agent.epoch) });
        out({ event: "joined", epoch: Number(ev[0].epoch) });
      } catch (e) {
        fail("welcome", e);
      }
      break;
    case "epoch_ready":
      if (agent.epoch === null) break;
      await agent.switchSending(BigInt(m.epoch));
      await emitReady(BigInt(m.epoch));
      break;
    case "removed":
      agent?.leave();
      out({ event: "removed", reason: m.reason });
      break;
    case "error":
      if (m.code === "stale_epoch" || m.code === "not_committer") agent?.discardPendingCommit();
      out({ event: "error", where: "server", code: m.code, message: m.message });
      break;
    default:
      out({ event: "ignored", type: m.type });
  }
}

/** Reports the epoch and a frame protected under this member's audio key of it. */
async function emitReady(epoch) {
  const info = agent.epochInfo;
  const frame = await agent.encrypt(stream.AUDIO, "opus", new TextEncoder().encode(`web ${userId} epoch ${epoch}`));
  out({
    event: "ready",
    epoch: Number(epoch),
    leaf: info.leaf,
    epoch_code: info.epochCode,
    base_key: hex(info.sframeBaseKey),
    roster: info.roster.map((r) => [
      r.leaf,
      r.principal.kind === "member" ? `u:${r.principal.userId}/${r.principal.deviceId}` : `s:${r.principal.name}`,
      hex(r.identityKey),
    ]),
    frame: hex(frame),
  });
}

// Messages are handled strictly in arrival order.
let chain = Promise.resolve();
ws.on("message", (data, isBinary) => {
  const m = decodeServerFrame(isBinary ? new Uint8Array(data) : data.toString());
  chain = chain.then(() => onMessage(m)).catch((e) => fail(m.type, e));
});
ws.on("close", () => {
  out({ event: "closed" });
  process.exit(0);
});
ws.on("error", (e) => {
  fail("websocket", e);
  process.exit(1);
});

const rl = createInterface({ input: process.stdin });
rl.on("line", (line) => {
  if (!line.trim()) return;
  const c = JSON.parse(line);
  chain = chain.then(async () => {
    switch (c.cmd) {
      case "decrypt":
        try {
          const d = await agent.decrypt(c.codec ?? "opus", unhex(c.frame));
          out({ event: "decrypted", ok: true, payload: hex(d.frame), leaf: d.leaf, epoch: Number(d.epoch), context: Number(d.context) });
        } catch (e) {
          out({ event: "decrypted", ok: false, message: String(e) });
        }
        break;
      case "leave":
        send("leave_call", { call_id: callId });
        break;
      case "quit":
        ws.close();
        break;
      default:
        fail("stdin", `unknown command ${c.cmd}`);
    }
  });
});
rl.on("close", () => ws.close());
