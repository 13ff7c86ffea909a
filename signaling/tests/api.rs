//! The HTTP API and policy enforcement against a real server on 127.0.0.1:
//! sign-in, admin API, security groups, credential reset, removal, guests,
//! API keys, the audit log, and a restart on the same database. Runs on
//! SQLite, and on PostgreSQL too when `CONCLAVE_TEST_POSTGRES_URL` is set
//! (required under CI).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use conclave_protocol::signal::ErrorCode;
use conclave_signaling::CallConfig;
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{Cmd, TestServer, spawn_member, spawn_with_token, start_with, temp_db_url, wait_for};

const LONG: Duration = Duration::from_secs(60);

fn config() -> CallConfig {
    CallConfig {
        batch_window: Duration::from_millis(100),
        ..CallConfig::default()
    }
}

/// Database URLs to run against: SQLite always, PostgreSQL when configured.
fn databases() -> Vec<String> {
    let mut v = vec![temp_db_url()];
    match std::env::var("CONCLAVE_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => v.push(url),
        _ => {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(!ci, "CI must provide CONCLAVE_TEST_POSTGRES_URL");
            eprintln!("SKIP PostgreSQL: CONCLAVE_TEST_POSTGRES_URL not set");
        }
    }
    v
}

struct Api {
    http: reqwest::Client,
    server: TestServer,
}

