//! The replicated state machine: bans, registrations, policies and the audit trail. Deterministic —
//! no clock, no I/O: every [`Command`] carries the time it was proposed at and who proposed it, so
//! every node applying the same log reaches the same state. Each applied change bumps the
//! [`StateMachine::revision`] and is kept in a bounded change window that watchers (edges) read
//! deltas from; a watcher older than the window gets a snapshot instead.

use serde::{Deserialize, Serialize};
use sipwarden_shared::ban::{Ban, BanSource, BanTarget, Binding};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// A ban to add; the state machine gives it its id and creation time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewBan {
    pub target: BanTarget,
    pub reason: String,
    pub source: BanSource,
    pub expires_unix_ms: Option<u64>,
    pub site: Option<String>,
}

/// Which bans to remove.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BanSelector {
    Id(String),
    Target(BanTarget),
}

/// What a command does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Adds bans; a target already banned (same scope) is updated in place, keeping its id.
    AddBans(Vec<NewBan>),
    RemoveBans(Vec<BanSelector>),
    /// Adds or refreshes bindings (keyed by AOR and contact).
    PutBindings(Vec<Binding>),
    /// Removes the binding of `contact` under `aor`.
    RemoveBindings(Vec<(String, String)>),
    /// Stores a new version of the policy document `name`.
    PutPolicy {
        name: String,
        body: String,
    },
    /// Records where an edge relays requests for the phones it holds (sent when it changes).
    PutEdge(EdgeInfo),
    /// Removes bans and bindings expired at the command's time (proposed by the leader).
    Expire,
    /// An audit record only (membership changes and the like).
    Note {
        action: String,
        detail: String,
    },
}

impl Op {
    /// The operation's name, for spans and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::AddBans(_) => "add_bans",
            Op::RemoveBans(_) => "remove_bans",
            Op::PutBindings(_) => "put_bindings",
            Op::RemoveBindings(_) => "remove_bindings",
            Op::PutPolicy { .. } => "put_policy",
            Op::PutEdge(_) => "put_edge",
            Op::Expire => "expire",
            Op::Note { .. } => "note",
        }
    }
}

/// One entry of the replicated log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// When it was proposed (the proposer's clock): the only time the state machine knows.
    pub at_unix_ms: u64,
    /// The operator (token name) or edge that asked.
    pub who: String,
    pub op: Op,
}

impl Command {
    pub fn encode(&self) -> Vec<u8> {
        // Strings, numbers and enums only: JSON encoding cannot fail.
        serde_json::to_vec(self).expect("command encodes as JSON")
    }

    pub fn decode(bytes: &[u8]) -> Result<Command, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// What applying a command did, returned to whoever proposed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// The bans as stored (new or updated).
    Bans(Vec<Ban>),
    /// The bans removed (empty: nothing matched).
    Removed(Vec<Ban>),
    Bindings {
        put: usize,
        removed: usize,
    },
    Policy {
        name: String,
        version: u64,
    },
    Expired {
        bans: usize,
        bindings: usize,
    },
    Noted,
}

/// One change, as watchers see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    BanPut(Ban),
    BanRemoved(Ban),
    BindingPut(Binding),
    BindingRemoved { aor: String, contact: String },
    PolicyPut { name: String, version: u64 },
    EdgePut(EdgeInfo),
}

/// An edge: its site and the address other edges relay PBX requests to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeInfo {
    pub id: String,
    pub site: String,
    pub relay: String,
}

/// A versioned policy document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyDoc {
    pub version: u64,
    pub body: String,
    pub updated_unix_ms: u64,
    pub updated_by: String,
}

/// Who changed what, when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub revision: u64,
    pub at_unix_ms: u64,
    pub who: String,
    pub action: String,
    pub detail: String,
}

/// What expires, as `StateMachine::expiries` holds it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Expiring {
    Ban(String),
    Binding { aor: String, contact: String },
}

/// The slot of a ban's source in `StateMachine::ban_counts` and `ban_counts()`.
fn source_slot(source: &BanSource) -> usize {
    match source {
        BanSource::Manual => 0,
        BanSource::AutoRule(_) => 1,
        BanSource::Feed(_) => 2,
    }
}

