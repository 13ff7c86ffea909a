//! The server under test: started as a child process on 127.0.0.1 (so
//! `/proc/<pid>` measures it alone) or given by URL and pid; accounts made
//! through the admin API; its Prometheus counters and its CPU and memory
//! sampled.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Password of the accounts the load test creates.
const USER_PASSWORD: &str = "loadtest-password-1";
/// Admin password of a server the load test starts.
const ADMIN_PASSWORD: &str = "loadtest-admin-password";

/// A running server.
#[derive(Debug)]
pub struct Server {
    /// `http://127.0.0.1:port`.
    pub http: String,
    /// Process id (for /proc).
    pub pid: u32,
    child: Option<Child>,
    client: reqwest::Client,
    admin_token: Option<String>,
    admin_password: String,
    data_dir: Option<PathBuf>,
}

fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[derive(Deserialize)]
struct TokenResponse {
    token: String,
}

/// Where the `conclave` binary is, if not given: next to this executable
/// (same target directory), else target/release, else target/debug.
pub fn find_server_binary() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        candidates.push(dir.join("conclave"));
        if let Some(up) = dir.parent() {
            candidates.push(up.join("conclave"));
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    candidates.push(root.join("target/release/conclave"));
    candidates.push(root.join("target/debug/conclave"));
    candidates.into_iter().find(|p| p.is_file())
}

impl Server {
    /// Starts `binary` on free loopback ports with a fresh data directory.
    pub async fn start(binary: &Path, sfu_workers: Option<usize>) -> anyhow::Result<Self> {
        let http_port = free_tcp_port()?;
        let udp_port = free_udp_port()?;
        let data_dir = std::env::temp_dir().join(format!(
            "conclave-loadtest-{}-{}",
            std::process::id(),
            http_port
        ));
        std::fs::create_dir_all(&data_dir)?;
        let mut cmd = Command::new(binary);
        cmd.arg("--http")
            .arg(format!("127.0.0.1:{http_port}"))
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--sfu-bind")
            .arg(format!("127.0.0.1:{udp_port}"))
            .env("CONCLAVE_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env(
                "RUST_LOG",
                std::env::var("CONCLAVE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null());
        // The server logs to stdout; both streams go to one file.
        let log = std::fs::File::create(data_dir.join("server.log"))
            .context("creating the server log")?;
        cmd.stdout(Stdio::from(
            log.try_clone().context("sharing the server log")?,
        ))
        .stderr(Stdio::from(log));
        if let Some(w) = sfu_workers {
            cmd.arg("--sfu-workers").arg(w.to_string());
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let pid = child.id();
        let mut server = Self {
            http: format!("http://127.0.0.1:{http_port}"),
            pid,
            child: Some(child),
            client: reqwest::Client::new(),
            admin_token: None,
            admin_password: ADMIN_PASSWORD.to_owned(),
            data_dir: Some(data_dir),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = server.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "the server exited at start ({status}); log: {}",
                    server
                        .log_path()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                );
            }
            let ok = server
                .client
                .get(format!("{}/healthz", server.http))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                break;
            }
            if Instant::now() > deadline {
                bail!("the server did not answer /healthz within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(server)
    }

    /// A server that is already running.
    pub fn existing(http: &str, pid: u32, admin_password: String) -> Self {
        Self {
            http: http.trim_end_matches('/').to_owned(),
            pid,
            child: None,
            client: reqwest::Client::new(),
            admin_token: None,
            admin_password,
            data_dir: None,
        }
    }

    /// The server's log file, if this process started it.
    pub fn log_path(&self) -> Option<PathBuf> {
        self.data_dir.as_ref().map(|d| d.join("server.log"))
    }

    /// `ws://host:port/ws`.
    pub fn ws_url(&self) -> String {
        format!("{}/ws", self.http.replacen("http://", "ws://", 1))
    }

    async fn login(&self, username: &str, password: &str) -> anyhow::Result<String> {
        let r = self
            .client
            .post(format!("{}/api/login", self.http))
            .json(&json!({"username": username, "password": password}))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("login as {username}: HTTP {}", r.status());
        }
        Ok(r.json::<TokenResponse>().await?.token)
    }

    /// Creates (or reuses) account `username` and returns a session token.
    pub async fn user_token(&mut self, username: &str) -> anyhow::Result<String> {
        if self.admin_token.is_none() {
            self.admin_token = Some(self.login("admin", &self.admin_password.clone()).await?);
        }
        let admin = self.admin_token.clone().unwrap_or_default();
        let r = self
            .client
            .post(format!("{}/admin/users", self.http))
            .bearer_auth(&admin)
            .json(&json!({
                "username": username,
                "display_name": format!("Load test {username}"),
                "password": USER_PASSWORD,
            }))
            .send()
            .await?;
        let status = r.status();
        // 409: it exists already (a reused server).
        if !status.is_success() && status.as_u16() != 409 {
            let body = r.text().await.unwrap_or_default();
            bail!("creating {username}: HTTP {status}: {body}");
        }
        self.login(username, USER_PASSWORD).await
    }

    /// Reads the server's Prometheus counters.
    pub async fn metrics(&self) -> anyhow::Result<SfuCounters> {
        let text = self
            .client
            .get(format!("{}/metrics", self.http))
            .send()
            .await?
            .text()
            .await?;
        Ok(SfuCounters::parse(&text))
    }

    /// Stops the server if this process started it.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_child(child);
        }
    }
}

