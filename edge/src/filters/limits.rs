//! `limit`: cluster-wide rate limits. The controllers define them (`[[counters.limits]]`) and sum
//! what every edge counts; this edge counts its share, pushes it a few times a second (see
//! `cluster::push_counters`) and refuses a key once the cluster total it last heard, plus what it
//! has counted since, reaches the limit — so the limit holds across edges within about one push
//! interval of traffic, and with every controller gone the edge still holds its own share.

use crate::pipeline::{Action, Filter, Finding, RequestCx, State};
use crate::proxy::Side;
use arc_swap::ArcSwap;
use sipwarden_proto::v1 as pb;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// The limits in force, as the controllers last sent them.
#[derive(Debug, Default)]
pub struct Limits {
    pub version: u64,
    pub defs: Vec<pb::LimitDef>,
}

/// Counts of one limit in one window, by key.
type Counts = HashMap<String, u64>;

/// Counts by limit, window and key. Windows are kept apart so that those that ended go whole, a
/// map at a time, rather than by a walk over every key.
#[derive(Debug, Default)]
struct Table {
    by_limit: HashMap<String, BTreeMap<u64, Counts>>,
    /// Keys held, over every limit and window.
    keys: usize,
}

impl Table {
    fn get(&self, limit: &str, window: u64, key: &str) -> u64 {
        self.by_limit
            .get(limit)
            .and_then(|w| w.get(&window))
            .and_then(|c| c.get(key))
            .copied()
            .unwrap_or(0)
    }

    /// The count of `key` made `f` of it, unless the key is new and the table is full.
    fn update(&mut self, limit: &str, window: u64, key: &str, f: impl FnOnce(u64) -> u64) {
        if let Some(n) = self
            .by_limit
            .get_mut(limit)
            .and_then(|w| w.get_mut(&window))
            .and_then(|c| c.get_mut(key))
        {
            *n = f(*n);
            return;
        }
        if self.keys >= ClusterCounters::MAX_KEYS {
            return;
        }
        let counts = match self.by_limit.get_mut(limit) {
            Some(w) => w,
            None => self.by_limit.entry(limit.to_string()).or_default(),
        }
        .entry(window)
        .or_default();
        counts.insert(key.to_string(), f(0));
        self.keys += 1;
    }

    /// Adds every count of `other`.
    fn merge(&mut self, other: &Table) {
        for (limit, key, window, n) in other.iter() {
            self.update(limit, window, key, |c| c + n);
        }
    }

