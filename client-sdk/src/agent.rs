//! The MLS group-key agent of one call member.
//!
//! The agent consumes what the delivery service (the signaling server)
//! relays: a Welcome, the server's external Add/Remove proposals, and
//! commits. When the server designates it as committer it commits the
//! pending proposals. For every epoch it exports the SFrame base key
//! (`MLS-Exporter("SFrame 1.0 Base Key", "", AEAD.Nk)`) into its
//! [`CallCrypto`], which derives one key per sender and stream.
//!
//! Epochs: a new epoch's receive keys are installed as soon as its commit is
//! processed; the previous epoch's stay for [`AgentConfig::retention`]. The
//! sending key moves only when the application says the group has moved
//! ([`MlsAgent::switch_sending`]), which also asks for a key frame.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use conclave_protocol::sframe::{CipherSuite, EpochSecret, KeyRingConfig, KidLayout, LeafSet};
use mls_rs::client_builder::{
    BaseConfig, WithCryptoProvider, WithGroupStateStorage, WithIdentityProvider, WithMlsRules,
};
use mls_rs::extension::built_in::ExternalSendersExt;
use mls_rs::group::{CommitEffect, ReceivedMessage};
use mls_rs::identity::SigningIdentity;
use mls_rs::mls_rules::{CommitOptions, DefaultMlsRules};
use mls_rs::{Client, ExtensionList, Group, MlsMessage};
use mls_rs_core::group::{EpochRecord, GroupState, GroupStateStorage};
use mls_rs_crypto_rustcrypto::RustCryptoProvider;
use zeroize::Zeroizing;

use crate::crypto::CallCrypto;
use crate::error::AgentError;
use crate::verify;
use conclave_protocol::mls::{ConclaveIdentityProvider, Identity, MLS_SUITE, Principal};

/// The exporter label of RFC 9605 §5.2.
pub const SFRAME_EXPORTER_LABEL: &[u8] = b"SFrame 1.0 Base Key";

/// mls-rs configuration used by every Conclave member.
pub type MlsConfig = WithGroupStateStorage<
    NoGroupStateStorage,
    WithMlsRules<
        DefaultMlsRules,
        WithCryptoProvider<
            RustCryptoProvider,
            WithIdentityProvider<ConclaveIdentityProvider, BaseConfig>,
        >,
    >,
>;

/// Builds the mls-rs client of a device identity (cipher suite 1, RustCrypto).
///
/// Every commit carries an update path, add-only ones included, so each
/// commit fills the committer's direct path in the ratchet tree; with the
/// delivery service rotating committers this keeps the tree dense and
/// commits O(log N) after a join storm.
pub fn mls_client(identity: &Identity) -> Client<MlsConfig> {
    Client::builder()
        .identity_provider(ConclaveIdentityProvider)
        .crypto_provider(RustCryptoProvider::default())
        .mls_rules(
            DefaultMlsRules::new()
                .with_commit_options(CommitOptions::new().with_path_required(true)),
        )
        .group_state_storage(NoGroupStateStorage)
        .signing_identity(
            identity.signing_identity().clone(),
            identity.secret().clone(),
            MLS_SUITE,
        )
        .build()
}

/// Group state storage that keeps nothing.
///
/// An agent's group lives in memory for one call and is never restored from
/// storage, so a serialized copy of it would only be one more place where an
/// epoch's secrets outlive the epoch. (mls-rs is built without `prior_epoch`,
/// so it keeps no past epochs either.)
#[derive(Clone, Copy, Debug, Default)]
pub struct NoGroupStateStorage;

impl GroupStateStorage for NoGroupStateStorage {
    type Error = std::convert::Infallible;

