//! [`LogStore`]: the Raft log, hard state, conf state and latest snapshot, kept in `raft-engine` and
//! read by raft-rs through its `Storage` trait. Every write goes through one [`LogStore::persist`]
//! batch that is fsynced before it returns, so nothing is acknowledged that a crash could lose.
//!
//! One `LogStore` per process: raft-engine caches file blocks per thread keyed by file position,
//! so two engines read from one thread can see each other's blocks (the in-process cluster tests
//! run each node on its own thread for that reason).

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};
use raft_engine::{Config, Engine, LogBatch, MessageExt, ReadableSize};
use std::path::Path;
use std::sync::{Arc, RwLock};

/// The single Raft group this controller runs.
const GROUP: u64 = 1;
const HARD_STATE: &[u8] = b"hard_state";
const CONF_STATE: &[u8] = b"conf_state";
const SNAPSHOT: &[u8] = b"snapshot";

#[derive(Clone)]
struct Entries;

impl MessageExt for Entries {
    type Entry = Entry;
    fn index(e: &Entry) -> u64 {
        e.index
    }
}

/// Why the log store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("raft log in {path}: {message}")]
    Engine { path: String, message: String },
}

/// What the node writes after a `Ready`, in one fsynced batch.
#[derive(Default)]
pub struct Persist<'a> {
    pub entries: &'a [Entry],
    pub hard_state: Option<&'a HardState>,
    pub conf_state: Option<&'a ConfState>,
    pub snapshot: Option<&'a Snapshot>,
}

/// Cached metadata, so raft-rs's reads do not decode protobuf every time.
#[derive(Default)]
struct Meta {
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: Snapshot,
}

/// Builds a snapshot of the applied state on demand (set by the node).
pub type SnapshotSource = Box<dyn Fn() -> Option<Snapshot> + Send + Sync>;

/// The Raft log on disk. Cheap to clone (shared).
#[derive(Clone)]
pub struct LogStore {
    engine: Arc<Engine>,
    meta: Arc<RwLock<Meta>>,
    path: String,
    /// Fresh snapshots for peers: a stored one may predate a membership change, and raft-rs
    /// rejects a snapshot whose conf state leaves the receiver out.
    source: Arc<RwLock<Option<SnapshotSource>>>,
}

fn engine_err(path: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Engine {
        path: path.to_string(),
        message: e.to_string(),
    }
}

fn store_err(e: impl std::fmt::Display) -> raft::Error {
    raft::Error::Store(StorageError::Other(e.to_string().into()))
}

impl LogStore {
    /// Opens (or creates) the log in `dir`.
    pub fn open(dir: &Path) -> Result<LogStore, StoreError> {
        let path = dir.display().to_string();
        std::fs::create_dir_all(dir).map_err(|e| engine_err(&path, e))?;
        let cfg = Config {
            dir: path.clone(),
            purge_threshold: ReadableSize::mb(64),
            target_file_size: ReadableSize::mb(16),
            ..Default::default()
        };
        let engine = Engine::open(cfg).map_err(|e| engine_err(&path, e))?;
        let get =
            |key: &[u8]| -> Result<Option<Vec<u8>>, StoreError> { Ok(engine.get(GROUP, key)) };
        let mut meta = Meta::default();
        if let Some(b) = get(HARD_STATE)? {
            meta.hard_state = HardState::parse_from_bytes(&b).map_err(|e| engine_err(&path, e))?;
        }
        if let Some(b) = get(CONF_STATE)? {
            meta.conf_state = ConfState::parse_from_bytes(&b).map_err(|e| engine_err(&path, e))?;
        }
        if let Some(b) = get(SNAPSHOT)? {
            meta.snapshot = Snapshot::parse_from_bytes(&b).map_err(|e| engine_err(&path, e))?;
        }
        Ok(LogStore {
            engine: Arc::new(engine),
            meta: Arc::new(RwLock::new(meta)),
            path,
            source: Arc::new(RwLock::new(None)),
        })
    }

