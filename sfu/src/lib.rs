//! Conclave's media plane: a selective forwarding unit that relays media it
//! cannot read.
//!
//! The forwarding engine (webrtc-rs sans-IO, one UDP port, simulcast, slots)
//! is issue 4. What is here is the part of it that enforces end-to-end
//! encryption: [`guard`], which lets through only frames that carry a
//! well-formed SFrame header for one of the call's live epochs; and the
//! first step of the packet path, [`demux`], which classifies datagrams on the
//! shared port and finds a new session by the ICE ufrag of its first STUN request.

pub mod demux;
pub mod guard;
