//! Signaling messages: JSON over one WebSocket per client session.
//!
//! Every frame is one JSON object `{"v": 1, "type": "...", ...}`. Requests
//! may carry an `id` (any u64 the client picks); the reply to that request —
//! success or [`ServerMessage::Error`] — echoes it. MLS messages travel as
//! standard base64 with padding, except in the server's `proposal`, `commit`
//! and `welcome`, which go as binary frames with the MLS message as raw
//! bytes after the JSON (see [`ServerFrame`]): those are what a rekey fans
//! out to every member. `docs/protocol.md` documents each message.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// The largest text frame a client may send (MLS key packages and commits fit well within).
pub const MAX_CLIENT_MESSAGE: usize = 256 * 1024;
/// Longest id (call, device, user) accepted.
pub const MAX_ID_LEN: usize = 128;

/// Bytes carried as base64 in JSON.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Bytes(pub Vec<u8>);

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bytes({} bytes)", self.0.len())
    }
}

impl Serialize for Bytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&B64.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        B64.decode(s.as_bytes())
            .map(Bytes)
            .map_err(|_| serde::de::Error::custom("invalid base64"))
    }
}

impl Bytes {
    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A server frame as it goes on the wire.
///
/// Messages that carry an MLS message the server fans out (`proposal`,
/// `commit`, `welcome`) go as a binary frame, so the MLS bytes are not
/// inflated by base64: a 4-byte big-endian length `n`, `n` bytes of the JSON
/// object without its `message` field, then the MLS message itself. Every
/// other message is a JSON text frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerFrame {
    /// A JSON text frame.
    Text(String),
    /// A binary frame: length-prefixed JSON header, then the MLS message.
    Binary(Vec<u8>),
}

impl ServerFrame {
    /// Bytes of frame payload.
    pub fn len(&self) -> usize {
        match self {
            ServerFrame::Text(t) => t.len(),
            ServerFrame::Binary(b) => b.len(),
        }
    }

    /// Whether the payload is empty (never, for an encoded message).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A message from a client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientEnvelope {
    /// Protocol version; must be [`PROTOCOL_VERSION`].
    pub v: u32,
    /// Request id echoed in the reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// The message.
    #[serde(flatten)]
    pub msg: ClientMessage,
}

/// What a client can ask.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    /// Joins (or, if it has no members, starts) a call with this device.
    JoinCall {
        /// The call to join.
        call_id: String,
        /// This device's id (unique per user).
        device_id: String,
        /// A fresh MLS KeyPackage (cipher suite 1) whose credential names this user and device.
        key_package: Bytes,
    },
    /// The first member's answer to [`ServerMessage::CreateGroup`]: the
    /// GroupInfo, ratchet tree included, of the group it created.
    GroupCreated {
        /// The call.
        call_id: String,
        /// MLS GroupInfo message.
        group_info: Bytes,
    },
    /// The committer's answer to [`ServerMessage::CommitRequest`].
    Commit {
        /// The call.
        call_id: String,
        /// The epoch the commit was built in.
        epoch: u64,
        /// MLS PublicMessage commit.
        commit: Bytes,
        /// MLS Welcome for the members it adds, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        welcome: Option<Bytes>,
    },
    /// The member has processed everything up to `epoch` and holds its keys.
    EpochAck {
        /// The call.
        call_id: String,
        /// The epoch reached.
        epoch: u64,
    },
    /// Mute state, shown to everyone in the roster.
    SetMute {
        /// The call.
        call_id: String,
        /// Microphone muted.
        audio: bool,
        /// Camera off.
        video: bool,
    },
    /// Leaves the call.
    LeaveCall {
        /// The call.
        call_id: String,
    },
    /// Opens (or replaces) this session's media connection for a call it
    /// has joined: a WebRTC SDP offer for the SFU, answered with
    /// [`ServerMessage::MediaAnswer`]. Sending m-lines are what the client
    /// publishes (first audio = microphone, first video = camera, second
    /// video = screen, unless `sources` says otherwise); `recvonly` m-lines
    /// are receive slots the SFU fills.
    MediaOffer {
        /// The call.
        call_id: String,
        /// The SDP offer (at most [`MAX_SDP`] bytes).
        sdp: String,
        /// Explicit mid → source assignments.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        sources: Vec<MediaSourceMid>,
    },
    /// The highest simulcast layer this client wants (0 = lowest, 2 = highest).
    SetQuality {
        /// The call.
        call_id: String,
        /// Highest layer, 0–2.
        max_layer: u8,
    },
    /// Keeps a member's source in this client's video slots (or stops).
    Pin {
        /// The call.
        call_id: String,
        /// The member's user id.
        user_id: String,
        /// The member's device id.
        device_id: String,
        /// Which of its sources.
        source: MediaSource,
        /// Pin (true) or unpin (false).
        pinned: bool,
    },
    /// Stores key packages for this device ahead of time, so the server
    /// can add it to a group without a round trip (the retention recorder
    /// uses this). Each is single use. Answered with
    /// [`ServerMessage::KeyPackagesStored`].
    UploadKeyPackages {
        /// This device's id.
        device_id: String,
        /// 1 to [`MAX_KEY_PACKAGE_UPLOAD`] MLS KeyPackages naming this user and device.
        key_packages: Vec<Bytes>,
    },
    /// Keep-alive; answered with [`ServerMessage::Pong`].
    Ping {},
}