/// Stops a server process this load test started: SIGINT, then up to 5 s
/// to exit, then SIGKILL.
pub fn stop_child(mut child: std::process::Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The SFU's counters from `/metrics`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SfuCounters {
    /// Datagrams received.
    pub packets_in: f64,
    /// Bytes received.
    pub bytes_in: f64,
    /// Datagrams sent.
    pub packets_out: f64,
    /// Bytes sent.
    pub bytes_out: f64,
    /// Datagrams sent inside UDP GSO sends (part of `packets_out`).
    pub gso_datagrams: f64,
    /// RTP packets forwarded (all kinds).
    pub forwarded: f64,
    /// Packets dropped (all reasons).
    pub drops: f64,
    /// Open sessions.
    pub sessions: f64,
    /// Drops by reason label.
    pub drops_by_reason: HashMap<String, f64>,
    /// `conclave_sfu_transit_seconds`: cumulative count per bucket bound
    /// (seconds, ascending, `+Inf` last), all kinds together.
    pub transit_buckets: Vec<(f64, f64)>,
    /// The same per `kind` label (`audio`, `video`).
    pub transit_by_kind: HashMap<String, Vec<(f64, f64)>>,
}

/// Time forwarded packets spent in the SFU (socket arrival → every copy
/// sent), from the SFU's histogram over a window.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TransitSummary {
    /// Packets measured.
    pub packets: f64,
    /// Upper bound of the histogram bucket holding the 50th, 95th and 99th
    /// percentile, ms (`None` above the largest finite bucket).
    pub p50_at_most_ms: Option<f64>,
    /// See `p50_at_most_ms`.
    pub p95_at_most_ms: Option<f64>,
    /// See `p50_at_most_ms`.
    pub p99_at_most_ms: Option<f64>,
    /// Share of packets that spent more than 20 ms, percent.
    pub over_20ms_percent: Option<f64>,
}

impl TransitSummary {
    /// The packets counted between two scrapes.
    pub fn between(before: &SfuCounters, after: &SfuCounters) -> Option<Self> {
        Self::window(&before.transit_buckets, &after.transit_buckets)
    }

    /// The packets of one kind (`audio`, `video`) counted between two
    /// scrapes.
    pub fn between_kind(before: &SfuCounters, after: &SfuCounters, kind: &str) -> Option<Self> {
        let before = before.transit_by_kind.get(kind).map_or(&[][..], |b| b);
        Self::window(before, after.transit_by_kind.get(kind)?)
    }

