// Rust → JS: every entry of test/vectors/rust.json (written by
// client-sdk/tests/web_vectors.rs) must be reproduced byte for byte.
import { test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  FrameKey,
  KeyRing,
  KidLayout,
  SframeError,
  clearPrefixLen,
  decodeHeader,
  deriveKeySalt,
  encodeHeader,
  epochCode,
  fingerprint,
  parseProtected,
  protectFrame,
  safetyNumber,
  unprotectFrame,
} from "../dist/conclave.mjs";
import { hex, readJson, unhex, vectorsDir } from "./helpers/util.mjs";

const v = readJson(join(vectorsDir, "rust.json"));

test("rust.json: headers", () => {
  assert.ok(v.headers.length > 100);
  for (const h of v.headers) {
    const kid = BigInt(h.kid);
    const ctr = BigInt(h.ctr);
    assert.equal(hex(encodeHeader(kid, ctr)), h.encoded);
    assert.deepEqual(decodeHeader(unhex(h.encoded)), { header: { kid, ctr }, length: h.encoded.length / 2 });
  }
});

test("rust.json: key and salt derivation", async () => {
  assert.equal(new Set(v.key_derivation.map((k) => k.suite)).size, 5);
  for (const k of v.key_derivation) {
    const d = await deriveKeySalt(k.suite, BigInt(k.kid), unhex(k.base_key));
    assert.equal(hex(d.key), k.key, `suite ${k.suite} kid ${k.kid}`);
    assert.equal(hex(d.salt), k.salt, `suite ${k.suite} kid ${k.kid}`);
  }
});

test("rust.json: KIDs", () => {
  assert.ok(v.kids.some((k) => k.kid === null), "overflow cases present");
  for (const k of v.kids) {
    const layout = new KidLayout(k.epoch_bits);
    assert.equal(KidLayout.senderBits(k.width), k.sender_bits, `width ${k.width}`);
    const epoch = BigInt(k.epoch);
    const context = BigInt(k.context);
    if (k.kid === null) {
      assert.throws(
        () => layout.kid(epoch, k.sender_bits, k.leaf, context),
        (e) => e instanceof SframeError && e.code === "KidOverflow",
      );
      continue;
    }
    const kid = layout.kid(epoch, k.sender_bits, k.leaf, context);
    assert.equal(kid, BigInt(k.kid), JSON.stringify(k));
    assert.deepEqual(layout.split(kid, k.sender_bits), { context, leaf: k.leaf, epochLow: layout.epochLow(epoch) });
  }
});

test("rust.json: clear prefix lengths", () => {
  for (const p of v.clear_prefix) {
    const frame = unhex(p.frame);
    if (p.len === null) {
      assert.throws(() => clearPrefixLen(p.codec, frame), (e) => e.code === "TruncatedFrame", p.frame);
    } else {
      assert.equal(clearPrefixLen(p.codec, frame), p.len, `${p.codec} ${p.frame}`);
    }
  }
});

test("rust.json: frames decrypt and re-encrypt to identical bytes", async () => {
  const prefixes = new Set(v.frames.map((f) => `${f.codec}/${f.prefix_len}`));
  for (const want of ["opus/0", "vp8/10", "vp8/3"]) assert.ok(prefixes.has(want), want);
  assert.equal(new Set(v.frames.map((f) => f.suite)).size, 5);
  for (const f of v.frames) {
    const epoch = BigInt(f.epoch);
    const kid = BigInt(f.kid);
    const ctr = BigInt(f.ctr);
    const baseKey = unhex(f.base_key);
    const plaintext = unhex(f.plaintext);
    const protectedFrame = unhex(f.protected);
    const layout = new KidLayout(f.epoch_bits);
    const senderBits = KidLayout.senderBits(f.width);
    assert.equal(layout.kid(epoch, senderBits, f.leaf, BigInt(f.context)), kid, f.name);
    assert.equal(clearPrefixLen(f.codec, plaintext), f.prefix_len, f.name);

    // As a receiving member: the key ring finds the epoch, checks the sender, decrypts.
    const ring = new KeyRing({ suite: f.suite, layout });
    ring.installEpoch({ epoch, baseKey, senderBits, members: new Set(f.members) }, 0);
    const d = await ring.decrypt(0, f.codec, protectedFrame);
    assert.equal(hex(d.frame), f.plaintext, f.name);
    assert.deepEqual(
      [d.kid, d.ctr, d.epoch, d.leaf, d.context],
      [kid, ctr, epoch, f.leaf, BigInt(f.context)],
      f.name,
    );
    await assert.rejects(ring.decrypt(0, f.codec, protectedFrame), (e) => e.code === "Replayed", f.name);

    // As the sender: same key, same counter, same bytes.
    const senderKey = await ring.senderKey(epoch, f.leaf, BigInt(f.context));
    assert.equal(senderKey.kid, kid);
    assert.equal(hex(await protectFrame(senderKey, ctr, f.codec, plaintext)), f.protected, f.name);
    const p = parseProtected(f.codec, protectedFrame);
    assert.equal(hex(p.prefix), f.plaintext.slice(0, 2 * f.prefix_len), f.name);
    assert.equal(hex(await unprotectFrame(senderKey, f.codec, protectedFrame)), f.plaintext);
  }
});

test("rust.json: tampered frames fail authentication", async () => {
  for (const t of v.tampered) {
    const f = v.frames[t.frame];
    const key = await FrameKey.derive(f.suite, BigInt(f.kid), unhex(f.base_key));
    const bad = unhex(t.protected);
    const p = parseProtected(f.codec, bad);
    await assert.rejects(
      key.open(p.header.ctr, p.headerBytes, p.prefix, p.body),
      (e) => e.code === "AuthenticationFailed",
      t.name,
    );
  }
});

test("rust.json: safety numbers and fingerprints", async () => {
  for (const s of v.safety_numbers) {
    const ka = unhex(s.key_a);
    const kb = unhex(s.key_b);
    assert.equal(await fingerprint(s.user_a, ka), s.fingerprint_a);
    assert.equal(await fingerprint(s.user_b, kb), s.fingerprint_b);
    assert.equal(await safetyNumber(s.user_a, ka, s.user_b, kb), s.safety_number);
    assert.equal(await safetyNumber(s.user_b, kb, s.user_a, ka), s.safety_number);
  }
});

test("rust.json: epoch codes", () => {
  for (const e of v.epoch_codes) {
    assert.equal(epochCode(unhex(e.epoch_authenticator)), e.code, e.epoch_authenticator);
  }
});
