//! The ban set: one immutable [`NetSet`] snapshot of banned networks read without locks by the
//! pre-parse gate, replaced atomically (`arc-swap`) by the [`BanStore`] writer.
//!
//! New bans are queued and applied in batches: copying a 100,000-entry snapshot per ban would let a
//! storm of auto-bans eat a core, so the writer task applies everything queued at once when the last
//! batch is older than [`BanStore::MIN_APPLY_INTERVAL`], else when it is — the next message of a just-banned source is still stopped by
//! the rule that banned it, so nothing slips through meanwhile. Expired bans are ignored at lookup
//! and purged by the writer. Bans made on this edge (not those from config) are kept in a JSON file
//! written atomically at most once every [`BanStore::SAVE_INTERVAL`] (and at shutdown), so a
//! restart keeps them: writing 100,000 bans after every batch of a cluster sync cost more than the
//! sync itself. A crash loses at most that second of bans on disk; cluster bans come back with the
//! next snapshot and auto-bans were proposed to the cluster as they were made.

use crate::netset::NetSet;
use arc_swap::ArcSwap;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
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

/// What the ban file holds.
#[derive(Debug, Serialize, Deserialize)]
struct BanFile {
    version: u32,
    bans: Vec<Ban>,
}

/// A snapshot: network → ban.
pub type BanSet = NetSet<Arc<Ban>>;

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

/// What is read of a snapshot every second (gauges) or every purge interval, worked out once when
/// the snapshot is made rather than by walking its entries: with 10,000 bans the walk cost the
/// housekeeping task ~0.3 ms a second on a core it shares with the receive threads.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Tally {
    by_origin: [usize; 4],
    /// The soonest expiry in the snapshot ([`NEVER`] when none expires).
    earliest_expiry: u64,
}

impl Tally {
    const EMPTY: Tally = Tally {
        by_origin: [0; 4],
        earliest_expiry: NEVER,
    };

    fn of(set: &BanSet) -> Tally {
        let mut t = Tally::EMPTY;
        for (_, b) in set.iter() {
            t.by_origin[b.origin.index()] += 1;
            t.earliest_expiry = t.earliest_expiry.min(b.expires_unix_ms);
        }
        t
    }
}

/// The current ban snapshot and the queue of changes to it.
pub struct BanStore {
    snapshot: ArcSwap<BanSet>,
    /// The tally of `snapshot`, replaced with it.
    tally: Mutex<Tally>,
    pending: Mutex<Vec<Change>>,
    wake: Notify,
    file: Option<PathBuf>,
    /// A batch changed what the file should hold.
    dirty: AtomicBool,
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
    /// How often expired bans are purged when nothing else happens.
    pub const PURGE_INTERVAL: Duration = Duration::from_secs(10);

    /// An empty store keeping its bans in `file` (none: memory only).
    pub fn new(file: Option<PathBuf>, max_entries: usize) -> BanStore {
        BanStore {
            snapshot: ArcSwap::from_pointee(BanSet::new()),
            tally: Mutex::new(Tally::EMPTY),
            pending: Mutex::new(Vec::new()),
            wake: Notify::new(),
            file,
            dirty: AtomicBool::new(false),
            max_entries,
        }
    }

