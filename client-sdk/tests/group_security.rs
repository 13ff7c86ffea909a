//! Security properties of the E2EE core, in-process, with a 50-member call:
//! real MLS (mls-rs) agents, the delivery service's public view of the group
//! (the server as external sender), and SFrame frames between members.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use conclave_client::{AgentConfig, AgentError, AgentEvent, Identity, MlsAgent, Principal, stream};
use conclave_protocol::mls::{DeliveryGroup, DsError};
use conclave_protocol::sframe::{Codec, SframeError, parse_protected};

const N: usize = 50;

/// A call: the delivery service plus every member's agent, in leaf order.
struct Call {
    server: Identity,
    ds: DeliveryGroup,
    members: Vec<Option<MlsAgent>>,
    now: Instant,
}

fn agent(i: usize) -> MlsAgent {
    let id = Identity::generate(Principal::member(&format!("user{i}"), "dev1").unwrap()).unwrap();
    MlsAgent::new(id, AgentConfig::default())
}

impl Call {
    /// Member 0 creates the group; everyone else is added by the server's
    /// external proposals, committed in one batch by member 0.
    fn new(n: usize) -> Self {
        let server = Identity::generate(Principal::server("conclave-test").unwrap()).unwrap();
        let now = Instant::now();
        let mut creator = agent(0);
        let ev = creator
            .create_group(b"call-under-test", server.signing_identity(), now)
            .unwrap();
        assert_eq!(ev, vec![AgentEvent::Joined { epoch: 0 }]);
        let ds = DeliveryGroup::observe(&server, &creator.group_info().unwrap()).unwrap();
        let mut call = Call {
            server,
            ds,
            members: vec![Some(creator)],
            now,
        };
        call.add((1..n).map(agent).collect());
        call
    }

    fn live(&mut self) -> impl Iterator<Item = &mut MlsAgent> {
        self.members.iter_mut().flatten()
    }

    /// Relays a handshake message to every member; returns their events.
    fn broadcast(&mut self, msg: &[u8]) -> Vec<Vec<AgentEvent>> {
        let now = self.now;
        self.live().map(|a| a.handle(msg, now).unwrap()).collect()
    }

    /// The committer (the lowest live leaf) commits what is queued; the
    /// delivery service orders it and relays it; joiners get the Welcome.
    fn commit(&mut self, joiners: Vec<MlsAgent>) -> u64 {
        let committer = self.members.iter().position(Option::is_some).unwrap();
        let bundle = self.members[committer]
            .as_mut()
            .unwrap()
            .commit_pending()
            .unwrap()
            .expect("proposals were queued");
        let accepted = self.ds.accept_commit(&bundle.commit).unwrap();
        assert_eq!(accepted.epoch, bundle.epoch + 1);
        self.broadcast(&bundle.commit);
        let now = self.now;
        for mut j in joiners {
            let ev = j.join(bundle.welcome.as_ref().unwrap(), now).unwrap();
            assert_eq!(
                ev,
                vec![AgentEvent::Joined {
                    epoch: accepted.epoch
                }]
            );
            let leaf = j.leaf_index().unwrap() as usize;
            if self.members.len() <= leaf {
                self.members.resize_with(leaf + 1, || None);
            }
            self.members[leaf] = Some(j);
        }
        // The server tells everyone the group has moved.
        for a in self.live() {
            a.switch_sending(accepted.epoch).unwrap();
        }
        accepted.epoch
    }

    fn add(&mut self, joiners: Vec<MlsAgent>) -> u64 {
        for j in &joiners {
            let proposal = self.ds.propose_add(&j.key_package().unwrap()).unwrap();
            for ev in self.broadcast(&proposal) {
                assert_eq!(ev, vec![AgentEvent::ProposalQueued]);
            }
        }
        self.commit(joiners)
    }

    fn member(&mut self, leaf: usize) -> &mut MlsAgent {
        self.members[leaf].as_mut().unwrap()
    }
}

/// A VP8 delta frame: 3-byte frame tag, then payload.
fn vp8_delta(seed: u8) -> Vec<u8> {
    let mut f = vec![0x31, 0x02, 0x00];
    f.extend((0..1000u32).map(|i| (i as u8).wrapping_mul(seed)));
    f
}

/// A VP8 key frame: tag, start code, dimensions, then payload.
fn vp8_key(seed: u8) -> Vec<u8> {
    let mut f = vec![0x50, 0x2a, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0xe0, 0x01];
    f.extend((0..3000u32).map(|i| (i as u8) ^ seed));
    f
}

