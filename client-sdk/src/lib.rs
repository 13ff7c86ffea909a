//! Conclave's Rust client SDK.
//!
//! Today: the end-to-end encryption core every client runs.
//! - identities (per-device Ed25519 keys bound to a user by the MLS
//!   credential) come from `conclave_protocol::mls`, shared with the server.
//! - [`agent`]: the MLS group-key agent (RFC 9420, cipher suite 1, mls-rs)
//!   that turns each epoch into SFrame keys.
//! - [`crypto`]: per-call frame protection (RFC 9605) fed by the agent.
//! - [`verify`]: safety numbers and epoch codes for key verification.
//! - [`session`]: a call over the network — the signaling WebSocket with the
//!   MLS agent run for you.
//! - [`media`]: the call's media over WebRTC to the SFU — SFrame-protected
//!   Opus and VP8 out, slots of forwarded frames in, decrypted and attributed.

pub mod agent;
pub mod crypto;
pub mod error;
pub mod media;
pub mod session;
pub mod verify;

pub use agent::{AgentConfig, AgentEvent, CommitBundle, MlsAgent, RosterEntry};
pub use conclave_protocol::mls::{Identity, Principal};
pub use crypto::{CallCrypto, stream};
pub use error::AgentError;
pub use media::{MediaConnection, MediaError, MediaOptions, ReceivedFrame};
