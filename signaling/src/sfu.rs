//! How signaling drives the media plane. The SFU crate knows nothing of
//! signaling; the `conclave` binary plugs an implementation in (in-process
//! by default once the SFU engine exists, issue 4).

/// Operations signaling needs from an SFU.
pub trait SfuControl: Send + Sync + 'static {
    /// The call's MLS group moved to `epoch`: frames under older epochs
    /// stop being forwarded after the grace period, and publishers should
    /// be asked for key frames.
    fn epoch_changed(&self, call_id: &str, epoch: u64);
}

/// No media plane attached (signaling-only deployments and tests).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoSfu;

impl SfuControl for NoSfu {
    fn epoch_changed(&self, _call_id: &str, _epoch: u64) {}
}
