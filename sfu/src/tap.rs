//! An interceptor at the application end of each session's chain. It lets
//! key-frame requests from subscribers through to the SFU (the chain's
//! terminus drops inbound RTCP otherwise), counts NACKs (which the NACK
//! responder below it answers from its packet cache), and records the
//! congestion controller's bandwidth estimate for layer selection.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rtc::interceptor::{Attribute, Interceptor, Packet, StreamInfo, TaggedPacket};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use rtc::sansio::Protocol;

/// What the tap shares with the worker, per session.
#[derive(Debug, Default)]
pub struct TapState {
    /// Latest send-side bandwidth estimate, bits per second (0 = none yet).
    pub estimate_bps: AtomicU64,
    /// NACKs received.
    pub nacks: AtomicU64,
}

/// The interceptor.
pub struct Tap {
    state: Arc<TapState>,
    reads: VecDeque<TaggedPacket>,
    writes: VecDeque<TaggedPacket>,
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tap")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Tap {
    /// A tap reporting into `state`.
    pub fn new(state: Arc<TapState>) -> Self {
        Self {
            state,
            reads: VecDeque::new(),
            writes: VecDeque::new(),
        }
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for Tap {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        for attribute in &msg.message.attributes {
            if let Attribute::TargetBitrateChanged { bits_per_second } = attribute {
                let bps = bits_per_second.max(0.0) as u64;
                self.state.estimate_bps.store(bps, Ordering::Relaxed);
            }
        }
        if let Packet::Rtcp(packets) = &msg.message.packet {
            let mut deliver = false;
            for p in packets {
                let any = p.as_any();
                if any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>() {
                    deliver = true;
                } else if let Some(n) = any.downcast_ref::<TransportLayerNack>() {
                    self.state
                        .nacks
                        .fetch_add(n.nacks.len() as u64, Ordering::Relaxed);
                }
            }
            if deliver {
                msg.message.add(Attribute::DeliverToApplication);
            }
        }
        self.reads.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.reads.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.writes.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.writes.pop_front()
    }
}

impl Interceptor for Tap {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}
