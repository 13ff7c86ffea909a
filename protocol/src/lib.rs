//! Conclave's protocol layer: pure data and pure functions, no I/O.
//!
//! - [`signal`]: the signaling wire protocol (JSON over WebSocket).
//! - [`sframe`]: the SFrame implementation that every client
//!   uses to protect media frames and that the SFU uses to check, without any
//!   key, that what it forwards is ciphertext.
//! - `mls` (feature `mls`): MLS identities and the delivery service's view of a group.

pub mod sframe;
pub mod signal;

#[cfg(feature = "mls")]
pub mod mls;