    /// Sets where fresh snapshots come from.
    pub fn set_snapshot_source(&self, f: SnapshotSource) {
        *self.source.write().unwrap_or_else(|p| p.into_inner()) = Some(f);
    }

    fn meta(&self) -> std::sync::RwLockReadGuard<'_, Meta> {
        self.meta.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the log has never been written (a fresh node).
    pub fn is_empty(&self) -> bool {
        let m = self.meta();
        self.engine.last_index(GROUP).is_none()
            && m.snapshot.get_metadata().index == 0
            && m.conf_state.voters.is_empty()
    }

    /// The latest snapshot kept (empty when none).
    pub fn latest_snapshot(&self) -> Snapshot {
        self.meta().snapshot.clone()
    }

    pub fn conf_state(&self) -> ConfState {
        self.meta().conf_state.clone()
    }

    pub fn hard_state(&self) -> HardState {
        self.meta().hard_state.clone()
    }

    /// Writes `p` in one batch and fsyncs it. A snapshot replaces the log before it.
    pub fn persist(&self, p: Persist<'_>) -> Result<(), StoreError> {
        let mut batch = LogBatch::default();
        let err = |e: raft_engine::Error| engine_err(&self.path, e);
        let enc =
            |m: &dyn protobuf::Message| m.write_to_bytes().map_err(|e| engine_err(&self.path, e));
        // The hard state after this write: a snapshot moves commit (and term) up to it.
        let mut hard_state = p.hard_state.cloned();
        if let Some(s) = p.snapshot {
            let md = s.get_metadata();
            let mut hs = hard_state.take().unwrap_or_else(|| self.hard_state());
            if hs.commit < md.index {
                hs.commit = md.index;
                hs.term = hs.term.max(md.term);
            }
            hard_state = Some(hs);
            // A snapshot from the leader replaces the whole log: clean the group, then write the
            // snapshot, its conf state and the hard state — one batch, so a crash leaves either
            // the old state or all of the new.
            batch.add_command(GROUP, raft_engine::Command::Clean);
            batch.put(GROUP, SNAPSHOT.to_vec(), enc(s)?).map_err(err)?;
            batch
                .put(GROUP, CONF_STATE.to_vec(), enc(md.get_conf_state())?)
                .map_err(err)?;
        }
        if !p.entries.is_empty() {
            batch
                .add_entries::<Entries>(GROUP, p.entries)
                .map_err(err)?;
        }
        if let Some(hs) = &hard_state {
            batch
                .put(GROUP, HARD_STATE.to_vec(), enc(hs)?)
                .map_err(err)?;
        }
        if let Some(cs) = p.conf_state {
            batch
                .put(GROUP, CONF_STATE.to_vec(), enc(cs)?)
                .map_err(err)?;
        }
        self.engine.write(&mut batch, true).map_err(err)?;
        let mut m = self.meta.write().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = p.snapshot {
            m.conf_state = s.get_metadata().get_conf_state().clone();
            m.snapshot = s.clone();
        }
        if let Some(hs) = hard_state {
            m.hard_state = hs;
        }
        if let Some(cs) = p.conf_state {
            m.conf_state = cs.clone();
        }
        Ok(())
    }

    /// Keeps `snapshot` as the latest and drops log entries up to its index.
    pub fn compact_with(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        let mut batch = LogBatch::default();
        batch
            .put(
                GROUP,
                SNAPSHOT.to_vec(),
                snapshot
                    .write_to_bytes()
                    .map_err(|e| engine_err(&self.path, e))?,
            )
            .map_err(|e| engine_err(&self.path, e))?;
        self.engine
            .write(&mut batch, true)
            .map_err(|e| engine_err(&self.path, e))?;
        self.engine
            .compact_to(GROUP, snapshot.get_metadata().index + 1);
        let _ = self.engine.purge_expired_files();
        self.meta
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .snapshot = snapshot.clone();
        Ok(())
    }

    fn snapshot_index(&self) -> u64 {
        self.meta().snapshot.get_metadata().index
    }
}

