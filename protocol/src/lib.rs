//! Conclave's protocol layer: pure data and pure functions, no I/O.
//!
//! Today it holds the SFrame implementation ([`sframe`]) that every client
//! uses to protect media frames and that the SFU uses to check, without any
//! key, that what it forwards is ciphertext.

pub mod sframe;

#[cfg(feature = "mls")]
pub mod mls;
