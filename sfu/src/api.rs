//! The SFU's control surface, used in-process by signaling: calls in
//! ([`SfuControl`]) and events out ([`SfuEvent`]).

use std::future::Future;
use std::pin::Pin;

/// A media session: one client's peer connection to the SFU.
pub type SessionId = u64;

/// What a media source is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// Microphone (Opus).
    Audio,
    /// Camera (VP8, simulcast).
    Camera,
    /// Screen share (VP8), its own track.
    Screen,
}

impl Source {
    /// Whether the source is video.
    pub fn is_video(self) -> bool {
        !matches!(self, Source::Audio)
    }
}

/// Which sources a session may publish. Packets from a source without the
/// right are dropped and counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PublishRights {
    /// May publish audio.
    pub audio: bool,
    /// May publish camera video.
    pub camera: bool,
    /// May publish a screen share.
    pub screen: bool,
}

impl PublishRights {
    /// Everything allowed.
    pub const ALL: Self = Self {
        audio: true,
        camera: true,
        screen: true,
    };

    /// Whether `source` may be published.
    pub fn allows(self, source: Source) -> bool {
        match source {
            Source::Audio => self.audio,
            Source::Camera => self.camera,
            Source::Screen => self.screen,
        }
    }
}

/// A request to open a media session from a client's SDP offer.
///
/// The offer's `sendonly`/`sendrecv` m-lines are what the client publishes:
/// the first audio is its microphone, the first video its camera, the second
/// video its screen share, unless `sources` names them by mid. Its `recvonly`
/// m-lines are receive slots: the SFU fills audio slots with the loudest
/// speakers and video slots with screen shares, pinned sources and the most
/// recent speakers, rewriting SSRCs so no renegotiation is needed when who
/// fills a slot changes.
#[derive(Clone, Debug)]
pub struct SessionRequest {
    /// The call this session belongs to.
    pub call_id: String,
    /// Who the session is (e.g. `u:alice/laptop`), used in events.
    pub participant: String,
    /// The client's SDP offer.
    pub offer_sdp: String,
    /// What the session may publish.
    pub rights: PublishRights,
    /// Explicit mid → source assignments (optional).
    pub sources: Vec<(String, Source)>,
}

/// The SFU's answer to a [`SessionRequest`].
#[derive(Clone, Debug)]
pub struct SessionAnswer {
    /// The new session.
    pub session: SessionId,
    /// The SDP answer to hand back to the client.
    pub answer_sdp: String,
    /// Receive slots granted: (audio, video).
    pub slots: (usize, usize),
}

/// Receive preferences of a subscriber.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QualityPrefs {
    /// Highest simulcast layer wanted (0 = lowest).
    pub max_layer: u8,
}

impl Default for QualityPrefs {
    fn default() -> Self {
        Self { max_layer: 2 }
    }
}

/// Why a session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DownReason {
    /// Closed by signaling.
    Closed,
    /// No packets from the peer within the ICE timeout.
    Timeout,
    /// ICE or DTLS failed.
    Failed,
    /// The session's state machine panicked; only it was closed.
    Fault,
    /// The SFU is shutting down.
    Shutdown,
}

/// Events the SFU reports to signaling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SfuEvent {
    /// ICE and DTLS completed: media can flow.
    SessionUp {
        /// The session.
        session: SessionId,
        /// Its call.
        call_id: String,
        /// Its participant.
        participant: String,
    },
    /// The session is gone.
    SessionDown {
        /// The session.
        session: SessionId,
        /// Its call.
        call_id: String,
        /// Its participant.
        participant: String,
        /// Why.
        reason: DownReason,
    },
    /// The first packet of a published track arrived.
    TrackPublished {
        /// The publishing session.
        session: SessionId,
        /// Its call.
        call_id: String,
        /// Its participant.
        participant: String,
        /// Which source.
        source: Source,
        /// The simulcast rid, if any.
        rid: Option<String>,
    },
    /// The loudest speaker of a call changed.
    DominantSpeaker {
        /// The call.
        call_id: String,
        /// The new dominant speaker's participant id.
        participant: String,
    },
    /// Publishers were asked for key frames (`request_key_frames`).
    KeyFrameRequested {
        /// The call.
        call_id: String,
        /// The call's epoch then.
        epoch: u64,
    },
}

/// Why a control call failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SfuError {
    /// The SDP offer is malformed or offers nothing usable.
    #[error("bad SDP offer: {0}")]
    BadOffer(String),
    /// No such session.
    #[error("unknown session")]
    UnknownSession,
    /// The SFU is at its session limit.
    #[error("session limit reached")]
    Full,
    /// The SFU has stopped.
    #[error("SFU stopped")]
    Stopped,
    /// No media plane is attached to this server.
    #[error("no media server is available")]
    Unavailable,
    /// The WebRTC stack refused the session.
    #[error("WebRTC error: {0}")]
    Rtc(String),
}

/// A boxed future, so the trait stays object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What signaling needs from a media plane. Implemented by [`crate::Sfu`].
pub trait SfuControl: Send + Sync {
    /// Opens a session from an SDP offer and returns the answer.
    fn create_session(
        &self,
        request: SessionRequest,
    ) -> BoxFuture<'_, Result<SessionAnswer, SfuError>>;
    /// Changes what a session may publish (takes effect on the next packet).
    fn set_publish_rights(&self, session: SessionId, rights: PublishRights);
    /// Pins a participant's source into the session's video slots
    /// (subscribe); `pinned = false` unpins it (unsubscribe).
    fn pin(&self, session: SessionId, participant: &str, source: Source, pinned: bool);
    /// Sets a session's receive preferences.
    fn set_quality(&self, session: SessionId, prefs: QualityPrefs);
    /// Closes a session.
    fn close_session(&self, session: SessionId);
    /// A commit moved the call's MLS group to `epoch` (members who join
    /// in it may send in it at once).
    fn epoch_changed(&self, call_id: &str, epoch: u64);
    /// Every member holds `epoch` and senders were told to switch to it
    /// (`epoch_ready`). The E2EE guard forwards frames of every epoch from
    /// the ready epoch before this one to the newest commit.
    fn epoch_ready(&self, call_id: &str, epoch: u64);
    /// The commit to `epoch` removed members. Frames of the epochs they hold
    /// stop once the group moves past `epoch`, even if senders have not
    /// switched keys yet (a removal outranks smooth media).
    fn members_removed(&self, call_id: &str, epoch: u64);
    /// Asks every video publisher of the call for a key frame (when members
    /// who joined in a new epoch can decode only from one under its keys).
    fn request_key_frames(&self, call_id: &str);
}
