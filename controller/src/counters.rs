//! Cluster-wide rate counters. Edges count requests against the configured limits and push the
//! increments a few times a second; the leader adds them per `(limit, key, window)` in a counter
//! store — its own memory, or Redis shared by every controller (pipelined `INCRBY` + `EXPIRE`) so
//! that counts survive a leader change — and answers with the totals of the keys pushed and every
//! key over its limit. A source over a `ban` limit is banned cluster-wide through Raft, once per
//! window.
//!
//! Counts are not replicated through Raft: they change thousands of times a second and are only
//! worth their window. A retried push can count twice; over-counting errs on the side of the
//! limit.

use crate::config::{self, Limit};
use sipwarden_proto::v1 as pb;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

/// Why the store could not count.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
}

/// `(limit, key, window)`.
pub type CounterKey = (String, String, u64);

/// Where the sums live.
pub enum Store {
    Memory(Mutex<HashMap<CounterKey, u64>>),
    Redis(redis::aio::ConnectionManager),
}

/// How long one Redis round trip may take before the push fails (and the edge retries).
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

impl Store {
    /// The store `cfg` asks for (connects to Redis, which must be reachable at start).
    pub async fn open(cfg: &config::Counters) -> Result<Store, StoreError> {
        if cfg.redis_url.is_empty() {
            return Ok(Store::Memory(Mutex::new(HashMap::new())));
        }
        let client = redis::Client::open(cfg.redis_url.as_str())?;
        let mgr = tokio::time::timeout(REDIS_TIMEOUT, redis::aio::ConnectionManager::new(client))
            .await
            .map_err(|_| StoreError::Timeout(REDIS_TIMEOUT))??;
        Ok(Store::Redis(mgr))
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Store::Memory(_) => "memory",
            Store::Redis(_) => "redis",
        }
    }

    /// Adds each `(key, count, ttl_s)` and returns the new totals, in order.
    pub async fn add(&self, items: &[(CounterKey, u64, u64)]) -> Result<Vec<u64>, StoreError> {
        match self {
            Store::Memory(m) => {
                let mut m = m.lock().unwrap_or_else(|p| p.into_inner());
                Ok(items
                    .iter()
                    .map(|(k, n, _)| {
                        let t = m.entry(k.clone()).or_insert(0);
                        *t = t.saturating_add(*n);
                        *t
                    })
                    .collect())
            }
            Store::Redis(mgr) => {
                if items.is_empty() {
                    return Ok(Vec::new());
                }
                let mut pipe = redis::pipe();
                for (k, n, ttl) in items {
                    let key = redis_key(k);
                    pipe.cmd("INCRBY").arg(&key).arg(*n);
                    pipe.cmd("EXPIRE").arg(&key).arg(*ttl).ignore();
                }
                let mut con = mgr.clone();
                let totals: Vec<u64> =
                    tokio::time::timeout(REDIS_TIMEOUT, pipe.query_async(&mut con))
                        .await
                        .map_err(|_| StoreError::Timeout(REDIS_TIMEOUT))??;
                Ok(totals)
            }
        }
    }

    /// Forgets windows that ended before `oldest` (memory only; Redis keys expire).
    pub fn prune(&self, oldest: impl Fn(&str) -> u64) {
        if let Store::Memory(m) = self {
            let mut m = m.lock().unwrap_or_else(|p| p.into_inner());
            m.retain(|(limit, _, window), _| *window >= oldest(limit));
        }
    }
}

/// The Redis key of a counter: the limit and window first so one limit's keys share a prefix.
pub fn redis_key((limit, key, window): &CounterKey) -> String {
    format!("sipwarden:ctr:{limit}:{window}:{key}")
}

/// What the leader learned from one push.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    pub sums: Vec<pb::CounterSum>,
    /// Sources that crossed a `ban` limit in this push: `(limit, source ip, ban ttl)`.
    pub to_ban: Vec<(String, String, u64)>,
}

/// The limits, the store and the keys over their limit.
pub struct Counters {
    pub limits: Vec<Limit>,
    by_name: HashMap<String, usize>,
    /// Derived from the limits' content, so it is the same on every controller and restart.
    pub version: u64,
    pub store: Store,
    /// Keys over their limit: `(limit, key, window)` → total.
    over: Mutex<HashMap<CounterKey, u64>>,
    /// `(limit, key, window)` already banned.
    banned: Mutex<HashSet<CounterKey>>,
}

