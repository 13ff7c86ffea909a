// The MLS agent (src/mls.ts) among JS members, with a stand-in for the
// server's external sender built on ts-mls itself. Interop with the Rust
// agent and the real server: signaling/tests/web_mls.rs (test/interop-client.mjs).
import { test } from "node:test";
import assert from "node:assert/strict";
import { decodeMlsMessage, encodeMlsMessage, proposeExternal } from "ts-mls";
import {
  MlsAgent,
  MlsAgentError,
  checkTsMlsPatched,
  cipherSuite,
  decodePrincipal,
  decodeSigningIdentity,
  encodePrincipal,
  encodeSigningIdentity,
  generateIdentity,
  sframeBaseKey,
  stream,
} from "../dist/conclave.mjs";

const code = (c) => (e) => e instanceof MlsAgentError && e.code === c;
const utf8 = new TextEncoder();

/** The delivery service's part: signs external proposals as `s:<name>`. */
async function fakeServer(name = "test-server") {
  const cs = await cipherSuite();
  const { publicKey, signKey } = await cs.signature.keygen();
  const signingIdentity = encodeSigningIdentity({
    signaturePublicKey: publicKey,
    credential: { credentialType: "basic", identity: utf8.encode(`s:${name}`) },
  });
  const propose = async (groupInfoBytes, proposal) => {
    const gi = decodeMlsMessage(groupInfoBytes, 0)[0];
    assert.equal(gi.wireformat, "mls_group_info");
    const msg = await proposeExternal(gi.groupInfo, proposal, publicKey, signKey, cs);
    return encodeMlsMessage(msg);
  };
  return {
    signingIdentity,
    add: async (gi, kpBytes) => {
      const kp = decodeMlsMessage(kpBytes, 0)[0];
      return propose(gi, { proposalType: "add", add: { keyPackage: kp.keyPackage } });
    },
    remove: (gi, leaf) => propose(gi, { proposalType: "remove", remove: { removed: leaf } }),
  };
}

async function agent(user) {
  return MlsAgent.create(await generateIdentity(user, "dev1"));
}

async function assertSameEpoch(members) {
  const [a, ...rest] = members;
  for (const b of rest) {
    assert.equal(b.epoch, a.epoch);
    assert.equal(b.epochCode(), a.epochCode());
    assert.deepEqual(b.epochInfo.sframeBaseKey, a.epochInfo.sframeBaseKey);
    assert.deepEqual(b.epochInfo.epochAuthenticator, a.epochInfo.epochAuthenticator);
    assert.deepEqual(
      b.roster().map((r) => [r.leaf, r.principal, Buffer.from(r.identityKey).toString("hex")]),
      a.roster().map((r) => [r.leaf, r.principal, Buffer.from(r.identityKey).toString("hex")]),
    );
  }
  // Every member reads every other member's frames.
  for (const s of members) {
    await s.switchSending(s.epoch);
    const frame = utf8.encode(`hello from leaf ${s.leafIndex}`);
    const ct = await s.encrypt(stream.CAMERA, "opaque", frame);
    for (const r of members) {
      if (r === s) continue;
      const d = await r.decrypt("opaque", ct);
      assert.deepEqual(d.frame, frame);
      assert.equal(d.leaf, s.leafIndex);
      assert.equal(d.context, stream.CAMERA);
      assert.equal(d.epoch, s.epoch);
    }
  }
}

test("ts-mls carries the external_senders patch", () => {
  checkTsMlsPatched();
});

test("principals follow Rust's credential rules", () => {
  const m = { kind: "member", userId: "alice", deviceId: "laptop-1" };
  assert.equal(new TextDecoder().decode(encodePrincipal(m)), "u:alice/laptop-1");
  assert.deepEqual(decodePrincipal(encodePrincipal(m)), m);
  assert.deepEqual(decodePrincipal(utf8.encode("s:conclave.example")), { kind: "server", name: "conclave.example" });
  for (const bad of ["", "alice", "u:alice", "u:/x", "u:a/b/c", "s:", "u:a b/c"]) {
    assert.throws(() => decodePrincipal(utf8.encode(bad)), code("InvalidIdentity"), bad);
  }
  assert.throws(() => decodePrincipal(new Uint8Array([0xff, 0xfe])), code("InvalidIdentity"));
  assert.throws(() => encodePrincipal({ kind: "member", userId: "x".repeat(129), deviceId: "d" }), code("InvalidIdentity"));
});