fn encrypt(a: &mut MlsAgent, context: u64, codec: Codec, frame: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; frame.len() + 64];
    let n = a.crypto().encrypt(context, codec, frame, &mut out).unwrap();
    out.truncate(n);
    out
}

fn decrypt(a: &mut MlsAgent, codec: Codec, frame: &[u8]) -> Result<Vec<u8>, SframeError> {
    let mut out = vec![0u8; frame.len()];
    let d = a.crypto().decrypt(codec, frame, &mut out)?;
    out.truncate(d.len);
    Ok(out)
}

#[test]
fn every_member_decrypts_every_other_members_frames() {
    let mut call = Call::new(N);
    assert_eq!(call.ds.epoch(), 1);
    assert_eq!(call.ds.members().len(), N);

    let mut checked = 0;
    for sender in 0..N {
        let clear = [vp8_key(sender as u8), vp8_delta(sender as u8)];
        let audio: Vec<u8> = (0..120u8).map(|b| b ^ sender as u8).collect();
        let s = call.member(sender);
        let frames = [
            encrypt(s, stream::CAMERA, Codec::Vp8, &clear[0]),
            encrypt(s, stream::CAMERA, Codec::Vp8, &clear[1]),
            encrypt(s, stream::AUDIO, Codec::Opus, &audio),
        ];
        // The clear prefix is readable; the rest is not the plaintext.
        assert_eq!(&frames[0][..10], &clear[0][..10]);
        assert_eq!(&frames[1][..3], &clear[1][..3]);
        assert!(
            !frames[0]
                .windows(32)
                .any(|w| clear[0][10..].windows(32).any(|c| c == w))
        );
        for receiver in (0..N).filter(|r| *r != sender) {
            let r = call.member(receiver);
            assert_eq!(decrypt(r, Codec::Vp8, &frames[0]).unwrap(), clear[0]);
            assert_eq!(decrypt(r, Codec::Vp8, &frames[1]).unwrap(), clear[1]);
            assert_eq!(decrypt(r, Codec::Opus, &frames[2]).unwrap(), audio);
            checked += 1;
        }
    }
    assert_eq!(checked, N * (N - 1));
}

#[test]
fn distinct_senders_and_streams_never_share_a_key_id() {
    let mut call = Call::new(N);
    let mut kids = std::collections::HashSet::new();
    for sender in 0..N {
        for context in [stream::AUDIO, stream::CAMERA, stream::SCREEN] {
            let f = encrypt(call.member(sender), context, Codec::Opus, b"x");
            let kid = parse_protected(Codec::Opus, &f).unwrap().header.kid;
            assert!(kids.insert(kid), "KID {kid:#x} reused");
        }
    }
    assert_eq!(kids.len(), N * 3);
}

#[test]
fn removed_member_cannot_decrypt_the_new_epoch() {
    let mut call = Call::new(N);
    let victim = 7;
    let victim_principal = call.member(victim).identity().principal().clone();
    assert_eq!(call.ds.leaf_of(&victim_principal), Some(victim as u32));

    let before = encrypt(call.member(3), stream::CAMERA, Codec::Vp8, &vp8_delta(3));
    assert!(decrypt(call.member(victim), Codec::Vp8, &before).is_ok());

    let proposal = call.ds.propose_remove(victim as u32).unwrap();
    call.broadcast(&proposal);
    let committer = 0;
    let bundle = call.member(committer).commit_pending().unwrap().unwrap();
    let accepted = call.ds.accept_commit(&bundle.commit).unwrap();
    assert!(call.ds.leaf_of(&victim_principal).is_none());
    assert_eq!(call.ds.members().len(), N - 1);

    // Everyone but the victim processes the commit; the victim keeps its old state.
    let mut victim_agent = call.members[victim].take().unwrap();
    let events = call.broadcast(&bundle.commit);
    assert!(events.iter().all(|e| matches!(
        e.as_slice(),
        [AgentEvent::EpochChanged { removed, .. }] if removed == &vec![victim as u32]
    )));
    for a in call.live() {
        a.switch_sending(accepted.epoch).unwrap();
    }

    for sender in [0usize, 3, 49] {
        let frame = encrypt(call.member(sender), stream::CAMERA, Codec::Vp8, &vp8_key(9));
        // The victim, holding every key it ever had, cannot read it.
        let err = decrypt(&mut victim_agent, Codec::Vp8, &frame).unwrap_err();
        assert!(
            matches!(
                err,
                SframeError::UnknownKid(_) | SframeError::AuthenticationFailed
            ),
            "{err:?}"
        );
        // Everyone still in the call can.
        for r in [1usize, 20, 48].into_iter().filter(|r| *r != sender) {
            assert_eq!(
                decrypt(call.member(r), Codec::Vp8, &frame).unwrap(),
                vp8_key(9)
            );
        }
    }

    // The honest path: the victim processes its removal and drops every key.
    let ev = victim_agent.handle(&bundle.commit, call.now).unwrap();
    assert_eq!(ev, vec![AgentEvent::Removed]);
    assert!(victim_agent.crypto().live_epochs().is_empty());
    let frame = encrypt(call.member(0), stream::AUDIO, Codec::Opus, b"after removal");
    assert!(decrypt(&mut victim_agent, Codec::Opus, &frame).is_err());
}

