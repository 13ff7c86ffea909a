//! `conclave-loadtest`: runs a scenario against a Conclave server, Janus
//! VideoRoom, or both one after the other, and writes a JSON result and an
//! HTML report (and, for both, a side-by-side comparison).

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use conclave_loadtest::janus::{JanusOptions, JanusServer};
use conclave_loadtest::run::{RunOptions, RunResult, Target, run, write_comparison, write_results};
use conclave_loadtest::scenario::Scenario;
use conclave_loadtest::server::{Server, find_server_binary, loopback_only};
use tracing_subscriber::EnvFilter;

/// Conclave load generator.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Runs a scenario file.
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Scenario file (TOML), e.g. loadtest/scenarios/meeting-100.toml.
    scenario: PathBuf,
    /// Multiply every video and screen-share bitrate (audio keeps its rate).
    #[arg(long, default_value_t = 1.0)]
    scale_bitrate: f64,
    /// Change the participant count (publisher counts that meant
    /// "everyone" follow it, cameras scale proportionally).
    #[arg(long)]
    participants: Option<u32>,
    /// Seconds of steady phase (after the join ramp).
    #[arg(long)]
    duration: Option<f64>,
    /// Directory for results (one subdirectory per run).
    #[arg(long, default_value = "results")]
    results: PathBuf,
    /// Decrypt one received frame in N at each receiver (1: every frame).
    #[arg(long, default_value_t = 1)]
    decrypt_every: u32,
    /// The `conclave` server binary to start [default: next to this
    /// binary, else target/release/conclave, else target/debug/conclave].
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// SFU worker threads of the started server [default: its own].
    #[arg(long)]
    sfu_workers: Option<usize>,
    /// Use a running server at this URL (http://127.0.0.1:PORT) instead.
    #[arg(long, requires = "server_pid")]
    server: Option<String>,
    /// Process id of that server (CPU and memory come from /proc/PID).
    #[arg(long, requires = "server")]
    server_pid: Option<u32>,
    /// Admin password of that server.
    #[arg(long, env = "CONCLAVE_ADMIN_PASSWORD", default_value = "")]
    admin_password: String,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// What to measure: Conclave, Janus VideoRoom, or both one after the
    /// other with a side-by-side report.
    #[arg(long, value_enum, default_value_t = TargetArg::Conclave)]
    target: TargetArg,
    /// Against Janus: the address Janus gathers its ICE candidate on and the
    /// simulated participants bind to. Janus never uses loopback addresses,
    /// so this must be another address of this machine (loadtest/side-by-side
    /// makes one in a network namespace). Conclave runs use 127.0.0.1.
    #[arg(long, default_value = "127.0.0.1")]
    janus_media_ip: IpAddr,
    /// The `janus` binary.
    #[arg(long, default_value = "/usr/bin/janus")]
    janus_bin: PathBuf,
    /// Janus's library directory (plugins/, transports/).
    #[arg(long, default_value = "/usr/lib/x86_64-linux-gnu/janus")]
    janus_lib: PathBuf,
    /// Janus `event_loops` (0: Janus's default, one thread per handle).
    #[arg(long, default_value_t = 0)]
    janus_event_loops: u32,
    /// Once the servers under test are up, lower the load generator's CPU
    /// priority to this niceness (0-19), so that on a machine it shares
    /// with them the scheduler runs the server first and the time in the
    /// SFU is the SFU's own. 0 leaves the priorities equal.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i32).range(0..=19))]
    generator_nice: i32,
    /// Once the servers under test are up, put the load generator's threads
    /// under SCHED_IDLE: they run only on a core no server thread wants, so
    /// a server thread that wakes never waits behind the generator (as it
    /// would not on a machine of its own). Niceness only shares the cores
    /// out in proportion; with both processes busy on 2 cores the server
    /// still waits its turn. The generator then falls further behind
    /// itself (frame latency, join times).
    #[arg(long)]
    generator_idle: bool,
    /// Receive buffer (SO_RCVBUF, bytes) of each simulated participant's
    /// UDP socket; 0 keeps the kernel's default (net.core.rmem_default).
    /// One thread serves every participant, so a buffer larger than the
    /// default rides out the moments that thread is busy elsewhere instead
    /// of counting its own backlog as network loss. The kernel caps it at
    /// net.core.rmem_max.
    #[arg(long, default_value_t = 1 << 20)]
    socket_recv_buffer: usize,
    /// Pace each participant's video at this multiple of its video bitrate,
    /// letting 40 ms of that rate leave at once, as a browser's paced sender
    /// does (libwebrtc: 2.5); audio is never held. 0 sends each frame's
    /// packets at once.
    #[arg(long, default_value_t = conclave_loadtest::pacer::DEFAULT_FACTOR)]
    pace_factor: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TargetArg {
    Conclave,
    Janus,
    Both,
}