    fn window(before: &[(f64, f64)], after: &[(f64, f64)]) -> Option<Self> {
        let at = |le: f64| {
            before
                .iter()
                .find(|(b, _)| *b == le)
                .map_or(0.0, |(_, n)| *n)
        };
        let window: Vec<(f64, f64)> = after.iter().map(|(le, n)| (*le, n - at(*le))).collect();
        let total = window.last().map(|(_, n)| *n)?;
        if total <= 0.0 {
            return None;
        }
        let quantile = |q: f64| {
            window
                .iter()
                .find(|(_, n)| *n >= q * total)
                .and_then(|(le, _)| le.is_finite().then_some(le * 1000.0))
        };
        let within_20ms = window
            .iter()
            .find(|(le, _)| (*le - 0.02).abs() < 1e-12)
            .map(|(_, n)| *n);
        Some(Self {
            packets: total,
            p50_at_most_ms: quantile(0.50),
            p95_at_most_ms: quantile(0.95),
            p99_at_most_ms: quantile(0.99),
            over_20ms_percent: within_20ms.map(|n| (total - n) * 100.0 / total),
        })
    }
}

impl SfuCounters {
    /// Sums the relevant series of a Prometheus text page.
    pub fn parse(text: &str) -> Self {
        let mut c = Self::default();
        let mut drops: HashMap<String, f64> = HashMap::new();
        let mut transit: HashMap<u64, (f64, f64)> = HashMap::new();
        let mut by_kind: HashMap<String, HashMap<u64, (f64, f64)>> = HashMap::new();
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(v) = value.trim().parse::<f64>() else {
                continue;
            };
            let base = name.split('{').next().unwrap_or(name);
            match base {
                "conclave_sfu_packets_in_total" => c.packets_in += v,
                "conclave_sfu_bytes_in_total" => c.bytes_in += v,
                "conclave_sfu_packets_out_total" => c.packets_out += v,
                "conclave_sfu_bytes_out_total" => c.bytes_out += v,
                "conclave_sfu_gso_datagrams_total" => c.gso_datagrams += v,
                "conclave_sfu_forwarded_total" => c.forwarded += v,
                "conclave_sfu_sessions" => c.sessions += v,
                "conclave_sfu_transit_seconds_bucket" => {
                    let le = label(name, "le").and_then(|r| r.parse::<f64>().ok());
                    if let Some(le) = le {
                        transit.entry(le.to_bits()).or_insert((le, 0.0)).1 += v;
                        if let Some(kind) = label(name, "kind") {
                            by_kind
                                .entry(kind.to_owned())
                                .or_default()
                                .entry(le.to_bits())
                                .or_insert((le, 0.0))
                                .1 += v;
                        }
                    }
                }
                "conclave_sfu_drops_total" => {
                    let reason = label(name, "reason").unwrap_or("unknown");
                    *drops.entry(reason.to_owned()).or_default() += v;
                }
                _ => {}
            }
        }
        c.drops = drops.values().sum();
        c.drops_by_reason = drops;
        let sorted = |m: HashMap<u64, (f64, f64)>| {
            let mut v: Vec<(f64, f64)> = m.into_values().collect();
            v.sort_by(|a, b| a.0.total_cmp(&b.0));
            v
        };
        c.transit_buckets = sorted(transit);
        c.transit_by_kind = by_kind.into_iter().map(|(k, m)| (k, sorted(m))).collect();
        c
    }
}

/// The value of label `key` in a Prometheus series name
/// (`name{key="value",…}`).
fn label<'a>(series: &'a str, key: &str) -> Option<&'a str> {
    let labels = series.split_once('{')?.1;
    labels.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_end_matches('}').trim_matches('"'))
    })
}

/// CPU time and resident memory of a process.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcSample {
    /// CPU time of all its threads, seconds.
    pub cpu_s: f64,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
}

/// Reads `/proc/<pid>`: CPU from `stat` (utime + stime, in clock ticks of
/// 1/100 s, the Linux USER_HZ), RSS from `status`.
pub fn proc_sample(pid: u32) -> anyhow::Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("malformed /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    let tick = |i: usize| -> f64 {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let cpu_s = (tick(11) + tick(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    Ok(ProcSample {
        cpu_s,
        rss_bytes: rss_kb * 1024,
    })
}

