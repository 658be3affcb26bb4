//! The ban set: an immutable [`BanSet`] snapshot of banned networks read without locks by the
//! pre-parse gate, replaced atomically (`arc-swap`) by the [`BanStore`] writer.
//!
//! New bans are queued and applied in batches by the writer, on a thread of its own: a lone ban at
//! once, a storm at most every [`BanStore::MIN_APPLY_INTERVAL`] or ten times as long as the last
//! batch took ([`BanStore::PACE`]) — the next message of a just-banned source is still stopped by
//! the rule that banned it, so nothing slips through meanwhile. A batch costs what it changes, not
//! the list's size: a snapshot shares its base with the one before and carries the changes since
//! (folded into a new base past four times the square root of its size), and the writer keeps the
//! bans in expiry order beside it for the purge and the cap. Expired bans are ignored at lookup and
//! purged by the writer. Bans made on this edge (not those from config) are kept on disk, so a
//! restart keeps them: each write (at most every [`BanStore::SAVE_INTERVAL`], and at shutdown)
//! appends what the batches since the last one did to a journal (`bans.journal`, a JSON line a
//! change, synced), and the JSON ban file (a ban a line) is written whole, starting a new journal
//! generation, only after a whole origin was replaced (a cluster snapshot) or once the journal
//! outgrows it. A start reads the file and replays the journal of its generation (a journal of an
//! older one was left by a crash between the two writes; a last line cut short by a crash in an
//! append is left out). A crash loses at most the second since the last write — longer only just
//! after a whole write, which waits ten times as long as it took (0.75 s with 1,000,000 bans);
//! cluster bans come back with the next snapshot and auto-bans were proposed to the cluster as
//! they were made.

use crate::netset::NetSet;
use arc_swap::ArcSwap;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Expiry of a ban that does not expire.
pub const NEVER: u64 = u64::MAX;

/// Where a ban came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BanOrigin {
    /// `policy.bans.networks`: lives as long as the config lists it.
    Config,
    /// Made by a rule on this edge.
    Auto,
    /// Made by an operator.
    Manual,
    /// From the controller cluster (the watch stream); replaced wholesale by a snapshot.
    Cluster,
}

impl BanOrigin {
    pub const ALL: [BanOrigin; 4] = [
        BanOrigin::Config,
        BanOrigin::Auto,
        BanOrigin::Manual,
        BanOrigin::Cluster,
    ];

    /// The name in the ban file, the API and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            BanOrigin::Config => "config",
            BanOrigin::Auto => "auto",
            BanOrigin::Manual => "manual",
            BanOrigin::Cluster => "cluster",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One ban.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ban {
    pub network: IpNet,
    pub origin: BanOrigin,
    /// The rule that made it (`scanner`, `bruteforce`, …) or `config` / the operator's name.
    pub rule: String,
    pub reason: String,
    pub created_unix_ms: u64,
    /// [`NEVER`] for bans without a TTL.
    pub expires_unix_ms: u64,
}

impl Ban {
    pub fn live(&self, now_ms: u64) -> bool {
        now_ms < self.expires_unix_ms
    }
}

/// The ban file's format, the `version` it carries.
const FILE_VERSION: u32 = 1;

/// What the ban file holds.
#[derive(Debug, Deserialize)]
struct BanFile {
    version: u32,
    /// The generation of the journal that follows this file (a journal of another one is older
    /// than the file, left by a crash between the two writes, and is not replayed).
    #[serde(default)]
    journal: u64,
    bans: Vec<Ban>,
}

/// The journal's first line.
#[derive(Debug, Serialize, Deserialize)]
struct JournalHead {
    journal: u64,
}

/// One line of the ban journal (`bans.journal` beside `bans.json`): what a batch did to the bans
/// the file keeps, in order. Replayed over the file at start; folded into it by a rewrite once it
/// outgrows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Logged {
    Put(Ban),
    Del(IpNet),
}

/// A snapshot: network → ban. A large base shared by the snapshots made from it, and the changes
/// made since (`None`: taken out), folded into a new base once they outgrow four times the square
/// root of its size: a batch copies the changes rather than the list. With 1,000,000 bans the
/// copy was 65 ms of each batch, however few bans it changed.
#[derive(Debug, Clone, Default)]
pub struct BanSet {
    base: Arc<NetSet<Arc<Ban>>>,
    delta: NetSet<Option<Arc<Ban>>>,
    len: usize,
}

impl BanSet {
    /// Changes held beside a base of any size before they are folded into it.
    const FOLD_MIN: usize = 256;

    pub fn new() -> BanSet {
        BanSet::default()
    }

    fn with_base(base: NetSet<Arc<Ban>>) -> BanSet {
        BanSet {
            len: base.len(),
            base: Arc::new(base),
            delta: NetSet::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The ban on exactly `net`.
    pub fn get(&self, net: IpNet) -> Option<&Arc<Ban>> {
        match self.delta.get(net) {
            Some(change) => change.as_ref(),
            None => self.base.get(net),
        }
    }

    /// Every ban on a network containing `ip`, longest first.
    pub fn matches(&self, ip: IpAddr) -> impl Iterator<Item = (u8, &Arc<Ban>)> + '_ {
        let mut delta = self.delta.matches(ip).peekable();
        let mut base = self.base.matches(ip).peekable();
        std::iter::from_fn(move || loop {
            let changed = delta.peek().map(|(len, _)| *len);
            let based = base.peek().map(|(len, _)| *len);
            match (changed, based) {
                (Some(c), b) if b.is_none_or(|b| c >= b) => {
                    let (len, change) = delta.next()?;
                    if b == Some(c) {
                        // The change is to that network: the base's ban is not in force.
                        base.next();
                    }
                    if let Some(ban) = change {
                        return Some((len, ban));
                    }
                }
                _ => return base.next(),
            }
        })
    }

    /// The longest ban covering `ip` that `pick` takes. Without changes beside the base (most of
    /// the time) the base is read alone: the merge of the two costs ~4 ns a lookup.
    pub fn find(&self, ip: IpAddr, pick: impl Fn(&Ban) -> bool) -> Option<&Arc<Ban>> {
        if self.delta.is_empty() {
            return self.base.matches(ip).map(|(_, b)| b).find(|b| pick(b));
        }
        self.matches(ip).map(|(_, b)| b).find(|b| pick(b))
    }

    /// Whether a ban covers `ip` (expired or not).
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.matches(ip).next().is_some()
    }