    /// A store loaded from `file` (a missing file is an empty store); expired bans are skipped.
    pub fn open(file: PathBuf, max_entries: usize, now_ms: u64) -> Result<BanStore, BanFileError> {
        let store = BanStore::new(Some(file.clone()), max_entries);
        let io = |source| BanFileError::Io {
            path: file.display().to_string(),
            source,
        };
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(store),
            Err(e) => return Err(io(e)),
        };
        let parsed: BanFile = serde_json::from_str(&text).map_err(|e| BanFileError::Format {
            path: file.display().to_string(),
            message: e.to_string(),
        })?;
        let mut set = BanSet::new();
        for b in parsed.bans {
            if b.live(now_ms) && b.origin != BanOrigin::Config {
                set.insert(b.network, Arc::new(b));
            }
        }
        info!(path = %file.display(), bans = set.len(), "ban file loaded");
        store.install(set);
        Ok(store)
    }

    /// Makes `set` the snapshot, with its tally.
    fn install(&self, set: BanSet) {
        let tally = Tally::of(&set);
        // The tally's lock is held across the swap, so a reader never pairs a snapshot with
        // another's tally for longer than this store.
        let mut t = lock(&self.tally);
        self.snapshot.store(Arc::new(set));
        *t = tally;
    }

    /// Entries in the snapshot by origin (expired ones not yet purged included), without walking it.
    pub fn count_by_origin(&self) -> [(BanOrigin, usize); 4] {
        let t = *lock(&self.tally);
        BanOrigin::ALL.map(|o| (o, t.by_origin[o.index()]))
    }

    /// The live ban covering `ip`, if any. Lock-free.
    pub fn lookup(&self, ip: IpAddr, now_ms: u64) -> Option<Arc<Ban>> {
        // The longest live one: an expired host ban must not hide a live network ban.
        self.snapshot
            .load()
            .matches(ip)
            .find(|(_, b)| b.live(now_ms))
            .map(|(_, b)| b.clone())
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
        let changes = std::mem::take(&mut *lock(&self.pending));
        let cur = self.snapshot.load();
        let expired = now_ms >= lock(&self.tally).earliest_expiry;
        if changes.is_empty() && !expired {
            return cur.len();
        }
        let mut next: BanSet = (**cur).clone();
        let mut file_changed = expired;
        for c in changes {
            match c {
                Change::Add(b) => {
                    // A config ban is not shortened by a rule's TTL.
                    let keep_existing = next.lookup(b.network.addr()).is_some_and(|(len, old)| {
                        len == b.network.prefix_len()
                            && old.origin == BanOrigin::Config
                            && b.origin != BanOrigin::Config
                    });
                    if !keep_existing {
                        next.insert(b.network, b);
                        file_changed = true;
                    }
                }
                Change::Remove(n) => {
                    file_changed |= next.remove(n).is_some();
                }
                Change::RemoveFrom(n, origin) => {
                    let ours = next
                        .lookup(n.addr())
                        .is_some_and(|(len, b)| len == n.prefix_len() && b.origin == origin);
                    if ours {
                        next.remove(n);
                        file_changed = true;
                    }
                }
                Change::Replace(origin, bans) => {
                    next.retain(|b| b.origin != origin);
                    for b in bans {
                        let config_there =
                            next.lookup(b.network.addr()).is_some_and(|(len, old)| {
                                len == b.network.prefix_len() && old.origin == BanOrigin::Config
                            });
                        if !config_there {
                            next.insert(b.network, b);
                        }
                    }
                    file_changed = true;
                }
                Change::Config(nets) => {
                    next.retain(|b| b.origin != BanOrigin::Config || nets.contains(&b.network));
                    for n in nets {
                        next.insert(
                            n,
                            Arc::new(Ban {
                                network: n,
                                origin: BanOrigin::Config,
                                rule: "config".into(),
                                reason: "policy.bans.networks".into(),
                                created_unix_ms: now_ms,
                                expires_unix_ms: NEVER,
                            }),
                        );
                    }
                }
            }
        }
        next.retain(|b| b.live(now_ms));
        self.evict_over_cap(&mut next);
        let len = next.len();
        self.install(next);
        if file_changed {
            self.dirty.store(true, Ordering::Release);
        }
        len
    }

    fn evict_over_cap(&self, set: &mut BanSet) {
        let mut expiries: Vec<u64> = set
            .iter()
            .filter(|(_, b)| b.origin != BanOrigin::Config)
            .map(|(_, b)| b.expires_unix_ms)
            .collect();
        if expiries.len() <= self.max_entries {
            return;
        }
        let excess = expiries.len() - self.max_entries;
        expiries.sort_unstable();
        let cut = expiries[excess - 1];
        let mut evicted = 0;
        set.retain(|b| {
            if b.origin != BanOrigin::Config && b.expires_unix_ms <= cut && evicted < excess {
                evicted += 1;
                false
            } else {
                true
            }
        });
        warn!(
            evicted,
            max_entries = self.max_entries,
            "ban list full: evicted the bans expiring soonest"
        );
    }

    /// Writes the non-config bans to the ban file if a batch changed them.
    pub fn save_if_dirty(&self) -> Result<(), BanFileError> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let snap = self.snapshot.load();
        let mut bans: Vec<Ban> = snap
            .iter()
            .filter(|(_, b)| b.origin != BanOrigin::Config)
            .map(|(_, b)| (**b).clone())
            .collect();
        bans.sort_by_key(|b| b.network);
        let body = serde_json::to_vec_pretty(&BanFile { version: 1, bans }).map_err(|e| {
            BanFileError::Format {
                path: path.display().to_string(),
                message: e.to_string(),
            }
        })?;
        write_atomic(path, &body).map_err(|source| {
            self.dirty.store(true, Ordering::Release);
            BanFileError::Io {
                path: path.display().to_string(),
                source,
            }
        })
    }

    /// The writer task: applies queued changes in batches, purges expired bans, keeps the file.
    pub async fn run(self: Arc<Self>, clock: crate::clock::Clock, stop: CancellationToken) {
        let mut next_save = tokio::time::Instant::now();
        let mut last_apply = tokio::time::Instant::now();
        loop {
            let dirty = self.dirty.load(Ordering::Acquire);
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.wake.notified() => {
                    // A lone ban applies at once; a storm is applied in batches at most once
                    // every MIN_APPLY_INTERVAL.
                    tokio::time::sleep_until(last_apply + Self::MIN_APPLY_INTERVAL).await;
                }
                _ = tokio::time::sleep_until(next_save), if dirty => {}
                _ = tokio::time::sleep(Self::PURGE_INTERVAL) => {}
            }
            self.apply(clock.now_ms());
            last_apply = tokio::time::Instant::now();
            if tokio::time::Instant::now() >= next_save && self.dirty.load(Ordering::Acquire) {
                if let Err(e) = self.save_if_dirty() {
                    warn!(error = %e, "cannot write the ban file; will retry");
                }
                next_save = tokio::time::Instant::now() + Self::SAVE_INTERVAL;
            }
        }
        self.apply(clock.now_ms());
        if let Err(e) = self.save_if_dirty() {
            warn!(error = %e, "cannot write the ban file at shutdown");
        }
    }
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
        let err = BanStore::open(path, 100, 0).unwrap_err().to_string();
        assert!(err.contains("not valid"), "{err}");
    }
}