/// The state every controller replicates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StateMachine {
    revision: u64,
    next_ban: u64,
    bans: BTreeMap<String, Ban>,
    /// `(target, site)` → id: one ban per target and scope. Rebuilt from `bans` on restore.
    #[serde(skip)]
    by_target: BTreeMap<(BanTarget, Option<String>), String>,
    /// Bans by source (`BanSource::slot`), kept with `bans`: the metrics read them on every
    /// scrape without a walk of the ban list under the lock the Raft loop needs. Rebuilt on
    /// restore.
    #[serde(skip)]
    ban_counts: [usize; 3],
    /// How many bindings `bindings` holds, for the same reason. Rebuilt on restore.
    #[serde(skip)]
    binding_count: usize,
    /// Every ban and binding that expires, by when, soonest first: the leader asks once a second
    /// whether anything is due, and `Expire` takes what is, without walking every ban and
    /// binding. Rebuilt on restore.
    #[serde(skip)]
    expiries: BTreeSet<(u64, Expiring)>,
    /// AOR → contact → binding.
    bindings: BTreeMap<String, BTreeMap<String, Binding>>,
    policies: BTreeMap<String, PolicyDoc>,
    /// Edge id → where it relays.
    #[serde(default)]
    edges: BTreeMap<String, EdgeInfo>,
    audit: VecDeque<AuditEntry>,
    /// `(revision, change)`, oldest first; not part of snapshots.
    #[serde(skip)]
    changes: VecDeque<(u64, Change)>,
    /// The oldest revision the change window can serve deltas from.
    #[serde(skip)]
    window_start: u64,
}

impl StateMachine {
    /// Changes kept for watchers.
    pub const CHANGE_WINDOW: usize = 100_000;
    /// Audit entries kept.
    pub const AUDIT_KEEP: usize = 100_000;