/// mimalloc: MLS group state is cloned (tree and all) for every commit, and
/// glibc's malloc spent about half of a 500-member rekey's CPU on it.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            // rtc's DTLS client warns once per connection that it has
            // no server name to check, which it does not use here.
            EnvFilter::new("warn,rtc_dtls=error")
        }))
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cli.command {
        Cmd::Run(args) => rt.block_on(run_cmd(args)),
    }
}

async fn run_cmd(a: RunArgs) -> anyhow::Result<()> {
    let mut scenario = Scenario::load(&a.scenario)?;
    if let Some(n) = a.participants {
        scenario = scenario.with_participants(n);
    }
    if let Some(d) = a.duration {
        scenario.duration_s = d;
    }
    if !(a.scale_bitrate.is_finite() && a.scale_bitrate > 0.0) {
        bail!("--scale-bitrate must be positive");
    }
    scenario = scenario.with_bitrate_scale(a.scale_bitrate);
    scenario.validate()?;

    let opts = |media_ip: IpAddr| RunOptions {
        scenario: scenario.clone(),
        bitrate_scale: a.scale_bitrate,
        decrypt_every: a.decrypt_every,
        progress: !a.quiet,
        media_ip,
        generator_nice: a.generator_nice,
        generator_idle: a.generator_idle,
        socket_recv_buffer: a.socket_recv_buffer,
        pace_factor: a.pace_factor,
    };
    let janus_options = JanusOptions {
        binary: a.janus_bin.clone(),
        lib_dir: a.janus_lib.clone(),
        media_ip: a.janus_media_ip,
        event_loops: a.janus_event_loops,
    };
    // A server started after the load generator lowered its priority would
    // inherit the lower priority: with both targets, Janus starts (and
    // idles) before the Conclave run.
    let yields = a.generator_nice > 0 || a.generator_idle;
    let janus = if a.target == TargetArg::Janus || (a.target == TargetArg::Both && yields) {
        Some(JanusServer::start(&janus_options).await?)
    } else {
        None
    };
    let mut results = Vec::new();
    if a.target != TargetArg::Janus {
        // On an error, dropping a started Janus stops it.
        let r = run_conclave(&a, opts(IpAddr::from([127, 0, 0, 1]))).await?;
        let dir = write_results(&a.results, &r)?;
        print_summary(&r, &dir);
        results.push(r);
    }
    if a.target != TargetArg::Conclave {
        if a.target == TargetArg::Both {
            // Let the machine settle between the two runs.
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        }
        let mut janus = match janus {
            Some(j) => j,
            None => JanusServer::start(&janus_options).await?,
        };
        let r = run(Target::Janus(&janus), opts(a.janus_media_ip)).await;
        janus.stop();
        let r = r.with_context(|| format!("Janus log: {}", janus.log_path().display()))?;
        let dir = write_results(&a.results, &r)?;
        print_summary(&r, &dir);
        results.push(r);
    }
    if let [c, j] = results.as_slice() {
        let dir = write_comparison(&a.results, c, j)?;
        print_comparison(c, j, &dir);
    }
    Ok(())
}

async fn run_conclave(a: &RunArgs, opts: RunOptions) -> anyhow::Result<RunResult> {
    let mut server = match (&a.server, a.server_pid) {
        (Some(url), Some(pid)) => {
            loopback_only(url)?;
            Server::existing(url, pid, a.admin_password.clone())
        }
        _ => {
            let bin = a
                .server_bin
                .clone()
                .or_else(find_server_binary)
                .context("no `conclave` binary found: build it (cargo build --release -p conclave-signaling --bin conclave) or pass --server-bin")?;
            Server::start(&bin, a.sfu_workers).await?
        }
    };
    let result = run(Target::Conclave(&mut server), opts).await;
    server.stop();
    result
}

#[allow(clippy::print_stdout, reason = "the binary's report goes to stdout")]
fn print_comparison(c: &RunResult, j: &RunResult, dir: &std::path::Path) {
    for row in conclave_loadtest::report::comparison_rows(c, j) {
        println!(
            "{:<48} conclave {:>12}  janus {:>12}  ratio {}",
            row.name, row.conclave, row.janus, row.ratio
        );
    }
    println!("comparison: {}", dir.display());
}