/// Most key packages in one upload.
pub const MAX_KEY_PACKAGE_UPLOAD: usize = 32;

/// Largest SDP offer accepted.
pub const MAX_SDP: usize = 64 * 1024;

/// A media source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MediaSource {
    /// Microphone.
    Audio,
    /// Camera.
    Camera,
    /// Screen share.
    Screen,
}

/// Which m-line of an offer carries which source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MediaSourceMid {
    /// The m-line's mid.
    pub mid: String,
    /// Its source.
    pub source: MediaSource,
}

/// A message from the server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServerEnvelope {
    /// Protocol version.
    pub v: u32,
    /// The request this answers, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// The message.
    #[serde(flatten)]
    pub msg: ServerMessage,
}

/// One member in a roster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RosterMember {
    /// User id.
    pub user_id: String,
    /// Device id.
    pub device_id: String,
    /// The name to show for the user (the account's display name; `Guest`
    /// for guests). Chosen by the organisation, not verified by MLS: the
    /// safety number is what binds a person to a key.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub display_name: String,
    /// MLS leaf index, once in the group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leaf: Option<u32>,
    /// Ed25519 identity public key, as in the member's credential.
    pub identity_key: Bytes,
    /// Microphone muted.
    pub audio_muted: bool,
    /// Camera off.
    pub video_muted: bool,
    /// Sources whose media is reaching the SFU.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publishing: Vec<MediaSource>,
    /// The organisation's retention recorder, added by the server because
    /// a member's policy requires records. It holds the call's keys.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub recorder: bool,
}

/// One device of one user: a roster entry's key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeviceRef {
    /// User id.
    pub user_id: String,
    /// Device id.
    pub device_id: String,
}

impl RosterMember {
    /// Whether this entry is `device`'s.
    pub fn is(&self, device: &DeviceRef) -> bool {
        self.user_id == device.user_id && self.device_id == device.device_id
    }
}

/// Applies a `roster_update` to the roster a client holds: entries in `gone`
/// leave; each entry in `changed` replaces the one of the same user and
/// device, or joins at the end (the server's order).
pub fn apply_roster_update(
    roster: &mut Vec<RosterMember>,
    changed: Vec<RosterMember>,
    gone: &[DeviceRef],
) {
    if !gone.is_empty() {
        roster.retain(|m| !gone.iter().any(|g| m.is(g)));
    }
    for c in changed {
        match roster
            .iter_mut()
            .find(|m| m.user_id == c.user_id && m.device_id == c.device_id)
        {
            Some(m) => *m = c,
            None => roster.push(c),
        }
    }
}