    /// `(limit, key, window, count)` of every count held.
    fn iter(&self) -> impl Iterator<Item = (&str, &str, u64, u64)> + '_ {
        self.by_limit.iter().flat_map(|(limit, windows)| {
            windows.iter().flat_map(move |(&w, counts)| {
                counts
                    .iter()
                    .map(move |(k, &n)| (limit.as_str(), k.as_str(), w, n))
            })
        })
    }

    /// Takes out the windows before `first(limit)`, and every window of a limit `first` does not
    /// know (no longer defined): what the caller drops, after letting go of the lock.
    fn split_ended(&mut self, first: impl Fn(&str) -> Option<u64>) -> Vec<Counts> {
        let mut ended = Vec::new();
        self.by_limit.retain(|limit, windows| {
            match first(limit) {
                Some(w) => {
                    let live = windows.split_off(&w);
                    ended.extend(std::mem::replace(windows, live).into_values());
                }
                None => ended.extend(std::mem::take(windows).into_values()),
            }
            !windows.is_empty()
        });
        self.keys -= ended.iter().map(HashMap::len).sum::<usize>();
        ended
    }
}

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
    pending: Table,
    /// Pushed, answer not yet back: what each push took (one, unless a push is retried while
    /// another is out), shared with the push that builds its deltas outside the lock.
    in_flight: Vec<Arc<Table>>,
    /// Cluster totals from the last answers (this edge's pushed counts included).
    known: Table,
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
    /// Most keys held (pending, in flight and known each); past it new keys are not counted
    /// (existing ones still are).
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
        let name = def.name.as_str();
        let mut inner = self.lock();
        let total = inner.known.get(name, w, key)
            + inner
                .in_flight
                .iter()
                .map(|t| t.get(name, w, key))
                .sum::<u64>()
            + inner.pending.get(name, w, key);
        if total >= def.max {
            let end_s = (w + 1) * def.window_s.max(1);
            return Hit::Over {
                retry_after_s: end_s.saturating_sub(now_ms / 1000).max(1),
            };
        }
        inner.pending.update(name, w, key, |n| n + 1);
        Hit::Counted
    }

    /// Takes what was counted since the last push (it stays counted locally until the answer).
    /// The lock is held to move the counts, not to copy them into the deltas.
    pub fn take(&self) -> Vec<pb::CounterDelta> {
        let taken = {
            let mut inner = self.lock();
            if inner.pending.keys == 0 {
                return Vec::new();
            }
            let taken = Arc::new(std::mem::take(&mut inner.pending));
            inner.in_flight.push(taken.clone());
            taken
        };
        taken
            .iter()
            .map(|(limit, key, window, count)| pb::CounterDelta {
                limit: limit.to_string(),
                key: key.to_string(),
                window,
                count,
            })
            .collect()
    }

    /// The push failed: what was in flight is pending again, for the next try.
    pub fn failed(&self) {
        let mut inner = self.lock();
        for t in std::mem::take(&mut inner.in_flight) {
            inner.pending.merge(&t);
        }
    }

    /// The push was counted: the cluster's totals (`sums` of the keys pushed, `over` every key at
    /// its limit) replace what was in flight; windows that ended are forgotten.
    pub fn learned(&self, sums: &[pb::CounterSum], over: &[pb::CounterSum], now_ms: u64) {
        let limits = self.limits();
        // The first window still counted of each limit: the current one and the one before.
        let first = |limit: &str| {
            limits
                .defs
                .iter()
                .find(|d| d.name == limit)
                .map(|d| Self::window(d, now_ms).saturating_sub(1))
        };
        let (in_flight, ended) = {
            let mut inner = self.lock();
            let in_flight = std::mem::take(&mut inner.in_flight);
            for s in sums.iter().chain(over) {
                if first(&s.limit).is_some_and(|w| s.window >= w) {
                    inner
                        .known
                        .update(&s.limit, s.window, &s.key, |t| t.max(s.total));
                }
            }
            let mut ended = inner.known.split_ended(first);
            ended.extend(inner.pending.split_ended(first));
            (in_flight, ended)
        };
        // Freed here, not under the lock every request that counts takes.
        drop((in_flight, ended));
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

    /// The counts as one map of `(limit, key, window)`, walked to forget ended windows: what the
    /// tables by window must agree with.
    #[derive(Default)]
    struct Model {
        pending: HashMap<(String, String, u64), u64>,
        in_flight: HashMap<(String, String, u64), u64>,
        known: HashMap<(String, String, u64), u64>,
    }

    impl Model {
        fn hit(&mut self, def: &pb::LimitDef, key: &str, now: u64) -> Hit {
            let w = ClusterCounters::window(def, now);
            let k = (def.name.clone(), key.to_string(), w);
            let total: u64 = [&self.known, &self.in_flight, &self.pending]
                .iter()
                .map(|m| m.get(&k).copied().unwrap_or(0))
                .sum();
            if total >= def.max {
                let end_s = (w + 1) * def.window_s.max(1);
                return Hit::Over {
                    retry_after_s: end_s.saturating_sub(now / 1000).max(1),
                };
            }
            *self.pending.entry(k).or_insert(0) += 1;
            Hit::Counted
        }

        fn take(&mut self) -> Vec<(String, String, u64, u64)> {
            let mut out = Vec::new();
            for (k, n) in std::mem::take(&mut self.pending) {
                out.push((k.0.clone(), k.1.clone(), k.2, n));
                *self.in_flight.entry(k).or_insert(0) += n;
            }
            out.sort();
            out
        }

        fn failed(&mut self) {
            for (k, n) in std::mem::take(&mut self.in_flight) {
                *self.pending.entry(k).or_insert(0) += n;
            }
        }

        fn learned(&mut self, defs: &[pb::LimitDef], sums: &[pb::CounterSum], now: u64) {
            let live = |k: &(String, String, u64)| {
                defs.iter()
                    .find(|d| d.name == k.0)
                    .is_some_and(|d| k.2 >= ClusterCounters::window(d, now).saturating_sub(1))
            };
            self.in_flight.clear();
            for s in sums {
                let k = (s.limit.clone(), s.key.clone(), s.window);
                if live(&k) {
                    let t = self.known.entry(k).or_insert(0);
                    *t = (*t).max(s.total);
                }
            }
            self.known.retain(|k, _| live(k));
            self.pending.retain(|k, _| live(k));
        }
    }

    /// Random hits, pushes, failed pushes and answers (totals of other edges, limits redefined,
    /// time running over several windows of two sizes) against the model.
    #[test]
    fn tables_by_window_count_as_one_map_walked() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        let counters = ClusterCounters::default();
        let mut model = Model::default();
        let mut defs = vec![
            def("a", "source", 6, "reject"),
            def("b", "source", 3, "drop"),
        ];
        defs[1].window_s = 7;
        counters.set_limits(1, defs.clone());
        let mut now = T0;
        for step in 0..20_000 {
            now += rng.random_range(0..400);
            match rng.random_range(0..100) {
                0..=69 => {
                    let d = &defs[rng.random_range(0..defs.len())];
                    let key = format!("k{}", rng.random_range(0..6));
                    assert_eq!(
                        counters.hit(d, &key, now),
                        model.hit(d, &key, now),
                        "step {step}"
                    );
                }
                70..=79 => {
                    let mut got: Vec<_> = counters
                        .take()
                        .into_iter()
                        .map(|d| (d.limit, d.key, d.window, d.count))
                        .collect();
                    got.sort();
                    assert_eq!(got, model.take(), "step {step}");
                }
                80..=84 => {
                    counters.failed();
                    model.failed();
                }
                85..=98 => {
                    let sums: Vec<pb::CounterSum> = (0..rng.random_range(0..4))
                        .map(|_| {
                            let d = &defs[rng.random_range(0..defs.len())];
                            let back = rng.random_range(0..3);
                            pb::CounterSum {
                                limit: d.name.clone(),
                                key: format!("k{}", rng.random_range(0..6)),
                                window: ClusterCounters::window(d, now).saturating_sub(back),
                                total: rng.random_range(0..8),
                            }
                        })
                        .collect();
                    counters.learned(&sums, &[], now);
                    model.learned(&defs, &sums, now);
                }
                _ => {
                    // A limit dropped or brought back by the controllers.
                    if defs.len() == 2 {
                        defs.pop();
                    } else {
                        defs.push(def("b", "source", 3, "drop"));
                        defs[1].window_s = 7;
                    }
                    counters.set_limits(step, defs.clone());
                }
            }
        }
    }
}