    fn state(&self, _group_id: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>, Self::Error> {
        Ok(None)
    }

    fn epoch(
        &self,
        _group_id: &[u8],
        _epoch_id: u64,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, Self::Error> {
        Ok(None)
    }

    fn write(
        &mut self,
        _state: GroupState,
        _epoch_inserts: Vec<EpochRecord>,
        _epoch_updates: Vec<EpochRecord>,
    ) -> Result<(), Self::Error> {
        Ok(())
    }

    fn max_epoch_id(&self, _group_id: &[u8]) -> Result<Option<u64>, Self::Error> {
        Ok(None)
    }
}

/// Settings of an agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    /// SFrame cipher suite of the call.
    pub sframe_suite: CipherSuite,
    /// KID layout of the call.
    pub layout: KidLayout,
    /// How long the previous epoch's receive keys are kept.
    pub retention: Duration,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            sframe_suite: CipherSuite::default(),
            layout: KidLayout::default(),
            retention: Duration::from_secs(10),
        }
    }
}

/// What happened as a result of an input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentEvent {
    /// The agent is in the group at `epoch` and sends in it.
    Joined {
        /// The epoch joined.
        epoch: u64,
    },
    /// A proposal from the delivery service was queued for the next commit.
    ProposalQueued,
    /// A commit moved the group to `epoch`; its receive keys are installed.
    EpochChanged {
        /// The new epoch.
        epoch: u64,
        /// Leaves added by the commit.
        added: Vec<u32>,
        /// Leaves removed by the commit.
        removed: Vec<u32>,
    },
    /// Outbound frames now use `epoch`'s keys.
    SendingSwitched {
        /// The epoch now sent in.
        epoch: u64,
    },
    /// Send a key frame so members who joined can start decoding (after
    /// switching to an epoch that added members).
    KeyFrameRequested,
    /// This member was removed; every key was dropped.
    Removed,
}

/// A commit waiting for the delivery service's verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitBundle {
    /// The epoch the commit was built in (it creates `epoch + 1`).
    pub epoch: u64,
    /// The commit message (an MLS PublicMessage).
    pub commit: Vec<u8>,
    /// The Welcome for members it adds, if any.
    pub welcome: Option<Vec<u8>>,
}

/// One member of the group as the agent sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RosterEntry {
    /// MLS leaf index.
    pub leaf: u32,
    /// User and device.
    pub principal: Principal,
    /// Ed25519 identity public key.
    pub identity_key: Vec<u8>,
}

/// The MLS agent of one device in one call.
pub struct MlsAgent {
    identity: Identity,
    client: Client<MlsConfig>,
    group: Option<Group<MlsConfig>>,
    config: AgentConfig,
    crypto: CallCrypto,
    /// The current epoch's members (leaf index, signature key), in leaf
    /// order: a commit's roster change is diffed against it, so the roster
    /// is walked once per epoch (at 500 members each walk clones 500 leaves).
    leaves: Vec<(u32, Vec<u8>)>,
    /// Epochs, not yet sent in, whose commit added members.
    added_epochs: BTreeSet<u64>,
}

impl std::fmt::Debug for MlsAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MlsAgent")
            .field("identity", &self.identity)
            .field("epoch", &self.epoch())
            .field("crypto", &self.crypto)
            .finish_non_exhaustive()
    }
}

fn decode(bytes: &[u8]) -> Result<MlsMessage, AgentError> {
    MlsMessage::from_bytes(bytes).map_err(AgentError::Malformed)
}

impl MlsAgent {
    /// An agent for `identity`, in no group yet.
    pub fn new(identity: Identity, config: AgentConfig) -> Self {
        let client = mls_client(&identity);
        Self {
            identity,
            client,
            group: None,
            config,
            crypto: CallCrypto::new(KeyRingConfig {
                suite: config.sframe_suite,
                layout: config.layout,
                retention: config.retention,
            }),
            leaves: Vec::new(),
            added_epochs: BTreeSet::new(),
        }
    }

    /// This device's identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// A fresh single-use key package for the delivery service to hold.
    pub fn key_package(&self) -> Result<Vec<u8>, AgentError> {
        let kp = self.client.generate_key_package_message(
            ExtensionList::default(),
            ExtensionList::default(),
            None,
        )?;
        Ok(kp.to_bytes()?)
    }

    /// How many key packages this device still holds the private keys of:
    /// those handed out and not yet used by a Welcome.
    pub fn unused_key_packages(&self) -> usize {
        self.client.key_package_store().key_packages().len()
    }

