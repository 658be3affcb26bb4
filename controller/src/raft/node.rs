//! [`Node`]: one tokio task owns the raft-rs `RawNode`. It ticks on an interval, steps messages from
//! peers, takes requests (proposals, linearizable reads, membership changes) from a channel, and
//! handles each `Ready` in the order raft-rs documents: send messages, apply a snapshot, apply
//! committed entries, persist entries and hard state (fsynced), send persisted messages, advance.
//! Proposals are answered by id when their entry is applied — on whichever node proposed them,
//! since a follower forwards proposals to the leader and the id travels in the entry.

use super::storage::{LogStore, Persist, StoreError};
use super::transport::Transport;
use crate::state::{Applied, Command, Op, StateMachine};
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, ConfState, Entry, EntryType, Message, Snapshot};
use raft::{RawNode, StateRole};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Why a request was not carried out.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RaftError {
    #[error("no leader is known; retry shortly")]
    NoLeader,
    /// The leader changed while the request waited: it may or may not have been applied.
    #[error("the leader changed before the request was applied; retry")]
    LeaderChanged,
    #[error("the request was not committed in time (leader change?); retry")]
    Timeout,
    #[error("the node is shutting down")]
    Stopped,
    #[error("raft: {0}")]
    Raft(String),
    #[error("storage: {0}")]
    Storage(String),
}

/// How a node runs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: u64,
    /// The initial voters when the cluster is created (empty for a node joining a running one).
    pub voters: Vec<u64>,
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Applied entries between two state-machine snapshots (which compact the log).
    pub snapshot_every: u64,
    /// Pending requests older than this are failed with [`RaftError::Timeout`].
    pub request_timeout: Duration,
    /// Member addresses known from configuration (membership changes add theirs).
    pub addresses: Vec<(u64, String)>,
}

impl NodeConfig {
    pub fn new(id: u64, voters: Vec<u64>) -> NodeConfig {
        NodeConfig {
            id,
            voters,
            tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_every: 10_000,
            request_timeout: Duration::from_secs(10),
            addresses: Vec::new(),
        }
    }
}

/// A request to the node task.
pub enum Request {
    Step(Box<Message>),
    Propose(Command, oneshot::Sender<Result<Applied, RaftError>>),
    /// Answers with the applied index once it covers the leader's commit index at the time.
    ReadIndex(oneshot::Sender<Result<u64, RaftError>>),
    ChangeMember(MemberChange, oneshot::Sender<Result<ConfState, RaftError>>),
}

/// Adding or removing a controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberChange {
    pub id: u64,
    pub add: bool,
    /// The new member's address (peers learn it from the log).
    pub address: String,
    pub who: String,
    /// When it was asked (the proposer's clock), for the audit trail.
    pub at_unix_ms: u64,
}

/// What the node reports about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NodeStatus {
    pub id: u64,
    pub leader: u64,
    pub term: u64,
    pub role: String,
    pub commit: u64,
    pub applied: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub snapshot_index: u64,
    /// Member addresses as recorded by membership changes.
    pub addresses: Vec<(u64, String)>,
}

/// The caller's side of a node.
#[derive(Clone)]
pub struct Handle {
    pub tx: mpsc::Sender<Request>,
    pub state: Arc<RwLock<StateMachine>>,
    pub status: watch::Receiver<NodeStatus>,
}

impl Handle {
    /// Proposes `cmd` and waits for it to be applied. While no leader is known (an election is
    /// under way) it retries for up to [`Handle::LEADER_WAIT`].
    pub async fn propose(&self, cmd: Command) -> Result<Applied, RaftError> {
        let deadline = tokio::time::Instant::now() + Self::LEADER_WAIT;
        loop {
            let (tx, rx) = oneshot::channel();
            self.tx
                .send(Request::Propose(cmd.clone(), tx))
                .await
                .map_err(|_| RaftError::Stopped)?;
            // Proposals are idempotent (a target is banned once, removals and bindings converge),
            // so one whose fate a leader change left unknown is simply proposed again.
            match rx.await.map_err(|_| RaftError::Timeout)? {
                Err(RaftError::NoLeader | RaftError::LeaderChanged)
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
    }

    /// How long a request waits for a leader to be elected.
    pub const LEADER_WAIT: Duration = Duration::from_secs(5);

    /// Waits until this node has applied everything committed when the read was asked
    /// (ReadIndex): reads of the state after this are linearizable.
    pub async fn read_barrier(&self) -> Result<u64, RaftError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Request::ReadIndex(tx))
            .await
            .map_err(|_| RaftError::Stopped)?;
        rx.await.map_err(|_| RaftError::Timeout)?
    }

