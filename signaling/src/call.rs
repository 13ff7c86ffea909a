//! One call's state machine: membership, the MLS delivery service, commit
//! ordering, batching and epoch readiness.
//!
//! Pure logic: every input carries `now` and returns the messages to send,
//! so the whole protocol is testable without sockets. The async side
//! ([`crate::hub`]) owns one of these per call in a task and delivers the
//! output.
//!
//! Flow: the first joiner is asked to create the group (`create_group`) and
//! uploads its GroupInfo. Later joins and leaves are queued; when the batch
//! window has passed and no commit is in flight, the server signs one
//! external proposal per change, relays them to every member and asks one
//! committer (the longest-present member) to commit. The first valid commit
//! for the epoch is accepted and relayed; the Welcome goes only to the
//! joiners. When every member has acknowledged the new epoch (or the ack
//! timeout passes) everyone is told `epoch_ready` and switches sending keys.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use conclave_protocol::mls::{DeliveryGroup, DsError, Identity, KeyPackageInfo, Principal};
use conclave_protocol::signal::{
    Bytes, DeviceRef, ErrorCode, MediaSource, RemovalReason, RosterMember, ServerMessage,
};

/// A client session's id, unique for the server's lifetime.
pub type SessionId = u64;

/// Timing and size settings of calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallConfig {
    /// How long joins are collected before one commit, in a call of up to
    /// [`BATCH_STEP_MEMBERS`] members; larger calls wait longer (see
    /// [`CallConfig::join_window`]).
    pub batch_window: Duration,
    /// The longest a large call collects joins before one commit.
    pub max_batch_window: Duration,
    /// The window when the batch holds only removals (leaves, removals by
    /// an administrator): short, because a removed member keeps the keys
    /// until the commit. Joins in the same batch do not delay it.
    pub removal_window: Duration,
    /// How long a committer has before another member is asked.
    pub commit_timeout: Duration,
    /// How long to wait for every member's ack before `epoch_ready`.
    pub ack_timeout: Duration,
    /// How long the first member has to upload its GroupInfo.
    pub create_timeout: Duration,
    /// How long a call of at least [`HEAL_MIN_MEMBERS`] must be quiet (the
    /// epoch ready, nothing queued) before the server asks a member with a
    /// blank path to heal the ratchet tree; `None` never heals.
    pub heal_after: Option<Duration>,
}

/// Each started run of this many members in a call adds `batch_window` to
/// its join window.
pub const BATCH_STEP_MEMBERS: usize = 50;

/// Calls smaller than this are not healed: their commits are small anyway.
pub const HEAL_MIN_MEMBERS: usize = 16;

/// Healing stops once every run of `1 << HEAL_UNIT_BITS` adjacent leaves has
/// a member whose path is set: that fills every parent node from two levels
/// above the leaves up, so a commit encrypts to at most 3 leaves below that
/// and one node per level above (at 500 members, about 10 HPKE ciphertexts
/// instead of up to 499), for about N/4 healing commits after a join storm.
/// Runs of 8 took half the healing commits but left commits about 4
/// ciphertexts (330 bytes per member) larger in the worst places.
const HEAL_UNIT_BITS: u32 = 2;

impl CallConfig {
    /// How long a call of `members` collects joins before one commit:
    /// `batch_window` for each started [`BATCH_STEP_MEMBERS`] members, up
    /// to `max_batch_window`. Every member processes every commit, so the
    /// call's total cost of a commit grows with its size; a longer window
    /// puts more joins in each commit (and publishers send one round of key
    /// frames for them). At 500 members that is 2 s instead of 200 ms.
    /// Removals do not wait for it (`removal_window`).
    pub fn join_window(&self, members: usize) -> Duration {
        let steps = u32::try_from(members.div_ceil(BATCH_STEP_MEMBERS).max(1)).unwrap_or(u32::MAX);
        self.batch_window
            .saturating_mul(steps)
            .min(self.max_batch_window.max(self.batch_window))
    }
}

impl Default for CallConfig {
    fn default() -> Self {
        Self {
            batch_window: Duration::from_millis(200),
            max_batch_window: Duration::from_secs(2),
            removal_window: Duration::from_millis(20),
            commit_timeout: Duration::from_secs(5),
            ack_timeout: Duration::from_secs(2),
            create_timeout: Duration::from_secs(10),
            heal_after: Some(Duration::from_secs(1)),
        }
    }
}

/// The organisation's retention recorder, to be added to a call alongside
/// a joiner whose policy requires records: its live session and one of its
/// stored (single-use) key packages.
#[derive(Clone, Debug)]
pub struct RecorderSeat {
    /// The recorder's signaling session.
    pub session: SessionId,
    /// Its user id.
    pub user_id: String,
    /// Its display name.
    pub display_name: String,
    /// The device the key package belongs to.
    pub device_id: String,
    /// What the key package says.
    pub info: KeyPackageInfo,
    /// The key package.
    pub key_package: Vec<u8>,
}

/// What a joiner's policy allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JoinLimits {
    /// Largest call size the joiner may be part of.
    pub max_size: u32,
    /// Whether the joiner may start a call that has nobody in it.
    pub may_start: bool,
}

impl Default for JoinLimits {
    fn default() -> Self {
        Self {
            max_size: 500,
            may_start: true,
        }
    }
}

/// A message for one session.
#[derive(Clone, Debug, PartialEq)]
pub struct Outbound {
    /// The recipient.
    pub to: SessionId,
    /// The request id it answers, if any.
    pub reply_to: Option<u64>,
    /// The message; a message fanned out to many members is one allocation
    /// they all point at (a roster of N members to N members is O(N), not
    /// O(N²), in memory and in the driver's encoding).
    pub msg: Arc<ServerMessage>,
}