#[test]
fn a_joiner_drops_its_key_package_secrets() {
    let mut call = Call::new(3);
    let joiner = agent(3);
    let kp = joiner.key_package().unwrap();
    assert_eq!(joiner.unused_key_packages(), 1);
    let proposal = call.ds.propose_add(&kp).unwrap();
    call.broadcast(&proposal);
    let epoch = call.commit(vec![joiner]);
    assert_eq!(call.member(3).unused_key_packages(), 0);

    // The agent writes no state per epoch; the joiner follows the next
    // commit and its frames still reach the others, and theirs reach it.
    assert_eq!(call.add(vec![agent(4)]), epoch + 1);
    let frame = encrypt(
        call.member(3),
        stream::AUDIO,
        Codec::Opus,
        b"from the joiner",
    );
    assert_eq!(
        decrypt(call.member(0), Codec::Opus, &frame).unwrap(),
        b"from the joiner"
    );
    let frame = encrypt(call.member(4), stream::AUDIO, Codec::Opus, b"to the joiner");
    assert_eq!(
        decrypt(call.member(3), Codec::Opus, &frame).unwrap(),
        b"to the joiner"
    );
}

#[test]
fn late_joiner_cannot_decrypt_earlier_epochs() {
    let mut call = Call::new(N);
    let old_audio = encrypt(
        call.member(5),
        stream::AUDIO,
        Codec::Opus,
        b"before you came",
    );
    let old_video = encrypt(call.member(6), stream::CAMERA, Codec::Vp8, &vp8_key(6));
    let joined_epoch = call.add(vec![agent(N)]);
    let late = call.member(N);
    assert_eq!(late.epoch(), Some(joined_epoch));
    assert!(matches!(
        decrypt(late, Codec::Opus, &old_audio),
        Err(SframeError::UnknownKid(_))
    ));
    assert!(matches!(
        decrypt(late, Codec::Vp8, &old_video),
        Err(SframeError::UnknownKid(_))
    ));
    // Existing members still read the old frames (previous epoch retained).
    assert_eq!(
        decrypt(call.member(9), Codec::Opus, &old_audio).unwrap(),
        b"before you came"
    );
    // And the newcomer reads what is sent now.
    let now_frame = encrypt(call.member(5), stream::AUDIO, Codec::Opus, b"welcome");
    assert_eq!(
        decrypt(call.member(N), Codec::Opus, &now_frame).unwrap(),
        b"welcome"
    );
}

#[test]
fn tampered_frames_are_rejected() {
    let mut call = Call::new(4);
    let clear = vp8_key(1);
    let frame = encrypt(call.member(1), stream::CAMERA, Codec::Vp8, &clear);
    let p = parse_protected(Codec::Vp8, &frame).unwrap();
    let header_at = p.prefix.len();
    let body_at = header_at + p.header_bytes.len();

    // Ciphertext, tag, counter byte of the header, and clear prefix.
    for (what, at) in [
        ("ciphertext", body_at + 5),
        ("tag", frame.len() - 1),
        ("header ctr", body_at - 1),
        ("prefix: dimensions", 7),
        ("prefix: frame tag size bits", 1),
    ] {
        let mut bad = frame.clone();
        bad[at] ^= 0x04;
        let err = decrypt(call.member(2), Codec::Vp8, &bad).unwrap_err();
        assert!(
            matches!(
                err,
                SframeError::AuthenticationFailed | SframeError::UnknownKid(_)
            ),
            "{what}: {err:?}"
        );
    }
    // Turning the key frame into a "delta" frame moves the prefix boundary.
    let mut bad = frame.clone();
    bad[0] |= 0x01;
    assert!(decrypt(call.member(2), Codec::Vp8, &bad).is_err());
    // Truncations of every length are typed errors.
    for cut in 0..frame.len() {
        assert!(decrypt(call.member(2), Codec::Vp8, &frame[..cut]).is_err());
    }
    // The untouched frame still decrypts (failures did not poison the key),
    // exactly once.
    assert_eq!(decrypt(call.member(2), Codec::Vp8, &frame).unwrap(), clear);
    assert!(matches!(
        decrypt(call.member(2), Codec::Vp8, &frame),
        Err(SframeError::Replayed { .. })
    ));
}