    /// Creates the call's group, naming the server as its only external sender.
    pub fn create_group(
        &mut self,
        group_id: &[u8],
        external_sender: &SigningIdentity,
        now: Instant,
    ) -> Result<Vec<AgentEvent>, AgentError> {
        if self.group.is_some() {
            return Err(AgentError::AlreadyInGroup);
        }
        if !matches!(Principal::of(external_sender)?, Principal::Server { .. }) {
            return Err(AgentError::Identity(
                conclave_protocol::mls::IdentityError::Invalid,
            ));
        }
        let mut ext = ExtensionList::new();
        ext.set_from(ExternalSendersExt::new(vec![external_sender.clone()]))?;
        let group = self.client.create_group_with_id(
            group_id.to_vec(),
            ext,
            ExtensionList::default(),
            None,
        )?;
        self.group = Some(group);
        self.enter_current_epoch(now)
    }

    /// Joins from a Welcome relayed by the delivery service.
    pub fn join(&mut self, welcome: &[u8], now: Instant) -> Result<Vec<AgentEvent>, AgentError> {
        if self.group.is_some() {
            return Err(AgentError::AlreadyInGroup);
        }
        let msg = decode(welcome)?;
        let (group, _info) = self.client.join_group(None, &msg, None)?;
        self.group = Some(group);
        self.enter_current_epoch(now)
    }

    fn enter_current_epoch(&mut self, now: Instant) -> Result<Vec<AgentEvent>, AgentError> {
        self.forget_key_package()?;
        let epoch = self.install_current_epoch(now)?;
        self.crypto.switch_sending(epoch)?;
        Ok(vec![AgentEvent::Joined { epoch }])
    }

    /// After a join: mls-rs deletes the private keys of the key package the
    /// Welcome used when the group is written to storage (which keeps
    /// nothing, [`NoGroupStateStorage`]). Later epochs need no write.
    fn forget_key_package(&mut self) -> Result<(), AgentError> {
        if let Some(g) = self.group.as_mut() {
            g.write_to_storage_without_ratchet_tree()?;
        }
        Ok(())
    }

    fn group(&self) -> Result<&Group<MlsConfig>, AgentError> {
        self.group.as_ref().ok_or(AgentError::NotInGroup)
    }

    /// Exports the current epoch's base key into the key ring; returns the epoch.
    fn install_current_epoch(&mut self, now: Instant) -> Result<u64, AgentError> {
        let group = self.group()?;
        let epoch = group.current_epoch();
        let secret = group.export_secret(
            SFRAME_EXPORTER_LABEL,
            b"",
            self.config.sframe_suite.key_len(),
        )?;
        let leaves = leaf_keys(group);
        let members: LeafSet = leaves.iter().map(|(i, _)| *i).collect();
        let width = leaves.last().map_or(1, |(i, _)| i + 1);
        let leaf = group.current_member_index();
        let secret = EpochSecret {
            epoch,
            base_key: Zeroizing::new(secret.as_bytes().to_vec()),
            sender_bits: KidLayout::sender_bits(width),
            members,
        };
        self.crypto.install(secret, leaf, now);
        self.leaves = leaves;
        Ok(epoch)
    }