    /// Every ban, as `(network, ban)`.
    pub fn iter(&self) -> impl Iterator<Item = (IpNet, &Arc<Ban>)> + '_ {
        let changed = self
            .delta
            .iter()
            .filter_map(|(net, change)| change.as_ref().map(|b| (net, b)));
        let kept = self
            .base
            .iter()
            .filter(|(net, _)| self.delta.get(*net).is_none());
        changed.chain(kept)
    }

    /// Sets the ban on `b.network`, returning the one it replaces.
    fn insert(&mut self, b: Arc<Ban>) -> Option<Arc<Ban>> {
        let old = self.get(b.network).cloned();
        self.delta.insert(b.network, Some(b));
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Takes the ban on exactly `net` out.
    fn remove(&mut self, net: IpNet) -> Option<Arc<Ban>> {
        let old = self.get(net).cloned()?;
        if self.base.get(net).is_some() {
            self.delta.insert(net, None);
        } else {
            self.delta.remove(net);
        }
        self.len -= 1;
        Some(old)
    }

    /// Folds the changes into a new base once they are many for its size (more than `min` and
    /// than four times the square root of the base's size).
    fn fold_if_large(&mut self, min: usize) {
        let bound = min.max(4 * self.base.len().isqrt());
        if self.delta.len() <= bound {
            return;
        }
        let mut base = (*self.base).clone();
        for (net, change) in self.delta.iter() {
            match change {
                Some(b) => base.insert(net, b.clone()),
                None => base.remove(net),
            };
        }
        self.base = Arc::new(base);
        self.delta = NetSet::new();
    }
}

enum Change {
    Add(Arc<Ban>),
    Remove(IpNet),
    /// Removes `network` only if its ban came from `origin`.
    RemoveFrom(IpNet, BanOrigin),
    Config(Vec<IpNet>),
    /// Replaces every ban of `origin` with these.
    Replace(BanOrigin, Vec<Arc<Ban>>),
}

/// Why the ban file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BanFileError {
    #[error("ban file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("ban file {path} is not valid: {message}")]
    Format { path: String, message: String },
}

impl BanFileError {
    fn io(path: &Path, source: std::io::Error) -> BanFileError {
        BanFileError::Io {
            path: path.display().to_string(),
            source,
        }
    }

    fn format(path: &Path, message: impl ToString) -> BanFileError {
        BanFileError::Format {
            path: path.display().to_string(),
            message: message.to_string(),
        }
    }
}

/// What the writer keeps beside the snapshot and changes with it, so that a batch costs what it
/// changes rather than walks of every ban: the bans that can expire or be evicted (all but the
/// config ones) in expiry order, and the count by origin. With 100,000 bans, the walks it replaced
/// (a purge, the eviction check, the count by origin) were two thirds of a batch's 9.5 ms.
#[derive(Default)]
struct Index {
    /// `(expiry, network)` of every ban not from config, soonest first.
    expiring: BTreeSet<(u64, IpNet)>,
    by_origin: [usize; 4],
}

impl Index {
    fn of(set: &BanSet) -> Index {
        let mut index = Index::default();
        for (_, b) in set.iter() {
            index.file(b);
        }
        index
    }

    fn file(&mut self, b: &Ban) {
        self.by_origin[b.origin.index()] += 1;
        if b.origin != BanOrigin::Config {
            self.expiring.insert((b.expires_unix_ms, b.network));
        }
    }

    fn unfile(&mut self, b: &Ban) {
        self.by_origin[b.origin.index()] -= 1;
        if b.origin != BanOrigin::Config {
            self.expiring.remove(&(b.expires_unix_ms, b.network));
        }
    }

    fn earliest_expiry(&self) -> u64 {
        self.expiring.first().map_or(NEVER, |(at, _)| *at)
    }
}

/// The writer's own state, under one lock (one batch at a time).
#[derive(Default)]
struct Writer {
    /// The index of the snapshot in force.
    index: Index,
    /// Snapshots replaced while a reader may still hold them. Each is dropped here once nothing
    /// else holds it, so that freeing a large set (12% of a batch's time with 100,000 bans) falls
    /// to the writer rather than to whichever receive thread let go of it last.
    retired: Vec<Arc<BanSet>>,
    /// What the batches did to the kept bans since the last write, for the journal.
    log: Vec<Logged>,
    /// Lines in the journal since the file was last written whole.
    journaled: usize,
    /// The next write must be of the whole file (a replacement of a whole origin, a journal that
    /// could not be written, one replayed or found stale at start).
    rewrite: bool,
    /// The journal generation: the file's, and the journal's once `journal_ready`.
    generation: u64,
    /// The journal on disk starts with this generation's head, so lines can be appended.
    journal_ready: bool,
}

impl Writer {
    /// Whether the file (with its journal) is behind the snapshot: changes logged and not yet
    /// written, or a whole write due (after a whole-origin replacement, a failed write, a
    /// journal replayed or found stale at start). A store without a file logs nothing and is
    /// never due a whole write.
    fn unsaved(&self) -> bool {
        self.rewrite || !self.log.is_empty()
    }
}

/// The next snapshot being made, with its index kept in step and what it does to the kept
/// (non-config) bans logged for the journal.
struct Draft<'a> {
    set: BanSet,
    index: &'a mut Index,
    log: &'a mut Vec<Logged>,
    /// Off in a store without a file, and once the next write is to be whole (the batch
    /// replaced a whole origin, or an earlier one did and was not written yet).
    logging: bool,
}

impl Draft<'_> {
    fn put(&mut self, b: Arc<Ban>) {
        // The one replaced first: it may be filed under the same key.
        let old = self.set.insert(b.clone());
        if let Some(old) = &old {
            self.index.unfile(old);
        }
        self.index.file(&b);
        if self.logging {
            if b.origin != BanOrigin::Config {
                self.log.push(Logged::Put((*b).clone()));
            } else if let Some(old) = old.filter(|o| o.origin != BanOrigin::Config) {
                // A config ban over a kept one: the file no longer keeps that network.
                self.log.push(Logged::Del(old.network));
            }
        }
    }

    fn take(&mut self, net: IpNet) -> Option<Arc<Ban>> {
        let old = self.set.remove(net)?;
        self.index.unfile(&old);
        if self.logging && old.origin != BanOrigin::Config {
            self.log.push(Logged::Del(old.network));
        }
        Some(old)
    }

    /// Takes every ban `drop` picks: a walk, for the rare batches that change a whole origin.
    fn take_all(&mut self, drop: impl Fn(&Ban) -> bool) {
        let gone: Vec<IpNet> = self
            .set
            .iter()
            .filter(|(_, b)| drop(b))
            .map(|(_, b)| b.network)
            .collect();
        for net in gone {
            self.take(net);
        }
    }

    /// Takes the soonest-expiring ban; `None` when none can expire.
    fn take_soonest(&mut self) -> Option<(u64, IpNet)> {
        let (at, net) = *self.index.expiring.first()?;
        if self.take(net).is_none() {
            // The index names a ban the set does not hold: never made so, but the entry must go
            // or the callers' loops would not end.
            self.index.expiring.remove(&(at, net));
        }
        Some((at, net))
    }
}