/// What the server tells a client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// Sent once after the session is authenticated.
    Ready {
        /// The authenticated user.
        user_id: String,
        /// The server's MLS external-sender signing identity (TLS-encoded
        /// `SigningIdentity`), to put in the group's `external_senders`.
        external_sender: Bytes,
    },
    /// The join was accepted; MLS messages follow.
    Joined {
        /// The call.
        call_id: String,
    },
    /// You are the first member: create the MLS group with this id and the
    /// server as external sender, then answer with `group_created`.
    CreateGroup {
        /// The call.
        call_id: String,
        /// The MLS group id to use.
        group_id: Bytes,
    },
    /// An external proposal signed by the server; process it (queue it).
    Proposal {
        /// The call.
        call_id: String,
        /// The epoch it belongs to.
        epoch: u64,
        /// MLS PublicMessage proposal (the payload of a binary frame).
        #[serde(default, skip_serializing_if = "Bytes::is_empty")]
        message: Bytes,
    },
    /// You are the committer for `epoch`: commit every queued proposal.
    CommitRequest {
        /// The call.
        call_id: String,
        /// The epoch to commit in.
        epoch: u64,
        /// Commit even with nothing queued: an empty commit whose update
        /// path refills your blank ratchet-tree nodes, so later commits stay
        /// small (the server heals the tree this way while a large call is
        /// quiet).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        heal: bool,
    },
    /// The accepted commit that moves the group from `epoch` to `epoch + 1`.
    Commit {
        /// The call.
        call_id: String,
        /// The epoch the commit was built in.
        epoch: u64,
        /// MLS PublicMessage commit (the payload of a binary frame).
        #[serde(default, skip_serializing_if = "Bytes::is_empty")]
        message: Bytes,
    },
    /// Your Welcome: join the group from it.
    Welcome {
        /// The call.
        call_id: String,
        /// The epoch it welcomes into.
        epoch: u64,
        /// MLS Welcome (the payload of a binary frame).
        #[serde(default, skip_serializing_if = "Bytes::is_empty")]
        message: Bytes,
    },
    /// Every member holds `epoch`: switch sending to it (and send a key frame).
    EpochReady {
        /// The call.
        call_id: String,
        /// The epoch.
        epoch: u64,
    },
    /// Everyone in the call: sent once, when the session enters the call;
    /// `roster_update`s follow.
    Roster {
        /// The call.
        call_id: String,
        /// The current epoch.
        epoch: u64,
        /// Everyone in the call.
        members: Vec<RosterMember>,
    },
    /// The call's members changed since the last `roster` or
    /// `roster_update` this session got (see [`apply_roster_update`]).
    RosterUpdate {
        /// The call.
        call_id: String,
        /// The current epoch.
        epoch: u64,
        /// Members who joined or whose entry changed, whole.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        changed: Vec<RosterMember>,
        /// Members who left.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        gone: Vec<DeviceRef>,
    },
    /// You are no longer in the call.
    Removed {
        /// The call.
        call_id: String,
        /// Why.
        reason: RemovalReason,
    },
    /// The SFU's answer to [`ClientMessage::MediaOffer`].
    MediaAnswer {
        /// The call.
        call_id: String,
        /// The SDP answer.
        sdp: String,
        /// Audio receive slots granted.
        audio_slots: u32,
        /// Video receive slots granted.
        video_slots: u32,
    },
    /// The media connection ended (ICE timeout or failure); offer again to
    /// reconnect.
    MediaClosed {
        /// The call.
        call_id: String,
        /// Why, in words.
        reason: String,
    },
    /// The loudest speaker in the call changed.
    ActiveSpeaker {
        /// The call.
        call_id: String,
        /// Speaker's user id.
        user_id: String,
        /// Speaker's device id.
        device_id: String,
    },
    /// Answer to [`ClientMessage::UploadKeyPackages`].
    KeyPackagesStored {
        /// The device.
        device_id: String,
        /// How many unused key packages the server now holds for it.
        stored: u32,
    },
    /// Answer to [`ClientMessage::Ping`].
    Pong,
    /// A request failed; nothing changed.
    Error {
        /// Machine-readable code.
        code: ErrorCode,
        /// Human-readable explanation.
        message: String,
    },
}

/// Why a member left a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemovalReason {
    /// The member left.
    Left,
    /// An administrator removed the user.
    RemovedByAdmin,
    /// The connection was lost.
    Disconnected,
}

/// Error codes, stable across versions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, unknown type or fields, bad base64, or a field out of range.
    BadRequest,
    /// The `v` field names a version this server does not speak.
    UnsupportedVersion,
    /// Missing or invalid credentials.
    Unauthorized,
    /// The user's security-group policy forbids this.
    Forbidden,
    /// No such call, or not a member of it.
    NotFound,
    /// The call is at its size limit.
    CallFull,
    /// A commit for an epoch that is already decided; fetch the winner and retry.
    StaleEpoch,
    /// This member is not the committer for that epoch.
    NotCommitter,
    /// The MLS message did not validate.
    InvalidMls,
    /// Too many messages; the session will be closed if it continues.
    RateLimited,
    /// A server fault; nothing changed.
    Internal,
}

