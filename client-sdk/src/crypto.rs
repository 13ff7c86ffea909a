//! The frame-protection state of one call member: receive keys for every
//! sender and epoch, and one encryptor per outbound stream.

use std::time::Instant;

use conclave_protocol::sframe::{
    Codec, DecryptedFrame, EpochSecret, FrameEncryptor, KeyRing, KeyRingConfig, SframeError,
};

/// Stream contexts carried in the KID's context bits: each outbound stream
/// has its own key and counter.
pub mod stream {
    /// Microphone audio.
    pub const AUDIO: u64 = 0;
    /// Camera video (simulcast layer 0; layers 1 and 2 use 3 and 4).
    pub const CAMERA: u64 = 1;
    /// Screen share.
    pub const SCREEN: u64 = 2;
}

/// Frame keys of one member of one call.
#[derive(Debug)]
pub struct CallCrypto {
    ring: KeyRing,
    leaf: Option<u32>,
    send_epoch: Option<u64>,
    senders: Vec<(u64, FrameEncryptor)>,
}

impl CallCrypto {
    /// Empty state with the given ring settings.
    pub fn new(config: KeyRingConfig) -> Self {
        Self {
            ring: KeyRing::new(config),
            leaf: None,
            send_epoch: None,
            senders: Vec::new(),
        }
    }

    /// The epoch frames are sent in.
    pub fn send_epoch(&self) -> Option<u64> {
        self.send_epoch
    }

    /// The newest epoch installed for receiving.
    pub fn receive_epoch(&self) -> Option<u64> {
        self.ring.current_epoch()
    }

    /// Epochs whose frames can still be decrypted.
    pub fn live_epochs(&self) -> Vec<u64> {
        self.ring.live_epochs()
    }

    pub(crate) fn install(&mut self, secret: EpochSecret, leaf: u32, now: Instant) {
        self.leaf = Some(leaf);
        self.ring.install_epoch(secret, now);
    }

    /// Moves every outbound stream to `epoch`'s keys. Counters keep counting.
    pub(crate) fn switch_sending(&mut self, epoch: u64) -> Result<(), SframeError> {
        let leaf = self.leaf.ok_or(SframeError::NoEpoch)?;
        for (context, enc) in &mut self.senders {
            enc.set_key(self.ring.sender_key(epoch, leaf, *context)?);
        }
        self.send_epoch = Some(epoch);
        Ok(())
    }

    pub(crate) fn clear(&mut self) {
        self.ring.clear();
        self.senders.clear();
        self.send_epoch = None;
        self.leaf = None;
    }

    /// Protects one frame of outbound stream `context` into `out`.
    pub fn encrypt(
        &mut self,
        context: u64,
        codec: Codec,
        frame: &[u8],
        out: &mut [u8],
    ) -> Result<usize, SframeError> {
        let idx = match self.senders.iter().position(|(c, _)| *c == context) {
            Some(i) => i,
            None => {
                let epoch = self.send_epoch.ok_or(SframeError::NoEpoch)?;
                let leaf = self.leaf.ok_or(SframeError::NoEpoch)?;
                let key = self.ring.sender_key(epoch, leaf, context)?;
                self.senders.push((context, FrameEncryptor::new(key)));
                self.senders.len() - 1
            }
        };
        self.senders[idx].1.encrypt(codec, frame, out)
    }

    /// Authenticates and decrypts a frame from any sender, now.
    pub fn decrypt(
        &mut self,
        codec: Codec,
        frame: &[u8],
        out: &mut [u8],
    ) -> Result<DecryptedFrame, SframeError> {
        self.ring.decrypt(Instant::now(), codec, frame, out)
    }

    /// As [`CallCrypto::decrypt`], at a given time.
    pub fn decrypt_at(
        &mut self,
        now: Instant,
        codec: Codec,
        frame: &[u8],
        out: &mut [u8],
    ) -> Result<DecryptedFrame, SframeError> {
        self.ring.decrypt(now, codec, frame, out)
    }
}