/// The current ban snapshot and the queue of changes to it.
pub struct BanStore {
    snapshot: ArcSwap<BanSet>,
    /// The snapshot's bans by origin, replaced with it: read every second for the gauges
    /// without walking the snapshot (with 10,000 bans the walk cost ~0.3 ms a second on a core
    /// shared with the receive threads).
    by_origin: Mutex<[usize; 4]>,
    writer: Mutex<Writer>,
    pending: Mutex<Vec<Change>>,
    wake: Notify,
    file: Option<PathBuf>,
    /// Bans held besides config ones; past this, those expiring soonest are evicted.
    max_entries: usize,
}

impl std::fmt::Debug for BanStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BanStore")
            .field("entries", &self.snapshot.load().len())
            .field("file", &self.file)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl BanStore {
    /// Shortest time between two applied batches.
    pub const MIN_APPLY_INTERVAL: Duration = Duration::from_millis(5);
    /// Longest time a changed ban set waits to be written to the ban file.
    pub const SAVE_INTERVAL: Duration = Duration::from_secs(1);
    /// Lines the journal may hold before the ban file is written whole, whatever its size.
    pub const JOURNAL_MIN: usize = 1_000;
    /// How many times as long as a batch or a write of the file took the next one waits, at least.
    pub const PACE: u32 = 10;
    /// How often expired bans are purged when nothing else happens.
    pub const PURGE_INTERVAL: Duration = Duration::from_secs(10);

    /// An empty store keeping its bans in `file` (none: memory only).
    pub fn new(file: Option<PathBuf>, max_entries: usize) -> BanStore {
        BanStore {
            snapshot: ArcSwap::from_pointee(BanSet::new()),
            by_origin: Mutex::new([0; 4]),
            writer: Mutex::new(Writer::default()),
            pending: Mutex::new(Vec::new()),
            wake: Notify::new(),
            file,
            max_entries,
        }
    }

    /// A store loaded from `file` (a missing file is an empty store); expired bans are skipped.
    pub fn open(file: PathBuf, max_entries: usize, now_ms: u64) -> Result<BanStore, BanFileError> {
        let store = BanStore::new(Some(file.clone()), max_entries);
        let mut base = NetSet::new();
        let mut generation = 0;
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                let parsed: BanFile =
                    serde_json::from_str(&text).map_err(|e| BanFileError::format(&file, e))?;
                if parsed.version != FILE_VERSION {
                    return Err(BanFileError::format(
                        &file,
                        format!(
                            "version {} (this edge reads version {FILE_VERSION})",
                            parsed.version
                        ),
                    ));
                }
                generation = parsed.journal;
                for b in parsed.bans {
                    if b.origin != BanOrigin::Config {
                        base.insert(b.network, Arc::new(b));
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(BanFileError::io(&file, e)),
        }
        let journal = journal_path(&file);
        let replayed = match std::fs::read_to_string(&journal) {
            Ok(text) => replay(&text, generation, &mut base)
                .map_err(|m| BanFileError::format(&journal, m))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(0),
            Err(e) => return Err(BanFileError::io(&journal, e)),
        };
        base.retain(|b| b.live(now_ms));
        info!(path = %file.display(), bans = base.len(), replayed = replayed.unwrap_or(0), "ban file loaded");
        if replayed.is_none() {
            info!(path = %journal.display(), "ban journal older than the ban file: not replayed");
        }
        let set = BanSet::with_base(base);
        let mut w = lock(&store.writer);
        w.index = Index::of(&set);
        w.generation = generation;
        // What the journal held goes into the file at the first write, which starts a new
        // journal; a stale journal is replaced by it too, so that nothing is appended to it.
        w.rewrite = replayed != Some(0);
        store.install(set, &mut w);
        drop(w);
        Ok(store)
    }

    /// Makes `set` (indexed by `w.index`) the snapshot, with its counts; the one it replaces
    /// is retired.
    fn install(&self, set: BanSet, w: &mut Writer) {
        // The counts' lock is held across the swap, so a reader never pairs a snapshot with
        // another's counts for longer than this store.
        let mut counts = lock(&self.by_origin);
        let old = self.snapshot.swap(Arc::new(set));
        *counts = w.index.by_origin;
        drop(counts);
        w.retired.push(old);
    }

    /// Entries in the snapshot by origin (expired ones not yet purged included), without walking it.
    pub fn count_by_origin(&self) -> [(BanOrigin, usize); 4] {
        let counts = *lock(&self.by_origin);
        BanOrigin::ALL.map(|o| (o, counts[o.index()]))
    }

    /// The live ban covering `ip`, if any. Lock-free.
    pub fn lookup(&self, ip: IpAddr, now_ms: u64) -> Option<Arc<Ban>> {
        // The longest live one: an expired host ban must not hide a live network ban.
        self.snapshot.load().find(ip, |b| b.live(now_ms)).cloned()
    }

    /// The current snapshot (for listing and metrics).
    pub fn snapshot(&self) -> Arc<BanSet> {
        self.snapshot.load_full()
    }

    /// Queues a ban; it takes effect with the next batch.
    pub fn ban(&self, ban: Ban) {
        lock(&self.pending).push(Change::Add(Arc::new(ban)));
        self.wake.notify_one();
    }

    /// Queues the removal of exactly `network`.
    pub fn unban(&self, network: IpNet) {
        lock(&self.pending).push(Change::Remove(network));
        self.wake.notify_one();
    }

    /// Queues the removal of `network` if its ban came from `origin` (a cluster unban must not lift
    /// a local auto-ban of the same address).
    pub fn unban_from(&self, network: IpNet, origin: BanOrigin) {
        lock(&self.pending).push(Change::RemoveFrom(network, origin));
        self.wake.notify_one();
    }

    /// Queues replacing every ban of `origin` with `bans` (a cluster snapshot).
    pub fn replace(&self, origin: BanOrigin, bans: Vec<Ban>) {
        let bans = bans.into_iter().map(Arc::new).collect();
        lock(&self.pending).push(Change::Replace(origin, bans));
        self.wake.notify_one();
    }

    /// Queues replacing the config bans with `networks`.
    pub fn set_config(&self, networks: Vec<IpNet>) {
        lock(&self.pending).push(Change::Config(networks));
        self.wake.notify_one();
    }

    /// Applies everything queued and purges what expired before `now_ms`, in one new snapshot.
    /// Returns how many entries the snapshot holds.
    pub fn apply(&self, now_ms: u64) -> usize {
        let mut w = lock(&self.writer);
        // Snapshots no reader holds any more are freed here, off the receive path.
        w.retired.retain(|old| Arc::strong_count(old) > 1);
        let changes = std::mem::take(&mut *lock(&self.pending));
        let cur = self.snapshot.load_full();
        let expired = now_ms >= w.index.earliest_expiry();
        if changes.is_empty() && !expired {
            return cur.len();
        }
        let w = &mut *w;
        let mut next = Draft {
            set: (*cur).clone(),
            index: &mut w.index,
            log: &mut w.log,
            // A store without a file keeps no log; nor does one whose next write is whole.
            logging: self.file.is_some() && !w.rewrite,
        };
        let mut whole = false;
        for c in changes {
            match c {
                Change::Add(b) => {
                    // A config ban is not shortened by a rule's TTL.
                    let keep_existing = next.set.get(b.network).is_some_and(|old| {
                        old.origin == BanOrigin::Config && b.origin != BanOrigin::Config
                    });
                    if !keep_existing {
                        next.put(b);
                    }
                }
                Change::Remove(n) => {
                    next.take(n);
                }
                Change::RemoveFrom(n, origin) => {
                    let ours = next.set.get(n).is_some_and(|b| b.origin == origin);
                    if ours {
                        next.take(n);
                    }
                }
                Change::Replace(origin, bans) => {
                    // A whole origin (a cluster snapshot of any size): the file is written whole
                    // rather than journaled a ban a line.
                    if next.logging {
                        next.logging = false;
                        next.log.clear();
                        whole = true;
                    }
                    next.take_all(|b| b.origin == origin);
                    for b in bans {
                        let config_there = next
                            .set
                            .get(b.network)
                            .is_some_and(|old| old.origin == BanOrigin::Config);
                        if !config_there {
                            next.put(b);
                        }
                    }
                }
                Change::Config(nets) => {
                    next.take_all(|b| b.origin == BanOrigin::Config && !nets.contains(&b.network));
                    for n in nets {
                        next.put(Arc::new(Ban {
                            network: n,
                            origin: BanOrigin::Config,
                            rule: "config".into(),
                            reason: "policy.bans.networks".into(),
                            created_unix_ms: now_ms,
                            expires_unix_ms: NEVER,
                        }));
                    }
                }
            }
        }
        // What expired, soonest first, up to the first ban still live.
        while next.index.earliest_expiry() <= now_ms {
            next.take_soonest();
        }
        self.evict_over_cap(&mut next);
        w.rewrite |= whole;
        let mut set = next.set;
        set.fold_if_large(BanSet::FOLD_MIN);
        drop(cur);
        let len = set.len();
        self.install(set, w);
        len
    }

    /// Past `max_entries` bans not from config, takes those expiring soonest.
    fn evict_over_cap(&self, next: &mut Draft) {
        let mut evicted = 0usize;
        while next.index.expiring.len() > self.max_entries && next.take_soonest().is_some() {
            evicted += 1;
        }
        if evicted > 0 {
            warn!(
                evicted,
                max_entries = self.max_entries,
                "ban list full: evicted the bans expiring soonest"
            );
        }
    }

    /// Keeps what the batches since the last call did to the non-config bans: appended to the
    /// journal, or the whole ban file written anew (and the journal emptied) when the journal
    /// would grow past the file's size ([`BanStore::JOURNAL_MIN`] lines at least), after a
    /// replacement of a whole origin, or after a failed write.
    pub fn save_if_dirty(&self) -> Result<(), BanFileError> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        let mut w = lock(&self.writer);
        if !w.unsaved() {
            return Ok(());
        }
        let snap = self.snapshot.load_full();
        let kept = snap.len() - w.index.by_origin[BanOrigin::Config.index()];
        let journal = journal_path(path);
        if !w.rewrite && w.journaled + w.log.len() <= Self::JOURNAL_MIN.max(kept) {
            let log = std::mem::take(&mut w.log);
            let head = (!w.journal_ready).then_some(w.generation);
            return match append_lines(&journal, head, &log) {
                Ok(()) => {
                    w.journaled += log.len();
                    w.journal_ready = true;
                    Ok(())
                }
                Err(e) => {
                    // The journal may hold part of it: the whole file next time, which holds all.
                    w.rewrite = true;
                    Err(BanFileError::io(&journal, e))
                }
            };
        }
        w.log.clear();
        w.rewrite = true;
        let mut bans: Vec<&Ban> = snap
            .iter()
            .filter(|(_, b)| b.origin != BanOrigin::Config)
            .map(|(_, b)| &**b)
            .collect();
        bans.sort_by_key(|b| b.network);
        // A new generation: a crash between the file's rename and the journal's leaves a journal
        // of the old one, which the next start does not replay over the newer file.
        let generation = w.generation + 1;
        let body = file_body(generation, &bans).map_err(|e| BanFileError::format(path, e))?;
        if let Err(e) = write_atomic(path, &body) {
            return Err(BanFileError::io(path, e));
        }
        w.generation = generation;
        w.journaled = 0;
        match write_atomic(&journal, &journal_head(generation)) {
            Ok(()) => {
                w.rewrite = false;
                w.journal_ready = true;
            }
            Err(e) => {
                // Lines appended to the old journal would not be replayed: whole files until a
                // new journal can be started.
                w.journal_ready = false;
                return Err(BanFileError::io(&journal, e));
            }
        }
        Ok(())
    }

    /// The writer: applies queued changes in batches, purges expired bans, keeps the file. A
    /// batch or a write of the file waits for at least [`BanStore::PACE`] times as long as the
    /// last one took, so the writer uses at most about a tenth of a core however long the list
    /// (with 100,000 bans a batch takes ~3 ms and a write of the file over 100).
    async fn run(self: Arc<Self>, clock: crate::clock::Clock, stop: CancellationToken) {
        use tokio::time::Instant;
        let mut next_save = Instant::now();
        let mut next_apply = Instant::now();
        loop {
            let unsaved = lock(&self.writer).unsaved();
            tokio::select! {
                _ = stop.cancelled() => break,
                // A lone ban applies at once; a storm is applied in batches.
                _ = self.wake.notified() => tokio::time::sleep_until(next_apply).await,
                _ = tokio::time::sleep_until(next_save), if unsaved => {}
                _ = tokio::time::sleep(Self::PURGE_INTERVAL) => {}
            }
            let start = Instant::now();
            self.apply(clock.now_ms());
            let done = Instant::now();
            next_apply = done + Self::MIN_APPLY_INTERVAL.max((done - start) * Self::PACE);
            if done >= next_save && lock(&self.writer).unsaved() {
                if let Err(e) = self.save_if_dirty() {
                    warn!(error = %e, "cannot write the ban file; will retry");
                }
                let saved = Instant::now();
                next_save = saved + Self::SAVE_INTERVAL.max((saved - done) * Self::PACE);
            }
        }
        self.apply(clock.now_ms());
        if let Err(e) = self.save_if_dirty() {
            warn!(error = %e, "cannot write the ban file at shutdown");
        }
    }

    /// Runs [`BanStore::run`] on a thread of its own (`bans`) with a runtime of its own, until
    /// `stop` and the last write; `done` is dropped when it has finished. On a runtime worker, a
    /// batch's milliseconds of CPU and the file's `fsync` would hold up every TCP connection that
    /// worker serves.
    pub fn spawn_writer<T: Send + 'static>(
        self: Arc<Self>,
        clock: crate::clock::Clock,
        stop: CancellationToken,
        done: T,
    ) -> std::io::Result<()> {
        crate::spawn_on_own_thread("bans", move || self.run(clock, stop), done)
    }
}