impl Api {
    async fn new(db: &str) -> Self {
        Self {
            http: reqwest::Client::new(),
            server: start_with(config(), db).await,
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let url = self.server.url(path);
        let mut req = match method {
            "GET" => self.http.get(url),
            "POST" => self.http.post(url),
            "PATCH" => self.http.patch(url),
            "PUT" => self.http.put(url),
            "DELETE" => self.http.delete(url),
            _ => unreachable!(),
        };
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Creates an admin directly in the database and signs in over HTTP.
    async fn admin(&self) -> String {
        let name = format!("root{}", &conclave_signaling::db::new_id()[..6]);
        let s = &self.server.state;
        s.db.create_user(
            &s.org_id,
            &name,
            "Root",
            &self.server.password_hash,
            &s.default_group,
            true,
        )
        .await
        .unwrap();
        self.login(&name, "correct horse battery").await.unwrap()
    }

    async fn login(&self, username: &str, password: &str) -> Result<String, StatusCode> {
        let (st, body) = self
            .call(
                "POST",
                "/api/login",
                None,
                Some(json!({"username": username, "password": password})),
            )
            .await;
        if st == StatusCode::OK {
            Ok(body["token"].as_str().unwrap().to_owned())
        } else {
            Err(st)
        }
    }

    async fn create_user(&self, admin: &str, username: &str, group: Option<&str>) -> String {
        let mut body =
            json!({"username": username, "display_name": username, "password": "pass-word-1"});
        if let Some(g) = group {
            body["group_id"] = json!(g);
        }
        let (st, v) = self
            .call("POST", "/admin/users", Some(admin), Some(body))
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        v["id"].as_str().unwrap().to_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_and_admin_api_access() {
    for db in databases() {
        let api = Api::new(&db).await;
        let admin = api.admin().await;
        let alice = api
            .create_user(
                &admin,
                &format!("alice{}", &conclave_signaling::db::new_id()[..6]),
                None,
            )
            .await;
        let (st, u) = api
            .call("GET", &format!("/admin/users/{alice}"), Some(&admin), None)
            .await;
        assert_eq!(st, StatusCode::OK);
        let alice_name = u["username"].as_str().unwrap().to_owned();

        assert!(api.login(&alice_name, "pass-word-1").await.is_ok());
        assert_eq!(
            api.login(&alice_name, "wrong").await,
            Err(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            api.login("nobody-at-all", "pass-word-1").await,
            Err(StatusCode::UNAUTHORIZED)
        );

        let alice_token = api.login(&alice_name, "pass-word-1").await.unwrap();
        assert_eq!(
            api.call("GET", "/admin/users", None, None).await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            api.call("GET", "/admin/users", Some("junk"), None).await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            api.call("GET", "/admin/users", Some(&alice_token), None)
                .await
                .0,
            StatusCode::FORBIDDEN
        );
        let (st, list) = api.call("GET", "/admin/users", Some(&admin), None).await;
        assert_eq!(st, StatusCode::OK);
        assert!(
            list.as_array()
                .unwrap()
                .iter()
                .any(|u| u["id"] == json!(alice))
        );
        // Validation: duplicate user, short password, bad name, unknown field.
        for (body, want) in [
            (
                json!({"username": alice_name, "display_name": "x", "password": "pass-word-1"}),
                StatusCode::CONFLICT,
            ),
            (
                json!({"username": "bob", "display_name": "x", "password": "short"}),
                StatusCode::BAD_REQUEST,
            ),
            (
                json!({"username": "b b", "display_name": "x", "password": "pass-word-1"}),
                StatusCode::BAD_REQUEST,
            ),
            (
                json!({"username": "bob2", "display_name": "x", "password": "pass-word-1", "root": true}),
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
        ] {
            let (st, v) = api
                .call("POST", "/admin/users", Some(&admin), Some(body))
                .await;
            assert_eq!(st, want, "{v}");
        }
        // Update and delete.
        let (st, u) = api
            .call(
                "PATCH",
                &format!("/admin/users/{alice}"),
                Some(&admin),
                Some(json!({"display_name": "Alice A."})),
            )
            .await;
        assert_eq!(
            (st, u["display_name"].as_str()),
            (StatusCode::OK, Some("Alice A."))
        );
        let (st, _) = api
            .call(
                "DELETE",
                &format!("/admin/users/{alice}"),
                Some(&admin),
                None,
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(
            api.call("GET", &format!("/admin/users/{alice}"), Some(&admin), None)
                .await
                .0,
            StatusCode::NOT_FOUND
        );
        // The deleted user's token is dead.
        assert_eq!(
            api.call(
                "POST",
                "/api/invitations",
                Some(&alice_token),
                Some(json!({"call_id": "x"}))
            )
            .await
            .0,
            StatusCode::UNAUTHORIZED
        );

        let (st, doc) = api.call("GET", "/admin/openapi.json", None, None).await;
        assert_eq!(st, StatusCode::OK);
        for p in [
            "/api/login",
            "/admin/users",
            "/admin/users/{id}/remove",
            "/admin/groups/{id}/policy",
            "/admin/calls/{id}/events",
        ] {
            assert!(doc["paths"].get(p).is_some(), "OpenAPI lacks {p}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_group_policies_are_enforced_at_join() {
    for db in databases() {
        let api = Api::new(&db).await;
        let admin = api.admin().await;
        let tag = &conclave_signaling::db::new_id()[..6];
        let (st, g) = api
            .call("POST", "/admin/groups", Some(&admin), Some(json!({"name": format!("small-{tag}"), "policy": {"max_call_size": 2, "may_start_calls": false}})))
            .await;
        assert_eq!(st, StatusCode::OK, "{g}");
        let small = g["id"].as_str().unwrap().to_owned();
        let (_, g) = api
            .call(
                "POST",
                "/admin/groups",
                Some(&admin),
                Some(json!({"name": format!("muted-{tag}"), "policy": {"may_join_calls": false}})),
            )
            .await;
        let nojoin = g["id"].as_str().unwrap().to_owned();

        let call = format!("policy-{tag}");
        // A member of `small` may not start a call.
        let s1 = api
            .create_user(&admin, &format!("s1{tag}"), Some(&small))
            .await;
        let t1 = api.login(&format!("s1{tag}"), "pass-word-1").await.unwrap();
        let early = spawn_with_token(&api.server, &t1, &s1, &call).await;
        assert!(
            wait_for(LONG, || early
                .status()
                .errors
                .iter()
                .any(|e| e.0 == ErrorCode::Forbidden))
            .await
        );

        // Someone from the default group starts it; then `small` members join up to size 2.
        let host = spawn_member(&api.server, &format!("host{tag}"), &call).await;
        assert!(wait_for(LONG, || host.status().epoch == Some(0)).await);
        let a = spawn_with_token(&api.server, &t1, &s1, &call).await;
        assert!(
            wait_for(LONG, || a.status().epoch == Some(1)).await,
            "{:?}",
            a.status()
        );
        let s2 = api
            .create_user(&admin, &format!("s2{tag}"), Some(&small))
            .await;
        let t2 = api.login(&format!("s2{tag}"), "pass-word-1").await.unwrap();
        let full = spawn_with_token(&api.server, &t2, &s2, &call).await;
        assert!(
            wait_for(LONG, || full
                .status()
                .errors
                .iter()
                .any(|e| e.0 == ErrorCode::CallFull))
            .await
        );

        let n = api
            .create_user(&admin, &format!("n{tag}"), Some(&nojoin))
            .await;
        let tn = api.login(&format!("n{tag}"), "pass-word-1").await.unwrap();
        let refused = spawn_with_token(&api.server, &tn, &n, &call).await;
        assert!(
            wait_for(LONG, || refused
                .status()
                .errors
                .iter()
                .any(|e| e.0 == ErrorCode::Forbidden))
            .await
        );

        // Policy changes apply to the next join.
        let (st, _) = api
            .call(
                "PUT",
                &format!("/admin/groups/{nojoin}/policy"),
                Some(&admin),
                Some(json!({"may_join_calls": true})),
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        let (st, _) = api
            .call(
                "PUT",
                &format!("/admin/groups/{nojoin}/policy"),
                Some(&admin),
                Some(json!({"no_such_field": 1})),
            )
            .await;
        assert!(st.is_client_error());
        let welcome = spawn_with_token(&api.server, &tn, &n, &call).await;
        assert!(wait_for(LONG, || welcome.status().epoch == Some(2)).await);
        assert!(host.status().errors.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_and_removal_revoke_access_and_rekey_with_an_audit_trail() {
    for db in databases() {
        let api = Api::new(&db).await;
        let admin = api.admin().await;
        let tag = &conclave_signaling::db::new_id()[..6];
        let call = format!("audit-{tag}");
        let host = spawn_member(&api.server, &format!("h{tag}"), &call).await;
        let bob = api.create_user(&admin, &format!("bob{tag}"), None).await;
        let bob_token = api
            .login(&format!("bob{tag}"), "pass-word-1")
            .await
            .unwrap();
        let eve = api.create_user(&admin, &format!("eve{tag}"), None).await;
        let eve_token = api
            .login(&format!("eve{tag}"), "pass-word-1")
            .await
            .unwrap();
        let b = spawn_with_token(&api.server, &bob_token, &bob, &call).await;
        let e = spawn_with_token(&api.server, &eve_token, &eve, &call).await;
        assert!(
            wait_for(LONG, || host.status().roster_len == 3
                && e.status().epoch.is_some()
                && b.status().epoch.is_some())
            .await
        );
        let epoch = host.status().epoch.unwrap();
        assert!(
            wait_for(LONG, || e.status().epoch == Some(epoch)
                && b.status().epoch == Some(epoch))
            .await
        );

        // Remove Eve from every call: rekey without her, her socket closed.
        let (st, r) = api
            .call(
                "POST",
                &format!("/admin/users/{eve}/remove"),
                Some(&admin),
                None,
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{r}");
        assert_eq!(r["removed_from_calls"], json!(1));
        assert!(wait_for(LONG, || e.status().closed).await);
        assert!(
            wait_for(LONG, || host.status().epoch == Some(epoch + 1)
                && b.status().epoch == Some(epoch + 1))
            .await
        );

        // Reset Bob: new password, old token dead, sockets closed, rekey.
        let (st, _) = api
            .call(
                "POST",
                &format!("/admin/users/{bob}/reset"),
                Some(&admin),
                Some(json!({"password": "new-pass-word"})),
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        assert!(wait_for(LONG, || b.status().closed).await);
        assert!(wait_for(LONG, || host.status().epoch == Some(epoch + 2)).await);
        assert!(
            support::connect(&api.server, &bob_token)
                .await
                .unwrap_err()
                .contains("401")
        );
        assert_eq!(
            api.login(&format!("bob{tag}"), "pass-word-1").await,
            Err(StatusCode::UNAUTHORIZED)
        );
        assert!(
            api.login(&format!("bob{tag}"), "new-pass-word")
                .await
                .is_ok()
        );

        // The audit log names who joined, was removed and left, and every rekey.
        host.cmd.send(Cmd::Leave).unwrap();
        let mut kinds: Vec<String> = Vec::new();
        for _ in 0..600 {
            kinds = api
                .server
                .state
                .db
                .call_events(&call)
                .await
                .unwrap()
                .into_iter()
                .map(|e| e.kind)
                .collect();
            if kinds.iter().any(|k| k == "ended") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(kinds.iter().any(|k| k == "ended"), "{kinds:?}");
        let (st, events) = api
            .call(
                "GET",
                &format!("/admin/calls/{call}/events"),
                Some(&admin),
                None,
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        let kinds: Vec<&str> = events
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap())
            .collect();
        assert_eq!(kinds.first(), Some(&"created"));
        for k in ["joined", "removed", "left", "rekeyed", "ended"] {
            assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
        }
        assert_eq!(kinds.iter().filter(|k| **k == "joined").count(), 3);
        assert!(
            events
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["kind"] == "removed" && e["user_id"] == json!(eve))
        );
        let (_, calls) = api.call("GET", "/admin/calls", Some(&admin), None).await;
        assert!(
            calls
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["id"] == json!(call) && !c["ended_at"].is_null())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_join_only_their_call_and_only_if_allowed() {
    let api = Api::new(&temp_db_url()).await;
    let admin = api.admin().await;
    let host = spawn_member(&api.server, "doctor", "visit-42").await;
    assert!(wait_for(LONG, || host.status().epoch == Some(0)).await);
    let doctor_token = api.server.token("doctor").await;
    let (st, inv) = api
        .call(
            "POST",
            "/api/invitations",
            Some(&doctor_token),
            Some(json!({"call_id": "visit-42"})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{inv}");
    let (st, g) = api
        .call(
            "POST",
            "/api/guest",
            None,
            Some(json!({"invitation": inv["invitation"]})),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let guest_token = g["token"].as_str().unwrap().to_owned();
    let guest_id = g["user_id"].as_str().unwrap().to_owned();
    let patient = spawn_with_token(&api.server, &guest_token, &guest_id, "visit-42").await;
    assert!(
        wait_for(LONG, || patient.status().epoch == Some(1)
            && host.status().roster_len == 2)
        .await
    );
    let stray = spawn_with_token(&api.server, &guest_token, &guest_id, "other-call").await;
    assert!(
        wait_for(LONG, || stray
            .status()
            .errors
            .iter()
            .any(|e| e.0 == ErrorCode::Forbidden))
        .await
    );
    assert_eq!(
        api.call(
            "POST",
            "/api/guest",
            None,
            Some(json!({"invitation": "forged"}))
        )
        .await
        .0,
        StatusCode::FORBIDDEN
    );
    // A group without guests cannot invite, and its old invitations stop working.
    let (_, groups) = api.call("GET", "/admin/groups", Some(&admin), None).await;
    let everyone = groups[0]["id"].as_str().unwrap().to_owned();
    let (st, _) = api
        .call(
            "PUT",
            &format!("/admin/groups/{everyone}/policy"),
            Some(&admin),
            Some(json!({"guests_allowed": false})),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        api.call(
            "POST",
            "/api/invitations",
            Some(&doctor_token),
            Some(json!({"call_id": "visit-42"}))
        )
        .await
        .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        api.call(
            "POST",
            "/api/guest",
            None,
            Some(json!({"invitation": inv["invitation"]}))
        )
        .await
        .0,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_give_machines_tokens_by_hmac() {
    let api = Api::new(&temp_db_url()).await;
    let admin = api.admin().await;
    let bot = api.create_user(&admin, "recorder", None).await;
    let (st, key) = api
        .call(
            "POST",
            &format!("/admin/users/{bot}/api-keys"),
            Some(&admin),
            Some(json!({"label": "retention recorder"})),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let key_id = key["key_id"].as_str().unwrap();
    use base64::Engine;
    let secret = base64::engine::general_purpose::STANDARD
        .decode(key["secret"].as_str().unwrap())
        .unwrap();
    let ts = conclave_signaling::auth::unix_time();
    let sig = conclave_signaling::auth::api_signature(&secret, key_id, ts);
    let (st, tok) = api
        .call(
            "POST",
            "/api/token",
            None,
            Some(json!({"key_id": key_id, "timestamp": ts, "signature": sig})),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let machine =
        spawn_with_token(&api.server, tok["token"].as_str().unwrap(), &bot, "board").await;
    assert!(wait_for(LONG, || machine.status().epoch == Some(0)).await);
    // Wrong signature, stale timestamp, unknown key.
    for body in [
        json!({"key_id": key_id, "timestamp": ts, "signature": "00"}),
        json!({"key_id": key_id, "timestamp": ts - 3600, "signature": conclave_signaling::auth::api_signature(&secret, key_id, ts - 3600)}),
        json!({"key_id": "nope", "timestamp": ts, "signature": sig}),
    ] {
        assert_eq!(
            api.call("POST", "/api/token", None, Some(body)).await.0,
            StatusCode::UNAUTHORIZED
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_users_groups_and_audit_and_calls_rebuild_on_rejoin() {
    for db in databases() {
        let tag = conclave_signaling::db::new_id()[..6].to_string();
        let call = format!("restart-{tag}");
        let group_name = format!("kept-{tag}");
        {
            let api = Api::new(&db).await;
            let admin = api.admin().await;
            let (st, _) = api
                .call(
                    "POST",
                    "/admin/groups",
                    Some(&admin),
                    Some(json!({"name": group_name})),
                )
                .await;
            assert_eq!(st, StatusCode::OK);
            api.create_user(&admin, &format!("keep{tag}"), None).await;
            let m = spawn_member(&api.server, &format!("early{tag}"), &call).await;
            assert!(wait_for(LONG, || m.status().epoch == Some(0)).await);
            m.cmd.send(Cmd::Close).unwrap();
            assert!(wait_for(LONG, || m.status().closed).await);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        // A new server process on the same database (live call state is gone).
        let api = Api::new(&db).await;
        assert!(
            api.login(&format!("keep{tag}"), "pass-word-1")
                .await
                .is_ok()
        );
        let admin = api.admin().await;
        let (_, groups) = api.call("GET", "/admin/groups", Some(&admin), None).await;
        assert!(
            groups
                .as_array()
                .unwrap()
                .iter()
                .any(|g| g["name"] == json!(group_name))
        );
        let (_, events) = api
            .call(
                "GET",
                &format!("/admin/calls/{call}/events"),
                Some(&admin),
                None,
            )
            .await;
        assert!(
            events
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["kind"] == "created")
        );
        // Clients reconnect and the call is rebuilt.
        let a = spawn_member(&api.server, &format!("early{tag}"), &call).await;
        let b = spawn_member(&api.server, &format!("late{tag}"), &call).await;
        assert!(
            wait_for(LONG, || a.status().epoch == Some(1)
                && b.status().epoch == Some(1))
            .await
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_settings_and_key_package_storage() {
    for db in databases() {
        let api = Api::new(&db).await;
        let admin = api.admin().await;
        let tag = &conclave_signaling::db::new_id()[..6];
        let user = api.create_user(&admin, &format!("carol{tag}"), None).await;
        let bot = api
            .create_user(&admin, &format!("archive{tag}"), None)
            .await;
        // Admin only; an unknown user is refused; a real one is stored.
        assert_eq!(
            api.call("GET", "/admin/retention", None, None).await.0,
            StatusCode::UNAUTHORIZED
        );
        let carol = api
            .login(&format!("carol{tag}"), "pass-word-1")
            .await
            .unwrap();
        assert_eq!(
            api.call("GET", "/admin/retention", Some(&carol), None)
                .await
                .0,
            StatusCode::FORBIDDEN
        );
        let (st, _) = api
            .call(
                "PUT",
                "/admin/retention",
                Some(&admin),
                Some(json!({"recorder_user_id": "nobody"})),
            )
            .await;
        assert_eq!(st, StatusCode::NOT_FOUND);
        let (st, v) = api
            .call(
                "PUT",
                "/admin/retention",
                Some(&admin),
                Some(json!({"recorder_user_id": bot})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        let (_, v) = api
            .call("GET", "/admin/retention", Some(&admin), None)
            .await;
        assert_eq!(v["recorder_user_id"], json!(bot));
        // Key packages: stored in order, capped, taken once each.
        let store = &api.server.state.db;
        let kps: Vec<String> = (0..3).map(|i| format!("kp{i}")).collect();
        assert_eq!(store.store_key_packages(&user, "d", &kps).await.unwrap(), 3);
        assert_eq!(
            store.take_key_package(&user, "d").await.unwrap().as_deref(),
            Some("kp0")
        );
        let many: Vec<String> = (0..120).map(|i| format!("m{i}")).collect();
        assert_eq!(
            store.store_key_packages(&user, "d", &many).await.unwrap(),
            conclave_signaling::db::MAX_KEY_PACKAGES_PER_DEVICE
        );
        assert_eq!(store.key_package_count(&user, "other").await.unwrap(), 0);
    }
}