/// Most keys over their limit one answer carries.
pub const MAX_OVER: usize = 10_000;

/// Most deltas one push may carry.
pub const MAX_DELTAS: usize = 10_000;

impl Counters {
    pub fn new(limits: Vec<Limit>, store: Store) -> Counters {
        use sha2::{Digest, Sha256};
        let by_name = limits
            .iter()
            .enumerate()
            .map(|(i, l)| (l.name.clone(), i))
            .collect();
        let text = serde_json::to_string(&limits).unwrap_or_default();
        let d = Sha256::digest(text.as_bytes());
        let mut v = [0u8; 8];
        v.copy_from_slice(&d[..8]);
        Counters {
            limits,
            by_name,
            // 0 means "no limits yet" to an edge.
            version: u64::from_be_bytes(v).max(1),
            store,
            over: Mutex::new(HashMap::new()),
            banned: Mutex::new(HashSet::new()),
        }
    }

    pub fn defs(&self) -> Vec<pb::LimitDef> {
        self.limits
            .iter()
            .map(|l| pb::LimitDef {
                name: l.name.clone(),
                key: l.key.clone(),
                methods: l.methods.clone(),
                max: l.max,
                window_s: l.window_s,
                action: l.action.clone(),
                ban_ttl_s: l.ban_ttl_s,
            })
            .collect()
    }

    /// The current window of `limit` at `now_ms`.
    fn window(l: &Limit, now_ms: u64) -> u64 {
        now_ms / 1000 / l.window_s
    }

    /// Checks and adds `deltas` at `now_ms`. Deltas for unknown limits, windows that are neither
    /// current nor previous, empty keys or zero counts are refused naming the field.
    pub async fn push(
        &self,
        deltas: &[pb::CounterDelta],
        now_ms: u64,
    ) -> Result<Outcome, PushError> {
        if deltas.len() > MAX_DELTAS {
            return Err(PushError::Invalid(format!(
                "deltas: at most {MAX_DELTAS} per push"
            )));
        }
        let mut items = Vec::with_capacity(deltas.len());
        for (i, d) in deltas.iter().enumerate() {
            let Some(&li) = self.by_name.get(&d.limit) else {
                return Err(PushError::Invalid(format!(
                    "deltas[{i}].limit: no limit named {:?}",
                    d.limit
                )));
            };
            let l = &self.limits[li];
            let current = Self::window(l, now_ms);
            // One window of clock skew either way, and a delta held back across a boundary.
            if d.window + 1 < current || d.window > current + 1 {
                return Err(PushError::Invalid(format!(
                    "deltas[{i}].window: {} is not near the current window {current}",
                    d.window
                )));
            }
            if d.key.is_empty() || d.key.len() > 256 || d.count == 0 {
                return Err(PushError::Invalid(format!(
                    "deltas[{i}]: key of 1 to 256 bytes and a count above zero"
                )));
            }
            items.push((
                (d.limit.clone(), d.key.clone(), d.window),
                d.count,
                l.window_s * 2 + 10,
            ));
        }
        let totals = self.store.add(&items).await?;
        let mut out = Outcome::default();
        let mut over = self.over.lock().unwrap_or_else(|p| p.into_inner());
        let mut banned = self.banned.lock().unwrap_or_else(|p| p.into_inner());
        for ((key, _, _), total) in items.into_iter().zip(totals) {
            let l = &self.limits[self.by_name[&key.0]];
            if total >= l.max {
                if l.action == "ban" && banned.insert(key.clone()) {
                    out.to_ban
                        .push((l.name.clone(), key.1.clone(), l.ban_ttl_s));
                }
                over.insert(key.clone(), total);
            }
            out.sums.push(pb::CounterSum {
                limit: key.0,
                key: key.1,
                window: key.2,
                total,
            });
        }
        // Forget windows that have ended.
        let oldest = |limit: &str| {
            self.by_name.get(limit).map_or(u64::MAX, |&i| {
                Self::window(&self.limits[i], now_ms).saturating_sub(1)
            })
        };
        over.retain(|(limit, _, w), _| *w >= oldest(limit));
        banned.retain(|(limit, _, w)| *w >= oldest(limit));
        drop((over, banned));
        self.store.prune(oldest);
        Ok(out)
    }