/// The journal beside the ban file `file` (`bans.json` → `bans.journal`).
fn journal_path(file: &Path) -> PathBuf {
    file.with_extension("journal")
}

/// The journal's first line for `generation`.
fn journal_head(generation: u64) -> Vec<u8> {
    let mut head = serde_json::to_vec(&JournalHead {
        journal: generation,
    })
    .unwrap_or_default();
    head.push(b'\n');
    head
}

/// Replays the lines of a journal of `generation` over `base`: the number replayed, or `None`
/// for a journal of another generation (older than the file: not replayed). A last line cut
/// short (a crash in the middle of an append) is left out; a bad line before it is an error,
/// naming the line.
fn replay(
    text: &str,
    generation: u64,
    base: &mut NetSet<Arc<Ban>>,
) -> Result<Option<usize>, String> {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let Some(first) = lines.first() else {
        return Ok(Some(0));
    };
    let head: JournalHead =
        serde_json::from_str(first).map_err(|e| format!("line 1 (the journal's head): {e}"))?;
    if head.journal != generation {
        return Ok(None);
    }
    let mut replayed = 0;
    for (i, line) in lines.iter().enumerate().skip(1) {
        match serde_json::from_str::<Logged>(line) {
            Ok(Logged::Put(b)) => {
                if b.origin != BanOrigin::Config {
                    base.insert(b.network, Arc::new(b));
                }
            }
            Ok(Logged::Del(net)) => {
                base.remove(net);
            }
            Err(e) if i + 1 == lines.len() => {
                warn!(error = %e, "the ban journal's last line is cut short; left out");
                break;
            }
            Err(e) => return Err(format!("line {}: {e}", i + 1)),
        }
        replayed += 1;
    }
    Ok(Some(replayed))
}