/// UDP datagrams this network namespace's kernel dropped because a
/// socket's receive buffer was full (`RcvbufErrors` in `/proc/net/snmp`):
/// loss that happened on this machine, at the SFU's socket or at one of the
/// load generator's, rather than in the SFU's forwarding.
pub fn udp_rcvbuf_errors() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let names: Vec<&str> = udp.next()?.split_whitespace().collect();
    let values: Vec<&str> = udp.next()?.split_whitespace().collect();
    let i = names.iter().position(|n| *n == "RcvbufErrors")?;
    values.get(i)?.parse().ok()
}

/// Receive-buffer drops of the UDP sockets process `pid` has open now: the
/// `drops` column of its network namespace's `/proc/<pid>/net/udp` and
/// `udp6`, for the sockets among its file descriptors. It separates loss at
/// the SFU's own sockets from loss at the load generator's. A socket closed
/// during the run takes its count with it, so a server that opens a socket
/// per participant (Janus) can show fewer than it dropped; Conclave's SFU
/// keeps its sockets for the whole run.
pub fn udp_socket_drops(pid: u32) -> Option<u64> {
    let mut inodes = HashSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        let Ok(link) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let link = link.to_string_lossy();
        if let Some(inode) = link
            .strip_prefix("socket:[")
            .and_then(|l| l.strip_suffix(']'))
            .and_then(|l| l.parse::<u64>().ok())
        {
            inodes.insert(inode);
        }
    }
    let mut drops = 0;
    let mut read_any = false;
    for table in ["udp", "udp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        read_any = true;
        drops += socket_table_drops(&text, &inodes);
    }
    read_any.then_some(drops)
}

/// Sums the `drops` column of a `/proc/net/udp`-style table over the rows
/// whose inode is in `inodes`; rows that do not parse are skipped.
fn socket_table_drops(table: &str, inodes: &HashSet<u64>) -> u64 {
    table
        .lines()
        .skip(1)
        .filter_map(|row| {
            let cols: Vec<&str> = row.split_whitespace().collect();
            let inode: u64 = cols.get(9)?.parse().ok()?;
            let drops: u64 = cols.get(12)?.parse().ok()?;
            inodes.contains(&inode).then_some(drops)
        })
        .sum()
}