impl raft::Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let m = self.meta();
        Ok(RaftState {
            hard_state: m.hard_state.clone(),
            conf_state: m.conf_state.clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.snapshot_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        let last = self.last_index()?;
        if high > last + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let mut out = Vec::with_capacity((high - low) as usize);
        let max = max_size.into().map(|m| m as usize);
        self.engine
            .fetch_entries_to::<Entries>(GROUP, low, high, max, &mut out)
            .map_err(store_err)?;
        if out.is_empty() && high > low {
            // raft-rs asks for at least one entry even past the size limit.
            self.engine
                .fetch_entries_to::<Entries>(GROUP, low, low + 1, None, &mut out)
                .map_err(store_err)?;
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let snap = self.meta().snapshot.get_metadata().clone();
        if idx == snap.index {
            return Ok(snap.term);
        }
        if idx < snap.index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        match self
            .engine
            .get_entry::<Entries>(GROUP, idx)
            .map_err(store_err)?
        {
            Some(e) => Ok(e.term),
            None if idx > self.last_index()? => Err(raft::Error::Store(StorageError::Unavailable)),
            None => Err(raft::Error::Store(StorageError::Compacted)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        let snap = self.snapshot_index();
        Ok(match self.engine.first_index(GROUP) {
            Some(i) => i.max(snap + 1),
            None => snap + 1,
        })
    }

    fn last_index(&self) -> raft::Result<u64> {
        let snap = self.snapshot_index();
        Ok(self.engine.last_index(GROUP).map_or(snap, |l| l.max(snap)))
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let fresh = self
            .source
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|f| f());
        if let Some(s) = fresh {
            if s.get_metadata().index >= request_index.max(1) {
                return Ok(s);
            }
        }
        let snap = self.meta().snapshot.clone();
        if snap.get_metadata().index < request_index || snap.get_metadata().index == 0 {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: vec![index as u8].into(),
            ..Default::default()
        }
    }

    #[test]
    fn entries_and_hard_state_survive_a_reopen_and_a_snapshot_replaces_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let s = LogStore::open(dir.path()).unwrap();
        assert!(s.is_empty());
        let ents: Vec<Entry> = (1..=5).map(|i| entry(i, 1)).collect();
        let hs = HardState {
            term: 1,
            vote: 1,
            commit: 3,
            ..Default::default()
        };
        s.persist(Persist {
            entries: &ents,
            hard_state: Some(&hs),
            ..Default::default()
        })
        .unwrap();
        drop(s);
        let s = LogStore::open(dir.path()).unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (1, 5));
        assert_eq!(
            s.entries(2, 4, None, GetEntriesContext::empty(false))
                .unwrap()
                .len(),
            2
        );
        assert_eq!(s.initial_state().unwrap().hard_state.commit, 3);
        assert_eq!(s.term(4).unwrap(), 1);

        // A new leader's entries overwrite a conflicting suffix.
        s.persist(Persist {
            entries: &[entry(4, 2)],
            ..Default::default()
        })
        .unwrap();
        assert_eq!((s.last_index().unwrap(), s.term(4).unwrap()), (4, 2));

        // A snapshot at 10 from the leader replaces everything; commit moves up to it.
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 10;
        snap.mut_metadata().term = 3;
        snap.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        snap.set_data(b"state".to_vec().into());
        s.persist(Persist {
            snapshot: Some(&snap),
            ..Default::default()
        })
        .unwrap();
        drop(s);
        let s = LogStore::open(dir.path()).unwrap();
        assert_eq!(
            (s.first_index().unwrap(), s.last_index().unwrap()),
            (11, 10)
        );
        assert_eq!(s.term(10).unwrap(), 3);
        let st = s.initial_state().unwrap();
        assert_eq!(
            (st.hard_state.commit, st.hard_state.term, st.hard_state.vote),
            (10, 3, 1)
        );
        assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
        assert!(matches!(
            s.entries(5, 6, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
    }
}