/// What a call tells its driver besides messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallEvent {
    /// Every member holds `epoch` (`epoch_ready` went out); `added`: the
    /// epoch brought in new members, who need key frames under its keys.
    EpochReady {
        /// The epoch.
        epoch: u64,
        /// Whether it added members.
        added: bool,
        /// Members that had not acked it: declared ready at the ack timeout.
        late: usize,
    },
    /// The group moved to a new epoch.
    EpochChanged {
        /// The new epoch.
        epoch: u64,
        /// Time from the first queued change to the accepted commit.
        commit_latency: Duration,
        /// Bytes of MLS handshake sent for this rekey.
        fanout_bytes: usize,
        /// Members after the commit.
        members: usize,
        /// The commit removed members.
        removed: bool,
        /// An empty commit that healed the ratchet tree.
        healed: bool,
    },
    /// A session is no longer in the call and should be told so.
    SessionLeft(SessionId),
    /// The group was created by this user.
    Created {
        /// Creator.
        user_id: String,
        /// Creator's device.
        device_id: String,
    },
    /// A member entered the group.
    MemberJoined {
        /// User.
        user_id: String,
        /// Device.
        device_id: String,
    },
    /// A member left the group.
    MemberLeft {
        /// User.
        user_id: String,
        /// Device.
        device_id: String,
        /// Why.
        reason: RemovalReason,
    },
}

#[derive(Clone, Debug)]
struct Member {
    session: SessionId,
    principal: Principal,
    user_id: String,
    device_id: String,
    display_name: String,
    identity_key: Vec<u8>,
    key_package: Vec<u8>,
    leaf: Option<u32>,
    audio_muted: bool,
    video_muted: bool,
    /// Sources whose media reaches the SFU.
    publishing: Vec<MediaSource>,
    /// Added by the server as the retention recorder.
    recorder: bool,
    /// Leaving: removed at the next commit.
    leaving: Option<RemovalReason>,
    /// Has had the whole roster; `roster_update`s follow.
    has_roster: bool,
}

#[derive(Clone, Debug)]
enum Phase {
    /// Nobody has created the group yet.
    Empty,
    /// Waiting for the creator's GroupInfo.
    Creating {
        creator: SessionId,
        deadline: Instant,
    },
    /// The group exists; no commit in flight.
    Idle,
    /// Proposals sent; waiting for the committer.
    Committing {
        epoch: u64,
        committer: SessionId,
        deadline: Instant,
        tried: Vec<SessionId>,
        joiners: Vec<SessionId>,
        leavers: Vec<SessionId>,
        removed_leaf: Option<u32>,
        /// An empty commit to heal the tree, not a batch.
        heal: bool,
    },
}

struct AckWait {
    epoch: u64,
    /// The epoch added members: once it is ready, publishers send key frames.
    added: bool,
    /// The epoch removed members: no commit until it is ready (see
    /// [`Call::batch_may_commit`]).
    removed: bool,
    waiting: HashSet<SessionId>,
    deadline: Instant,
}

/// One call.
pub struct Call {
    call_id: String,
    group_id: Vec<u8>,
    config: CallConfig,
    server: Identity,
    ds: Option<DeliveryGroup>,
    /// In order of arrival: the first in-group member is the longest present.
    members: Vec<Member>,
    phase: Phase,
    batch_since: Option<Instant>,
    /// When the first removal in the pending batch was queued.
    removal_since: Option<Instant>,
    /// When the changes in the commit in flight were first queued.
    batch_started: Option<Instant>,
    /// Leaves with no session (a joiner that left while being added).
    orphans: Vec<u32>,
    acks: Option<AckWait>,
    commits: u64,
    /// Leaves that have committed since they joined: their direct paths in
    /// the ratchet tree are set.
    filled: HashSet<u32>,
    /// The roster as last sent: `roster_update`s carry what differs from it.
    sent_roster: Vec<RosterMember>,
    /// Since when nothing has been queued or in flight (the last epoch
    /// ready); `None` while anything is.
    quiet_since: Option<Instant>,
    /// Sessions that did not answer a heal request: not asked again.
    heal_refused: HashSet<SessionId>,
}

impl std::fmt::Debug for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Call")
            .field("call_id", &self.call_id)
            .field("members", &self.members.len())
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

/// A refused request: nothing changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Code for the client.
    pub code: ErrorCode,
    /// Explanation for a person.
    pub message: String,
}

impl Refusal {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

type Step = Result<(Vec<Outbound>, Vec<CallEvent>), Refusal>;

/// An order over `0..=max` that visits the tree top-down: each value's bits
/// reversed within the width of `max` (0, 4, 2, 6, 1, … for max 7), so
/// successive picks land in different halves, then quarters, and so on.
fn bit_reversal(max: Option<u32>) -> impl Fn(u32) -> u32 {
    let width = max.map_or(1, |m| (u32::BITS - m.leading_zeros()).max(1));
    move |v: u32| v.reverse_bits() >> (u32::BITS - width)
}

fn out(to: SessionId, msg: impl Into<Arc<ServerMessage>>) -> Outbound {
    Outbound {
        to,
        reply_to: None,
        msg: msg.into(),
    }
}

fn message_len(msg: &ServerMessage) -> usize {
    match msg {
        ServerMessage::Proposal { message, .. }
        | ServerMessage::Commit { message, .. }
        | ServerMessage::Welcome { message, .. } => message.0.len(),
        _ => 0,
    }
}

impl Call {
    /// A new, empty call.
    pub fn new(call_id: String, group_id: Vec<u8>, server: Identity, config: CallConfig) -> Self {
        Self {
            call_id,
            group_id,
            config,
            server,
            ds: None,
            members: Vec::new(),
            phase: Phase::Empty,
            batch_since: None,
            removal_since: None,
            batch_started: None,
            orphans: Vec::new(),
            acks: None,
            commits: 0,
            filled: HashSet::new(),
            sent_roster: Vec::new(),
            quiet_since: None,
            heal_refused: HashSet::new(),
        }
    }

    /// The call's id.
    pub fn id(&self) -> &str {
        &self.call_id
    }

    /// Sessions in the call (joined or joining).
    pub fn sessions(&self) -> Vec<SessionId> {
        self.members.iter().map(|m| m.session).collect()
    }

    /// Number of members (joined or joining).
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether nobody is in the call.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The group's epoch (0 before the group exists).
    pub fn epoch(&self) -> u64 {
        self.ds.as_ref().map_or(0, DeliveryGroup::epoch)
    }