    pub async fn change_member(&self, change: MemberChange) -> Result<ConfState, RaftError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Request::ChangeMember(change, tx))
            .await
            .map_err(|_| RaftError::Stopped)?;
        rx.await.map_err(|_| RaftError::Timeout)?
    }

    /// Steps a message from a peer.
    pub fn step(&self, m: Message) {
        let _ = self.tx.try_send(Request::Step(Box::new(m)));
    }

    /// Reads the state machine.
    pub fn read<R>(&self, f: impl FnOnce(&StateMachine) -> R) -> R {
        f(&self.state.read().unwrap_or_else(|p| p.into_inner()))
    }
}

enum Pending {
    Propose(oneshot::Sender<Result<Applied, RaftError>>),
    Member(oneshot::Sender<Result<ConfState, RaftError>>),
    Read(oneshot::Sender<Result<u64, RaftError>>),
}

/// The applied index, its term and the conf state: what a snapshot of the state machine is
/// labelled with. Updated by the node task as it applies.
#[derive(Default, Clone)]
struct AppliedMeta {
    index: u64,
    term: u64,
    conf: ConfState,
}

/// The node task's state.
pub struct Node {
    applied_meta: Arc<std::sync::Mutex<AppliedMeta>>,
    cfg: NodeConfig,
    raw: RawNode<LogStore>,
    store: LogStore,
    transport: Arc<dyn Transport>,
    state: Arc<RwLock<StateMachine>>,
    status: watch::Sender<NodeStatus>,
    pending: HashMap<u64, (Instant, Pending)>,
    /// Read requests whose read index is known: `(index, id)`.
    reads: Vec<(u64, u64)>,
    next_id: u64,
    applied: u64,
    addresses: HashMap<u64, String>,
    expire_in_flight: Option<Instant>,
    /// The leader seen at the last `Ready`: when it changes, waiting requests are failed.
    leader_seen: u64,
    /// Wall clock for `Expire` commands; injected so tests can move it.
    clock: fn() -> u64,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// slog → tracing, so raft-rs logs where everything else does.
struct TracingDrain;

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;
    fn log(&self, record: &slog::Record<'_>, _: &slog::OwnedKVList) -> Result<(), slog::Never> {
        match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                warn!(target: "raft", "{}", record.msg())
            }
            slog::Level::Warning | slog::Level::Info => debug!(target: "raft", "{}", record.msg()),
            _ => {}
        }
        Ok(())
    }
}

impl Node {
    /// Opens node `cfg.id` over `store` (bootstrapping the initial voters on a fresh store) and
    /// returns the task and its handle.
    pub fn start(
        cfg: NodeConfig,
        store: LogStore,
        transport: Arc<dyn Transport>,
    ) -> Result<(Node, Handle, mpsc::Receiver<Request>), RaftError> {
        let serr = |e: StoreError| RaftError::Storage(e.to_string());
        if store.is_empty() && !cfg.voters.is_empty() {
            let cs = ConfState {
                voters: cfg.voters.clone(),
                ..Default::default()
            };
            store
                .persist(Persist {
                    conf_state: Some(&cs),
                    ..Default::default()
                })
                .map_err(serr)?;
        }
        let snap = store.latest_snapshot();
        let (state, applied) = if snap.get_metadata().index > 0 {
            let s = StateMachine::restore(snap.get_data())
                .map_err(|e| RaftError::Storage(format!("snapshot: {e}")))?;
            (s, snap.get_metadata().index)
        } else {
            (StateMachine::new(), 0)
        };
        let rcfg = raft::Config {
            id: cfg.id,
            election_tick: cfg.election_ticks,
            heartbeat_tick: cfg.heartbeat_ticks,
            applied,
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            ..Default::default()
        };
        let logger = slog::Logger::root(TracingDrain, slog::o!("raft_id" => cfg.id));
        let mut raw = RawNode::new(&rcfg, store.clone(), &logger)
            .map_err(|e| RaftError::Raft(e.to_string()))?;
        // A cluster of one needs no election timeout to pass.
        if raw.raft.prs().conf().voters().ids().len() == 1
            && raw.raft.prs().conf().voters().contains(cfg.id)
        {
            raw.campaign().map_err(|e| RaftError::Raft(e.to_string()))?;
        }
        let (tx, rx) = mpsc::channel(4096);
        let state = Arc::new(RwLock::new(state));
        let applied_meta = Arc::new(std::sync::Mutex::new(AppliedMeta {
            index: applied,
            term: snap.get_metadata().term,
            conf: store.conf_state(),
        }));
        {
            let state = state.clone();
            let meta = applied_meta.clone();
            store.set_snapshot_source(Box::new(move || {
                let m = meta.lock().unwrap_or_else(|p| p.into_inner()).clone();
                if m.index == 0 {
                    return None;
                }
                let mut s = Snapshot::default();
                s.set_data(
                    state
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .snapshot()
                        .into(),
                );
                let md = s.mut_metadata();
                md.index = m.index;
                md.term = m.term;
                md.set_conf_state(m.conf);
                Some(s)
            }));
        }
        let (status_tx, status_rx) = watch::channel(NodeStatus::default());
        let addresses = cfg.addresses.iter().cloned().collect();
        let node = Node {
            applied_meta,
            next_id: cfg.id << 40,
            cfg,
            raw,
            store,
            transport,
            state: state.clone(),
            status: status_tx,
            pending: HashMap::new(),
            reads: Vec::new(),
            applied,
            addresses,
            expire_in_flight: None,
            leader_seen: 0,
            clock: unix_ms,
        };
        let handle = Handle {
            tx,
            state,
            status: status_rx,
        };
        Ok((node, handle, rx))
    }