    /// Processes a proposal or commit relayed by the delivery service.
    /// On error the group state is unchanged.
    pub fn handle(&mut self, message: &[u8], now: Instant) -> Result<Vec<AgentEvent>, AgentError> {
        let msg = decode(message)?;
        let group = self.group.as_mut().ok_or(AgentError::NotInGroup)?;
        match group.process_incoming_message(msg)? {
            ReceivedMessage::Proposal(_) => Ok(vec![AgentEvent::ProposalQueued]),
            ReceivedMessage::Commit(desc) => match desc.effect {
                CommitEffect::NewEpoch(_) => {
                    let before = std::mem::take(&mut self.leaves);
                    let epoch = match self.install_current_epoch(now) {
                        Ok(e) => e,
                        Err(e) => {
                            self.leaves = before;
                            return Err(e);
                        }
                    };
                    let (added, removed) = roster_change(&before, &self.leaves);
                    if !added.is_empty() {
                        self.added_epochs.insert(epoch);
                    }
                    Ok(vec![AgentEvent::EpochChanged {
                        epoch,
                        added,
                        removed,
                    }])
                }
                CommitEffect::Removed { .. } => {
                    self.group = None;
                    self.crypto.clear();
                    self.leaves.clear();
                    self.added_epochs.clear();
                    Ok(vec![AgentEvent::Removed])
                }
                CommitEffect::ReInit(_) => Err(AgentError::UnexpectedMessage("reinit")),
            },
            ReceivedMessage::ApplicationMessage(_) => {
                Err(AgentError::UnexpectedMessage("application message"))
            }
            ReceivedMessage::GroupInfo(_) => Err(AgentError::UnexpectedMessage("group info")),
            ReceivedMessage::Welcome => Err(AgentError::UnexpectedMessage("welcome")),
            ReceivedMessage::KeyPackage(_) => Err(AgentError::UnexpectedMessage("key package")),
        }
    }

    /// As the designated committer: commits every queued proposal. Returns
    /// `None` when nothing is queued. The commit takes effect when the
    /// delivery service relays it back ([`MlsAgent::handle`]); if it loses to
    /// another commit, call [`MlsAgent::discard_pending_commit`].
    pub fn commit_pending(&mut self) -> Result<Option<CommitBundle>, AgentError> {
        self.commit(false)
    }

    /// As [`MlsAgent::commit_pending`], but with nothing queued it makes an
    /// empty commit: its update path refills this member's blank nodes in
    /// the ratchet tree (the delivery service's `heal` request).
    pub fn commit_heal(&mut self) -> Result<Option<CommitBundle>, AgentError> {
        self.commit(true)
    }

    fn commit(&mut self, even_empty: bool) -> Result<Option<CommitBundle>, AgentError> {
        let group = self.group.as_mut().ok_or(AgentError::NotInGroup)?;
        if group.has_pending_commit() {
            return Err(AgentError::CommitPending);
        }
        if !even_empty && !group.commit_required() {
            return Ok(None);
        }
        let epoch = group.current_epoch();
        let out = group.commit_builder().build()?;
        let welcome = match out.welcome_messages.first() {
            Some(w) => Some(w.to_bytes()?),
            None => None,
        };
        Ok(Some(CommitBundle {
            epoch,
            commit: out.commit_message.to_bytes()?,
            welcome,
        }))
    }

    /// Forgets a commit the delivery service refused.
    pub fn discard_pending_commit(&mut self) {
        if let Some(g) = self.group.as_mut() {
            g.clear_pending_commit();
        }
    }

    /// The group has moved to `epoch`: send in it from now on. Asks for a
    /// key frame ([`AgentEvent::KeyFrameRequested`]) when an epoch since
    /// the one sent in so far added members: they can decode video only
    /// from a key frame under keys they hold. An epoch that only removed
    /// members needs none (everyone left keeps their decoder state), which
    /// spares a large call a burst of key frames on every leave.
    pub fn switch_sending(&mut self, epoch: u64) -> Result<Vec<AgentEvent>, AgentError> {
        let previous = self.crypto.send_epoch();
        if previous == Some(epoch) {
            return Ok(Vec::new());
        }
        self.crypto.switch_sending(epoch)?;
        let joined = self
            .added_epochs
            .range(..=epoch)
            .next_back()
            .is_some_and(|a| previous.is_none_or(|p| *a > p));
        self.added_epochs = self.added_epochs.split_off(&(epoch + 1));
        let mut events = vec![AgentEvent::SendingSwitched { epoch }];
        if joined || previous.is_none() {
            events.push(AgentEvent::KeyFrameRequested);
        }
        Ok(events)
    }

    /// The current MLS epoch, if in a group.
    pub fn epoch(&self) -> Option<u64> {
        self.group.as_ref().map(Group::current_epoch)
    }

    /// This member's leaf index.
    pub fn leaf_index(&self) -> Option<u32> {
        self.group.as_ref().map(Group::current_member_index)
    }

