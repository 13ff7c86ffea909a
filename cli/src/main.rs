//! `conclave-client`: join, record and verify Conclave calls.
//!
//! ```text
//! conclave-client --server http://127.0.0.1:8080 --user alice --password … \
//!     join --call standup --audio tone.wav --video clip.ivf
//! conclave-client --server … --api-key-id K --api-key-secret S \
//!     record --call standup --out recordings/ --duration 60
//! conclave-client --server … --token T verify --call standup
//! ```
//!
//! Progress goes to stderr in plain words; `verify` prints its codes on
//! stdout (`--json` for machines).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use conclave_cli::{Auth, Connect, Publish};

#[derive(Debug, Parser)]
#[command(
    name = "conclave-client",
    version,
    about = "Join, record and verify end-to-end encrypted Conclave calls."
)]
struct Cli {
    /// Server URL.
    #[arg(long, env = "CONCLAVE_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
    /// A session token (from /api/login, /api/token or a guest invitation).
    #[arg(long, env = "CONCLAVE_TOKEN")]
    token: Option<String>,
    /// Sign in as this user (with --password).
    #[arg(long, env = "CONCLAVE_USER")]
    user: Option<String>,
    /// The user's password.
    #[arg(long, env = "CONCLAVE_PASSWORD")]
    password: Option<String>,
    /// Machine API key id (with --api-key-secret).
    #[arg(long, env = "CONCLAVE_API_KEY_ID")]
    api_key_id: Option<String>,
    /// Machine API key secret (base64).
    #[arg(long, env = "CONCLAVE_API_KEY_SECRET")]
    api_key_secret: Option<String>,
    /// This device's id.
    #[arg(long, default_value = "cli")]
    device: String,
    /// Bind media to 127.0.0.1 (a server on this machine).
    #[arg(long)]
    loopback: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Join a call and publish an audio file (WAV, encoded to Opus) and/or a VP8 IVF file.
    Join {
        /// The call.
        #[arg(long)]
        call: String,
        /// 16-bit PCM WAV file.
        #[arg(long)]
        audio: Option<PathBuf>,
        /// VP8 IVF file.
        #[arg(long)]
        video: Option<PathBuf>,
        /// Stop after this many seconds (default: when the files end).
        #[arg(long)]
        duration: Option<u64>,
        /// Loop the files.
        #[arg(long)]
        repeat: bool,
    },
    /// Join a call and record every received track, decrypted, with a manifest of who spoke when.
    Record {
        /// The call.
        #[arg(long)]
        call: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Seconds to record.
        #[arg(long, default_value_t = 60)]
        duration: u64,
    },
    /// Print the call's epoch code and this device's safety numbers with every member.
    Verify {
        /// The call.
        #[arg(long)]
        call: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn auth(cli: &Cli) -> Result<Auth, String> {
    match (
        &cli.token,
        &cli.user,
        &cli.password,
        &cli.api_key_id,
        &cli.api_key_secret,
    ) {
        (Some(t), _, _, _, _) => Ok(Auth::Token(t.clone())),
        (None, Some(u), Some(p), _, _) => Ok(Auth::Password {
            username: u.clone(),
            password: p.clone(),
        }),
        (None, _, _, Some(k), Some(s)) => Ok(Auth::ApiKey {
            key_id: k.clone(),
            secret: s.clone(),
        }),
        _ => Err(
            "sign in with --token, --user and --password, or --api-key-id and --api-key-secret"
                .into(),
        ),
    }
}

#[allow(clippy::print_stdout)]
async fn run(cli: Cli) -> anyhow::Result<()> {
    let auth = auth(&cli).map_err(anyhow::Error::msg)?;
    let connect = |call: &str| Connect {
        server: cli.server.clone(),
        auth: auth.clone(),
        call: call.to_owned(),
        device: cli.device.clone(),
        loopback: cli.loopback,
    };
    let say = |line: String| eprintln!("· {line}");
    match &cli.command {
        Command::Join {
            call,
            audio,
            video,
            duration,
            repeat,
        } => {
            let publish = Publish {
                audio: audio.clone(),
                video: video.clone(),
                duration: duration.map(Duration::from_secs),
                repeat: *repeat,
            };
            conclave_cli::publish(&connect(call), &publish, say).await
        }
        Command::Record {
            call,
            out,
            duration,
        } => {
            let m = conclave_cli::record(&connect(call), out, Duration::from_secs(*duration), say)
                .await?;
            for p in &m.participants {
                eprintln!(
                    "· {}: {} audio frames, {} video frames, spoke {} time(s)",
                    p.participant,
                    p.audio_frames,
                    p.video_frames,
                    p.spoke.len()
                );
            }
            if m.decrypt_failures > 0 {
                eprintln!("! {} frames failed to decrypt", m.decrypt_failures);
            }
            Ok(())
        }
        Command::Verify { call, json } => {
            let v = conclave_cli::verify(&connect(call)).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("Call {call}, epoch {}", v.epoch);
                println!(
                    "Epoch code (everyone should see the same): {}",
                    v.epoch_code
                );
                if v.safety_numbers.is_empty() {
                    println!("Nobody else is in the call yet.");
                }
                for (who, number) in &v.safety_numbers {
                    println!("Safety number with {who}:\n  {number}");
                }
            }
            Ok(())
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
