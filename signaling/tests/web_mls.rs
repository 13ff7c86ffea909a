//! The browser SDK's MLS agent (ts-mls, client-sdk/web/src/mls.ts) in the
//! same call as Rust SDK members (mls-rs), through the real server on
//! 127.0.0.1. The JS member runs in node (client-sdk/web/test/interop-client.mjs).
//! Both sides must reach the same epochs with equal epoch codes and rosters,
//! and read each other's SFrame frames (so their per-sender keys, derived
//! from `MLS-Exporter("SFrame 1.0 Base Key", "", 32)`, are equal).
//!
//! Needs `node` and `client-sdk/web/node_modules` (`npm ci` there). Without
//! them the tests are skipped with a message — unless `CI=true`, where they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::until;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use conclave_client::session::{CallEvent, CallSession, JoinOptions};
use conclave_client::stream;
use conclave_protocol::sframe::Codec;
use conclave_protocol::signal::RemovalReason;
use conclave_signaling::CallConfig;
use serde_json::Value;
use tokio::sync::mpsc;

const LIMIT: Duration = Duration::from_secs(30);

fn web_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../client-sdk/web")
}

/// Whether node and the web SDK's dependencies are there; builds dist/.
fn node_ready() -> bool {
    let why = if Command::new("node")
        .arg("--version")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        Some("`node` is not installed")
    } else if !web_dir().join("node_modules/ts-mls").is_dir() {
        Some("client-sdk/web/node_modules is missing (run `npm ci` in client-sdk/web)")
    } else {
        None
    };
    if let Some(why) = why {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "web MLS interop cannot run under CI: {why}"
        );
        eprintln!("SKIPPED web MLS interop: {why}");
        return false;
    }
    let status = Command::new("node")
        .arg("build.mjs")
        .current_dir(web_dir())
        .status()
        .expect("node build.mjs");
    assert!(status.success(), "building the web SDK failed");
    true
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// The node member: its JSON lines out, commands in.
struct WebMember {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::UnboundedReceiver<Value>,
}