    /// Commits accepted so far.
    pub fn commits(&self) -> u64 {
        self.commits
    }

    /// Sessions of a user in this call.
    pub fn sessions_of(&self, user_id: &str) -> Vec<SessionId> {
        self.members
            .iter()
            .filter(|m| m.user_id == user_id)
            .map(|m| m.session)
            .collect()
    }

    fn member(&self, session: SessionId) -> Option<&Member> {
        self.members.iter().find(|m| m.session == session)
    }

    fn member_mut(&mut self, session: SessionId) -> Option<&mut Member> {
        self.members.iter_mut().find(|m| m.session == session)
    }

    fn in_group(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().filter(|m| m.leaf.is_some())
    }

    /// Everyone in the call, as the roster shows them.
    fn roster_members(&self) -> Vec<RosterMember> {
        self.members
            .iter()
            .filter(|m| m.leaving.is_none())
            .map(|m| RosterMember {
                user_id: m.user_id.clone(),
                device_id: m.device_id.clone(),
                display_name: m.display_name.clone(),
                leaf: m.leaf,
                identity_key: Bytes(m.identity_key.clone()),
                audio_muted: m.audio_muted,
                video_muted: m.video_muted,
                publishing: m.publishing.clone(),
                recorder: m.recorder,
            })
            .collect()
    }

    /// The roster to every member: whole to those who have not had it yet,
    /// and to the others only what changed since it last went out (in a
    /// 500-member call a mute toggle is one entry, not 500).
    fn roster_out(&mut self) -> Vec<Outbound> {
        let now = self.roster_members();
        let before: HashMap<(&str, &str), &RosterMember> = self
            .sent_roster
            .iter()
            .map(|m| ((m.user_id.as_str(), m.device_id.as_str()), m))
            .collect();
        let changed: Vec<RosterMember> = now
            .iter()
            .filter(|m| before.get(&(m.user_id.as_str(), m.device_id.as_str())) != Some(m))
            .cloned()
            .collect();
        let present: HashSet<(&str, &str)> = now
            .iter()
            .map(|m| (m.user_id.as_str(), m.device_id.as_str()))
            .collect();
        let gone: Vec<DeviceRef> = self
            .sent_roster
            .iter()
            .filter(|m| !present.contains(&(m.user_id.as_str(), m.device_id.as_str())))
            .map(|m| DeviceRef {
                user_id: m.user_id.clone(),
                device_id: m.device_id.clone(),
            })
            .collect();
        let epoch = self.epoch();
        let update = (!changed.is_empty() || !gone.is_empty()).then(|| {
            Arc::new(ServerMessage::RosterUpdate {
                call_id: self.call_id.clone(),
                epoch,
                changed,
                gone,
            })
        });
        let mut whole = None;
        let mut msgs = Vec::with_capacity(self.members.len());
        for m in &mut self.members {
            if !m.has_roster {
                m.has_roster = true;
                let w = whole.get_or_insert_with(|| {
                    Arc::new(ServerMessage::Roster {
                        call_id: self.call_id.clone(),
                        epoch,
                        members: now.clone(),
                    })
                });
                msgs.push(out(m.session, w.clone()));
            } else if let Some(u) = &update {
                msgs.push(out(m.session, u.clone()));
            }
        }
        self.sent_roster = now;
        msgs
    }