/// Why a client message was refused before any state was touched.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Larger than [`MAX_CLIENT_MESSAGE`].
    #[error("message of {0} bytes exceeds {max}", max = MAX_CLIENT_MESSAGE)]
    TooLarge(usize),
    /// Not a valid message.
    #[error("invalid message: {0}")]
    Invalid(String),
    /// Unsupported version.
    #[error("unsupported protocol version {0}")]
    Version(u32),
    /// An id is empty, too long or has characters outside `[A-Za-z0-9._@+-]`.
    #[error("invalid id in field {0}")]
    BadId(&'static str),
}

impl DecodeError {
    /// The error code to reply with.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Version(_) => ErrorCode::UnsupportedVersion,
            _ => ErrorCode::BadRequest,
        }
    }
}

/// Whether `s` is a valid call, user or device id.
pub fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@' | b'+'))
}

fn check_id(s: &str, field: &'static str) -> Result<(), DecodeError> {
    if valid_id(s) {
        Ok(())
    } else {
        Err(DecodeError::BadId(field))
    }
}

impl ClientEnvelope {
    /// Parses and validates one client frame.
    pub fn decode(text: &str) -> Result<Self, DecodeError> {
        if text.len() > MAX_CLIENT_MESSAGE {
            return Err(DecodeError::TooLarge(text.len()));
        }
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| DecodeError::Invalid(e.to_string()))?;
        let serde_json::Value::Object(mut map) = value else {
            return Err(DecodeError::Invalid("expected a JSON object".into()));
        };
        // Check the version before the body so an old or new client gets a
        // precise answer.
        let v = map
            .remove("v")
            .ok_or_else(|| DecodeError::Invalid("missing field `v`".into()))?;
        let v = v
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| DecodeError::Invalid("`v` must be an unsigned integer".into()))?;
        if v != PROTOCOL_VERSION {
            return Err(DecodeError::Version(v));
        }
        let id =
            match map.remove("id") {
                None | Some(serde_json::Value::Null) => None,
                Some(id) => Some(id.as_u64().ok_or_else(|| {
                    DecodeError::Invalid("`id` must be an unsigned integer".into())
                })?),
            };
        let msg = ClientMessage::deserialize(serde_json::Value::Object(map))
            .map_err(|e| DecodeError::Invalid(e.to_string()))?;
        let env = Self { v, id, msg };
        match &env.msg {
            ClientMessage::JoinCall {
                call_id,
                device_id,
                key_package,
            } => {
                check_id(call_id, "call_id")?;
                check_id(device_id, "device_id")?;
                if key_package.0.is_empty() {
                    return Err(DecodeError::Invalid("empty key_package".into()));
                }
            }
            ClientMessage::GroupCreated { call_id, .. }
            | ClientMessage::Commit { call_id, .. }
            | ClientMessage::EpochAck { call_id, .. }
            | ClientMessage::SetMute { call_id, .. }
            | ClientMessage::LeaveCall { call_id }
            | ClientMessage::SetQuality { call_id, .. } => check_id(call_id, "call_id")?,
            ClientMessage::MediaOffer {
                call_id,
                sdp,
                sources,
            } => {
                check_id(call_id, "call_id")?;
                if sdp.is_empty() || sdp.len() > MAX_SDP {
                    return Err(DecodeError::Invalid(format!(
                        "sdp must be 1 to {MAX_SDP} bytes"
                    )));
                }
                if sources.len() > 16 || sources.iter().any(|s| !valid_id(&s.mid)) {
                    return Err(DecodeError::BadId("sources"));
                }
            }
            ClientMessage::UploadKeyPackages {
                device_id,
                key_packages,
            } => {
                check_id(device_id, "device_id")?;
                if key_packages.is_empty()
                    || key_packages.len() > MAX_KEY_PACKAGE_UPLOAD
                    || key_packages.iter().any(|k| k.0.is_empty())
                {
                    return Err(DecodeError::Invalid(format!(
                        "key_packages must hold 1 to {MAX_KEY_PACKAGE_UPLOAD} non-empty packages"
                    )));
                }
            }
            ClientMessage::Pin {
                call_id,
                user_id,
                device_id,
                ..
            } => {
                check_id(call_id, "call_id")?;
                check_id(user_id, "user_id")?;
                check_id(device_id, "device_id")?;
            }
            ClientMessage::Ping {} => {}
        }
        Ok(env)
    }

    /// Encodes a client frame (for clients and tests).
    pub fn encode(id: Option<u64>, msg: ClientMessage) -> String {
        let env = Self {
            v: PROTOCOL_VERSION,
            id,
            msg,
        };
        // Serializing these plain data types cannot fail.
        serde_json::to_string(&env).unwrap_or_default()
    }
}

