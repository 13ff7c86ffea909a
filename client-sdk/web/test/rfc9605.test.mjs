// RFC 9605 Appendix C test vectors (../shared/vectors/sframe-rfc9605.json).
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import {
  AeadKey,
  FrameKey,
  decodeHeader,
  deriveKeySalt,
  derivationLabels,
  encodeHeader,
} from "../dist/conclave.mjs";
import { hex, readJson, rfc9605VectorPath, unhex } from "./helpers/util.mjs";

const path = rfc9605VectorPath();
const ci = process.env.CI === "true" || process.env.CI === "1";
if (!existsSync(path) && ci) throw new Error(`RFC 9605 vectors missing at ${path}`);
const skip = existsSync(path) ? false : `RFC 9605 vectors not found at ${path}`;
const v = skip ? null : readJson(path);

test("RFC 9605 C.1 header encoding", { skip }, () => {
  assert.ok(v.header.length > 200);
  for (const h of v.header) {
    const kid = BigInt(h.kid);
    const ctr = BigInt(h.ctr);
    assert.equal(hex(encodeHeader(kid, ctr)), h.encoded, `kid ${kid} ctr ${ctr}`);
    const d = decodeHeader(unhex(h.encoded));
    assert.deepEqual(d, { header: { kid, ctr }, length: h.encoded.length / 2 });
  }
});

test("RFC 9605 C.2 AES-CTR-HMAC AEAD", { skip }, async () => {
  for (const c of v.aes_ctr_hmac) {
    const aead = await AeadKey.create(c.cipher_suite, unhex(c.key));
    const ct = await aead.seal(unhex(c.nonce), unhex(c.aad), unhex(c.pt));
    assert.equal(hex(ct), c.ct, `suite ${c.cipher_suite}`);
    assert.equal(hex(await aead.open(unhex(c.nonce), unhex(c.aad), unhex(c.ct))), c.pt);
  }
});

test("RFC 9605 C.3 SFrame encryption, every suite", { skip }, async () => {
  const suites = new Set();
  for (const c of v.sframe) {
    suites.add(c.cipher_suite);
    const kid = BigInt(c.kid);
    const ctr = BigInt(c.ctr);
    const labels = derivationLabels(c.cipher_suite, kid);
    assert.equal(hex(labels.keyLabel), c.sframe_key_label);
    assert.equal(hex(labels.saltLabel), c.sframe_salt_label);
    const d = await deriveKeySalt(c.cipher_suite, kid, unhex(c.base_key));
    assert.equal(hex(d.key), c.sframe_key, `key, suite ${c.cipher_suite}`);
    assert.equal(hex(d.salt), c.sframe_salt, `salt, suite ${c.cipher_suite}`);
    const key = await FrameKey.derive(c.cipher_suite, kid, unhex(c.base_key));
    assert.equal(hex(key.nonce(ctr)), c.nonce);
    const header = encodeHeader(kid, ctr);
    assert.equal(hex(header) + c.metadata, c.aad);
    const ct = await key.seal(ctr, unhex(c.metadata), unhex(c.pt));
    assert.equal(hex(ct), c.ct, `ct, suite ${c.cipher_suite}`);
    const { length } = decodeHeader(unhex(c.ct));
    const body = unhex(c.ct).subarray(length);
    const pt = await key.open(ctr, unhex(c.ct).subarray(0, length), unhex(c.metadata), body);
    assert.equal(hex(pt), c.pt);
  }
  assert.deepEqual([...suites].sort(), [1, 2, 3, 4, 5]);
});
