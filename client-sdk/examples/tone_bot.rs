//! A bot that joins a Conclave call and publishes end-to-end encrypted audio
//! (and, with `--video`, camera video) through the SFU.
//!
//! ```text
//! cargo run -p conclave-client --example tone_bot -- \
//!     ws://127.0.0.1:8080/ws <session-token> <call-id> [device-id] [--video]
//! ```
//!
//! Get a token from `POST /api/login` (users) or `POST /api/token` (machine
//! API keys); see `docs/protocol.md`. No codec is linked: every 20 ms the bot
//! sends the Opus "silence" frame (`f8 ff fe`, which decoders play as
//! silence) with an RFC 6464 audio level that swells and fades like a tone,
//! so it shows up as a speaker. With `--video` it also sends a synthetic
//! VP8 frame every 100 ms: a valid frame header with filler bytes that real
//! decoders will reject, a key frame whenever one is wanted (after
//! connecting, after every new epoch, or when the SFU asks). Everything is
//! SFrame-protected with the call's MLS keys; the SFU only forwards it.
//! Ctrl-C leaves the call.

use std::time::{Duration, Instant};

use conclave_client::media::{MediaConnection, MediaOptions};
use conclave_client::session::{CallEvent, CallSession, JoinOptions};

const OPUS_SILENCE: [u8; 3] = [0xf8, 0xff, 0xfe];

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, token, call_id, rest @ ..] = args.as_slice() else {
        return Err("usage: tone_bot <ws-url> <token> <call-id> [device-id] [--video]".into());
    };
    let device = rest
        .iter()
        .find(|a| *a != "--video")
        .map_or("tone-bot", |d| d);
    let video = rest.iter().any(|a| a == "--video");

    let mut call = CallSession::join(JoinOptions::new(url, token, call_id, device)).await?;
    loop {
        match call.next_event().await {
            Some(CallEvent::Joined { .. }) => break, // in the group: keys ready
            Some(_) => {}
            None => return Err("the server ended the session".into()),
        }
    }
    let options = MediaOptions {
        publish_camera: video,
        ..MediaOptions::default()
    };
    let media = MediaConnection::connect(&call, options).await?;
    eprintln!(
        "in call {call_id} as {}; epoch code {}",
        call.user_id(),
        call.epoch_code()?
    );

    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for n in 0u64.. {
        // Wait for the next 20 ms tick, reporting call events meanwhile.
        while tokio::select! {
            _ = tick.tick() => false,
            event = call.next_event() => match event {
                Some(CallEvent::Removed(_)) | None => { eprintln!("call ended: {event:?}"); return Ok(()) }
                Some(other) => { eprintln!("{other:?}"); true }
            },
            _ = tokio::signal::ctrl_c() => { call.leave()?; media.close().await; return Ok(()) }
        } {}
        let level = (30.0 + 25.0 * (n as f64 / 25.0).sin()) as u8; // 5..55 -dBov
        media.send_audio_frame(&OPUS_SILENCE, level).await?;
        if video && n % 5 == 0 {
            let key = media.needs_key_frame();
            let mut frame = if key {
                vec![0x50, 0x2a, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0xe0, 0x01] // 640x480
            } else {
                vec![0x31, 0x02, 0x00]
            };
            frame.resize(if key { 4000 } else { 800 }, 0x5a);
            media.send_video_frame(&frame, key, start.elapsed()).await?;
        }
    }
    Ok(())
}