impl ServerEnvelope {
    /// Encodes a server frame.
    pub fn encode(id: Option<u64>, msg: ServerMessage) -> String {
        let env = Self {
            v: PROTOCOL_VERSION,
            id,
            msg,
        };
        serde_json::to_string(&env).unwrap_or_default()
    }

    /// Encodes a server message the way the server sends it: a binary
    /// frame for a message that carries a fanned-out MLS message, JSON text
    /// otherwise (see [`ServerFrame`]).
    pub fn frame(id: Option<u64>, mut msg: ServerMessage) -> ServerFrame {
        let Some(field) = msg.mls_payload_mut() else {
            return ServerFrame::Text(Self::encode(id, msg));
        };
        let payload = std::mem::take(field);
        let env = Self {
            v: PROTOCOL_VERSION,
            id,
            msg,
        };
        let header = serde_json::to_vec(&env).unwrap_or_default();
        let mut out = Vec::with_capacity(4 + header.len() + payload.0.len());
        out.extend_from_slice(&(header.len() as u32).to_be_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&payload.0);
        ServerFrame::Binary(out)
    }

    /// Parses a server text frame (for clients and tests).
    pub fn decode(text: &str) -> Result<Self, DecodeError> {
        let env: Self =
            serde_json::from_str(text).map_err(|e| DecodeError::Invalid(e.to_string()))?;
        if let Some(Bytes(b)) = ServerMessage::mls_payload(&env.msg)
            && b.is_empty()
        {
            return Err(DecodeError::Invalid("missing field `message`".into()));
        }
        Ok(env)
    }

    /// Parses a server binary frame (for clients and tests).
    pub fn decode_binary(frame: &[u8]) -> Result<Self, DecodeError> {
        let bad = |why: &str| DecodeError::Invalid(format!("binary frame: {why}"));
        let (len, rest) = frame
            .split_first_chunk::<4>()
            .ok_or_else(|| bad("shorter than its length prefix"))?;
        let len = u32::from_be_bytes(*len) as usize;
        if len > rest.len() {
            return Err(bad("header longer than the frame"));
        }
        let (header, payload) = rest.split_at(len);
        let mut env: Self = serde_json::from_slice(header).map_err(|e| bad(&e.to_string()))?;
        let field = env
            .msg
            .mls_payload_mut()
            .ok_or_else(|| bad("this message type carries no MLS message"))?;
        if !field.is_empty() || payload.is_empty() {
            return Err(bad(
                "the MLS message must follow the header, and only there",
            ));
        }
        *field = Bytes(payload.to_vec());
        Ok(env)
    }

    /// Parses either kind of server frame.
    pub fn decode_frame(frame: &ServerFrame) -> Result<Self, DecodeError> {
        match frame {
            ServerFrame::Text(t) => Self::decode(t),
            ServerFrame::Binary(b) => Self::decode_binary(b),
        }
    }
}

impl ServerMessage {
    /// The MLS message this message carries in a binary frame, if any.
    fn mls_payload_mut(&mut self) -> Option<&mut Bytes> {
        match self {
            ServerMessage::Proposal { message, .. }
            | ServerMessage::Commit { message, .. }
            | ServerMessage::Welcome { message, .. } => Some(message),
            _ => None,
        }
    }

