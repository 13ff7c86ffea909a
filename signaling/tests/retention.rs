//! The retention recorder: key packages stored per device ahead of time,
//! and a recorder the server adds to every call whose members' policy
//! requires records — or a join refused when it cannot.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use conclave_protocol::signal::{Bytes, ClientEnvelope, ClientMessage, ErrorCode};
use conclave_signaling::CallConfig;
use conclave_signaling::db::Policy;
use support::{Cmd, spawn_member, spawn_recorder, start, wait_for};

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recorder_joins_calls_that_require_records() {
    let server = start(CallConfig {
        batch_window: Duration::from_millis(50),
        ..CallConfig::default()
    })
    .await;
    let db = &server.state.db;
    let org = &server.state.org_id;
    // A clinic group whose calls must be recorded.
    let clinic = db
        .create_group(
            org,
            "clinic",
            &Policy {
                retention_required: true,
                ..Policy::default()
            },
        )
        .await
        .unwrap();
    let alice = server.user("alice").await;
    db.update_user(&alice, None, Some(&clinic.id), None)
        .await
        .unwrap();

    // No recorder configured: Alice's join is refused, in words.
    let refused = spawn_member(&server, "alice", "visit").await;
    assert!(
        wait_for(WAIT, || !refused.status().errors.is_empty()).await,
        "refused"
    );
    let (code, message) = refused.status().errors[0].clone();
    assert_eq!(code, ErrorCode::Forbidden);
    assert!(message.contains("recorded"), "{message}");
    refused.cmd.send(Cmd::Close).unwrap();

    // The recorder: a user whose device uploads key packages and stays online.
    let recorder_id = server.user("recorder").await;
    db.set_recorder(org, Some(&recorder_id)).await.unwrap();
    let recorder = spawn_recorder(
        &server,
        &server.token("recorder").await,
        &recorder_id,
        "archive1",
        3,
        "visit",
    )
    .await;
    assert!(wait_for(WAIT, || recorder.status().key_packages_stored == Some(3)).await);

    // Now Alice's call starts, and the recorder is in its group.
    let alice_c = spawn_member(&server, "alice", "visit").await;
    assert!(
        wait_for(WAIT, || {
            let (a, r) = (alice_c.status(), recorder.status());
            a.epoch.is_some() && a.epoch == r.epoch && a.roster_len == 2
        })
        .await,
        "alice {:?} recorder {:?}",
        alice_c.status(),
        recorder.status()
    );
    assert_eq!(alice_c.status().roster_recorders, 1);
    assert_eq!(alice_c.status().epoch_code, recorder.status().epoch_code);
    assert_eq!(
        db.key_package_count(&recorder_id, "archive1")
            .await
            .unwrap(),
        2
    );

    // A second clinic member joins: the recorder is not added twice.
    let bob = server.user("bob").await;
    db.update_user(&bob, None, Some(&clinic.id), None)
        .await
        .unwrap();
    let bob_c = spawn_member(&server, "bob", "visit").await;
    assert!(
        wait_for(WAIT, || {
            let (a, b, r) = (alice_c.status(), bob_c.status(), recorder.status());
            b.epoch.is_some() && a.epoch == b.epoch && b.epoch == r.epoch && b.roster_len == 3
        })
        .await
    );
    assert_eq!(bob_c.status().roster_recorders, 1);
    assert_eq!(
        db.key_package_count(&recorder_id, "archive1")
            .await
            .unwrap(),
        2
    );
    assert!(
        recorder.status().errors.is_empty(),
        "{:?}",
        recorder.status().errors
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_package_uploads_are_validated() {
    let server = start(CallConfig::default()).await;
    let carol = server.user("carol").await;
    // A real key package, but for another user: refused, nothing stored.
    let mallory = spawn_recorder(
        &server,
        &server.token("mallory").await,
        "someone-else",
        "d1",
        1,
        "x",
    )
    .await;
    assert!(
        wait_for(WAIT, || {
            mallory
                .status()
                .errors
                .iter()
                .any(|(c, _)| *c == ErrorCode::Forbidden)
        })
        .await
    );
    // Garbage bytes: typed error.
    let honest = spawn_recorder(&server, &server.token("carol").await, &carol, "d1", 2, "x").await;
    assert!(wait_for(WAIT, || honest.status().key_packages_stored == Some(2)).await);
    honest
        .cmd
        .send(Cmd::Raw(ClientEnvelope::encode(
            Some(2),
            ClientMessage::UploadKeyPackages {
                device_id: "d1".into(),
                key_packages: vec![Bytes(vec![1, 2, 3])],
            },
        )))
        .unwrap();
    assert!(
        wait_for(WAIT, || {
            honest
                .status()
                .errors
                .iter()
                .any(|(c, _)| *c == ErrorCode::InvalidMls)
        })
        .await
    );
    let db = &server.state.db;
    assert_eq!(db.key_package_count(&carol, "d1").await.unwrap(), 2);
    assert_eq!(db.key_package_count("someone-else", "d1").await.unwrap(), 0);
    // Taking is single use.
    assert!(db.take_key_package(&carol, "d1").await.unwrap().is_some());
    assert!(db.take_key_package(&carol, "d1").await.unwrap().is_some());
    assert!(db.take_key_package(&carol, "d1").await.unwrap().is_none());
}