    /// Uses `clock` for the time of `Expire` commands (tests).
    pub fn with_clock(mut self, clock: fn() -> u64) -> Node {
        self.clock = clock;
        self
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Runs until `stop`.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Request>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.cfg.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_sweep = Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {
                    self.raw.tick();
                    if last_sweep.elapsed() >= Duration::from_secs(1) {
                        last_sweep = Instant::now();
                        self.sweep();
                        self.maybe_expire();
                    }
                }
                r = rx.recv() => match r {
                    Some(r) => {
                        self.request(r);
                        // Drain what else is queued before handling Ready: batches writes.
                        while let Ok(r) = rx.try_recv() {
                            self.request(r);
                        }
                    }
                    None => break,
                },
            }
            if let Err(e) = self.on_ready() {
                warn!(error = %e, "raft ready handling failed; stopping the node");
                break;
            }
            self.on_leader_change();
            self.publish_status();
        }
        for (_, (_, p)) in self.pending.drain() {
            fail(p, RaftError::Stopped);
        }
    }

    fn request(&mut self, r: Request) {
        match r {
            Request::Step(m) => {
                if let Err(e) = self.raw.step(*m) {
                    debug!(error = %e, "step");
                }
            }
            Request::Propose(cmd, reply) => {
                let id = self.id();
                match self.raw.propose(id.to_le_bytes().to_vec(), cmd.encode()) {
                    Ok(()) => {
                        self.pending
                            .insert(id, (Instant::now(), Pending::Propose(reply)));
                    }
                    Err(raft::Error::ProposalDropped) => {
                        let _ = reply.send(Err(RaftError::NoLeader));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(RaftError::Raft(e.to_string())));
                    }
                }
            }
            Request::ReadIndex(reply) => {
                if self.raw.raft.leader_id == 0 {
                    let _ = reply.send(Err(RaftError::NoLeader));
                    return;
                }
                let id = self.id();
                self.raw.read_index(id.to_le_bytes().to_vec());
                self.pending
                    .insert(id, (Instant::now(), Pending::Read(reply)));
            }
            Request::ChangeMember(change, reply) => {
                let id = self.id();
                let mut cc = ConfChange::default();
                cc.set_change_type(if change.add {
                    ConfChangeType::AddNode
                } else {
                    ConfChangeType::RemoveNode
                });
                cc.node_id = change.id;
                let ctx = serde_json::to_vec(&(id, &change)).unwrap_or_default();
                match self.raw.propose_conf_change(ctx, cc) {
                    Ok(()) => {
                        self.pending
                            .insert(id, (Instant::now(), Pending::Member(reply)));
                    }
                    Err(raft::Error::ProposalDropped) => {
                        let _ = reply.send(Err(RaftError::NoLeader));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(RaftError::Raft(e.to_string())));
                    }
                }
            }
        }
    }

    /// A proposal forwarded to (or accepted by) a leader that lost its place may never be applied,
    /// and raft-rs drops it silently: fail what waits, so callers retry now rather than at the
    /// request timeout.
    fn on_leader_change(&mut self) {
        let leader = self.raw.raft.leader_id;
        if leader == self.leader_seen {
            return;
        }
        let had = self.leader_seen;
        self.leader_seen = leader;
        if had == 0 {
            return;
        }
        let waiting: Vec<u64> = self.pending.keys().copied().collect();
        for id in waiting {
            if let Some((_, p)) = self.pending.remove(&id) {
                fail(p, RaftError::LeaderChanged);
            }
        }
        self.reads.clear();
        self.expire_in_flight = None;
    }

    /// Fails requests that waited too long (their entry may have been lost in a leader change).
    fn sweep(&mut self) {
        let limit = self.cfg.request_timeout;
        let old: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, (at, _))| at.elapsed() > limit)
            .map(|(id, _)| *id)
            .collect();
        for id in old {
            if let Some((_, p)) = self.pending.remove(&id) {
                fail(p, RaftError::Timeout);
            }
        }
        if self.expire_in_flight.is_some_and(|at| at.elapsed() > limit) {
            self.expire_in_flight = None;
        }
    }

    /// The leader proposes `Expire` when a ban or binding has expired.
    fn maybe_expire(&mut self) {
        if self.raw.raft.state != StateRole::Leader || self.expire_in_flight.is_some() {
            return;
        }
        let now = (self.clock)();
        let due = self
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .next_expiry()
            .is_some_and(|t| t <= now);
        if !due {
            return;
        }
        let cmd = Command {
            at_unix_ms: now,
            who: format!("controller-{}", self.cfg.id),
            op: Op::Expire,
        };
        if self.raw.propose(Vec::new(), cmd.encode()).is_ok() {
            self.expire_in_flight = Some(Instant::now());
        }
    }

    fn on_ready(&mut self) -> Result<(), RaftError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let serr = |e: StoreError| RaftError::Storage(e.to_string());
        let mut ready = self.raw.ready();
        if !ready.messages().is_empty() {
            self.transport.send(ready.take_messages());
        }
        if !ready.snapshot().is_empty() {
            let snap = ready.snapshot().clone();
            self.store
                .persist(Persist {
                    snapshot: Some(&snap),
                    ..Default::default()
                })
                .map_err(serr)?;
            self.install_snapshot(&snap)?;
        }
        for rs in ready.take_read_states() {
            if let Ok(b) = <[u8; 8]>::try_from(&rs.request_ctx[..]) {
                self.reads.push((rs.index, u64::from_le_bytes(b)));
            }
        }
        let committed = ready.take_committed_entries();
        self.apply(committed)?;
        let hs = ready.hs().cloned();
        if !ready.entries().is_empty() || hs.is_some() {
            self.store
                .persist(Persist {
                    entries: ready.entries(),
                    hard_state: hs.as_ref(),
                    ..Default::default()
                })
                .map_err(serr)?;
        }
        if !ready.persisted_messages().is_empty() {
            self.transport.send(ready.take_persisted_messages());
        }
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            let mut hs = self.store.hard_state();
            hs.commit = commit;
            self.store
                .persist(Persist {
                    hard_state: Some(&hs),
                    ..Default::default()
                })
                .map_err(serr)?;
        }
        self.transport.send(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply();
        self.answer_reads();
        self.maybe_snapshot()?;
        Ok(())
    }

    fn install_snapshot(&mut self, snap: &Snapshot) -> Result<(), RaftError> {
        let s = StateMachine::restore(snap.get_data())
            .map_err(|e| RaftError::Storage(format!("snapshot: {e}")))?;
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = s;
        self.applied = snap.get_metadata().index;
        *self.applied_meta.lock().unwrap_or_else(|p| p.into_inner()) = AppliedMeta {
            index: snap.get_metadata().index,
            term: snap.get_metadata().term,
            conf: snap.get_metadata().get_conf_state().clone(),
        };
        info!(index = self.applied, "installed a snapshot from the leader");
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), RaftError> {
        for e in entries {
            self.applied = e.index;
            {
                let mut m = self.applied_meta.lock().unwrap_or_else(|p| p.into_inner());
                m.index = e.index;
                m.term = e.term;
            }
            match e.get_entry_type() {
                EntryType::EntryNormal => {
                    if e.data.is_empty() {
                        continue; // a new leader's empty entry
                    }
                    let result = match Command::decode(&e.data) {
                        Ok(cmd) => {
                            if matches!(cmd.op, Op::Expire) {
                                self.expire_in_flight = None;
                            }
                            Ok(self
                                .state
                                .write()
                                .unwrap_or_else(|p| p.into_inner())
                                .apply(&cmd))
                        }
                        Err(err) => {
                            warn!(index = e.index, error = %err, "undecodable log entry skipped");
                            Err(RaftError::Raft(format!("undecodable entry: {err}")))
                        }
                    };
                    if let Ok(b) = <[u8; 8]>::try_from(&e.context[..]) {
                        if let Some((_, Pending::Propose(reply))) =
                            self.pending.remove(&u64::from_le_bytes(b))
                        {
                            let _ = reply.send(result);
                        }
                    }
                }
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&e.data)
                        .map_err(|err| RaftError::Raft(err.to_string()))?;
                    let cs = self
                        .raw
                        .apply_conf_change(&cc)
                        .map_err(|err| RaftError::Raft(err.to_string()))?;
                    self.store
                        .persist(Persist {
                            conf_state: Some(&cs),
                            ..Default::default()
                        })
                        .map_err(|err| RaftError::Storage(err.to_string()))?;
                    self.applied_meta
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .conf = cs.clone();
                    let parsed: Option<(u64, MemberChange)> =
                        serde_json::from_slice(&e.context).ok();
                    if let Some((id, change)) = parsed {
                        if change.add {
                            self.addresses.insert(change.id, change.address.clone());
                        } else {
                            self.addresses.remove(&change.id);
                        }
                        let note = Command {
                            at_unix_ms: change.at_unix_ms,
                            who: change.who.clone(),
                            op: Op::Note {
                                action: if change.add {
                                    "member.add"
                                } else {
                                    "member.remove"
                                }
                                .into(),
                                detail: format!("node {} {}", change.id, change.address),
                            },
                        };
                        self.state
                            .write()
                            .unwrap_or_else(|p| p.into_inner())
                            .apply(&note);
                        if let Some((_, Pending::Member(reply))) = self.pending.remove(&id) {
                            let _ = reply.send(Ok(cs.clone()));
                        }
                    }
                    info!(voters = ?cs.voters, "membership changed");
                }
                EntryType::EntryConfChangeV2 => {}
            }
        }
        Ok(())
    }

    fn answer_reads(&mut self) {
        let applied = self.applied;
        let (ready, waiting): (Vec<_>, Vec<_>) =
            self.reads.drain(..).partition(|(idx, _)| *idx <= applied);
        self.reads = waiting;
        for (_, id) in ready {
            if let Some((_, Pending::Read(reply))) = self.pending.remove(&id) {
                let _ = reply.send(Ok(applied));
            }
        }
    }

    fn maybe_snapshot(&mut self) -> Result<(), RaftError> {
        let last = self.store.latest_snapshot().get_metadata().index;
        if self.applied < last + self.cfg.snapshot_every || self.applied == 0 {
            return Ok(());
        }
        let term = raft::Storage::term(&self.store, self.applied)
            .map_err(|e| RaftError::Storage(e.to_string()))?;
        let mut snap = Snapshot::default();
        snap.set_data(
            self.state
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .snapshot()
                .into(),
        );
        let meta = snap.mut_metadata();
        meta.index = self.applied;
        meta.term = term;
        meta.set_conf_state(self.raw.raft.prs().conf().to_conf_state());
        self.store
            .compact_with(&snap)
            .map_err(|e| RaftError::Storage(e.to_string()))?;
        debug!(index = self.applied, "state snapshot taken; log compacted");
        Ok(())
    }

    fn publish_status(&self) {
        let r = &self.raw.raft;
        let conf = r.prs().conf().to_conf_state();
        let mut addresses: Vec<(u64, String)> = self
            .addresses
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        addresses.sort();
        let st = NodeStatus {
            id: self.cfg.id,
            leader: r.leader_id,
            term: r.term,
            role: format!("{:?}", r.state),
            commit: r.raft_log.committed,
            applied: self.applied,
            voters: conf.voters.clone(),
            learners: conf.learners.clone(),
            snapshot_index: self.store.latest_snapshot().get_metadata().index,
            addresses,
        };
        self.status.send_if_modified(|old| {
            if *old == st {
                false
            } else {
                *old = st;
                true
            }
        });
    }
}

fn fail(p: Pending, e: RaftError) {
    match p {
        Pending::Propose(r) => {
            let _ = r.send(Err(e));
        }
        Pending::Member(r) => {
            let _ = r.send(Err(e));
        }
        Pending::Read(r) => {
            let _ = r.send(Err(e));
        }
    }
}