#[test]
fn unknown_kids_are_rejected_without_panic() {
    let mut call = Call::new(4);
    let frame = encrypt(call.member(1), stream::AUDIO, Codec::Opus, b"hi");
    // Rewrite the header with KIDs for unknown epochs, unknown leaves, huge values.
    let p = parse_protected(Codec::Opus, &frame).unwrap();
    for kid in [0x0fu64, 0xff, 0x3f05, u64::MAX] {
        let hdr = conclave_protocol::sframe::Header::new(kid, p.header.ctr);
        let mut buf = [0u8; 17];
        let n = hdr.encode(&mut buf).unwrap();
        let forged = [&buf[..n], p.body].concat();
        let err = decrypt(call.member(2), Codec::Opus, &forged).unwrap_err();
        assert!(
            matches!(
                err,
                SframeError::UnknownKid(_) | SframeError::AuthenticationFailed
            ),
            "{kid:#x}: {err:?}"
        );
    }
}

#[test]
fn previous_epoch_keys_expire_after_the_retention() {
    let mut call = Call::new(3);
    let old = encrypt(call.member(1), stream::AUDIO, Codec::Opus, b"in flight");
    let old2 = encrypt(
        call.member(1),
        stream::AUDIO,
        Codec::Opus,
        b"still in flight",
    );
    let new_epoch = call.add(vec![agent(3)]);
    let r = call.member(2);
    assert_eq!(r.crypto().live_epochs(), vec![new_epoch, new_epoch - 1]);
    let mut out = vec![0u8; 64];
    let t = call.now;
    let d =
        call.member(2)
            .crypto()
            .decrypt_at(t + Duration::from_secs(9), Codec::Opus, &old, &mut out);
    assert!(d.is_ok());
    let late = call.member(2).crypto().decrypt_at(
        t + Duration::from_secs(11),
        Codec::Opus,
        &old2,
        &mut out,
    );
    assert!(matches!(late, Err(SframeError::UnknownKid(_))));
    assert_eq!(call.member(2).crypto().live_epochs(), vec![new_epoch]);
}

#[test]
fn sending_switches_only_when_told_and_asks_for_a_key_frame() {
    let mut call = Call::new(3);
    let proposal = call
        .ds
        .propose_add(&agent(3).key_package().unwrap())
        .unwrap();
    call.broadcast(&proposal);
    let bundle = call.member(0).commit_pending().unwrap().unwrap();
    call.ds.accept_commit(&bundle.commit).unwrap();
    call.broadcast(&bundle.commit);
    let a = call.member(1);
    assert_eq!(a.crypto().receive_epoch(), Some(2));
    assert_eq!(a.crypto().send_epoch(), Some(1));
    assert_eq!(
        a.switch_sending(2).unwrap(),
        vec![
            AgentEvent::SendingSwitched { epoch: 2 },
            AgentEvent::KeyFrameRequested
        ]
    );
    assert_eq!(a.switch_sending(2).unwrap(), vec![]);
    let f = encrypt(a, stream::AUDIO, Codec::Opus, b"x");
    let kid = parse_protected(Codec::Opus, &f).unwrap().header.kid;
    assert_eq!(kid & 0xff, 2, "KID carries the epoch's low bits");
}