    /// A session asks to join with a validated key package.
    #[allow(clippy::too_many_arguments)]
    pub fn join(
        &mut self,
        session: SessionId,
        user_id: &str,
        device_id: &str,
        display_name: &str,
        kp: KeyPackageInfo,
        key_package: Vec<u8>,
        limits: JoinLimits,
        recorder: Option<RecorderSeat>,
        now: Instant,
    ) -> Step {
        let principal = Principal::member(user_id, device_id)
            .map_err(|_| Refusal::new(ErrorCode::BadRequest, "invalid user or device id"))?;
        if kp.principal != principal {
            return Err(Refusal::new(
                ErrorCode::Forbidden,
                "the key package's credential names another user or device",
            ));
        }
        if self.members.iter().any(|m| m.session == session) {
            return Err(Refusal::new(ErrorCode::BadRequest, "already in this call"));
        }
        if matches!(self.phase, Phase::Empty) && !limits.may_start {
            return Err(Refusal::new(
                ErrorCode::Forbidden,
                "your security group may not start calls, and this call has not started",
            ));
        }
        let present = self.members.iter().filter(|m| m.leaving.is_none()).count();
        if present + 1 > limits.max_size as usize {
            return Err(Refusal::new(
                ErrorCode::CallFull,
                format!(
                    "the call is full for you (limit {} participants)",
                    limits.max_size
                ),
            ));
        }
        if self
            .members
            .iter()
            .any(|m| m.principal == principal && m.leaving.is_none())
        {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                "this device is already in the call from another session",
            ));
        }
        self.members.push(Member {
            session,
            principal,
            user_id: user_id.to_owned(),
            device_id: device_id.to_owned(),
            display_name: display_name.to_owned(),
            identity_key: kp.identity_key,
            key_package,
            leaf: None,
            audio_muted: false,
            video_muted: false,
            publishing: Vec::new(),
            recorder: false,
            leaving: None,
            has_roster: false,
        });
        let mut msgs = vec![out(
            session,
            ServerMessage::Joined {
                call_id: self.call_id.clone(),
            },
        )];
        if let Some(seat) = recorder {
            msgs.extend(self.seat_recorder(seat));
        }
        if matches!(self.phase, Phase::Empty) {
            msgs.extend(self.start_creation(session, now));
        } else {
            self.batch_since.get_or_insert(now);
        }
        Ok((msgs, Vec::new()))
    }

    /// Adds the retention recorder as a member (Add proposed in the next
    /// batch, or right after the group is created), unless it is already in.
    fn seat_recorder(&mut self, seat: RecorderSeat) -> Vec<Outbound> {
        let Ok(principal) = Principal::member(&seat.user_id, &seat.device_id) else {
            return Vec::new();
        };
        let present = self.members.iter().any(|m| {
            m.leaving.is_none()
                && (m.recorder || m.principal == principal || m.session == seat.session)
        });
        if present || seat.info.principal != principal {
            return Vec::new();
        }
        self.members.push(Member {
            session: seat.session,
            principal,
            user_id: seat.user_id,
            device_id: seat.device_id,
            display_name: seat.display_name,
            identity_key: seat.info.identity_key,
            key_package: seat.key_package,
            leaf: None,
            audio_muted: true,
            video_muted: true,
            publishing: Vec::new(),
            recorder: true,
            leaving: None,
            has_roster: false,
        });
        vec![out(
            seat.session,
            ServerMessage::Joined {
                call_id: self.call_id.clone(),
            },
        )]
    }

    /// Whether the retention recorder is (or is being added) in the call.
    pub fn has_recorder(&self) -> bool {
        self.members
            .iter()
            .any(|m| m.recorder && m.leaving.is_none())
    }

    fn start_creation(&mut self, creator: SessionId, now: Instant) -> Vec<Outbound> {
        self.phase = Phase::Creating {
            creator,
            deadline: now + self.config.create_timeout,
        };
        vec![out(
            creator,
            ServerMessage::CreateGroup {
                call_id: self.call_id.clone(),
                group_id: Bytes(self.group_id.clone()),
            },
        )]
    }

    /// The creator uploads its group's GroupInfo.
    pub fn group_created(&mut self, session: SessionId, group_info: &[u8], now: Instant) -> Step {
        let Phase::Creating { creator, .. } = self.phase else {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                "the group already exists",
            ));
        };
        if creator != session {
            return Err(Refusal::new(
                ErrorCode::Forbidden,
                "not asked to create the group",
            ));
        }
        let ds = DeliveryGroup::observe(&self.server, group_info)
            .map_err(|e| Refusal::new(ErrorCode::InvalidMls, format!("group info: {e}")))?;
        let principal = self
            .member(session)
            .map(|m| m.principal.clone())
            .ok_or_else(|| Refusal::new(ErrorCode::NotFound, "not in this call"))?;
        if ds.epoch() != 0 || ds.members() != vec![(0, principal)] {
            return Err(Refusal::new(
                ErrorCode::InvalidMls,
                "the new group must hold exactly its creator at epoch 0",
            ));
        }
        if ds.group_id() != self.group_id.as_slice() {
            return Err(Refusal::new(ErrorCode::InvalidMls, "wrong group id"));
        }
        if !ds.has_external_sender(&self.server) {
            return Err(Refusal::new(
                ErrorCode::InvalidMls,
                "the group must name this server as its external sender",
            ));
        }
        self.ds = Some(ds);
        let mut events = Vec::new();
        if let Some(m) = self.member_mut(session) {
            m.leaf = Some(0);
            events.push(CallEvent::Created {
                user_id: m.user_id.clone(),
                device_id: m.device_id.clone(),
            });
        }
        self.phase = Phase::Idle;
        if self.members.len() > 1 {
            self.batch_since.get_or_insert(now);
        }
        Ok((self.roster_out(), events))
    }

    /// A member (or joiner) leaves, by choice, removal or disconnection.
    pub fn leave(&mut self, session: SessionId, reason: RemovalReason, now: Instant) -> Step {
        let Some(idx) = self.members.iter().position(|m| m.session == session) else {
            return Err(Refusal::new(ErrorCode::NotFound, "not in this call"));
        };
        let mut msgs = Vec::new();
        let mut events = vec![CallEvent::SessionLeft(session)];
        let notice = ServerMessage::Removed {
            call_id: self.call_id.clone(),
            reason,
        };
        if self.members[idx].leaf.is_none() {
            // Not in the group yet: just forget it (a commit adding it will be rebuilt).
            self.members.remove(idx);
            msgs.push(out(session, notice));
            if let Phase::Creating { creator, .. } = self.phase
                && creator == session
            {
                self.phase = Phase::Empty;
                if let Some(next) = self.members.first().map(|m| m.session) {
                    msgs.extend(self.start_creation(next, now));
                }
            }
            if let Phase::Committing { joiners, .. } = &mut self.phase {
                joiners.retain(|s| *s != session);
            }
        } else {
            if self.members[idx].leaving.is_some() {
                return Ok((msgs, Vec::new()));
            }
            self.members[idx].leaving = Some(reason);
            msgs.push(out(session, notice));
            self.batch_since.get_or_insert(now);
            self.removal_since.get_or_insert(now);
            // A committer that leaves is replaced now.
            if let Phase::Committing { committer, .. } = self.phase
                && committer == session
            {
                msgs.extend(self.redesignate(now));
            }
        }
        if self.in_group().all(|m| m.leaving.is_some())
            && !matches!(self.phase, Phase::Creating { .. })
        {
            // Nobody left to hold the group: the call ends; joiners start over.
            for m in self.members.iter().filter(|m| m.leaf.is_some()) {
                if m.session != session {
                    events.push(CallEvent::SessionLeft(m.session));
                }
                events.push(CallEvent::MemberLeft {
                    user_id: m.user_id.clone(),
                    device_id: m.device_id.clone(),
                    reason: m.leaving.unwrap_or(reason),
                });
            }
            self.members.retain(|m| m.leaf.is_none());
            self.ds = None;
            self.acks = None;
            self.phase = Phase::Empty;
            self.batch_since = None;
            self.removal_since = None;
            if let Some(next) = self.members.first().map(|m| m.session) {
                msgs.extend(self.start_creation(next, now));
            }
        }
        msgs.extend(self.roster_out());
        Ok((msgs, events))
    }

    /// The committer's commit for `epoch`.
    pub fn commit(
        &mut self,
        session: SessionId,
        epoch: u64,
        commit: &[u8],
        welcome: Option<&[u8]>,
        now: Instant,
    ) -> Step {
        let current = self.epoch();
        let Phase::Committing {
            epoch: want,
            committer,
            ref joiners,
            ref leavers,
            ..
        } = self.phase
        else {
            let code = if epoch < current {
                ErrorCode::StaleEpoch
            } else {
                ErrorCode::NotCommitter
            };
            return Err(Refusal::new(code, "no commit is expected now"));
        };
        if epoch != want {
            return Err(Refusal::new(
                ErrorCode::StaleEpoch,
                format!("the group is at epoch {want}"),
            ));
        }
        if session != committer {
            return Err(Refusal::new(
                ErrorCode::NotCommitter,
                "another member is the committer for this epoch",
            ));
        }
        let joiners = joiners.clone();
        let leavers = leavers.clone();
        let ds = self
            .ds
            .as_mut()
            .ok_or_else(|| Refusal::new(ErrorCode::Internal, "no group"))?;
        let before: HashSet<Principal> = ds.members().into_iter().map(|(_, p)| p).collect();
        let accepted = ds.accept_commit(commit).map_err(|e| match e {
            DsError::StaleEpoch { .. } => Refusal::new(ErrorCode::StaleEpoch, e.to_string()),
            other => Refusal::new(ErrorCode::InvalidMls, other.to_string()),
        })?;
        self.commits += 1;
        let new_epoch = accepted.epoch;

        // Who is in the group now.
        let leaves = ds.members();
        let leaf_of: HashMap<&Principal, u32> = leaves.iter().map(|(l, p)| (p, *l)).collect();
        let removed_any = before.iter().any(|p| !leaf_of.contains_key(p));
        let joiner_set: HashSet<SessionId> = joiners.iter().copied().collect();
        let mut added = Vec::new();
        for m in &mut self.members {
            let leaf = leaf_of.get(&m.principal).copied();
            let joining = joiner_set.contains(&m.session);
            if m.leaf.is_none() && leaf.is_some() && joining {
                added.push(m.session);
            }
            if m.leaf.is_some() || joining {
                m.leaf = leaf;
            }
        }
        // The committer's path is now set; new or vacated leaves have none.
        let present: HashSet<u32> = leaves.iter().map(|(l, _)| *l).collect();
        self.filled.retain(|l| present.contains(l));
        let added_set: HashSet<SessionId> = added.iter().copied().collect();
        for m in self
            .members
            .iter()
            .filter(|m| added_set.contains(&m.session))
        {
            if let Some(l) = m.leaf {
                self.filled.remove(&l);
            }
        }
        self.filled.insert(accepted.committer);
        self.orphans = leaves
            .iter()
            .filter(|(_, p)| !self.members.iter().any(|m| m.principal == *p))
            .map(|(l, _)| *l)
            .collect();
        let gone: Vec<SessionId> = self
            .members
            .iter()
            .filter(|m| leavers.contains(&m.session) && m.leaf.is_none())
            .map(|m| m.session)
            .collect();

        let mut msgs = Vec::new();
        let commit_msg = Arc::new(ServerMessage::Commit {
            call_id: self.call_id.clone(),
            epoch,
            message: Bytes(commit.to_vec()),
        });
        // Every previous member gets the commit, the removed ones included
        // (so an honest client drops its keys at once).
        for m in &self.members {
            if !added_set.contains(&m.session) && (m.leaf.is_some() || gone.contains(&m.session)) {
                msgs.push(out(m.session, commit_msg.clone()));
            }
        }
        if let Some(w) = welcome {
            let welcome_msg = Arc::new(ServerMessage::Welcome {
                call_id: self.call_id.clone(),
                epoch: new_epoch,
                message: Bytes(w.to_vec()),
            });
            for s in &added {
                msgs.push(out(*s, welcome_msg.clone()));
            }
        }
        let mut events = Vec::new();
        for m in &self.members {
            if added_set.contains(&m.session) {
                events.push(CallEvent::MemberJoined {
                    user_id: m.user_id.clone(),
                    device_id: m.device_id.clone(),
                });
            }
            if gone.contains(&m.session) {
                events.push(CallEvent::MemberLeft {
                    user_id: m.user_id.clone(),
                    device_id: m.device_id.clone(),
                    reason: m.leaving.unwrap_or(RemovalReason::Left),
                });
            }
        }
        for s in &gone {
            events.push(CallEvent::SessionLeft(*s));
        }
        self.members.retain(|m| !gone.contains(&m.session));
        // Joiners the commit left out and leavers still present go to the next batch.
        self.requeue(now);

        let fanout: usize = msgs.iter().map(|o| message_len(&o.msg)).sum();
        let healed = matches!(self.phase, Phase::Committing { heal: true, .. });
        events.push(CallEvent::EpochChanged {
            epoch: new_epoch,
            commit_latency: self
                .batch_started
                .map_or(Duration::ZERO, |t| now.saturating_duration_since(t)),
            fanout_bytes: fanout,
            members: self.in_group().count(),
            removed: removed_any,
            healed,
        });
        self.batch_started = None;
        self.phase = Phase::Idle;
        self.acks = Some(AckWait {
            epoch: new_epoch,
            added: !added.is_empty(),
            removed: removed_any,
            waiting: self.in_group().map(|m| m.session).collect(),
            deadline: now + self.config.ack_timeout,
        });
        msgs.extend(self.roster_out());
        // More changes may already be waiting.
        let (m, e) = self.tick(now);
        msgs.extend(m);
        events.extend(e);
        Ok((msgs, events))
    }

    /// A member holds `epoch`.
    pub fn epoch_ack(&mut self, session: SessionId, epoch: u64, now: Instant) -> Step {
        let done = match &mut self.acks {
            Some(w) if epoch >= w.epoch => {
                w.waiting.remove(&session);
                w.waiting.is_empty()
            }
            _ => false,
        };
        if done {
            return Ok(self.epoch_ready(now));
        }
        Ok((Vec::new(), Vec::new()))
    }

    fn epoch_ready(&mut self, now: Instant) -> (Vec<Outbound>, Vec<CallEvent>) {
        let Some(w) = self.acks.take() else {
            return (Vec::new(), Vec::new());
        };
        self.quiet_since = Some(now);
        let msg = Arc::new(ServerMessage::EpochReady {
            call_id: self.call_id.clone(),
            epoch: w.epoch,
        });
        let msgs = self
            .in_group()
            .map(|m| out(m.session, msg.clone()))
            .collect();
        (
            msgs,
            vec![CallEvent::EpochReady {
                epoch: w.epoch,
                added: w.added,
                late: w.waiting.len(),
            }],
        )
    }

    /// Mute state changes.
    pub fn set_mute(&mut self, session: SessionId, audio: bool, video: bool) -> Step {
        let m = self
            .member_mut(session)
            .ok_or_else(|| Refusal::new(ErrorCode::NotFound, "not in this call"))?;
        m.audio_muted = audio;
        m.video_muted = video;
        Ok((self.roster_out(), Vec::new()))
    }

    /// A member's source started reaching the SFU (`Some`), or its media
    /// connection closed (`None`). The roster goes out if anything changed.
    pub fn set_publishing(&mut self, session: SessionId, source: Option<MediaSource>) -> Step {
        let m = self
            .member_mut(session)
            .ok_or_else(|| Refusal::new(ErrorCode::NotFound, "not in this call"))?;
        let changed = match source {
            Some(s) if !m.publishing.contains(&s) => {
                m.publishing.push(s);
                m.publishing.sort_by_key(|s| *s as u8);
                true
            }
            Some(_) => false,
            None => {
                let had = !m.publishing.is_empty();
                m.publishing.clear();
                had
            }
        };
        if !changed {
            return Ok((Vec::new(), Vec::new()));
        }
        Ok((self.roster_out(), Vec::new()))
    }

    /// The SFU heard a new dominant speaker. Only the call's members hear of
    /// it: a session whose join is still queued, or was refused, never got
    /// `joined` and learns nothing about the call. A speaker who is not (or
    /// no longer) a member is not announced.
    pub fn active_speaker(&self, user_id: &str, device_id: &str) -> Vec<Outbound> {
        let speaking = self
            .members
            .iter()
            .any(|m| m.leaving.is_none() && m.user_id == user_id && m.device_id == device_id);
        if !speaking {
            return Vec::new();
        }
        let msg = Arc::new(ServerMessage::ActiveSpeaker {
            call_id: self.call_id.clone(),
            user_id: user_id.to_owned(),
            device_id: device_id.to_owned(),
        });
        self.members
            .iter()
            .filter(|m| m.leaving.is_none())
            .map(|m| out(m.session, msg.clone()))
            .collect()
    }

    /// Starts a new batch now with what a commit left out (or what a commit
    /// nobody made would have held): joiners not added, leavers still in
    /// the group.
    fn requeue(&mut self, now: Instant) {
        let removals = self.removals_pending();
        let joins = self.members.iter().any(|m| m.leaf.is_none());
        if removals || joins {
            self.batch_since = Some(now);
        }
        self.removal_since = removals.then_some(now);
    }

    /// Members to remove from the group: leavers still in it, and leaves
    /// whose session is gone.
    fn removals_pending(&self) -> bool {
        !self.orphans.is_empty()
            || self
                .members
                .iter()
                .any(|m| m.leaf.is_some() && m.leaving.is_some())
    }

    /// Whether the pending batch may be committed now, as far as the epoch
    /// awaiting acks goes. Senders switch keys only at `epoch_ready`, and
    /// once the group is past a commit that removed members the SFU stops
    /// forwarding the epochs they held. A commit on top of an epoch that is
    /// not ready yet can therefore end the epoch senders still use, and the
    /// whole call goes silent until the next `epoch_ready`. So a batch waits
    /// while the epoch awaiting acks removed members, and a batch that
    /// removes members waits while any epoch awaits acks: at most
    /// `ack_timeout`. Joins alone still commit faster than acks.
    fn batch_may_commit(&self) -> bool {
        match &self.acks {
            None => true,
            Some(w) => !w.removed && !self.removals_pending(),
        }
    }

    /// When the pending batch is due: the join window after its first
    /// change, or `removal_window` after its first removal if that is
    /// sooner (a removed member keeps the keys until the commit).
    fn batch_due_at(&self) -> Option<Instant> {
        let since = self.batch_since?;
        let joins = self
            .members
            .iter()
            .any(|m| m.leaf.is_none() && m.leaving.is_none());
        let join_window = self.config.join_window(self.in_group().count());
        let removal_window = self.config.removal_window.min(join_window);
        let joins_due = joins.then(|| since + join_window);
        let removals_due = self.removal_since.map(|t| t + removal_window);
        joins_due
            .into_iter()
            .chain(removals_due)
            .min()
            .or(Some(since + removal_window))
    }

    /// When the call next needs [`Call::tick`].
    ///
    /// A batch only counts while the call is idle: joins and leaves that
    /// arrive while the group is being created or a commit is in flight wait
    /// for it, and [`Call::tick`] would do nothing for them. Counting them
    /// anyway put a deadline in the past that no tick moved, and the call's
    /// task spun on it until the commit landed.
    pub fn next_deadline(&self) -> Option<Instant> {
        let batch = match self.phase {
            Phase::Idle if self.batch_may_commit() => self.batch_due_at(),
            _ => None,
        };
        let phase = match &self.phase {
            Phase::Creating { deadline, .. } | Phase::Committing { deadline, .. } => {
                Some(*deadline)
            }
            _ => None,
        };
        let ack = self.acks.as_ref().map(|a| a.deadline);
        let heal = self.heal_due_at();
        [batch, phase, ack, heal].into_iter().flatten().min()
    }

    /// Runs timers: starts a batch commit, replaces a silent committer or
    /// creator, or declares an epoch ready after the ack timeout.
    pub fn tick(&mut self, now: Instant) -> (Vec<Outbound>, Vec<CallEvent>) {
        let mut msgs = Vec::new();
        let mut events = Vec::new();
        if self.acks.as_ref().is_some_and(|a| now >= a.deadline) {
            let (m, e) = self.epoch_ready(now);
            msgs.extend(m);
            events.extend(e);
        }
        match self.phase.clone() {
            Phase::Creating { creator, deadline } if now >= deadline => {
                // The creator never answered: drop it and ask the next joiner.
                if let Ok((m, e)) = self.leave(creator, RemovalReason::Disconnected, now) {
                    msgs.extend(m);
                    events.extend(e);
                }
            }
            Phase::Committing { deadline, .. } if now >= deadline => {
                msgs.extend(self.redesignate(now));
            }
            Phase::Idle => {
                if self.batch_may_commit() && self.batch_due_at().is_some_and(|t| now >= t) {
                    msgs.extend(self.start_commit(now));
                } else if self.heal_due_at().is_some_and(|t| now >= t) {
                    msgs.extend(self.start_heal(now));
                }
            }
            _ => {}
        }
        (msgs, events)
    }

    /// Who commits the next batch. The choice keeps the ratchet tree dense,
    /// so commits stay O(log N) bytes instead of O(N):
    ///
    /// - a batch that removes members goes to the member nearest the first
    ///   removed leaf (the smallest XOR of leaf indices, i.e. the deepest
    ///   common subtree): a Remove blanks the removed leaf's direct path and
    ///   the committer's own path re-fills almost all of it;
    /// - a join-only batch goes to a member whose path is still blank, taking
    ///   leaves in bit-reversed order so successive commits fill the top of
    ///   the tree first (after a join storm every parent node is blank);
    /// - otherwise the longest-present member.
    fn pick_committer(&self, tried: &[SessionId], removed: Option<u32>) -> Option<SessionId> {
        let candidates: Vec<&Member> = self
            .in_group()
            .filter(|m| m.leaving.is_none() && !tried.contains(&m.session))
            .collect();
        let leaf = |m: &&&Member| m.leaf.unwrap_or(u32::MAX);
        if let Some(r) = removed {
            return candidates
                .iter()
                .min_by_key(|m| leaf(m) ^ r)
                .map(|m| m.session);
        }
        let spread = bit_reversal(candidates.iter().filter_map(|m| m.leaf).max());
        candidates
            .iter()
            .filter(|m| m.leaf.is_some_and(|l| !self.filled.contains(&l)))
            .min_by_key(|m| m.leaf.map(&spread))
            .or(candidates.first())
            .map(|m| m.session)
    }

    fn start_commit(&mut self, now: Instant) -> Vec<Outbound> {
        let joiners: Vec<SessionId> = self
            .members
            .iter()
            .filter(|m| m.leaf.is_none())
            .map(|m| m.session)
            .collect();
        let leavers: Vec<(SessionId, u32)> = self
            .members
            .iter()
            .filter_map(|m| m.leaving.and(m.leaf).map(|l| (m.session, l)))
            .collect();
        if joiners.is_empty() && leavers.is_empty() && self.orphans.is_empty() {
            self.batch_since = None;
            self.removal_since = None;
            return Vec::new();
        }
        let first_removed = leavers
            .first()
            .map(|(_, l)| *l)
            .or(self.orphans.first().copied());
        let Some(committer) = self.pick_committer(&[], first_removed) else {
            return Vec::new();
        };
        let Some(ds) = self.ds.as_mut() else {
            return Vec::new();
        };
        let epoch = ds.epoch();
        let mut proposals = Vec::new();
        let mut msgs = Vec::new();
        for leaf in leavers
            .iter()
            .map(|(_, l)| *l)
            .chain(self.orphans.iter().copied())
        {
            if let Ok(p) = ds.propose_remove(leaf) {
                proposals.push(p);
            }
        }
        let mut accepted_joiners = Vec::new();
        for s in &joiners {
            let Some(m) = self.members.iter().find(|m| m.session == *s) else {
                continue;
            };
            match ds.propose_add(&m.key_package) {
                Ok(p) => {
                    proposals.push(p);
                    accepted_joiners.push(*s);
                }
                Err(e) => msgs.push(out(
                    *s,
                    ServerMessage::Error {
                        code: ErrorCode::InvalidMls,
                        message: format!("key package refused: {e}"),
                    },
                )),
            }
        }
        self.batch_started = self.batch_since.take();
        self.removal_since = None;
        let call_id = self.call_id.clone();
        // Leaving members get the proposals too, so an honest client can
        // process the commit that removes it and drop its keys at once.
        for m in self.in_group() {
            for p in &proposals {
                msgs.push(out(
                    m.session,
                    ServerMessage::Proposal {
                        call_id: call_id.clone(),
                        epoch,
                        message: Bytes(p.clone()),
                    },
                ));
            }
        }
        msgs.push(out(
            committer,
            ServerMessage::CommitRequest {
                call_id,
                epoch,
                heal: false,
            },
        ));
        self.phase = Phase::Committing {
            epoch,
            committer,
            deadline: now + self.config.commit_timeout,
            tried: vec![committer],
            joiners: accepted_joiners,
            leavers: leavers.into_iter().map(|(s, _)| s).collect(),
            removed_leaf: first_removed,
            heal: false,
        };
        self.quiet_since = None;
        msgs
    }

    /// The member to heal the tree next, if it needs it: the call is large
    /// enough, and some run of adjacent leaves has nobody whose path is set.
    /// Runs are taken in bit-reversed order, so the top of the tree fills
    /// first.
    fn heal_committer(&self) -> Option<SessionId> {
        let members: Vec<(u32, SessionId)> = self
            .in_group()
            .filter(|m| m.leaving.is_none())
            .filter_map(|m| m.leaf.map(|l| (l, m.session)))
            .collect();
        if members.len() < HEAL_MIN_MEMBERS {
            return None;
        }
        let covered: HashSet<u32> = self.filled.iter().map(|l| l >> HEAL_UNIT_BITS).collect();
        let spread = bit_reversal(members.iter().map(|(l, _)| l >> HEAL_UNIT_BITS).max());
        members
            .iter()
            .filter(|(l, s)| {
                !covered.contains(&(l >> HEAL_UNIT_BITS)) && !self.heal_refused.contains(s)
            })
            .min_by_key(|(l, _)| (spread(l >> HEAL_UNIT_BITS), *l))
            .map(|(_, s)| *s)
    }

    /// When the quiet call is due to heal the tree.
    fn heal_due_at(&self) -> Option<Instant> {
        let after = self.config.heal_after?;
        let since = self.quiet_since?;
        if !matches!(self.phase, Phase::Idle) || self.batch_since.is_some() || self.acks.is_some() {
            return None;
        }
        self.heal_committer().map(|_| since + after)
    }

    /// Asks one member for an empty commit that refills its path.
    fn start_heal(&mut self, now: Instant) -> Vec<Outbound> {
        let (Some(committer), Some(ds)) = (self.heal_committer(), self.ds.as_ref()) else {
            self.quiet_since = None;
            return Vec::new();
        };
        let epoch = ds.epoch();
        self.quiet_since = None;
        self.batch_started = Some(now);
        self.phase = Phase::Committing {
            epoch,
            committer,
            deadline: now + self.config.commit_timeout,
            tried: vec![committer],
            joiners: Vec::new(),
            leavers: Vec::new(),
            removed_leaf: None,
            heal: true,
        };
        vec![out(
            committer,
            ServerMessage::CommitRequest {
                call_id: self.call_id.clone(),
                epoch,
                heal: true,
            },
        )]
    }

    /// Asks the next member to commit the same proposals.
    fn redesignate(&mut self, now: Instant) -> Vec<Outbound> {
        let Phase::Committing {
            epoch,
            tried,
            removed_leaf,
            heal,
            committer,
            ..
        } = &self.phase
        else {
            return Vec::new();
        };
        if *heal {
            // Healing is optional: a member that does not answer is not
            // asked again, and the call carries on as it is.
            self.heal_refused.insert(*committer);
            self.phase = Phase::Idle;
            self.quiet_since = Some(now);
            return Vec::new();
        }
        let (epoch, tried, removed) = (*epoch, tried.clone(), *removed_leaf);
        let Some(next) = self.pick_committer(&tried, removed) else {
            // Nobody answered: start over with a fresh batch later.
            self.phase = Phase::Idle;
            self.requeue(now);
            return Vec::new();
        };
        if let Phase::Committing {
            committer,
            deadline,
            tried,
            ..
        } = &mut self.phase
        {
            *committer = next;
            *deadline = now + self.config.commit_timeout;
            tried.push(next);
        }
        vec![out(
            next,
            ServerMessage::CommitRequest {
                call_id: self.call_id.clone(),
                epoch,
                heal: false,
            },
        )]
    }
}