test("create, add by external proposal, commit, join; remove; keys agree", async () => {
  const server = await fakeServer();
  assert.equal(decodeSigningIdentity(server.signingIdentity).credential.credentialType, "basic");
  const alice = await agent("alice");
  const bob = await agent("bob");
  const carol = await agent("carol");
  const groupId = utf8.encode("group-1");

  assert.deepEqual(await alice.createGroup(groupId, server.signingIdentity), [{ type: "joined", epoch: 0n }]);
  await assert.rejects(alice.createGroup(groupId, server.signingIdentity), code("AlreadyInGroup"));
  assert.equal(alice.leafIndex, 0);
  assert.equal(alice.epochInfo.sframeBaseKey.length, 32);
  assert.deepEqual(alice.epochInfo.sframeBaseKey, await sframeBaseKey((l, c, n) => alice.exportSecret(new TextDecoder().decode(l), c, n)));
  assert.equal(await alice.commitPending(), null);

  // Server adds Bob and Carol (epoch 0 -> 1).
  let gi = await alice.groupInfo();
  for (const kp of [await bob.keyPackage(), await carol.keyPackage()]) {
    assert.deepEqual(await alice.handle(await server.add(gi, kp)), [{ type: "proposalQueued" }]);
  }
  assert.equal(alice.pendingProposals, 2);
  const c1 = await alice.commitPending();
  assert.equal(c1.epoch, 0n);
  assert.ok(c1.welcome);
  await assert.rejects(alice.commitPending(), code("CommitPending"));
  assert.equal(alice.epoch, 0n, "a commit takes effect only when the server relays it");
  const ev = await alice.handle(c1.commit);
  assert.deepEqual(ev, [{ type: "epochChanged", epoch: 1n, added: [1, 2], removed: [] }]);
  assert.deepEqual(await bob.join(c1.welcome), [{ type: "joined", epoch: 1n }]);
  assert.deepEqual(await carol.join(c1.welcome), [{ type: "joined", epoch: 1n }]);
  await assertSameEpoch([alice, bob, carol]);

  // Bob leaves: the server proposes his removal; Carol commits (epoch 1 -> 2).
  gi = await alice.groupInfo();
  const rm = await server.remove(gi, bob.leafIndex);
  for (const m of [alice, bob, carol]) assert.deepEqual(await m.handle(rm), [{ type: "proposalQueued" }]);
  const c2 = await carol.commitPending();
  assert.equal(c2.welcome, undefined);
  // Alice also tried and lost: she discards hers and processes the winner.
  const lost = await alice.commitPending();
  assert.ok(lost);
  assert.deepEqual(await alice.handle(c2.commit), [{ type: "epochChanged", epoch: 2n, added: [], removed: [1] }]);
  assert.equal(alice.hasPendingCommit, false);
  assert.deepEqual(await carol.handle(c2.commit), [{ type: "epochChanged", epoch: 2n, added: [], removed: [1] }]);
  assert.deepEqual(await bob.handle(c2.commit), [{ type: "removed" }]);
  assert.equal(bob.epoch, null);
  await assert.rejects(bob.handle(c2.commit), code("NotInGroup"));
  await assertSameEpoch([alice, carol]);

  // Earlier epochs stay until their retention runs out (purged on use).
  assert.deepEqual(alice.keyRing.liveEpochs().slice(0, 2), [2n, 1n]);

  // The server asks Alice to heal the tree: nothing is queued, and the
  // empty commit moves both members to a new epoch (its update path).
  assert.equal(await alice.commitPending(), null);
  const heal = await alice.commitPending(true);
  assert.equal(heal.epoch, 2n);
  assert.equal(heal.welcome, undefined);
  assert.deepEqual(await alice.handle(heal.commit), [{ type: "epochChanged", epoch: 3n, added: [], removed: [] }]);
  assert.deepEqual(await carol.handle(heal.commit), [{ type: "epochChanged", epoch: 3n, added: [], removed: [] }]);
  await assertSameEpoch([alice, carol]);
});

test("refusals leave the agent unchanged", async () => {
  const server = await fakeServer();
  const a = await agent("alice");
  await assert.rejects(a.handle(new Uint8Array([1, 2, 3])), code("NotInGroup"));
  await assert.rejects(a.join(new Uint8Array([0, 1])), code("Malformed"));
  // The external sender must be a server credential.
  const notServer = encodeSigningIdentity({
    signaturePublicKey: new Uint8Array(32).fill(3),
    credential: { credentialType: "basic", identity: utf8.encode("u:eve/x") },
  });
  await assert.rejects(a.createGroup(utf8.encode("g"), notServer), code("InvalidIdentity"));
  await a.createGroup(utf8.encode("g"), server.signingIdentity);
  await assert.rejects(a.handle(new Uint8Array([9, 9, 9])), code("Malformed"));
  // A Welcome for someone else's key package.
  const b = await agent("bob");
  const c = await agent("carol");
  await a.handle(await server.add(await a.groupInfo(), await b.keyPackage()));
  const bundle = await a.commitPending();
  await assert.rejects(c.join(bundle.welcome), code("NoMatchingKeyPackage"));
  // A proposal whose server signature does not verify.
  await a.handle(bundle.commit);
  const forged = await server.add(await a.groupInfo(), await c.keyPackage());
  forged[forged.length - 1] ^= 1;
  await assert.rejects(a.handle(forged), code("Mls"));
  assert.equal(a.pendingProposals, 0);
  assert.equal(a.epoch, 1n);
});
