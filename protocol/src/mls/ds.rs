//! The delivery service's view of a call's MLS group.
//!
//! The signaling server is the group's external sender: it tracks the public
//! group state (ratchet tree, epoch) from PublicMessage commits, proposes Add
//! and Remove from the roster it authorises, and orders commits — the first
//! valid commit for an epoch wins and every other one is refused with
//! [`DsError::StaleEpoch`]. It never holds a group secret.

use mls_rs::MlsMessage;
use mls_rs::extension::built_in::ExternalSendersExt;
use mls_rs::external_client::builder::{
    ExternalBaseConfig, WithCryptoProvider, WithIdentityProvider,
};
use mls_rs::external_client::{ExternalClient, ExternalGroup, ExternalReceivedMessage};
use mls_rs::group::CommitEffect;
use mls_rs_crypto_rustcrypto::RustCryptoProvider;

use super::identity::{ConclaveIdentityProvider, Identity, MLS_SUITE, Principal};

/// mls-rs configuration of the delivery service.
pub type DsConfig = WithCryptoProvider<
    RustCryptoProvider,
    WithIdentityProvider<ConclaveIdentityProvider, ExternalBaseConfig>,
>;

/// Why the delivery service refused a message.
#[derive(Debug, thiserror::Error)]
pub enum DsError {
    /// The bytes are not an MLS message.
    #[error("malformed MLS message: {0}")]
    Malformed(mls_rs::error::MlsError),
    /// A commit for an epoch that is already decided (or not yet reached).
    #[error("stale epoch: group is at {current}, commit is for {got}")]
    StaleEpoch {
        /// The group's epoch.
        current: u64,
        /// The commit's epoch.
        got: u64,
    },
    /// The message is not of the kind expected here.
    #[error("expected {0}")]
    Unexpected(&'static str),
    /// MLS validation failed.
    #[error("MLS: {0}")]
    Mls(#[from] mls_rs::error::MlsError),
}

/// What the delivery service learns from a joiner's key package.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyPackageInfo {
    /// The user and device its credential names.
    pub principal: Principal,
    /// Its Ed25519 identity public key.
    pub identity_key: Vec<u8>,
}

fn external_client(server: Option<&Identity>) -> ExternalClient<DsConfig> {
    let b = ExternalClient::builder()
        .identity_provider(ConclaveIdentityProvider)
        .crypto_provider(RustCryptoProvider::default());
    match server {
        Some(id) => b
            .signer(id.secret().clone(), id.signing_identity().clone())
            .build(),
        None => b.build(),
    }
}

/// Fully validates a key package (signature, lifetime, cipher suite 1, a
/// Conclave member credential) and says whom it names.
pub fn validate_key_package(bytes: &[u8]) -> Result<KeyPackageInfo, DsError> {
    let msg = decode(bytes)?;
    let kp = external_client(None).validate_key_package(msg, None)?;
    if kp.cipher_suite() != MLS_SUITE {
        return Err(DsError::Unexpected("a cipher suite 1 key package"));
    }
    let id = kp.signing_identity();
    match Principal::of(id) {
        Ok(p @ Principal::Member { .. }) => Ok(KeyPackageInfo {
            principal: p,
            identity_key: id.signature_key.as_bytes().to_vec(),
        }),
        _ => Err(DsError::Unexpected("a member credential")),
    }
}

/// What an accepted commit did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcceptedCommit {
    /// The new epoch.
    pub epoch: u64,
    /// Leaf index of the committer.
    pub committer: u32,
}

/// The public state of one call's group, as the delivery service holds it.
pub struct DeliveryGroup {
    group: ExternalGroup<DsConfig>,
}

impl std::fmt::Debug for DeliveryGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryGroup")
            .field("epoch", &self.epoch())
            .finish_non_exhaustive()
    }
}

fn decode(bytes: &[u8]) -> Result<MlsMessage, DsError> {
    MlsMessage::from_bytes(bytes).map_err(DsError::Malformed)
}

impl DeliveryGroup {
    /// Starts tracking a group from the GroupInfo (ratchet tree included)
    /// its creator uploaded; `server` signs the external proposals.
    pub fn observe(server: &Identity, group_info: &[u8]) -> Result<Self, DsError> {
        let group = external_client(Some(server)).observe_group(decode(group_info)?, None, None)?;
        Ok(Self { group })
    }

    /// The group's current epoch.
    pub fn epoch(&self) -> u64 {
        self.group.group_context().epoch
    }

    /// The MLS group id.
    pub fn group_id(&self) -> &[u8] {
        &self.group.group_context().group_id
    }

    /// Whether the group names `server` in its `external_senders` extension.
    pub fn has_external_sender(&self, server: &Identity) -> bool {
        self.group
            .group_context()
            .extensions
            .get_as::<ExternalSendersExt>()
            .ok()
            .flatten()
            .is_some_and(|ext| ext.allowed_senders.contains(server.signing_identity()))
    }

    /// Members of the current epoch: leaf index and principal.
    pub fn members(&self) -> Vec<(u32, Principal)> {
        self.group
            .roster()
            .members_iter()
            .filter_map(|m| {
                Principal::of(&m.signing_identity)
                    .ok()
                    .map(|p| (m.index, p))
            })
            .collect()
    }

    /// The leaf of a principal, if it is a member.
    pub fn leaf_of(&self, principal: &Principal) -> Option<u32> {
        self.members()
            .into_iter()
            .find(|(_, p)| p == principal)
            .map(|(i, _)| i)
    }

    /// An external Add proposal for a joiner's key package.
    pub fn propose_add(&mut self, key_package: &[u8]) -> Result<Vec<u8>, DsError> {
        let kp = decode(key_package)?;
        Ok(self.group.propose_add(kp, Vec::new())?.to_bytes()?)
    }

    /// An external Remove proposal for the member at `leaf`.
    pub fn propose_remove(&mut self, leaf: u32) -> Result<Vec<u8>, DsError> {
        Ok(self.group.propose_remove(leaf, Vec::new())?.to_bytes()?)
    }

    /// Orders a commit: accepted only if it is for the current epoch and
    /// valid; the group then moves to the next epoch.
    pub fn accept_commit(&mut self, commit: &[u8]) -> Result<AcceptedCommit, DsError> {
        let msg = decode(commit)?;
        let current = self.epoch();
        let got = msg.epoch().ok_or(DsError::Unexpected("a commit"))?;
        if got != current {
            return Err(DsError::StaleEpoch { current, got });
        }
        match self.group.process_incoming_message(msg)? {
            ExternalReceivedMessage::Commit(desc) => match desc.effect {
                CommitEffect::NewEpoch(_) | CommitEffect::Removed { .. } => Ok(AcceptedCommit {
                    epoch: self.epoch(),
                    committer: desc.committer,
                }),
                CommitEffect::ReInit(_) => Err(DsError::Unexpected("a commit without reinit")),
            },
            _ => Err(DsError::Unexpected("a commit")),
        }
    }
}