#[cfg(test)]
mod tests {
    use super::{Call, CallConfig, JoinLimits, bit_reversal};
    use conclave_protocol::mls::{Identity, KeyPackageInfo, Principal};
    use std::time::Instant;

    fn join(call: &mut Call, session: u64, user: &str, now: Instant) {
        let principal = Principal::member(user, "d1").expect("principal");
        let kp = KeyPackageInfo {
            principal,
            identity_key: vec![session as u8; 32],
        };
        call.join(
            session,
            user,
            "d1",
            user,
            kp,
            Vec::new(),
            JoinLimits::default(),
            None,
            now,
        )
        .expect("join");
    }

    /// A call whose first member (session 1) is creating the group while
    /// a second (session 2) waits to be added; and when they joined.
    fn alice_creating_and_bob_waiting() -> (Call, Instant) {
        let server = Identity::generate(Principal::server("conclave").expect("server"))
            .expect("server identity");
        let mut call = Call::new("c".into(), vec![7; 16], server, CallConfig::default());
        let t0 = Instant::now();
        join(&mut call, 1, "alice", t0);
        join(&mut call, 2, "bob", t0);
        (call, t0)
    }

    #[test]
    fn only_members_hear_who_is_speaking() {
        let (call, _) = alice_creating_and_bob_waiting();
        let to: Vec<u64> = call
            .active_speaker("bob", "d1")
            .iter()
            .map(|o| o.to)
            .collect();
        assert_eq!(to, [1, 2]);
        assert!(
            call.active_speaker("mallory", "d1").is_empty(),
            "a speaker who is not in the call is not announced"
        );
        assert!(call.active_speaker("bob", "d2").is_empty());
    }