/// Appends `log` to the journal at `path`, a line each, and syncs it; with `head`, the journal is
/// started anew with that generation's head first.
fn append_lines(path: &Path, head: Option<u64>, log: &[Logged]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(generation) = head {
        write_atomic(path, &journal_head(generation))?;
    }
    let mut body = Vec::with_capacity(log.len() * 160);
    for entry in log {
        serde_json::to_writer(&mut body, entry)?;
        body.push(b'\n');
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(&body)?;
    f.sync_data()
}

/// The ban file's text: `{"version":1,"bans":[…]}` with a ban a line, so an address can be looked
/// up with grep; written without indentation, which took longer than the rest of the write.
fn file_body(generation: u64, bans: &[&Ban]) -> serde_json::Result<Vec<u8>> {
    let mut body = Vec::with_capacity(64 + bans.len() * 160);
    body.extend_from_slice(
        format!("{{\"version\":{FILE_VERSION},\"journal\":{generation},\"bans\":[").as_bytes(),
    );
    for (i, b) in bans.iter().enumerate() {
        body.extend_from_slice(if i == 0 { b"\n" } else { b",\n" });
        serde_json::to_writer(&mut body, b)?;
    }
    body.extend_from_slice(b"\n]}\n");
    Ok(body)
}

/// Writes `body` to `path` through a synced temporary file and a rename.
pub(crate) fn write_atomic(path: &Path, body: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)?;
        }
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(body)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ban(net: &str, origin: BanOrigin, expires: u64) -> Ban {
        Ban {
            network: net.parse().unwrap(),
            origin,
            rule: "test".into(),
            reason: "r".into(),
            created_unix_ms: 0,
            expires_unix_ms: expires,
        }
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn bans_take_effect_in_batches_and_expire() {
        let s = BanStore::new(None, 100);
        s.ban(ban("192.0.2.1/32", BanOrigin::Auto, 1_000));
        s.ban(ban("2001:db8::/32", BanOrigin::Manual, NEVER));
        assert!(
            s.lookup(ip("192.0.2.1"), 0).is_none(),
            "queued, not applied"
        );
        assert_eq!(s.apply(0), 2);
        assert_eq!(s.lookup(ip("192.0.2.1"), 999).unwrap().rule, "test");
        assert!(s.lookup(ip("192.0.2.1"), 1_000).is_none(), "expired at TTL");
        assert!(s.lookup(ip("2001:db8:5::1"), 5_000).is_some());
        assert_eq!(s.apply(1_000), 1, "expired ban purged");
        s.unban("2001:db8::/32".parse().unwrap());
        assert_eq!(s.apply(1_000), 0);
        let w = lock(&s.writer);
        assert!(
            w.log.is_empty(),
            "a store without a file keeps no journal log"
        );
    }

    #[test]
    fn counts_by_origin_follow_each_snapshot_and_the_soonest_expiry_triggers_the_purge() {
        let s = BanStore::new(None, 100);
        let count = |s: &BanStore, o: BanOrigin| {
            s.count_by_origin()
                .into_iter()
                .find(|(origin, _)| *origin == o)
                .map(|(_, n)| n)
                .unwrap()
        };
        s.set_config(vec!["198.51.100.0/24".parse().unwrap()]);
        s.ban(ban("192.0.2.1/32", BanOrigin::Auto, 2_000));
        s.ban(ban("192.0.2.2/32", BanOrigin::Auto, 5_000));
        s.ban(ban("192.0.2.3/32", BanOrigin::Manual, NEVER));
        assert_eq!(count(&s, BanOrigin::Auto), 0, "nothing applied yet");
        assert_eq!(s.apply(0), 4);
        let by: Vec<usize> = s.count_by_origin().iter().map(|(_, n)| *n).collect();
        assert_eq!(by, [1, 2, 1, 0], "config, auto, manual, cluster");
        assert_eq!(s.apply(1_999), 4, "nothing due before the soonest expiry");
        assert_eq!(s.apply(2_000), 3, "due at it, with no change queued");
        assert_eq!(count(&s, BanOrigin::Auto), 1);
        assert_eq!(s.apply(5_000), 2);
        assert_eq!(count(&s, BanOrigin::Auto), 0);
        assert_eq!(count(&s, BanOrigin::Manual), 1);
        let names: Vec<&str> = BanOrigin::ALL.iter().map(|o| o.as_str()).collect();
        let serde_names: Vec<String> = BanOrigin::ALL
            .iter()
            .map(|o| {
                serde_json::to_value(o)
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(names, serde_names, "labels are the ban file's names");
    }

    #[test]
    fn an_expired_host_ban_does_not_hide_a_live_network_ban() {
        let s = BanStore::new(None, 100);
        s.ban(ban("192.0.2.0/24", BanOrigin::Manual, NEVER));
        s.ban(ban("192.0.2.7/32", BanOrigin::Auto, 10));
        s.apply(0);
        assert_eq!(
            s.lookup(ip("192.0.2.7"), 20).unwrap().network.prefix_len(),
            24
        );
    }

    #[test]
    fn config_bans_are_replaced_on_reload_and_not_shortened() {
        let s = BanStore::new(None, 100);
        s.set_config(vec!["198.51.100.0/24".parse().unwrap()]);
        s.apply(0);
        s.ban(ban("198.51.100.0/24", BanOrigin::Auto, 5));
        s.apply(0);
        assert!(s.lookup(ip("198.51.100.9"), 10).is_some());
        // Nor when a longer ban sits at the network's own address (the check reads exactly that
        // network, not the longest ban covering its address).
        s.ban(ban("198.51.100.0/32", BanOrigin::Auto, 5));
        s.apply(0);
        s.ban(ban("198.51.100.0/24", BanOrigin::Auto, 5));
        s.apply(0);
        assert_eq!(
            s.lookup(ip("198.51.100.9"), 10).map(|b| b.origin),
            Some(BanOrigin::Config)
        );
        s.set_config(vec!["203.0.113.0/24".parse().unwrap()]);
        s.apply(10);
        assert!(s.lookup(ip("198.51.100.9"), 10).is_none());
        assert!(s.lookup(ip("203.0.113.1"), 10).is_some());
    }

    #[test]
    fn cluster_bans_are_replaced_by_snapshots_and_removed_only_as_cluster_bans() {
        let s = BanStore::new(None, 100);
        s.ban(ban("192.0.2.1/32", BanOrigin::Auto, NEVER));
        s.replace(
            BanOrigin::Cluster,
            vec![
                ban("192.0.2.1/32", BanOrigin::Cluster, NEVER),
                ban("192.0.2.2/32", BanOrigin::Cluster, NEVER),
            ],
        );
        s.apply(0);
        assert_eq!(s.snapshot().len(), 2);
        s.unban_from("192.0.2.3/32".parse().unwrap(), BanOrigin::Cluster);
        s.replace(
            BanOrigin::Cluster,
            vec![ban("192.0.2.9/32", BanOrigin::Cluster, NEVER)],
        );
        s.apply(0);
        assert!(
            s.lookup(ip("192.0.2.2"), 0).is_none(),
            "gone with the new snapshot"
        );
        assert!(s.lookup(ip("192.0.2.9"), 0).is_some());
        s.ban(ban("192.0.2.5/32", BanOrigin::Auto, NEVER));
        s.unban_from("192.0.2.5/32".parse().unwrap(), BanOrigin::Cluster);
        s.apply(0);
        assert!(
            s.lookup(ip("192.0.2.5"), 0).is_some(),
            "a local ban is not lifted by the cluster"
        );
    }

    #[test]
    fn cap_evicts_the_soonest_expiring() {
        let s = BanStore::new(None, 3);
        for i in 1..=5u64 {
            s.ban(ban(&format!("192.0.2.{i}/32"), BanOrigin::Auto, 100 * i));
        }
        s.apply(0);
        let snap = s.snapshot();
        assert_eq!(snap.len(), 3);
        assert!(!snap.contains(ip("192.0.2.1")) && !snap.contains(ip("192.0.2.2")));
        assert!(snap.contains(ip("192.0.2.5")));
    }

    #[test]
    fn the_file_keeps_local_bans_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bans.json");
        let s = BanStore::new(Some(path.clone()), 100);
        s.set_config(vec!["203.0.113.0/24".parse().unwrap()]);
        s.ban(ban("192.0.2.1/32", BanOrigin::Auto, 1_000));
        s.ban(ban("192.0.2.2/32", BanOrigin::Auto, 50));
        s.apply(0);
        s.save_if_dirty().unwrap();
        let again = BanStore::open(path.clone(), 100, 100).unwrap();
        assert!(again.lookup(ip("192.0.2.1"), 100).is_some());
        assert!(
            again.lookup(ip("192.0.2.2"), 100).is_none(),
            "expired one skipped"
        );
        assert!(
            again.lookup(ip("203.0.113.1"), 100).is_none(),
            "config bans come from config"
        );
        std::fs::write(&path, "{not json").unwrap();
        let err = BanStore::open(path.clone(), 100, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not valid"), "{err}");
        std::fs::write(&path, r#"{"version":2,"bans":[]}"#).unwrap();
        let err = BanStore::open(path, 100, 0).unwrap_err().to_string();
        assert!(err.contains("version 2"), "{err}");
    }

    #[test]
    fn the_file_is_json_with_a_ban_a_line() {
        let a = ban("192.0.2.1/32", BanOrigin::Auto, 1_000);
        let b = Ban {
            reason: "quote \" and\nnewline".into(),
            ..ban("2001:db8::/32", BanOrigin::Manual, NEVER)
        };
        let body = String::from_utf8(file_body(7, &[&a, &b]).unwrap()).unwrap();
        let lines: Vec<&str> = body.lines().collect();
        assert_eq!(lines.len(), 4, "{body}");
        assert!(lines[1].contains("192.0.2.1/32") && lines[2].contains("2001:db8::/32"));
        let parsed: BanFile = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (parsed.version, parsed.journal, parsed.bans),
            (1, 7, vec![a, b])
        );
        let empty: BanFile = serde_json::from_slice(&file_body(0, &[]).unwrap()).unwrap();
        assert!(empty.bans.is_empty());
    }

    #[test]
    fn a_set_with_changes_beside_its_base_reads_as_one_map() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        // Networks inside one another, in both families, so that matches merge lengths.
        let nets: Vec<IpNet> = [
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.1.2.0/24",
            "10.1.3.0/24",
            "2001:db8::/32",
            "2001:db8:1::/48",
            "::/0",
        ]
        .iter()
        .map(|n| n.to_string())
        .chain((0..8).map(|i| format!("10.1.2.{i}/32")))
        .chain((0..4).map(|i| format!("2001:db8:1::{i}/128")))
        .map(|n| n.parse().unwrap())
        .collect();
        let probes: Vec<IpAddr> = ["10.1.2.3", "10.1.2.200", "10.1.3.1", "10.9.9.9", "11.0.0.1"]
            .iter()
            .chain(&[
                "2001:db8:1::2",
                "2001:db8:2::1",
                "2001:db9::1",
                "::ffff:10.1.2.5",
            ])
            .map(|a| a.parse().unwrap())
            .collect();
        let mut set = BanSet::new();
        let mut model: std::collections::BTreeMap<IpNet, u64> = Default::default();
        let mut folds = 0;
        for step in 0..5_000u64 {
            let net = nets[rng.random_range(0..nets.len())];
            match rng.random_range(0..10) {
                0..=5 => {
                    let old = set.insert(Arc::new(ban(&net.to_string(), BanOrigin::Auto, step)));
                    assert_eq!(
                        old.map(|b| b.expires_unix_ms),
                        model.insert(net, step),
                        "step {step}"
                    );
                }
                6..=8 => {
                    let old = set.remove(net);
                    assert_eq!(old.map(|b| b.expires_unix_ms), model.remove(&net));
                }
                _ => {
                    let before = Arc::as_ptr(&set.base);
                    set.fold_if_large(rng.random_range(0..6));
                    if Arc::as_ptr(&set.base) != before {
                        folds += 1;
                        assert!(set.delta.is_empty());
                    }
                }
            }
            assert_eq!(set.len(), model.len(), "step {step}");
            let all: std::collections::BTreeMap<IpNet, u64> =
                set.iter().map(|(n, b)| (n, b.expires_unix_ms)).collect();
            assert_eq!(all, model, "step {step}");
            assert_eq!(set.iter().count(), model.len(), "each network once");
            for n in &nets {
                assert_eq!(
                    set.get(*n).map(|b| b.expires_unix_ms),
                    model.get(n).copied()
                );
            }
            for ip in &probes {
                let got: Vec<(u8, u64)> = set
                    .matches(*ip)
                    .map(|(len, b)| (len, b.expires_unix_ms))
                    .collect();
                let mut want: Vec<(u8, u64)> = model
                    .iter()
                    .filter(|(n, _)| {
                        let mapped = match *ip {
                            IpAddr::V6(a) => a.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(*ip),
                            v4 => v4,
                        };
                        n.contains(&mapped)
                    })
                    .map(|(n, at)| (n.prefix_len(), *at))
                    .collect();
                want.sort_by_key(|w| std::cmp::Reverse(w.0));
                assert_eq!(got, want, "matches of {ip} at step {step}");
            }
        }
        assert!(folds > 50, "{folds} folds");
    }

    #[test]
    fn the_journal_keeps_every_batch_and_a_restart_replays_it() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(23);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data/bans.json");
        let journal = journal_path(&path);
        let s = BanStore::new(Some(path.clone()), 50);
        s.set_config(vec!["203.0.113.0/24".parse().unwrap()]);
        let nets: Vec<String> = (0..80).map(|i| format!("192.0.2.{i}/32")).collect();
        let origins = [BanOrigin::Auto, BanOrigin::Manual, BanOrigin::Cluster];
        let mut now = 1_000u64;
        let (mut appended, mut rewritten, mut restarts) = (0, 0, 0);
        for step in 0..3_000 {
            for _ in 0..rng.random_range(1..4) {
                let net = &nets[rng.random_range(0..nets.len())];
                match rng.random_range(0..10) {
                    0..=5 => s.ban(ban(
                        net,
                        origins[rng.random_range(0..3)],
                        now + rng.random_range(1..200) * 1_000,
                    )),
                    6..=8 => s.unban(net.parse().unwrap()),
                    // A config ban over a kept one, now and then a whole cluster snapshot.
                    _ if rng.random_bool(0.9) => s.set_config(vec![
                        "203.0.113.0/24".parse().unwrap(),
                        net.parse().unwrap(),
                    ]),
                    _ => s.replace(
                        BanOrigin::Cluster,
                        vec![ban(net, BanOrigin::Cluster, now + 50_000)],
                    ),
                }
            }
            now += rng.random_range(0..5) * 1_000;
            s.apply(now);
            let before = std::fs::metadata(&journal).map_or(0, |m| m.len());
            s.save_if_dirty().unwrap();
            let after = std::fs::metadata(&journal).map_or(0, |m| m.len());
            if after > before {
                appended += 1;
            } else if after < before {
                rewritten += 1;
            }
            if step % 50 == 49 {
                // A restart now reads back what the store holds, config bans aside.
                let again = BanStore::open(path.clone(), 50, now).unwrap();
                let mut kept = held(&s);
                kept.retain(|_, (o, _)| *o != BanOrigin::Config);
                assert_eq!(held(&again), kept, "restart at step {step}");
                restarts += 1;
            }
        }
        assert!(
            appended > 1_000 && rewritten > 3 && restarts == 60,
            "{appended} appends, {rewritten} rewrites"
        );
    }

    /// A store keeping its bans in a temporary directory: the directory, the ban file's path, the
    /// store.
    fn kept_store() -> (tempfile::TempDir, PathBuf, BanStore) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bans.json");
        let s = BanStore::new(Some(path.clone()), 100);
        (dir, path, s)
    }

    #[test]
    fn a_journal_cut_short_loses_its_last_line_only() {
        let (_dir, path, s) = kept_store();
        s.ban(ban("192.0.2.1/32", BanOrigin::Auto, NEVER));
        s.apply(0);
        s.save_if_dirty().unwrap();
        s.ban(ban("192.0.2.2/32", BanOrigin::Auto, NEVER));
        s.unban("192.0.2.1/32".parse().unwrap());
        s.apply(0);
        s.save_if_dirty().unwrap();
        assert!(!path.exists(), "small changes go to the journal only");
        let journal = journal_path(&path);
        let text = std::fs::read_to_string(&journal).unwrap();
        assert_eq!(text.lines().count(), 4, "a head and three lines: {text}");
        // A crash in the middle of the last append.
        std::fs::write(&journal, &text[..text.len() - 10]).unwrap();
        let again = BanStore::open(path.clone(), 100, 0).unwrap();
        assert!(
            again.lookup(ip("192.0.2.1"), 0).is_some(),
            "its removal was cut"
        );
        assert!(again.lookup(ip("192.0.2.2"), 0).is_some());
        // A bad line before the last is not a torn write: the file is refused, naming the line.
        let lines: Vec<&str> = text.lines().collect();
        std::fs::write(
            &journal,
            format!("{}\n{}\n{{oops\n{}\n", lines[0], lines[1], lines[3]),
        )
        .unwrap();
        let err = BanStore::open(path, 100, 0).unwrap_err().to_string();
        assert!(
            err.contains("bans.journal") && err.contains("line 3"),
            "{err}"
        );
    }

    #[test]
    fn a_config_ban_over_a_kept_one_reaches_the_disk_alone() {
        let (_dir, path, s) = kept_store();
        s.ban(ban("192.0.2.0/24", BanOrigin::Auto, NEVER));
        s.apply(0);
        s.save_if_dirty().unwrap();
        // A batch with nothing but the config change: the auto ban it replaced is off the disk.
        s.set_config(vec!["192.0.2.0/24".parse().unwrap()]);
        s.apply(0);
        s.save_if_dirty().unwrap();
        let again = BanStore::open(path, 100, 0).unwrap();
        assert!(again.snapshot().is_empty(), "{:?}", held(&again));
    }

    #[test]
    fn a_journal_older_than_the_file_is_not_replayed() {
        let (_dir, path, s) = kept_store();
        s.ban(ban("192.0.2.1/32", BanOrigin::Auto, NEVER));
        s.ban(ban("192.0.2.2/32", BanOrigin::Auto, NEVER));
        s.apply(0);
        s.unban("192.0.2.1/32".parse().unwrap());
        s.ban(ban("192.0.2.1/32", BanOrigin::Manual, NEVER));
        s.unban("192.0.2.2/32".parse().unwrap());
        s.apply(0);
        s.save_if_dirty().unwrap();
        let journal = journal_path(&path);
        let stale = std::fs::read_to_string(&journal).unwrap();
        // A cluster snapshot makes the next write whole, which empties the journal.
        s.replace(
            BanOrigin::Cluster,
            vec![ban("192.0.2.2/32", BanOrigin::Cluster, NEVER)],
        );
        s.apply(0);
        s.save_if_dirty().unwrap();
        assert!(path.exists());
        assert_eq!(
            std::fs::read_to_string(&journal).unwrap(),
            "{\"journal\":1}\n",
            "a new journal, of the file's generation"
        );
        // As if the process died between the file's rename and the new journal's: the old
        // journal's lines would take back the cluster snapshot's ban on 192.0.2.2.
        std::fs::write(&journal, &stale).unwrap();
        let again = BanStore::open(path, 100, 0).unwrap();
        assert_eq!(held(&again), held(&s));
    }

    /// What the snapshot holds: network → (origin, expiry).
    type Held = std::collections::BTreeMap<IpNet, (BanOrigin, u64)>;

    fn held(s: &BanStore) -> Held {
        s.snapshot()
            .iter()
            .map(|(_, b)| (b.network, (b.origin, b.expires_unix_ms)))
            .collect()
    }

    #[test]
    fn batches_keep_what_the_walks_of_every_ban_kept() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        const CAP: usize = 8;
        let s = BanStore::new(None, CAP);
        // The model: the same changes on a plain map, then the walks `apply` did before it kept
        // an index — drop what expired, then evict the soonest-expiring past the cap.
        let mut model = Held::new();
        let origins = [BanOrigin::Auto, BanOrigin::Manual, BanOrigin::Cluster];
        let nets: Vec<IpNet> = (0..16)
            .map(|i| format!("192.0.2.{i}/32"))
            .chain((0..4).map(|i| format!("198.51.{i}.0/24")))
            .map(|n| n.parse().unwrap())
            .collect();
        let mut now = 1_000u64;
        // Every expiry is different, so which ban goes first at the cap is never a tie.
        let mut serial = 0u64;
        let mut expiry = |rng: &mut rand::rngs::StdRng, now: u64| {
            serial += 1;
            now + rng.random_range(0..400) * 1_000 + serial
        };
        let (mut evictions, mut purges) = (0, 0);
        for step in 0..3_000 {
            for _ in 0..rng.random_range(0..4) {
                let net = nets[rng.random_range(0..nets.len())];
                let origin = origins[rng.random_range(0..origins.len())];
                let config_there = model
                    .get(&net)
                    .is_some_and(|(o, _)| *o == BanOrigin::Config);
                match rng.random_range(0..20) {
                    0..=10 => {
                        // Now and then the very ban held again (a rule firing twice, a cluster
                        // echo of a local ban): filed under the key of the one it replaces.
                        let again = model
                            .get(&net)
                            .map(|(_, at)| *at)
                            .filter(|at| *at != NEVER && rng.random_bool(0.3));
                        let b = Ban {
                            expires_unix_ms: again.unwrap_or_else(|| expiry(&mut rng, now)),
                            ..ban(&net.to_string(), origin, 0)
                        };
                        if !config_there {
                            model.insert(net, (origin, b.expires_unix_ms));
                        }
                        s.ban(b);
                    }
                    11..=13 => {
                        model.remove(&net);
                        s.unban(net);
                    }
                    14..=16 => {
                        if model.get(&net).is_some_and(|(o, _)| *o == origin) {
                            model.remove(&net);
                        }
                        s.unban_from(net, origin);
                    }
                    17..=18 => {
                        let bans: Vec<Ban> = (0..rng.random_range(0..5))
                            .map(|_| Ban {
                                expires_unix_ms: expiry(&mut rng, now),
                                ..ban(
                                    &nets[rng.random_range(0..nets.len())].to_string(),
                                    BanOrigin::Cluster,
                                    0,
                                )
                            })
                            .collect();
                        model.retain(|_, (o, _)| *o != BanOrigin::Cluster);
                        for b in &bans {
                            let config_there = model
                                .get(&b.network)
                                .is_some_and(|(o, _)| *o == BanOrigin::Config);
                            if !config_there {
                                model.insert(b.network, (b.origin, b.expires_unix_ms));
                            }
                        }
                        s.replace(BanOrigin::Cluster, bans);
                    }
                    _ => {
                        let listed: Vec<IpNet> = (0..rng.random_range(0..3))
                            .map(|_| nets[rng.random_range(0..nets.len())])
                            .collect();
                        model.retain(|n, (o, _)| *o != BanOrigin::Config || listed.contains(n));
                        for n in &listed {
                            model.insert(*n, (BanOrigin::Config, NEVER));
                        }
                        s.set_config(listed);
                    }
                }
            }
            now += rng.random_range(0..20) * 1_000;
            let before = model.len();
            model.retain(|_, (_, at)| now < *at);
            purges += before - model.len();
            let mut soonest: Vec<(u64, IpNet)> = model
                .iter()
                .filter(|(_, (o, _))| *o != BanOrigin::Config)
                .map(|(n, (_, at))| (*at, *n))
                .collect();
            soonest.sort();
            for (_, n) in soonest.iter().take(soonest.len().saturating_sub(CAP)) {
                model.remove(n);
                evictions += 1;
            }
            assert_eq!(s.apply(now), model.len(), "step {step}");
            assert_eq!(held(&s), model, "step {step}");
            let mut counts = [0; 4];
            for (o, _) in model.values() {
                counts[o.index()] += 1;
            }
            let got: Vec<usize> = s.count_by_origin().iter().map(|(_, n)| *n).collect();
            assert_eq!(got, counts, "counts by origin at step {step}");
        }
        assert!(
            evictions > 100 && purges > 100,
            "the walk reached the cap ({evictions} evicted) and expiries ({purges} purged)"
        );
        // What readers let go of is freed by the writer: every snapshot but the one in force.
        let w = lock(&s.writer);
        assert!(w.retired.len() <= 1, "{} retired held", w.retired.len());
    }
}
