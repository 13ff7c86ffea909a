//! Conclave's media plane: a selective forwarding unit that relays media it
//! cannot read.
//!
//! The forwarding engine (webrtc-rs sans-IO, one UDP port, simulcast, slots)
//! is issue 4. What is here is the part of it that enforces end-to-end
//! encryption: [`guard`], which lets through only frames that carry a
//! well-formed SFrame header for one of the call's live epochs.

pub mod guard;
