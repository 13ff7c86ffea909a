// Behaviour of the SDK beyond the shared vectors.
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  CipherSuite,
  FrameEncryptor,
  FrameKey,
  KeyRing,
  KidLayout,
  ReplayWindow,
  SFRAME_EXPORTER_LABEL,
  FrameError,
  decodeHeader,
  decodeServerFrame,
  sframeBaseKey,
  stream,
  suiteFromId,
  unprotectFrame,
  vp8IsKeyFrame,
} from "../dist/conclave.mjs";
import { hex, unhex } from "./helpers/util.mjs";

const code = (c) => (e) => e.code === c;

test("the base key is MLS-Exporter(\"SFrame 1.0 Base Key\", \"\", Nk)", async () => {
  const calls = [];
  const exporter = async (label, context, length) => {
    calls.push([new TextDecoder().decode(label), context.length, length]);
    return new Uint8Array(length).fill(7);
  };
  assert.equal(SFRAME_EXPORTER_LABEL, "SFrame 1.0 Base Key");
  assert.equal((await sframeBaseKey(exporter)).length, 32);
  await sframeBaseKey(exporter, CipherSuite.AES_128_GCM_SHA256_128);
  await sframeBaseKey(exporter, CipherSuite.AES_128_CTR_HMAC_SHA256_80);
  assert.deepEqual(calls, [
    ["SFrame 1.0 Base Key", 0, 32],
    ["SFrame 1.0 Base Key", 0, 16],
    ["SFrame 1.0 Base Key", 0, 48],
  ]);
});

test("headers: truncation and range errors", () => {
  assert.throws(() => decodeHeader(new Uint8Array(0)), code("TruncatedHeader"));
  assert.throws(() => decodeHeader(new Uint8Array([0xf0, 1, 2, 3])), code("TruncatedHeader"));
  assert.throws(() => decodeHeader(new Uint8Array([0x09, 1])), code("TruncatedHeader"));
  assert.throws(() => suiteFromId(6), code("UnsupportedSuite"));
});

test("KID layout: RFC-shaped examples and sender bits", () => {
  const l = new KidLayout(4);
  assert.equal(l.kid(17n, 6, 33, 0n), 0x211n);
  assert.equal(l.kid(14n, 6, 20, 0n), 0x14en);
  assert.deepEqual(l.split(l.kid(300n, 6, 20, 2n), 6), { context: 2n, leaf: 20, epochLow: 300n % 16n });
  assert.throws(() => l.kid(1n, 6, 64, 0n), code("KidOverflow"));
  assert.deepEqual([1, 2, 500, 2 ** 32 - 1].map(KidLayout.senderBits), [1, 2, 9, 32]);
  assert.throws(() => new KidLayout(0), code("KidOverflow"));
  assert.throws(() => new KidLayout(17), code("KidOverflow"));
});

test("encryptor: prefix stays clear, counters count across key changes, failures consume none", async () => {
  const k1 = await FrameKey.derive(CipherSuite.AES_256_GCM_SHA512_128, 0x1234n, new Uint8Array(32).fill(7));
  const k2 = await FrameKey.derive(CipherSuite.AES_256_GCM_SHA512_128, 0x1235n, new Uint8Array(32).fill(8));
  const enc = new FrameEncryptor(k1);
  const delta = new Uint8Array([0x31, 0x02, 0x00, 1, 2, 3, 4, 5]);
  const out = await enc.encrypt("vp8", delta);
  assert.equal(hex(out.subarray(0, 3)), "310200");
  assert.equal(out.length, delta.length + 1 + 2 + 16);
  await assert.rejects(enc.encrypt("vp8", new Uint8Array([0x30, 1])), code("TruncatedFrame"));
  assert.equal(enc.nextCounter, 1n);
  enc.setKey(k2);
  const second = await enc.encrypt("vp8", delta);
  assert.equal(enc.nextCounter, 2n);
  assert.equal(hex(await unprotectFrame(k2, "vp8", second)), hex(delta));
  assert.ok(vp8IsKeyFrame(new Uint8Array([0x50])) && !vp8IsKeyFrame(new Uint8Array([0x51])));
  // Metadata beyond 64 bytes is refused, as in Rust.
  await assert.rejects(k1.seal(0n, new Uint8Array(65), new Uint8Array(1)), code("MetadataTooLong"));
});

