//! MLS costs at N = 50, 200 and 500 members (cipher suite 1, mls-rs with
//! RustCrypto, Conclave credentials), for two tree shapes:
//!
//! - **dense**: built as a chain where every joiner commits with a path, so
//!   every parent node of the ratchet tree is set (the steady state of a
//!   call whose members have each committed or updated once);
//! - **batch**: all N−1 members added by one add-only commit, the shape right
//!   after a join storm (parent nodes blank until members update).
//!
//! Timed: creating a commit that removes one member, processing it as
//! another member, and joining from a Welcome. Sizes (remove commit, Welcome
//! with the ratchet tree inside) are printed, one `SIZE` line each.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    missing_docs
)]

use std::hint::black_box;

use conclave_client::agent::{MlsConfig, mls_client};
use conclave_protocol::mls::{Identity, Principal};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use mls_rs::{Client, ExtensionList, Group, MlsMessage};

fn client(i: usize) -> Client<MlsConfig> {
    let id = Identity::generate(Principal::member(&format!("user{i}"), "bench").unwrap()).unwrap();
    mls_client(&id)
}

fn key_package(c: &Client<MlsConfig>) -> MlsMessage {
    c.generate_key_package_message(ExtensionList::default(), ExtensionList::default(), None)
        .unwrap()
}

/// Returns the states of leaf 0 and leaf 1 of an `n`-member dense group.
fn dense_group(n: usize) -> (Group<MlsConfig>, Group<MlsConfig>) {
    let c0 = client(0);
    let g0 = c0
        .create_group(ExtensionList::default(), ExtensionList::default(), None)
        .unwrap();
    // live[0] = leaf 0, live[1] = leaf 1, live[2] = the newest joiner. The
    // newest member adds the next one, who then commits with a path.
    let mut live = vec![g0];
    for i in 1..n {
        let ci = client(i);
        let adder = live.len() - 1;
        let out = live[adder]
            .commit_builder()
            .add_member(key_package(&ci))
            .unwrap()
            .build()
            .unwrap();
        live[adder].apply_pending_commit().unwrap();
        for (j, g) in live.iter_mut().enumerate() {
            if j != adder {
                g.process_incoming_message(out.commit_message.clone())
                    .unwrap();
            }
        }
        let (mut joined, _) = ci.join_group(None, &out.welcome_messages[0], None).unwrap();
        let update = joined.commit(Vec::new()).unwrap();
        joined.apply_pending_commit().unwrap();
        for g in &mut live {
            g.process_incoming_message(update.commit_message.clone())
                .unwrap();
        }
        if live.len() == 3 {
            live[2] = joined;
        } else {
            live.push(joined);
        }
    }
    let g1 = live.swap_remove(1);
    (live.swap_remove(0), g1)
}

/// Returns the states of leaf 0 and leaf 1 after one batch add of n−1 members.
fn batch_group(n: usize) -> (Group<MlsConfig>, Group<MlsConfig>) {
    let c0 = client(0);
    let mut g0 = c0
        .create_group(ExtensionList::default(), ExtensionList::default(), None)
        .unwrap();
    let clients: Vec<Client<MlsConfig>> = (1..n).map(client).collect();
    let mut b = g0.commit_builder();
    for c in &clients {
        b = b.add_member(key_package(c)).unwrap();
    }
    let out = b.build().unwrap();
    g0.apply_pending_commit().unwrap();
    let (g1, _) = clients[0]
        .join_group(None, &out.welcome_messages[0], None)
        .unwrap();
    (g0, g1)
}

fn bench_shape(
    c: &mut Criterion,
    shape: &str,
    n: usize,
    g0: &Group<MlsConfig>,
    g1: &Group<MlsConfig>,
) {
    let last = g0.roster().members_iter().map(|m| m.index).max().unwrap();
    let mut grp = c.benchmark_group(format!("mls/{shape}/n{n}"));
    grp.sample_size(10);

    // Remove commit: created by leaf 0, processed by leaf 1.
    let remove = g0
        .clone()
        .commit_builder()
        .remove_member(last)
        .unwrap()
        .build()
        .unwrap()
        .commit_message;
    println!(
        "SIZE mls/{shape}/n{n}/remove_commit_bytes {}",
        remove.to_bytes().unwrap().len()
    );
    grp.bench_function("remove_commit_create", |b| {
        b.iter_batched(
            || g0.clone(),
            |mut g| {
                g.commit_builder()
                    .remove_member(last)
                    .unwrap()
                    .build()
                    .unwrap()
            },
            BatchSize::LargeInput,
        )
    });
    grp.bench_function("remove_commit_process", |b| {
        b.iter_batched(
            || (g1.clone(), remove.clone()),
            |(mut g, m)| black_box(g.process_incoming_message(m).unwrap()),
            BatchSize::LargeInput,
        )
    });

    // Welcome for one joiner (ratchet tree in the Welcome) and the join.
    let joiner = client(100_000);
    let welcome = g0
        .clone()
        .commit_builder()
        .add_member(key_package(&joiner))
        .unwrap()
        .build()
        .unwrap()
        .welcome_messages
        .remove(0);
    println!(
        "SIZE mls/{shape}/n{n}/welcome_bytes {}",
        welcome.to_bytes().unwrap().len()
    );
    grp.bench_function("join_from_welcome", |b| {
        b.iter_batched(
            || {
                let j = client(100_001);
                let w = g0
                    .clone()
                    .commit_builder()
                    .add_member(key_package(&j))
                    .unwrap()
                    .build()
                    .unwrap()
                    .welcome_messages
                    .remove(0);
                (j, w)
            },
            |(j, w)| black_box(j.join_group(None, &w, None).unwrap()),
            BatchSize::PerIteration,
        )
    });
    grp.finish();
}

fn mls(c: &mut Criterion) {
    let sizes: Vec<usize> = std::env::var("CONCLAVE_BENCH_MLS_N")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![50, 200, 500]);
    for n in sizes {
        let (g0, g1) = dense_group(n);
        bench_shape(c, "dense", n, &g0, &g1);
        let (g0, g1) = batch_group(n);
        bench_shape(c, "batch", n, &g0, &g1);
    }
}

criterion_group!(benches, mls);
criterion_main!(benches);