    fn mls_payload(&self) -> Option<&Bytes> {
        match self {
            ServerMessage::Proposal { message, .. }
            | ServerMessage::Commit { message, .. }
            | ServerMessage::Welcome { message, .. } => Some(message),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(user: &str, muted: bool) -> RosterMember {
        RosterMember {
            user_id: user.into(),
            device_id: "d".into(),
            display_name: String::new(),
            leaf: None,
            identity_key: Bytes(vec![1]),
            audio_muted: muted,
            video_muted: false,
            publishing: Vec::new(),
            recorder: false,
        }
    }

    #[test]
    fn a_roster_update_replaces_in_place_appends_and_removes() {
        let mut roster = vec![entry("a", false), entry("b", false), entry("c", false)];
        let text = ServerEnvelope::encode(
            None,
            ServerMessage::RosterUpdate {
                call_id: "c1".into(),
                epoch: 3,
                changed: vec![entry("c", true), entry("d", false)],
                gone: vec![DeviceRef {
                    user_id: "a".into(),
                    device_id: "d".into(),
                }],
            },
        );
        let ServerMessage::RosterUpdate { changed, gone, .. } =
            ServerEnvelope::decode(&text).unwrap().msg
        else {
            panic!("{text}");
        };
        apply_roster_update(&mut roster, changed, &gone);
        assert_eq!(
            roster,
            vec![entry("b", false), entry("c", true), entry("d", false)]
        );
        // Empty lists are left out on the wire and read back as empty.
        let quiet = ServerEnvelope::encode(
            None,
            ServerMessage::RosterUpdate {
                call_id: "c1".into(),
                epoch: 4,
                changed: Vec::new(),
                gone: Vec::new(),
            },
        );
        assert!(
            !quiet.contains("changed") && !quiet.contains("gone"),
            "{quiet}"
        );
        assert!(ServerEnvelope::decode(&quiet).is_ok());
    }

    #[test]
    fn round_trips_a_join() {
        let text = ClientEnvelope::encode(
            Some(7),
            ClientMessage::JoinCall {
                call_id: "c1".into(),
                device_id: "laptop".into(),
                key_package: Bytes(vec![1, 2, 3]),
            },
        );
        assert_eq!(
            text,
            r#"{"v":1,"id":7,"type":"join_call","call_id":"c1","device_id":"laptop","key_package":"AQID"}"#
        );
        let env = ClientEnvelope::decode(&text).unwrap();
        assert_eq!(env.id, Some(7));
    }

    #[test]
    fn rejects_bad_input_with_typed_errors() {
        assert_eq!(
            ClientEnvelope::decode(r#"{"v":2,"type":"ping"}"#),
            Err(DecodeError::Version(2))
        );
        assert!(matches!(
            ClientEnvelope::decode(r#"{"v":1,"type":"nope"}"#),
            Err(DecodeError::Invalid(_))
        ));
        assert!(matches!(
            ClientEnvelope::decode(r#"{"v":1,"type":"ping","extra":1}"#),
            Err(DecodeError::Invalid(_))
        ));
        assert!(matches!(
            ClientEnvelope::decode(
                r#"{"v":1,"type":"join_call","call_id":"a b","device_id":"d","key_package":"AQID"}"#
            ),
            Err(DecodeError::BadId("call_id"))
        ));
        assert!(matches!(
            ClientEnvelope::decode(
                r#"{"v":1,"type":"join_call","call_id":"a","device_id":"d","key_package":"!!"}"#
            ),
            Err(DecodeError::Invalid(_))
        ));
        let big = format!(
            r#"{{"v":1,"type":"ping","pad":"{}"}}"#,
            "x".repeat(MAX_CLIENT_MESSAGE)
        );
        assert!(matches!(
            ClientEnvelope::decode(&big),
            Err(DecodeError::TooLarge(_))
        ));
        assert!(ClientEnvelope::decode("not json").is_err());
        assert!(matches!(
            ClientEnvelope::decode(r#"{"v":1,"type":"media_offer","call_id":"c","sdp":""}"#),
            Err(DecodeError::Invalid(_))
        ));
        assert!(matches!(
            ClientEnvelope::decode(
                r#"{"v":1,"type":"pin","call_id":"c","user_id":"a b","device_id":"d","source":"camera","pinned":true}"#
            ),
            Err(DecodeError::BadId("user_id"))
        ));
    }

    #[test]
    fn media_messages_round_trip() {
        let text = ClientEnvelope::encode(
            Some(1),
            ClientMessage::MediaOffer {
                call_id: "c".into(),
                sdp: "v=0\r\n".into(),
                sources: vec![MediaSourceMid {
                    mid: "1".into(),
                    source: MediaSource::Screen,
                }],
            },
        );
        assert!(text.contains(r#""type":"media_offer""#));
        assert!(text.contains(r#""source":"screen""#));
        assert!(ClientEnvelope::decode(&text).is_ok());
        let answer = ServerEnvelope::encode(
            Some(1),
            ServerMessage::MediaAnswer {
                call_id: "c".into(),
                sdp: "v=0".into(),
                audio_slots: 3,
                video_slots: 9,
            },
        );
        assert_eq!(
            ServerEnvelope::decode(&answer).unwrap().msg,
            ServerMessage::MediaAnswer {
                call_id: "c".into(),
                sdp: "v=0".into(),
                audio_slots: 3,
                video_slots: 9,
            }
        );
    }

    #[test]
    fn mls_fan_out_messages_go_as_binary_frames_with_raw_bytes() {
        let mls = vec![0u8, 1, 2, 0xff, b'{', b'"'];
        for msg in [
            ServerMessage::Proposal {
                call_id: "c".into(),
                epoch: 3,
                message: Bytes(mls.clone()),
            },
            ServerMessage::Commit {
                call_id: "c".into(),
                epoch: 3,
                message: Bytes(mls.clone()),
            },
            ServerMessage::Welcome {
                call_id: "c".into(),
                epoch: 4,
                message: Bytes(mls.clone()),
            },
        ] {
            let frame = ServerEnvelope::frame(Some(2), msg.clone());
            let ServerFrame::Binary(b) = &frame else {
                panic!("{frame:?}")
            };
            // Length, header without the MLS field, then the raw bytes.
            let n = u32::from_be_bytes(b[..4].try_into().unwrap()) as usize;
            let header = std::str::from_utf8(&b[4..4 + n]).unwrap();
            assert!(header.starts_with(r#"{"v":1,"id":2,"type":"#), "{header}");
            assert!(!header.contains("message"), "{header}");
            assert_eq!(&b[4 + n..], &mls[..]);
            assert_eq!(b.len(), 4 + n + mls.len());
            let back = ServerEnvelope::decode_frame(&frame).unwrap();
            assert_eq!((back.id, back.msg), (Some(2), msg.clone()));
            // The text form stays readable.
            let text = ServerEnvelope::encode(None, msg.clone());
            assert_eq!(ServerEnvelope::decode(&text).unwrap().msg, msg);
        }
        // Everything else is text.
        let ready = ServerEnvelope::frame(None, ServerMessage::Pong {});
        assert_eq!(ready, ServerFrame::Text(r#"{"v":1,"type":"pong"}"#.into()));
    }

    #[test]
    fn malformed_binary_frames_are_refused() {
        let header = br#"{"v":1,"type":"commit","call_id":"c","epoch":1}"#;
        let with = |len: u32, header: &[u8], payload: &[u8]| {
            let mut f = len.to_be_bytes().to_vec();
            f.extend_from_slice(header);
            f.extend_from_slice(payload);
            f
        };
        let n = header.len() as u32;
        let doubled = br#"{"v":1,"type":"commit","call_id":"c","epoch":1,"message":"AA=="}"#;
        assert!(ServerEnvelope::decode_binary(&with(n, header, b"mls")).is_ok());
        for bad in [
            vec![],
            vec![0, 0, 1],
            with(n + 1, header, b""),
            with(u32::MAX, header, b"mls"),
            // No MLS message after the header.
            with(n, header, b""),
            // A message type that carries none.
            with(21, br#"{"v":1,"type":"pong"}"#, b"x"),
            // The MLS message both in the header and after it.
            with(doubled.len() as u32, doubled, b"x"),
            with(3, b"{{{", b"x"),
        ] {
            assert!(
                matches!(
                    ServerEnvelope::decode_binary(&bad),
                    Err(DecodeError::Invalid(_))
                ),
                "{bad:?}"
            );
        }
        // A text commit must carry its message.
        assert!(
            ServerEnvelope::decode(r#"{"v":1,"type":"commit","call_id":"c","epoch":1}"#).is_err()
        );
    }

    proptest::proptest! {
        #[test]
        fn decoding_random_binary_frames_never_panics(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)
        ) {
            let _ = ServerEnvelope::decode_binary(&bytes);
        }
    }
}
