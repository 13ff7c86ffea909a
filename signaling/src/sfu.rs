//! How signaling drives the media plane: through the SFU crate's
//! [`SfuControl`] trait (the SFU knows nothing of signaling). The `conclave`
//! binary embeds [`conclave_sfu::Sfu`] in-process; [`NoSfu`] serves
//! signaling-only deployments and tests.

pub use conclave_sfu::{
    BoxFuture, DownReason, PublishRights, QualityPrefs, SessionAnswer, SessionId as MediaSessionId,
    SessionRequest, SfuControl, SfuError, SfuEvent, Source,
};

/// No media plane attached: media offers are refused with
/// [`SfuError::Unavailable`]; everything else is a no-op.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoSfu;

impl SfuControl for NoSfu {
    fn create_session(
        &self,
        _request: SessionRequest,
    ) -> BoxFuture<'_, Result<SessionAnswer, SfuError>> {
        Box::pin(async { Err(SfuError::Unavailable) })
    }
    fn set_publish_rights(&self, _session: MediaSessionId, _rights: PublishRights) {}
    fn pin(&self, _session: MediaSessionId, _participant: &str, _source: Source, _pinned: bool) {}
    fn set_quality(&self, _session: MediaSessionId, _prefs: QualityPrefs) {}
    fn close_session(&self, _session: MediaSessionId) {}
    fn epoch_changed(&self, _call_id: &str, _epoch: u64) {}
    fn epoch_ready(&self, _call_id: &str, _epoch: u64) {}
    fn members_removed(&self, _call_id: &str, _epoch: u64) {}
    fn request_key_frames(&self, _call_id: &str) {}
}

/// The SFU's name for a member: its MLS principal, `u:<user>/<device>`.
pub fn participant(user_id: &str, device_id: &str) -> String {
    format!("u:{user_id}/{device_id}")
}

/// The (user, device) of an SFU participant name.
pub fn parse_participant(p: &str) -> Option<(&str, &str)> {
    p.strip_prefix("u:")?.split_once('/')
}