#[test]
fn only_epochs_that_added_members_ask_for_a_key_frame() {
    let mut call = Call::new(4);
    // A removal alone: switch, no key frame (nobody new must start decoding).
    let remove = |call: &mut Call, leaf: u32| {
        let proposal = call.ds.propose_remove(leaf).unwrap();
        call.broadcast(&proposal);
        let bundle = call.member(0).commit_pending().unwrap().unwrap();
        let accepted = call.ds.accept_commit(&bundle.commit).unwrap();
        call.members[leaf as usize] = None;
        call.broadcast(&bundle.commit);
        accepted.epoch
    };
    let e = remove(&mut call, 3);
    assert_eq!(
        call.member(1).switch_sending(e).unwrap(),
        vec![AgentEvent::SendingSwitched { epoch: e }]
    );
    // An addition, then a removal before anyone switched: switching
    // straight to the latest epoch still asks for the joiner's key frame.
    let joiner = agent(5);
    let joiner_principal = joiner.identity().principal().clone();
    let proposal = call.ds.propose_add(&joiner.key_package().unwrap()).unwrap();
    call.broadcast(&proposal);
    let bundle = call.member(0).commit_pending().unwrap().unwrap();
    call.ds.accept_commit(&bundle.commit).unwrap();
    call.broadcast(&bundle.commit);
    let joiner_leaf = call.ds.leaf_of(&joiner_principal).unwrap();
    let latest = remove(&mut call, 2);
    assert_eq!(
        call.member(1).switch_sending(latest).unwrap(),
        vec![
            AgentEvent::SendingSwitched { epoch: latest },
            AgentEvent::KeyFrameRequested
        ]
    );
    // The addition is not asked for twice; a member that had not switched
    // past it yet still asks.
    let after = remove(&mut call, joiner_leaf);
    assert_eq!(
        call.member(1).switch_sending(after).unwrap(),
        vec![AgentEvent::SendingSwitched { epoch: after }]
    );
    assert_eq!(
        call.member(0).switch_sending(after).unwrap(),
        vec![
            AgentEvent::SendingSwitched { epoch: after },
            AgentEvent::KeyFrameRequested
        ],
        "member 0 had not switched past the addition yet"
    );
    assert_eq!(
        call.member(0).switch_sending(after).unwrap(),
        vec![],
        "already sending in it"
    );
}

#[test]
fn delivery_service_accepts_exactly_one_commit_per_epoch() {
    let mut call = Call::new(5);
    let proposal = call.ds.propose_remove(4).unwrap();
    call.broadcast(&proposal);
    let first = call.member(1).commit_pending().unwrap().unwrap();
    let second = call.member(2).commit_pending().unwrap().unwrap();
    assert_eq!(first.epoch, second.epoch);
    call.ds.accept_commit(&first.commit).unwrap();
    assert!(matches!(
        call.ds.accept_commit(&second.commit),
        Err(DsError::StaleEpoch { current: 2, got: 1 })
    ));
    // The loser forgets its commit and follows the winner.
    call.member(2).discard_pending_commit();
    for leaf in 0..4 {
        let now = call.now;
        let ev = call.member(leaf).handle(&first.commit, now).unwrap();
        assert!(matches!(
            ev.as_slice(),
            [AgentEvent::EpochChanged { epoch: 2, .. }]
        ));
    }
    let codes: Vec<String> = (0..4)
        .map(|l| call.member(l).epoch_code().unwrap())
        .collect();
    assert!(codes.iter().all(|c| c == &codes[0]));
}

#[test]
fn malformed_handshake_input_changes_nothing() {
    let mut call = Call::new(3);
    let epoch = call.member(1).epoch();
    for junk in [
        &b""[..],
        b"\x00",
        b"\x00\x01\x00\x02garbage",
        &[0xffu8; 300],
    ] {
        let now = call.now;
        let err = call.member(1).handle(junk, now).unwrap_err();
        assert!(
            matches!(err, AgentError::Malformed(_) | AgentError::Mls(_)),
            "{err:?}"
        );
        assert!(call.ds.accept_commit(junk).is_err());
    }
    // A commit replayed from an old epoch is refused and changes nothing.
    assert_eq!(call.member(1).epoch(), epoch);
    let f = encrypt(call.member(0), stream::AUDIO, Codec::Opus, b"still fine");
    assert_eq!(
        decrypt(call.member(1), Codec::Opus, &f).unwrap(),
        b"still fine"
    );
}

#[test]
fn verification_codes_agree_across_the_call() {
    let mut call = Call::new(N);
    let code = call.member(0).epoch_code().unwrap();
    for leaf in 1..N {
        assert_eq!(call.member(leaf).epoch_code().unwrap(), code);
    }
    assert_eq!(code.len(), 19);
    let ab = call.member(3).safety_number_with(17).unwrap();
    let ba = call.member(17).safety_number_with(3).unwrap();
    assert_eq!(ab, ba);
    assert_ne!(ab, call.member(3).safety_number_with(18).unwrap());
    // The code changes with the epoch.
    call.add(vec![agent(N)]);
    assert_ne!(call.member(0).epoch_code().unwrap(), code);
    let roster = call.member(0).roster().unwrap();
    assert_eq!(roster.len(), N + 1);
    assert!(roster.iter().all(|m| m.identity_key.len() == 32));
    let _ = &call.server;
}
