//! `limit`: cluster-wide rate limits. The controllers define them (`[[counters.limits]]`) and sum
//! what every edge counts; this edge counts its share, pushes it a few times a second (see
//! `cluster::push_counters`) and refuses a key once the cluster total it last heard, plus what it
//! has counted since, reaches the limit — so the limit holds across edges within about one push
//! interval of traffic, and with every controller gone the edge still holds its own share.

use crate::pipeline::{Action, Filter, Finding, RequestCx, State};
use crate::proxy::Side;
use arc_swap::ArcSwap;
use sipwarden_proto::v1 as pb;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// The limits in force, as the controllers last sent them.
#[derive(Debug, Default)]
pub struct Limits {
    pub version: u64,
    pub defs: Vec<pb::LimitDef>,
}

/// `(limit, key, window)`.
type Key = (String, String, u64);

/// What the edge knows of the cluster's counts.
#[derive(Default)]
pub struct ClusterCounters {
    limits: ArcSwap<Limits>,
    /// The edge's site (the key of `site` limits).
    site: OnceLock<String>,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Counted here, not yet pushed.
    pending: HashMap<Key, u64>,
    /// Pushed, answer not yet back.
    in_flight: HashMap<Key, u64>,
    /// Cluster totals from the last answers (this edge's pushed counts included).
    known: HashMap<Key, u64>,
}

/// What counting one request decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Hit {
    Counted,
    /// The key is at its limit until the window ends, in `retry_after_s`.
    Over {
        retry_after_s: u64,
    },
}

impl ClusterCounters {
    /// Most keys held (each map); past it new keys are not counted (existing ones still are).
    pub const MAX_KEYS: usize = 200_000;

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_site(&self, site: &str) {
        let _ = self.site.set(site.to_string());
    }

    pub fn site(&self) -> &str {
        self.site.get().map_or("", |s| s.as_str())
    }

    pub fn limits(&self) -> arc_swap::Guard<Arc<Limits>> {
        self.limits.load()
    }

    pub fn set_limits(&self, version: u64, defs: Vec<pb::LimitDef>) {
        self.limits.store(Arc::new(Limits { version, defs }));
    }

    fn window(def: &pb::LimitDef, now_ms: u64) -> u64 {
        now_ms / 1000 / def.window_s.max(1)
    }

    /// Counts one request of `key` against `def`, unless the key is already at its limit.
    pub fn hit(&self, def: &pb::LimitDef, key: &str, now_ms: u64) -> Hit {
        let w = Self::window(def, now_ms);
        let k: Key = (def.name.clone(), key.to_string(), w);
        let mut inner = self.lock();
        let total = inner.known.get(&k).copied().unwrap_or(0)
            + inner.in_flight.get(&k).copied().unwrap_or(0)
            + inner.pending.get(&k).copied().unwrap_or(0);
        if total >= def.max {
            let end_s = (w + 1) * def.window_s.max(1);
            return Hit::Over {
                retry_after_s: end_s.saturating_sub(now_ms / 1000).max(1),
            };
        }
        if inner.pending.len() < Self::MAX_KEYS || inner.pending.contains_key(&k) {
            *inner.pending.entry(k).or_insert(0) += 1;
        }
        Hit::Counted
    }

    /// Takes what was counted since the last push (it stays counted locally until the answer).
    pub fn take(&self) -> Vec<pb::CounterDelta> {
        let mut inner = self.lock();
        let pending = std::mem::take(&mut inner.pending);
        let mut out = Vec::with_capacity(pending.len());
        for (k, n) in pending {
            out.push(pb::CounterDelta {
                limit: k.0.clone(),
                key: k.1.clone(),
                window: k.2,
                count: n,
            });
            *inner.in_flight.entry(k).or_insert(0) += n;
        }
        out
    }

    /// The push failed: what was in flight is pending again, for the next try.
    pub fn failed(&self) {
        let mut inner = self.lock();
        let in_flight = std::mem::take(&mut inner.in_flight);
        for (k, n) in in_flight {
            if inner.pending.len() < Self::MAX_KEYS || inner.pending.contains_key(&k) {
                *inner.pending.entry(k).or_insert(0) += n;
            }
        }
    }

    /// The push was counted: the cluster's totals (`sums` of the keys pushed, `over` every key at
    /// its limit) replace what was in flight; windows that ended are forgotten.
    pub fn learned(&self, sums: &[pb::CounterSum], over: &[pb::CounterSum], now_ms: u64) {
        let limits = self.limits();
        let current: HashMap<&str, u64> = limits
            .defs
            .iter()
            .map(|d| (d.name.as_str(), Self::window(d, now_ms)))
            .collect();
        let live = |k: &Key| {
            current
                .get(k.0.as_str())
                .is_some_and(|w| k.2 >= w.saturating_sub(1))
        };
        let mut inner = self.lock();
        inner.in_flight.clear();
        for s in sums.iter().chain(over) {
            let k: Key = (s.limit.clone(), s.key.clone(), s.window);
            if !live(&k) {
                continue;
            }
            if inner.known.len() < Self::MAX_KEYS || inner.known.contains_key(&k) {
                let t = inner.known.entry(k).or_insert(0);
                *t = (*t).max(s.total);
            }
        }
        inner.known.retain(|k, _| live(k));
        inner.pending.retain(|k, _| live(k));
    }
}

/// The filter: counts new requests from the Internet against each limit naming their method.
pub struct ClusterLimits {
    state: Arc<State>,
}

