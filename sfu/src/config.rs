//! SFU configuration.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// How the media plane runs.
#[derive(Clone, Debug)]
pub struct SfuConfig {
    /// Address of the shared UDP port (default `0.0.0.0:7882`).
    pub bind: SocketAddr,
    /// The IP clients reach the SFU at, when it differs from the bind
    /// address (1:1 NAT). Defaults to the bind IP, or 127.0.0.1 if that is
    /// unspecified.
    pub advertised_ip: Option<IpAddr>,
    /// Worker threads, each with its own socket on the shared port.
    pub workers: usize,
    /// Receive slots for audio per subscriber (loudest speakers).
    pub audio_slots: usize,
    /// Receive slots for video per subscriber.
    pub video_slots: usize,
    /// A connected session with no packets for this long is reaped.
    pub ice_timeout: Duration,
    /// A session that never connects is reaped after this long.
    pub setup_timeout: Duration,
    /// Packets per second one session may send.
    pub session_pps: u32,
    /// Packets per second the whole SFU accepts.
    pub global_pps: u32,
    /// Most sessions at once.
    pub max_sessions: usize,
    /// Send-side congestion control (TWCC + GCC + pacer) towards
    /// subscribers, used for simulcast layer selection.
    pub congestion_control: bool,
    /// When one packet's fan-out (or a batch's) leaves at least this many
    /// sessions with datagrams to send, a worker sends them from two
    /// threads. `None`: always one (the default on a single core).
    pub parallel_send_from: Option<usize>,
    /// Send a run of datagrams to one subscriber (a video frame's packets)
    /// as one UDP GSO send (`UDP_SEGMENT`) when the kernel allows it.
    pub udp_gso: bool,
}

impl Default for SfuConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 7882),
            advertised_ip: None,
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            audio_slots: 3,
            video_slots: 9,
            ice_timeout: Duration::from_secs(15),
            setup_timeout: Duration::from_secs(30),
            session_pps: 5_000,
            global_pps: 2_000_000,
            max_sessions: 5_000,
            congestion_control: true,
            parallel_send_from: std::thread::available_parallelism()
                .is_ok_and(|n| n.get() > 1)
                .then_some(32),
            udp_gso: true,
        }
    }
}

impl SfuConfig {
    /// A loopback configuration on an ephemeral port (tests).
    pub fn loopback() -> Self {
        Self {
            bind: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            ..Self::default()
        }
    }
}