#[allow(clippy::print_stdout, reason = "the binary's report goes to stdout")]
fn print_summary(r: &RunResult, dir: &std::path::Path) {
    let f = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
    let m = &r.media;
    let s = &r.server;
    println!(
        "{}: scenario {} ({} participants, video bitrate x{})",
        r.target, r.scenario.name, r.scenario.participants, r.bitrate_scale
    );
    println!(
        "joins: {} attempted, {} completed, {} failed, {} still under way at the end; join ms p50 {} p95 {} p99 {}",
        r.join.attempted,
        r.join.completed,
        r.join.failed,
        r.join.unfinished,
        f(r.join.join_ms.p50),
        f(r.join.join_ms.p95),
        f(r.join.join_ms.p99)
    );
    println!(
        "leaves: {} ({} incomplete); leave -> all rekeyed ms p50 {} p95 {} max {}",
        r.rekey.leaves,
        r.rekey.incomplete,
        f(r.rekey.leave_to_all_rekeyed_ms.p50),
        f(r.rekey.leave_to_all_rekeyed_ms.p95),
        f(r.rekey.leave_to_all_rekeyed_ms.max)
    );
    println!(
        "frames: sent {} ({} key frames: {}), received {}, decrypted {}, decrypt failures {} ({} sent before the receiver joined), incomplete video frames {}",
        m.frames_sent.values().sum::<u64>(),
        m.key_frames_sent,
        conclave_loadtest::report::key_frames_label(&m.key_frames_by_source),
        m.frames_received,
        m.frames_decrypted,
        m.decrypt_failures,
        m.decrypt_failures_before_join,
        m.video_frames_incomplete
    );
    println!(
        "frame latency ms p50 {} p95 {} p99 {} (steady phase p50 {} p95 {} p99 {}); RTP loss {}% (steady phase {}%)",
        f(m.latency_ms.p50),
        f(m.latency_ms.p95),
        f(m.latency_ms.p99),
        f(m.latency_steady_ms.p50),
        f(m.latency_steady_ms.p95),
        f(m.latency_steady_ms.p99),
        r.loss_percent
            .map_or_else(|| "-".to_owned(), |v| format!("{v:.3}")),
        r.loss_percent_steady
            .map_or_else(|| "-".to_owned(), |v| format!("{v:.3}"))
    );
    println!(
        "time video waited in the senders' pacers ms: p50 {} p95 {} p99 {} max {}",
        f(m.pacer_wait_ms.p50),
        f(m.pacer_wait_ms.p95),
        f(m.pacer_wait_ms.p99),
        f(m.pacer_wait_ms.max)
    );
    let n = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    println!(
        "datagrams the kernel dropped at full receive buffers (SFU and load generator): {} (steady phase {}); at the SFU's own sockets: {} (steady phase {})",
        n(r.kernel_udp_drops),
        n(r.kernel_udp_drops_steady),
        n(r.sfu_socket_drops),
        n(r.sfu_socket_drops_steady)
    );
    println!(
        "server: CPU {:.1}% (max {:.1}%), RSS max {:.1} MiB, in {:.0} pkt/s {:.2} Mbit/s, out {:.0} pkt/s {:.2} Mbit/s ({}% in UDP GSO sends), {:.0} forwarded/s, {} us CPU per forwarded packet",
        s.cpu_percent_mean,
        s.cpu_percent_max,
        s.rss_mib_max,
        s.packets_in_per_s,
        s.bits_in_per_s / 1e6,
        s.packets_out_per_s,
        s.bits_out_per_s / 1e6,
        f(s.gso_percent),
        s.forwarded_per_s,
        f(s.cpu_us_per_forwarded_packet)
    );
    for (what, t) in [
        ("all", &s.sfu_transit),
        ("audio", &s.sfu_transit_audio),
        ("video", &s.sfu_transit_video),
    ] {
        let Some(t) = t else { continue };
        println!(
            "time in the SFU per forwarded packet (socket arrival -> every copy sent), {what}, ms: p50 <= {} p95 <= {} p99 <= {}; over 20 ms: {}% of {:.0}",
            f(t.p50_at_most_ms),
            f(t.p95_at_most_ms),
            f(t.p99_at_most_ms),
            t.over_20ms_percent
                .map_or_else(|| "-".to_owned(), |v| format!("{v:.3}")),
            t.packets
        );
    }
    println!(
        "load generator -> SFU {:.0} pkt/s {:.2} Mbit/s, SFU -> load generator {:.0} pkt/s {:.2} Mbit/s",
        s.loadgen_packets_to_sfu_per_s,
        s.loadgen_bits_to_sfu_per_s / 1e6,
        s.loadgen_packets_from_sfu_per_s,
        s.loadgen_bits_from_sfu_per_s / 1e6
    );
    println!(
        "server CPU per datagram delivered to the load generator {} us; RSS {:.1} MiB before the first join, {} KiB per participant",
        f(s.cpu_us_per_delivered_datagram),
        s.rss_mib_baseline,
        f(s.kib_per_participant)
    );
    println!(
        "load generator CPU {:.1}% of a core ({}), socket receive buffers {}, video pacing {}",
        s.loadgen_cpu_percent_mean,
        conclave_loadtest::report::scheduling_label(r.generator_nice, r.generator_idle),
        conclave_loadtest::report::recv_buffer_label(r.socket_recv_buffer),
        conclave_loadtest::report::pacing_label(r.pace_factor)
    );
    let mut drops: Vec<String> = r
        .sfu_drops_by_reason
        .iter()
        .filter(|(_, n)| **n > 0.0)
        .map(|(k, n)| format!("{k} {n:.0}"))
        .collect();
    drops.sort();
    println!(
        "SFU drops over the run: {}",
        if drops.is_empty() {
            "none".to_owned()
        } else {
            drops.join(", ")
        }
    );
    println!("results: {}", dir.display());
}