/// The address part of a URL like `http://127.0.0.1:8080`.
pub fn loopback_only(url: &str) -> anyhow::Result<()> {
    let host = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default();
    let addr: SocketAddr = host
        .parse()
        .with_context(|| format!("{url}: give the server as http://127.x.y.z:port"))?;
    if !addr.ip().is_loopback() {
        bail!("{url}: the load test only talks to 127.0.0.0/8");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_summed_over_labels() {
        let page = "# HELP x\nconclave_sfu_packets_in_total 10\n\
            conclave_sfu_forwarded_total{kind=\"audio\"} 5\n\
            conclave_sfu_forwarded_total{kind=\"video\"} 7\n\
            conclave_sfu_drops_total{reason=\"stale_epoch\"} 2\n\
            conclave_sfu_sessions 3\n\
            conclave_sfu_gso_datagrams_total 4\n";
        let c = SfuCounters::parse(page);
        assert_eq!(c.packets_in, 10.0);
        assert_eq!(c.gso_datagrams, 4.0);
        assert_eq!(c.forwarded, 12.0);
        assert_eq!(c.drops, 2.0);
        assert_eq!(c.drops_by_reason.get("stale_epoch"), Some(&2.0));
        assert_eq!(c.sessions, 3.0);
    }

    #[test]
    fn transit_percentiles_come_from_the_window_between_scrapes() {
        let page = |b: [u64; 4]| {
            format!(
                "conclave_sfu_transit_seconds_bucket{{le=\"0.001\"}} {}\n\
                 conclave_sfu_transit_seconds_bucket{{le=\"0.02\"}} {}\n\
                 conclave_sfu_transit_seconds_bucket{{le=\"0.05\"}} {}\n\
                 conclave_sfu_transit_seconds_bucket{{le=\"+Inf\"}} {}\n\
                 conclave_sfu_transit_seconds_count {}\n",
                b[0], b[1], b[2], b[3], b[3]
            )
        };
        // Before the window: 1000 fast packets. In it: 90 ≤ 1 ms, 6 ≤ 20 ms,
        // 3 ≤ 50 ms, 1 slower.
        let before = SfuCounters::parse(&page([1000, 1000, 1000, 1000]));
        let after = SfuCounters::parse(&page([1090, 1096, 1099, 1100]));
        assert_eq!(after.transit_buckets.len(), 4);
        let t = TransitSummary::between(&before, &after).unwrap();
        assert_eq!(t.packets, 100.0);
        assert_eq!(t.p50_at_most_ms, Some(1.0));
        assert_eq!(t.p95_at_most_ms, Some(20.0));
        assert_eq!(t.p99_at_most_ms, Some(50.0));
        assert!((t.over_20ms_percent.unwrap() - 4.0).abs() < 1e-9);
        assert_eq!(TransitSummary::between(&after, &after), None);
    }

    #[test]
    fn transit_is_summed_over_kinds_and_kept_per_kind() {
        let page = |audio: [u64; 3], video: [u64; 3]| {
            let mut p = String::new();
            for (kind, b) in [("audio", audio), ("video", video)] {
                for (le, n) in ["0.001", "0.02", "+Inf"].iter().zip(b) {
                    p.push_str(&format!(
                        "conclave_sfu_transit_seconds_bucket{{kind=\"{kind}\",le=\"{le}\"}} {n}\n"
                    ));
                }
            }
            p
        };
        let before = SfuCounters::parse(&page([0, 0, 0], [0, 0, 0]));
        // Audio: 100 packets, all ≤ 1 ms. Video: 100, 10 of them over 20 ms.
        let after = SfuCounters::parse(&page([100, 100, 100], [50, 90, 100]));
        let all = TransitSummary::between(&before, &after).unwrap();
        assert_eq!(all.packets, 200.0);
        assert!((all.over_20ms_percent.unwrap() - 5.0).abs() < 1e-9);
        let audio = TransitSummary::between_kind(&before, &after, "audio").unwrap();
        assert_eq!(audio.packets, 100.0);
        assert_eq!(audio.p99_at_most_ms, Some(1.0));
        let video = TransitSummary::between_kind(&before, &after, "video").unwrap();
        assert_eq!(video.p50_at_most_ms, Some(1.0));
        assert_eq!(video.p95_at_most_ms, None);
        assert!((video.over_20ms_percent.unwrap() - 10.0).abs() < 1e-9);
        // A kind first seen after the window opened counts from zero.
        let empty = SfuCounters::parse("");
        assert_eq!(
            TransitSummary::between_kind(&empty, &after, "audio")
                .unwrap()
                .packets,
            100.0
        );
        assert_eq!(TransitSummary::between_kind(&before, &after, "data"), None);
    }

    #[test]
    fn this_process_can_be_sampled() {
        let s = proc_sample(std::process::id()).unwrap_or_default();
        assert!(s.rss_bytes > 0);
    }

    #[test]
    fn kernel_udp_drops_can_be_read() {
        assert!(udp_rcvbuf_errors().is_some());
    }

    /// A socket nobody reads overflows; its drops are this process's.
    #[test]
    fn a_process_sees_the_drops_at_its_own_sockets() {
        let pid = std::process::id();
        let rx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let to = rx.local_addr().expect("address");
        let before = udp_socket_drops(pid).expect("readable");
        // Far more than a default receive buffer (212,992 bytes) holds.
        for _ in 0..20_000 {
            let _ = tx.send_to(&[0u8; 1000], to);
        }
        let after = udp_socket_drops(pid).expect("readable");
        assert!(after > before, "{before} -> {after}");
    }

    #[test]
    fn socket_drops_are_summed_over_the_processs_sockets_only() {
        let table = "\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  1: 0100007F:A1B2 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 111 2 0000000000000000 5
  2: 0100007F:A1B3 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 222 2 0000000000000000 7
  3: 0100007F:A1B4 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 333 2 0000000000000000 11
  4: garbage
";
        let ours: HashSet<u64> = [111, 333].into_iter().collect();
        assert_eq!(socket_table_drops(table, &ours), 16);
        assert_eq!(socket_table_drops(table, &HashSet::new()), 0);
    }

    #[test]
    fn only_loopback_servers() {
        assert!(loopback_only("http://127.0.0.1:8080").is_ok());
        assert!(loopback_only("http://10.0.0.1:8080").is_err());
    }
}