    pub fn new() -> Self {
        Self::default()
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn bans(&self) -> impl Iterator<Item = &Ban> {
        self.bans.values()
    }

    pub fn ban(&self, id: &str) -> Option<&Ban> {
        self.bans.get(id)
    }

    pub fn edges(&self) -> impl Iterator<Item = &EdgeInfo> {
        self.edges.values()
    }

    pub fn edge(&self, id: &str) -> Option<&EdgeInfo> {
        self.edges.get(id)
    }

    pub fn bindings(&self) -> impl Iterator<Item = &Binding> {
        self.bindings.values().flat_map(|m| m.values())
    }

    pub fn bindings_of(&self, aor: &str) -> Vec<&Binding> {
        self.bindings
            .get(aor)
            .map(|m| m.values().collect())
            .unwrap_or_default()
    }

    pub fn policies(&self) -> impl Iterator<Item = (&String, &PolicyDoc)> {
        self.policies.iter()
    }

    pub fn policy(&self, name: &str) -> Option<&PolicyDoc> {
        self.policies.get(name)
    }

    pub fn audit(&self) -> impl DoubleEndedIterator<Item = &AuditEntry> {
        self.audit.iter()
    }

    /// The changes after `revision`, or `None` when the window no longer reaches back that far
    /// (the watcher needs a snapshot).
    pub fn changes_since(&self, revision: u64) -> Option<Vec<(u64, Change)>> {
        if revision < self.window_start {
            return None;
        }
        // Revisions only grow along the window: the first one after `revision` is a binary
        // search away, not a scan of the 100,000 before it (this runs for every watching edge
        // on every applied change).
        let first = self.changes.partition_point(|(r, _)| *r <= revision);
        Some(self.changes.range(first..).cloned().collect())
    }

    /// Bumps the revision and writes the audit entry when `changes` is not empty (or for a note).
    fn record(&mut self, cmd: &Command, action: &str, detail: String, changes: Vec<Change>) {
        if changes.is_empty() && !matches!(cmd.op, Op::Note { .. }) {
            return;
        }
        self.revision += 1;
        let rev = self.revision;
        for c in changes {
            self.changes.push_back((rev, c));
        }
        while self.changes.len() > Self::CHANGE_WINDOW {
            if let Some((r, _)) = self.changes.pop_front() {
                self.window_start = r;
            }
        }
        // Registrations come and go with every phone's refresh: they are listed, not audited.
        if action.starts_with("registration.") {
            return;
        }
        self.audit.push_back(AuditEntry {
            revision: rev,
            at_unix_ms: cmd.at_unix_ms,
            who: cmd.who.clone(),
            action: action.to_string(),
            detail,
        });
        while self.audit.len() > Self::AUDIT_KEEP {
            self.audit.pop_front();
        }
    }

    /// Applies one command.
    pub fn apply(&mut self, cmd: &Command) -> Applied {
        match &cmd.op {
            Op::AddBans(new) => {
                let mut stored = Vec::new();
                for n in new {
                    let key = (n.target.clone(), n.site.clone());
                    let ban = match self.by_target.get(&key).and_then(|id| self.bans.get(id)) {
                        Some(old) => Ban {
                            reason: n.reason.clone(),
                            source: n.source.clone(),
                            created_by: cmd.who.clone(),
                            expires_unix_ms: n.expires_unix_ms,
                            ..old.clone()
                        },
                        None => {
                            self.next_ban += 1;
                            Ban {
                                id: format!("b{}", self.next_ban),
                                target: n.target.clone(),
                                reason: n.reason.clone(),
                                source: n.source.clone(),
                                created_by: cmd.who.clone(),
                                created_unix_ms: cmd.at_unix_ms,
                                expires_unix_ms: n.expires_unix_ms,
                                site: n.site.clone(),
                            }
                        }
                    };
                    self.by_target.insert(key, ban.id.clone());
                    self.put_ban(ban.clone());
                    stored.push(ban);
                }
                let detail = summarize("ban", stored.iter().map(|b| b.target.to_string()));
                let changes = stored.iter().cloned().map(Change::BanPut).collect();
                self.record(cmd, "ban.add", detail, changes);
                Applied::Bans(stored)
            }
            Op::RemoveBans(selectors) => {
                let mut removed = Vec::new();
                for s in selectors {
                    let ids: Vec<String> = match s {
                        BanSelector::Id(id) => vec![id.clone()],
                        BanSelector::Target(t) => self
                            .by_target
                            .iter()
                            .filter(|((target, _), _)| target == t)
                            .map(|(_, id)| id.clone())
                            .collect(),
                    };
                    for id in ids {
                        if let Some(b) = self.take_ban(&id) {
                            removed.push(b);
                        }
                    }
                }
                let detail = summarize("unban", removed.iter().map(|b| b.target.to_string()));
                let changes = removed.iter().cloned().map(Change::BanRemoved).collect();
                self.record(cmd, "ban.remove", detail, changes);
                Applied::Removed(removed)
            }
            Op::PutBindings(list) => {
                let mut changes = Vec::new();
                for b in list {
                    let old = self
                        .bindings
                        .entry(b.aor.clone())
                        .or_default()
                        .insert(b.contact.clone(), b.clone());
                    match old {
                        Some(old) => {
                            self.expiries.remove(&binding_expiry(&old));
                        }
                        None => self.binding_count += 1,
                    }
                    self.expiries.insert(binding_expiry(b));
                    changes.push(Change::BindingPut(b.clone()));
                }
                let put = changes.len();
                let detail = summarize("register", list.iter().map(|b| b.aor.clone()));
                self.record(cmd, "registration.put", detail, changes);
                Applied::Bindings { put, removed: 0 }
            }
            Op::RemoveBindings(list) => {
                let mut changes = Vec::new();
                for (aor, contact) in list {
                    if self.remove_binding(aor, contact) {
                        changes.push(Change::BindingRemoved {
                            aor: aor.clone(),
                            contact: contact.clone(),
                        });
                    }
                }
                let removed = changes.len();
                let detail = summarize("unregister", list.iter().map(|(a, _)| a.clone()));
                self.record(cmd, "registration.remove", detail, changes);
                Applied::Bindings { put: 0, removed }
            }
            Op::PutPolicy { name, body } => {
                let version = self.policies.get(name).map_or(1, |p| p.version + 1);
                self.policies.insert(
                    name.clone(),
                    PolicyDoc {
                        version,
                        body: body.clone(),
                        updated_unix_ms: cmd.at_unix_ms,
                        updated_by: cmd.who.clone(),
                    },
                );
                let change = Change::PolicyPut {
                    name: name.clone(),
                    version,
                };
                self.record(
                    cmd,
                    "policy.put",
                    format!("{name} v{version}"),
                    vec![change],
                );
                Applied::Policy {
                    name: name.clone(),
                    version,
                }
            }
            Op::Expire => {
                let now = cmd.at_unix_ms;
                // What is due, in the order a walk of the maps gives (bans by id, bindings by
                // AOR and contact), as controllers before the index did.
                let (mut expired, mut old) = (Vec::new(), Vec::new());
                for (_, what) in self.expiries.iter().take_while(|(at, _)| *at <= now) {
                    match what {
                        Expiring::Ban(id) => expired.push(id.clone()),
                        Expiring::Binding { aor, contact } => {
                            old.push((aor.clone(), contact.clone()))
                        }
                    }
                }
                expired.sort_unstable();
                old.sort_unstable();
                let mut changes = Vec::new();
                for id in &expired {
                    if let Some(b) = self.take_ban(id) {
                        changes.push(Change::BanRemoved(b));
                    }
                }
                for (aor, contact) in &old {
                    self.remove_binding(aor, contact);
                    changes.push(Change::BindingRemoved {
                        aor: aor.clone(),
                        contact: contact.clone(),
                    });
                }
                let detail = format!("{} bans, {} bindings expired", expired.len(), old.len());
                self.record(cmd, "expire", detail, changes);
                Applied::Expired {
                    bans: expired.len(),
                    bindings: old.len(),
                }
            }
            Op::Note { action, detail } => {
                self.record(cmd, action, detail.clone(), Vec::new());
                Applied::Noted
            }
            Op::PutEdge(e) => {
                if self.edges.get(&e.id) != Some(e) {
                    self.edges.insert(e.id.clone(), e.clone());
                    let detail = format!("edge {} of site {} relays at {}", e.id, e.site, e.relay);
                    self.record(cmd, "edge.put", detail, vec![Change::EdgePut(e.clone())]);
                }
                Applied::Noted
            }
        }
    }

    fn remove_binding(&mut self, aor: &str, contact: &str) -> bool {
        let Some(m) = self.bindings.get_mut(aor) else {
            return false;
        };
        let gone = m.remove(contact);
        if m.is_empty() {
            self.bindings.remove(aor);
        }
        if let Some(b) = &gone {
            self.expiries.remove(&binding_expiry(b));
            self.binding_count -= 1;
        }
        gone.is_some()
    }

    /// Stores `ban` (its `by_target` entry is the caller's), replacing any of the same id.
    fn put_ban(&mut self, ban: Ban) {
        // The old one's index entries go first: the new one may expire at the same time.
        if let Some(old) = self.bans.remove(&ban.id) {
            self.unindex_ban(&old);
        }
        self.index_ban(&ban);
        self.bans.insert(ban.id.clone(), ban);
    }

    /// Removes the ban `id` and everything kept about it.
    fn take_ban(&mut self, id: &str) -> Option<Ban> {
        let b = self.bans.remove(id)?;
        self.by_target.remove(&(b.target.clone(), b.site.clone()));
        self.unindex_ban(&b);
        Some(b)
    }

    /// Counts `b` by its source and files its expiry.
    fn index_ban(&mut self, b: &Ban) {
        self.ban_counts[source_slot(&b.source)] += 1;
        if let Some(e) = ban_expiry(b) {
            self.expiries.insert(e);
        }
    }

    /// Takes back what `index_ban` kept about `b`.
    fn unindex_ban(&mut self, b: &Ban) {
        self.ban_counts[source_slot(&b.source)] -= 1;
        if let Some(e) = ban_expiry(b) {
            self.expiries.remove(&e);
        }
    }

    /// How many bindings there are (`bindings().count()` without the walk).
    pub fn binding_count(&self) -> usize {
        self.binding_count
    }

    /// How many bans each source holds: manual, auto (an edge's rule), feed.
    pub fn ban_counts(&self) -> [usize; 3] {
        self.ban_counts
    }

    /// The earliest expiry of any ban or binding: when the leader should next propose `Expire`.
    pub fn next_expiry(&self) -> Option<u64> {
        self.expiries.first().map(|(at, _)| *at)
    }

    /// The state as bytes (the change window is not included).
    pub fn snapshot(&self) -> Vec<u8> {
        // Every map is keyed by strings and every value is plain data, so JSON encoding cannot
        // fail; the round-trip test guards it.
        serde_json::to_vec(self).expect("state machine encodes as JSON")
    }

    /// The state `snapshot` wrote; watchers older than it get a snapshot.
    pub fn restore(bytes: &[u8]) -> Result<StateMachine, serde_json::Error> {
        let mut s: StateMachine = serde_json::from_slice(bytes)?;
        s.window_start = s.revision;
        s.by_target = s
            .bans
            .values()
            .map(|b| ((b.target.clone(), b.site.clone()), b.id.clone()))
            .collect();
        let bans = std::mem::take(&mut s.bans);
        for b in bans.values() {
            s.index_ban(b);
        }
        s.bans = bans;
        let bindings: Vec<_> = s.bindings().map(binding_expiry).collect();
        s.binding_count = bindings.len();
        s.expiries.extend(bindings);
        Ok(s)
    }
}

/// A ban's entry in `StateMachine::expiries`, when it expires.
fn ban_expiry(b: &Ban) -> Option<(u64, Expiring)> {
    b.expires_unix_ms
        .map(|at| (at, Expiring::Ban(b.id.clone())))
}

/// A binding's entry in `StateMachine::expiries`.
fn binding_expiry(b: &Binding) -> (u64, Expiring) {
    let what = Expiring::Binding {
        aor: b.aor.clone(),
        contact: b.contact.clone(),
    };
    (b.expires_unix_ms, what)
}

/// `verb a, b, c` or `verb 1000 targets (a, b, c, …)`.
fn summarize(verb: &str, items: impl Iterator<Item = String>) -> String {
    let all: Vec<String> = items.collect();
    match all.len() {
        0..=3 => format!("{verb} {}", all.join(", ")),
        n => format!("{verb} {n} targets ({}, …)", all[..3].join(", ")),
    }
}

#[cfg(test)]
mod tests;