impl WebMember {
    fn spawn(server: &support::TestServer, token: &str, call: &str) -> Self {
        let mut child = Command::new("node")
            .arg("test/interop-client.mjs")
            .arg(format!("ws://{}/ws", server.addr))
            .arg(token)
            .arg(call)
            .current_dir(web_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn node");
        let stdout = child.stdout.take().unwrap();
        let stdin = child.stdin.take().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("node printed {line:?}: {e}"));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            stdin,
            lines,
        }
    }

    /// The next line for which `pred` holds; any `error` line fails the test.
    async fn until(&mut self, what: &str, mut pred: impl FnMut(&Value) -> bool) -> Value {
        tokio::time::timeout(LIMIT, async {
            loop {
                let v = self.lines.recv().await.expect("node exited");
                eprintln!("node: {v}");
                assert_ne!(v["event"], "error", "node member: {v}");
                if pred(&v) {
                    return v;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for node: {what}"))
    }

    async fn ready(&mut self, epoch: u64) -> Value {
        self.until(&format!("epoch_ready {epoch}"), |v| {
            v["event"] == "ready" && v["epoch"] == epoch
        })
        .await
    }

    fn command(&mut self, cmd: Value) {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Has the node member decrypt a frame; returns (payload, leaf, epoch).
    async fn decrypt(&mut self, frame: &[u8]) -> (Vec<u8>, u64, u64) {
        self.command(serde_json::json!({"cmd": "decrypt", "codec": "opus", "frame": hex(frame)}));
        let v = self.until("decrypted", |v| v["event"] == "decrypted").await;
        assert_eq!(v["ok"], true, "node could not decrypt: {v}");
        (
            unhex(v["payload"].as_str().unwrap()),
            v["leaf"].as_u64().unwrap(),
            v["epoch"].as_u64().unwrap(),
        )
    }
}

impl Drop for WebMember {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn rust_member(server: &support::TestServer, user: &str, call: &str) -> CallSession {
    let url = format!("ws://{}/ws", server.addr);
    CallSession::join(JoinOptions::new(
        &url,
        &server.token(user).await,
        call,
        "laptop",
    ))
    .await
    .unwrap()
}

async fn rust_ready(call: &mut CallSession, epoch: u64) {
    until(
        call,
        |e| matches!(e, CallEvent::EpochReady { epoch: e } if *e == epoch),
    )
    .await;
}

/// The node member's `ready` line agrees with the Rust member: same epoch
/// code, the node member's frame decrypts on the Rust side, and a Rust frame
/// decrypts in node.
async fn agree(web: &mut WebMember, ready: &Value, rust: &CallSession) {
    let epoch = ready["epoch"].as_u64().unwrap();
    assert_eq!(rust.epoch(), Some(epoch));
    assert_eq!(
        ready["epoch_code"].as_str().unwrap(),
        rust.epoch_code().unwrap(),
        "epoch codes differ in epoch {epoch}"
    );
    assert_eq!(unhex(ready["base_key"].as_str().unwrap()).len(), 32);
    let web_leaf = ready["leaf"].as_u64().unwrap();
    let user = ready["roster"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r[0] == web_leaf)
        .unwrap()[1]
        .as_str()
        .unwrap()
        .to_owned();
    let user = user.trim_start_matches("u:").split('/').next().unwrap();

    // JS -> Rust.
    let frame = unhex(ready["frame"].as_str().unwrap());
    let mut pt = vec![0u8; frame.len()];
    let d = rust.decrypt(Codec::Opus, &frame, &mut pt).unwrap();
    assert_eq!(&pt[..d.len], format!("web {user} epoch {epoch}").as_bytes());
    assert_eq!(u64::from(d.leaf), web_leaf);
    assert_eq!(d.epoch, epoch);
    assert_eq!(d.context, stream::AUDIO);

    // Rust -> JS.
    let msg = format!("rust leaf {} epoch {epoch}", rust.leaf_index().unwrap());
    let mut ct = vec![0u8; msg.len() + 64];
    let n = rust
        .encrypt(stream::AUDIO, Codec::Opus, msg.as_bytes(), &mut ct)
        .unwrap();
    let (payload, leaf, e) = web.decrypt(&ct[..n]).await;
    assert_eq!(payload, msg.as_bytes());
    assert_eq!(leaf, u64::from(rust.leaf_index().unwrap()));
    assert_eq!(e, epoch);
}

fn config() -> CallConfig {
    CallConfig {
        batch_window: Duration::from_millis(50),
        ..CallConfig::default()
    }
}

/// Rust creates the group; the JS member joins from a mls-rs Welcome, then
/// processes a Rust commit adding Carol and the Remove commit when she leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_creates_js_joins_and_follows_commits() {
    if !node_ready() {
        return;
    }
    let server = support::start(config()).await;
    let mut alice = rust_member(&server, "alice", "mixed").await;
    rust_ready(&mut alice, 0).await;

    let mut web = WebMember::spawn(&server, &server.token("webbob").await, "mixed");
    web.until("joined", |v| v["event"] == "joined" && v["epoch"] == 1)
        .await;
    let r = web.ready(1).await;
    rust_ready(&mut alice, 1).await;
    assert_eq!(r["leaf"], 1);
    assert_eq!(
        r["roster"][0][1],
        "u:".to_owned() + &server.user("alice").await + "/laptop"
    );
    agree(&mut web, &r, &alice).await;

    // Carol (Rust) joins: Alice commits, the JS member processes it.
    let mut carol = rust_member(&server, "carol", "mixed").await;
    let r = web.ready(2).await;
    rust_ready(&mut alice, 2).await;
    rust_ready(&mut carol, 2).await;
    assert_eq!(r["roster"].as_array().unwrap().len(), 3);
    agree(&mut web, &r, &alice).await;
    agree(&mut web, &r, &carol).await;

    // Carol leaves: the server proposes Remove, Alice commits, JS follows.
    carol.leave().unwrap();
    until(&mut carol, |e| {
        matches!(e, CallEvent::Removed(RemovalReason::Left))
    })
    .await;
    let r = web.ready(3).await;
    rust_ready(&mut alice, 3).await;
    assert_eq!(r["roster"].as_array().unwrap().len(), 2);
    agree(&mut web, &r, &alice).await;
    web.command(serde_json::json!({"cmd": "quit"}));
}

/// The JS member creates the group and commits: a Rust member joins from its
/// Welcome, both follow a Rust commit adding a third member, Rust members
/// process the JS member's Remove commit; finally the JS member leaves and a
/// Rust member commits its removal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_creates_and_commits_rust_joins_and_leaves() {
    if !node_ready() {
        return;
    }
    let server = support::start(config()).await;
    let mut web = WebMember::spawn(&server, &server.token("webalice").await, "webcall");
    web.until("created", |v| v["event"] == "joined" && v["epoch"] == 0)
        .await;
    let r = web.ready(0).await;
    assert_eq!(r["leaf"], 0);

    // Bob (Rust) joins from the JS member's Welcome.
    let mut bob = rust_member(&server, "bob", "webcall").await;
    web.until("commit 0", |v| {
        v["event"] == "committed" && v["epoch"] == 0 && v["welcome"] == true
    })
    .await;
    let r = web.ready(1).await;
    rust_ready(&mut bob, 1).await;
    agree(&mut web, &r, &bob).await;

    // Carol (Rust) joins. The server gives a join-only batch to a member
    // whose tree path is still blank: Bob commits, the JS member follows.
    let mut carol = rust_member(&server, "carol", "webcall").await;
    let r = web.ready(2).await;
    rust_ready(&mut bob, 2).await;
    rust_ready(&mut carol, 2).await;
    agree(&mut web, &r, &bob).await;
    agree(&mut web, &r, &carol).await;

    // Bob (leaf 1) leaves: a removal batch goes to the member nearest the
    // removed leaf, the JS member (leaf 0), which commits; Carol follows.
    bob.leave().unwrap();
    web.until("commit 2", |v| v["event"] == "committed" && v["epoch"] == 2)
        .await;
    let r = web.ready(3).await;
    rust_ready(&mut carol, 3).await;
    assert_eq!(r["roster"].as_array().unwrap().len(), 2);
    agree(&mut web, &r, &carol).await;

    // The JS member leaves: Carol commits its removal and rekeys alone.
    web.command(serde_json::json!({"cmd": "leave"}));
    web.until("removed", |v| v["event"] == "removed").await;
    rust_ready(&mut carol, 4).await;
    let mut ct = vec![0u8; 128];
    let n = carol
        .encrypt(stream::AUDIO, Codec::Opus, b"after web left", &mut ct)
        .unwrap();
    web.command(serde_json::json!({"cmd": "decrypt", "codec": "opus", "frame": hex(&ct[..n])}));
    let v = web.until("decrypt", |v| v["event"] == "decrypted").await;
    assert_eq!(v["ok"], false, "a removed JS member must not read epoch 4");
    web.command(serde_json::json!({"cmd": "quit"}));
}