    /// A GroupInfo (ratchet tree included) for the delivery service to track the group.
    pub fn group_info(&self) -> Result<Vec<u8>, AgentError> {
        Ok(self.group()?.group_info_message(true)?.to_bytes()?)
    }

    /// The members of the current epoch.
    pub fn roster(&self) -> Result<Vec<RosterEntry>, AgentError> {
        self.group()?
            .roster()
            .members_iter()
            .map(|m| {
                Ok(RosterEntry {
                    leaf: m.index,
                    principal: Principal::of(&m.signing_identity)?,
                    identity_key: m.signing_identity.signature_key.as_bytes().to_vec(),
                })
            })
            .collect()
    }

    /// The call's epoch code (from the MLS epoch authenticator).
    pub fn epoch_code(&self) -> Result<String, AgentError> {
        let auth = self.group()?.epoch_authenticator()?;
        Ok(verify::epoch_code(auth.as_bytes()))
    }

    /// The safety number between this device and the member at `leaf`.
    pub fn safety_number_with(&self, leaf: u32) -> Result<String, AgentError> {
        let other = self
            .group()?
            .member_at_index(leaf)
            .ok_or(AgentError::NoSuchMember(leaf))?;
        let their_user = match Principal::of(&other.signing_identity)? {
            Principal::Member { user_id, .. } => user_id,
            Principal::Server { .. } => {
                return Err(AgentError::Identity(
                    conclave_protocol::mls::IdentityError::Invalid,
                ));
            }
        };
        let my_user = match self.identity.principal() {
            Principal::Member { user_id, .. } => user_id.clone(),
            Principal::Server { .. } => {
                return Err(AgentError::Identity(
                    conclave_protocol::mls::IdentityError::Invalid,
                ));
            }
        };
        Ok(verify::safety_number(
            &my_user,
            self.identity.public_key(),
            &their_user,
            other.signing_identity.signature_key.as_bytes(),
        ))
    }

    /// Frame protection for this member.
    pub fn crypto(&mut self) -> &mut CallCrypto {
        &mut self.crypto
    }
}

/// Every member's leaf index and signature key, in leaf order.
fn leaf_keys(group: &Group<MlsConfig>) -> Vec<(u32, Vec<u8>)> {
    group
        .roster()
        .members_iter()
        .map(|m| {
            (
                m.index,
                m.signing_identity.signature_key.as_bytes().to_vec(),
            )
        })
        .collect()
}

/// Leaves added (new, or a new key on a reused leaf) and removed between two
/// leaf-ordered rosters: one merge, O(N) (a 500-member call diffs on every commit).
fn roster_change(before: &[(u32, Vec<u8>)], after: &[(u32, Vec<u8>)]) -> (Vec<u32>, Vec<u32>) {
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    let (mut b, mut a) = (before.iter().peekable(), after.iter().peekable());
    loop {
        match (b.peek(), a.peek()) {
            (Some(x), Some(y)) if x.0 == y.0 => {
                if x.1 != y.1 {
                    added.push(y.0);
                }
                b.next();
                a.next();
            }
            (Some(x), Some(y)) if x.0 < y.0 => {
                removed.push(x.0);
                b.next();
            }
            (_, Some(y)) => {
                added.push(y.0);
                a.next();
            }
            (Some(x), None) => {
                removed.push(x.0);
                b.next();
            }
            (None, None) => return (added, removed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::roster_change;

    #[test]
    fn roster_change_finds_added_removed_and_reused_leaves() {
        let k = |b: u8| vec![b; 4];
        let before = [(0, k(1)), (1, k(2)), (2, k(3)), (4, k(5))];
        // 1 left, 2 was re-filled by someone else, 3 and 5 are new, 4 left.
        let after = [(0, k(1)), (2, k(9)), (3, k(4)), (5, k(6))];
        assert_eq!(roster_change(&before, &after), (vec![2, 3, 5], vec![1, 4]));
        assert_eq!(roster_change(&before, &before), (vec![], vec![]));
        assert_eq!(roster_change(&[], &before[..2]), (vec![0, 1], vec![]));
    }
}