    /// Keys over their limit in a window that has not ended (at most [`MAX_OVER`] per answer;
    /// sources over a `ban` limit are banned besides, and an edge refuses a key it pushed as soon
    /// as its own total says so).
    pub fn over(&self) -> Vec<pb::CounterSum> {
        let over = self.over.lock().unwrap_or_else(|p| p.into_inner());
        over.iter()
            .take(MAX_OVER)
            .map(|((limit, key, window), total)| pb::CounterSum {
                limit: limit.clone(),
                key: key.clone(),
                window: *window,
                total: *total,
            })
            .collect()
    }
}

/// Why a push was refused.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<PushError> for tonic::Status {
    fn from(e: PushError) -> Self {
        match e {
            PushError::Invalid(m) => tonic::Status::invalid_argument(m),
            PushError::Store(e) => tonic::Status::unavailable(format!("counter store: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(name: &str, max: u64, action: &str) -> Limit {
        Limit {
            name: name.into(),
            key: "source".into(),
            methods: vec!["INVITE".into()],
            max,
            window_s: 60,
            action: action.into(),
            ban_ttl_s: 600,
        }
    }

    fn delta(limit: &str, key: &str, window: u64, count: u64) -> pb::CounterDelta {
        pb::CounterDelta {
            limit: limit.into(),
            key: key.into(),
            window,
            count,
        }
    }

    const NOW: u64 = 1_800_000_000_000;
    const W: u64 = NOW / 1000 / 60;

    #[tokio::test]
    async fn pushes_from_two_edges_add_up_and_cross_the_limit_once() {
        let c = Counters::new(
            vec![limit("calls", 10, "ban"), limit("soft", 5, "reject")],
            Store::Memory(Default::default()),
        );
        let a = c
            .push(
                &[delta("calls", "192.0.2.1", W, 6), delta("soft", "x", W, 1)],
                NOW,
            )
            .await
            .unwrap();
        assert_eq!(a.sums[0].total, 6);
        assert!(a.to_ban.is_empty());
        assert!(c.over().is_empty());
        let b = c
            .push(&[delta("calls", "192.0.2.1", W, 4)], NOW)
            .await
            .unwrap();
        assert_eq!(
            b.sums[0].total, 10,
            "the second edge's count adds to the first's"
        );
        assert_eq!(b.to_ban, vec![("calls".into(), "192.0.2.1".into(), 600)]);
        assert_eq!(c.over().len(), 1);
        let again = c
            .push(&[delta("calls", "192.0.2.1", W, 1)], NOW)
            .await
            .unwrap();
        assert!(again.to_ban.is_empty(), "banned once per window");
        // The next window starts from zero; two windows on, the old one is forgotten.
        let next = c
            .push(&[delta("calls", "192.0.2.1", W + 1, 1)], NOW + 60_000)
            .await
            .unwrap();
        assert_eq!(next.sums[0].total, 1);
        c.push(&[delta("soft", "y", W + 2, 1)], NOW + 120_000)
            .await
            .unwrap();
        assert!(c.over().is_empty());
        // The same limits give the same version anywhere.
        let same = Counters::new(
            vec![limit("calls", 10, "ban"), limit("soft", 5, "reject")],
            Store::Memory(Default::default()),
        );
        assert_eq!(same.version, c.version);
    }

    #[tokio::test]
    async fn bad_deltas_are_refused_naming_the_field_and_nothing_is_counted() {
        let c = Counters::new(
            vec![limit("calls", 10, "reject")],
            Store::Memory(Default::default()),
        );
        let cases = [
            (delta("nope", "k", W, 1), "deltas[1].limit"),
            (delta("calls", "k", W + 5, 1), "deltas[1].window"),
            (delta("calls", "", W, 1), "deltas[1]"),
            (delta("calls", "k", W, 0), "deltas[1]"),
        ];
        for (bad, field) in cases {
            let e = c
                .push(&[delta("calls", "ok", W, 1), bad], NOW)
                .await
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(field), "{e}");
        }
        let r = c.push(&[delta("calls", "ok", W, 1)], NOW).await.unwrap();
        assert_eq!(r.sums[0].total, 1, "refused pushes counted nothing");
    }
}