test("replay window rejects repeats and stale counters", () => {
  const w = new ReplayWindow();
  for (const c of [5n, 3n, 4n, 200n]) {
    w.check(c);
    w.accept(c);
  }
  assert.throws(() => w.check(200n), code("Replayed"));
  assert.throws(() => w.check(5n), code("TooOld"));
  w.check(199n);
  w.check(73n);
  assert.throws(() => w.check(72n), code("TooOld"));
});

test("key ring: previous epoch kept only for the retention; non-members are unknown", async () => {
  const ring = new KeyRing({ retentionMs: 10_000 });
  const secret = (epoch, fill, members) => ({
    epoch,
    baseKey: new Uint8Array(32).fill(fill),
    senderBits: KidLayout.senderBits(8),
    members: new Set(members),
  });
  ring.installEpoch(secret(1n, 1, [0, 1]), 0);
  const enc = new FrameEncryptor(await ring.senderKey(1n, 1, stream.AUDIO));
  const hello = new TextEncoder().encode("hello");
  const first = await enc.encrypt("opus", hello);
  ring.installEpoch(secret(2n, 2, [0, 1]), 0);
  const d = await ring.decrypt(9_000, "opus", first);
  assert.deepEqual([d.epoch, d.leaf, hex(d.frame)], [1n, 1, hex(hello)]);
  const late = await enc.encrypt("opus", hello);
  await assert.rejects(ring.decrypt(10_000, "opus", late), code("UnknownKid"));
  assert.deepEqual(ring.liveEpochs(), [2n]);

  const stranger = new FrameEncryptor(
    await FrameKey.derive(CipherSuite.AES_256_GCM_SHA512_128, new KidLayout().kid(2n, 4, 5, 0n), new Uint8Array(32).fill(2)),
  );
  await assert.rejects(ring.decrypt(10_000, "opus", await stranger.encrypt("opus", hello)), code("UnknownKid"));
  await assert.rejects(ring.senderKey(1n, 0, 0n), code("NoEpoch"));
});

test("server frames: binary MLS messages and text JSON decode to one shape", () => {
  const frame = (header, payload) => {
    const h = new TextEncoder().encode(header);
    const out = new Uint8Array(4 + h.length + payload.length);
    new DataView(out.buffer).setUint32(0, h.length);
    out.set(h, 4);
    out.set(payload, 4 + h.length);
    return out;
  };
  const mls = new Uint8Array([0, 1, 2, 0xff, 0x7b]);
  const header = '{"v":1,"type":"commit","call_id":"c","epoch":7}';
  const m = decodeServerFrame(frame(header, mls).buffer);
  assert.equal(m.type, "commit");
  assert.equal(m.epoch, 7);
  assert.deepEqual(m.message, mls);
  // The text form of the same message.
  const t = decodeServerFrame('{"v":1,"type":"commit","call_id":"c","epoch":7,"message":"AAEC/3s="}');
  assert.deepEqual(t.message, mls);
  assert.equal(decodeServerFrame('{"v":1,"type":"pong"}').type, "pong");
  for (const bad of [
    new Uint8Array([0, 0, 1]),
    frame(header, new Uint8Array()),
    frame('{"v":1,"type":"pong"}', mls),
    frame('{"v":1,"type":"commit","call_id":"c","epoch":7,"message":"AA=="}', mls),
    frame("{{", mls),
    (() => { const f = frame(header, mls); new DataView(f.buffer).setUint32(0, 999); return f; })(),
    '{"v":1,"type":"welcome","call_id":"c","epoch":7}',
    "[1]",
  ]) {
    assert.throws(() => decodeServerFrame(bad), FrameError);
  }
});