impl ClusterLimits {
    pub fn new(state: &Arc<State>) -> ClusterLimits {
        ClusterLimits {
            state: state.clone(),
        }
    }
}

/// The key `kind` gives a request, `None` when it does not apply.
fn key_of(kind: &str, cx: &RequestCx<'_>, site: &str) -> Option<String> {
    let method = cx.sip.method();
    Some(match kind {
        "source" => cx.meta.source.ip().to_string(),
        "aor" if method == "REGISTER" => cx.to_aor().clone(),
        "aor" => cx.from_aor().clone(),
        "account" if method == "INVITE" => cx.from_aor().clone(),
        "site" => site.to_string(),
        _ => return None,
    })
}

impl Filter for ClusterLimits {
    fn name(&self) -> &'static str {
        "limit"
    }

    fn dry_run(&self) -> bool {
        false
    }

    fn request(&self, cx: &RequestCx<'_>) -> Option<Finding> {
        let counters = &self.state.counters;
        let limits = counters.limits();
        if limits.defs.is_empty()
            || cx.meta.side != Side::Internet
            || cx.meta.trusted
            || cx.sip.to_tag().is_some()
        {
            return None;
        }
        let method = cx.sip.method();
        for def in limits
            .defs
            .iter()
            .filter(|d| d.methods.iter().any(|m| m == method))
        {
            let Some(key) = key_of(&def.key, cx, counters.site()) else {
                continue;
            };
            if let Hit::Over { retry_after_s } = counters.hit(def, &key, cx.meta.now_ms) {
                let action = match def.action.as_str() {
                    "drop" => Action::Drop,
                    "ban" => Action::Ban {
                        ttl_s: def.ban_ttl_s,
                    },
                    _ => Action::Reject {
                        code: 503,
                        reason: "Service Unavailable",
                        header: Some(("Retry-After", Arc::from(retry_after_s.to_string()))),
                    },
                };
                return Some(Finding::new(
                    "limit",
                    action,
                    format!("cluster-wide limit {} reached for {key}", def.name),
                ));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bans::BanStore;
    use crate::filters::testkit::*;

    fn def(name: &str, key: &str, max: u64, action: &str) -> pb::LimitDef {
        pb::LimitDef {
            name: name.into(),
            key: key.into(),
            methods: vec!["INVITE".into()],
            max,
            window_s: 60,
            action: action.into(),
            ban_ttl_s: 600,
        }
    }

    fn invite(f: &ClusterLimits, now: u64, source: &str, from: &str) -> Option<Finding> {
        let raw = request("INVITE", "2000", from, "");
        let m = parse(&raw);
        let meta = meta(now, source, Side::Internet);
        f.request(&req_cx(&meta, &m))
    }

    #[test]
    fn counts_up_to_the_cluster_total_and_refuses_until_the_window_ends() {
        let state = Arc::new(State::new(Arc::new(BanStore::new(None, 10))));
        let f = ClusterLimits::new(&state);
        assert!(
            invite(&f, T0, "192.0.2.1:5060", "1001").is_none(),
            "no limits: nothing counted"
        );
        assert!(state.counters.take().is_empty());
        state
            .counters
            .set_limits(7, vec![def("calls", "account", 5, "reject")]);
        for _ in 0..2 {
            assert!(invite(&f, T0, "192.0.2.1:5060", "1001").is_none());
        }
        let pushed = state.counters.take();
        assert_eq!(pushed.len(), 1);
        assert_eq!(pushed[0].key, "1001@pbx.example");
        assert_eq!(pushed[0].count, 2);
        // While in flight the two still count; another edge has admitted 2 meanwhile.
        assert!(invite(&f, T0, "192.0.2.1:5060", "1001").is_none());
        let w = pushed[0].window;
        let sum = |total| pb::CounterSum {
            limit: "calls".into(),
            key: "1001@pbx.example".into(),
            window: w,
            total,
        };
        state.counters.learned(&[sum(4)], &[], T0);
        // 4 known + 1 pending = 5: the limit.
        match invite(&f, T0, "192.0.2.1:5060", "1001").unwrap().action {
            Action::Reject {
                code: 503,
                header: Some((_, after)),
                ..
            } => assert!(after.parse::<u64>().unwrap() <= 60),
            other => panic!("{other:?}"),
        }
        assert!(
            invite(&f, T0, "192.0.2.1:5060", "1002").is_none(),
            "another account"
        );
        // The next window starts afresh.
        assert!(invite(&f, T0 + 60_000, "192.0.2.1:5060", "1001").is_none());
    }

    #[test]
    fn a_failed_push_is_counted_again_and_a_ban_limit_bans() {
        let state = Arc::new(State::new(Arc::new(BanStore::new(None, 10))));
        let f = ClusterLimits::new(&state);
        state
            .counters
            .set_limits(1, vec![def("src", "source", 2, "ban")]);
        assert!(invite(&f, T0, "192.0.2.9:5060", "a").is_none());
        let first = state.counters.take();
        state.counters.failed();
        assert!(invite(&f, T0, "192.0.2.9:5060", "b").is_none());
        let again = state.counters.take();
        assert_eq!(again[0].count, first[0].count + 1, "nothing lost");
        assert_eq!(
            invite(&f, T0, "192.0.2.9:5060", "c").unwrap().action,
            Action::Ban { ttl_s: 600 }
        );
        assert!(invite(&f, T0, "192.0.2.10:5060", "c").is_none());
    }
}