    /// The call's task sleeps until `next_deadline` and then ticks; a
    /// deadline that a tick at that time leaves in place makes it spin.
    /// A second joiner arriving while the first creates the group has a
    /// batch pending that must wait for the group, not fire every loop.
    #[test]
    fn a_tick_at_the_deadline_moves_the_deadline_past_it() {
        let (mut call, t0) = alice_creating_and_bob_waiting();
        let due = call.next_deadline().expect("the creation has a deadline");
        assert_eq!(
            due,
            t0 + CallConfig::default().create_timeout,
            "the pending batch waits for the group to exist"
        );
        let _ = call.tick(due);
        let next = call
            .next_deadline()
            .expect("bob is still waiting for a group");
        assert!(
            next > due,
            "a tick at {due:?} left the deadline at {next:?}"
        );
    }

    #[test]
    fn a_larger_call_collects_joins_longer_up_to_the_cap() {
        let c = CallConfig::default();
        let ms = |n| c.join_window(n).as_millis();
        assert_eq!([ms(0), ms(1), ms(50)], [200, 200, 200]);
        assert_eq!([ms(51), ms(100), ms(101)], [400, 400, 600]);
        assert_eq!([ms(499), ms(500), ms(5000)], [2000, 2000, 2000]);
        // A cap below the base window never shortens it.
        let short_cap = CallConfig {
            max_batch_window: std::time::Duration::from_millis(50),
            ..c
        };
        assert_eq!(short_cap.join_window(500).as_millis(), 200);
    }

    #[test]
    fn bit_reversal_visits_halves_then_quarters() {
        let order = bit_reversal(Some(7));
        let mut leaves: Vec<u32> = (0..8).collect();
        leaves.sort_by_key(|l| order(*l));
        assert_eq!(leaves, [0, 4, 2, 6, 1, 5, 3, 7]);
        assert_eq!(bit_reversal(None)(0), 0);
        assert_eq!(bit_reversal(Some(0))(0), 0);
    }
}
