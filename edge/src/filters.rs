//! The threat filters, one small type per file, each implementing [`crate::pipeline::Filter`]:
//!
//! | file | phase | rule |
//! |---|---|---|
//! | [`ban`] | gate | source in the ban set |
//! | [`flood`] | gate | per-source message rate (GCRA, `governor`); sustained excess → ban |
//! | [`sanity`] | request | required headers, CSeq, Content-Length, Max-Forwards, scheme, size, Via loop |
//! | [`scanner`] | request | User-Agent and header fingerprints of attack tools |
//! | [`methods`] | request | methods accepted per direction |
//! | [`geoip`] | request | country allow/deny from a MaxMind database |
//! | [`rate`] | request | REGISTER/INVITE/OPTIONS per source and per AOR |
//! | [`limits`] | request | cluster-wide limits per source, AOR, account or site, summed by the controllers |
//! | [`registered`] | request, response | INVITE only from registered sources or trunks |
//! | [`tollfraud`] | request, response, completion | destination prefixes, calls per minute, concurrent calls, sequential dialling |
//! | [`bruteforce`] | response | 401/407/403 scores per source and per AOR |
//! | [`enumeration`] | response | distinct user parts answered 404/401/403/407 per source |
//!
//! The allowlist is not a filter: it marks a message `trusted` in [`crate::pipeline::Meta`], and
//! every filter leaves trusted sources alone.

pub mod ban;
pub mod bruteforce;
pub mod enumeration;
pub mod flood;
pub mod geoip;
pub mod limits;
pub mod methods;
pub mod rate;
pub mod registered;
pub mod sanity;
pub mod scanner;
pub mod tollfraud;

use crate::clock::Clock;
use crate::pipeline::{Action, BuildError};
use crate::policy::RuleAction;
use aho_corasick::AhoCorasick;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};
use lru::LruCache;
use std::hash::Hash;
use std::num::NonZeroUsize;
use std::sync::{Mutex, MutexGuard};

/// `needle` (already lower-case ASCII) occurs in `hay`, ignoring ASCII case.
/// One ASCII-case-insensitive Aho–Corasick automaton over `patterns` (which `what` names in the
/// build error): a text is searched for all of them in one pass.
pub fn automaton<I, P>(patterns: I, what: &str) -> Result<AhoCorasick, BuildError>
where
    I: IntoIterator<Item = P>,
    P: AsRef<[u8]>,
{
    AhoCorasick::builder()
        .ascii_case_insensitive(true)
        .build(patterns)
        .map_err(|e| BuildError::Invalid(format!("{what}: {e}")))
}

pub fn contains_ci(hay: &str, needle: &str) -> bool {
    let (h, n) = (hay.as_bytes(), needle.as_bytes());
    if n.is_empty() {
        return true;
    }
    if h.len() < n.len() {
        return false;
    }
    h.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n))
}

/// The pipeline action for a configured rule action; `reject` answers `code reason`.
pub fn action_of(a: RuleAction, ttl_s: u64, code: u16, reason: &'static str) -> Action {
    match a {
        RuleAction::Alert => Action::Alert,
        RuleAction::Reject => Action::Reject {
            code,
            reason,
            header: None,
        },
        RuleAction::Drop => Action::Drop,
        RuleAction::Ban => Action::Ban { ttl_s },
    }
}

/// A keyed GCRA limiter (`governor`, one DashMap of per-key state) with its upkeep.
///
/// [`KeyedLimiter::upkeep`] runs every second on the housekeeping task, which shares a core with
/// the receive threads, so it does little: it drops the keys back at full burst (forgetting them
/// changes no verdict) and gives memory back only when a minute's most keys have fallen to a
/// quarter of what the maps were last sized for — after a flood from many sources, not in steady
/// load. Shrinking every second made the maps of a steady load (a thousand callers, each idle for a
/// moment at the tick) shrink and then grow back on the receive path, rehashing under a shard
/// lock, every second.
pub struct KeyedLimiter<K: Hash + Eq + Clone> {
    limiter: RateLimiter<K, DashMapStateStore<K>, Clock, NoOpMiddleware<Nanos>>,
    sizing: Mutex<Sizing>,
}

/// What [`KeyedLimiter::upkeep`] remembers between ticks.
#[derive(Debug, Default)]
struct Sizing {
    /// Ticks since the last look at shrinking.
    ticks: u32,
    /// The most keys held at a tick since that look.
    recent: usize,
    /// The most keys held since the maps were last shrunk (what their capacity is sized for).
    sized_for: usize,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    /// Ticks between two looks at shrinking.
    pub const SHRINK_EVERY: u32 = 60;

    pub fn new(quota: Quota, clock: Clock) -> Self {
        KeyedLimiter {
            limiter: RateLimiter::dashmap_with_clock(quota, clock),
            sizing: Mutex::new(Sizing::default()),
        }
    }

    /// One key's cell: `Ok`, or when the next one would conform.
    pub fn check_key(
        &self,
        key: &K,
    ) -> Result<(), governor::NotUntil<<Clock as governor::clock::Clock>::Instant>> {
        self.limiter.check_key(key)
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The periodic upkeep (see the type's doc). Returns whether the maps were shrunk.
    pub fn upkeep(&self) -> bool {
        let held = self.limiter.len();
        self.limiter.retain_recent();
        let mut s = self.sizing.lock().unwrap_or_else(|p| p.into_inner());
        s.recent = s.recent.max(held);
        s.sized_for = s.sized_for.max(held);
        s.ticks += 1;
        if s.ticks < Self::SHRINK_EVERY {
            return false;
        }
        let shrink = s.recent.saturating_mul(4) < s.sized_for;
        if shrink {
            self.limiter.shrink_to_fit();
            s.sized_for = s.recent;
        }
        s.ticks = 0;
        s.recent = 0;
        shrink
    }
}

/// A map of per-key windows behind a lock, bounded in size, kept in the order of the entries'
/// stamps (oldest first): an entry moves to the back when its stamp changes, which is when its
/// window restarts or it is touched, at "now". So when the map is full a new key drops the oldest
/// entry in O(1) — the same one a walk for the smallest stamp found, at 100,000 entries 320 µs a
/// new key, which a spray from many sources (spoofed UDP is free) would have made every message
/// pay — and a sweep takes what is due from the front, a batch per lock, without looking at the
/// rest. Used off the gate path (responses, INVITEs), where a lock is cheap next to parsing.
pub struct Windows<K: Hash + Eq, V> {
    map: Mutex<LruCache<K, V>>,
}

impl<K: Hash + Eq + Clone, V> Default for Windows<K, V> {
    fn default() -> Self {
        Windows::with_capacity(Self::DEFAULT_CAP)
    }
}

/// Something that knows when it was last touched.
pub trait Stamped {
    fn stamp(&self) -> u64;
}

impl<K: Hash + Eq + Clone, V> Windows<K, V> {
    pub const DEFAULT_CAP: usize = 100_000;

    /// Entries a sweep drops per hold of the lock; the receive path gets it in between.
    pub const SWEEP_BATCH: usize = 1_000;

    pub fn with_capacity(cap: usize) -> Self {
        Windows {
            map: Mutex::new(LruCache::new(
                NonZeroUsize::new(cap).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }

    /// The map itself, oldest stamp first: for reads that must not reorder it (`peek`) and
    /// removals (`pop`).
    pub fn lock(&self) -> MutexGuard<'_, LruCache<K, V>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K: Hash + Eq + Clone, V: Stamped> Windows<K, V> {
    /// Runs `f` on the entry of `key` (made by `new` when absent; when the map is full, the entry
    /// with the oldest stamp makes room). `f` may restart the window: an entry whose stamp it
    /// changes moves to the back, so stamps should only move forward, to now.
    pub fn with<R>(&self, key: &K, new: impl FnOnce() -> V, f: impl FnOnce(&mut V) -> R) -> R {
        let mut map = self.lock();
        if let Some(v) = map.peek_mut(key) {
            let before = v.stamp();
            let r = f(v);
            if v.stamp() != before {
                map.promote(key);
            }
            return r;
        }
        // At the cap, `push` drops the front: the oldest stamp (gone stale or not).
        map.push(key.clone(), new());
        let v = map.peek_mut(key).expect("just pushed");
        f(v)
    }

    /// Forgets entries whose stamp is `window_ms` or more before `now_ms`: from the front, until
    /// the first that is not, [`Self::SWEEP_BATCH`] per hold of the lock.
    pub fn expire(&self, now_ms: u64, window_ms: u64) {
        let due = |v: &V| now_ms.saturating_sub(v.stamp()) >= window_ms;
        while drain_due(&mut self.lock(), Self::SWEEP_BATCH, due, |_, _| ()) {}
    }
}

/// Pops entries from the front of `cache` (kept in the order they fell due) while `due` holds
/// for the first, at most `limit` of them, each handed to `gone`; returns whether it stopped at
/// `limit` with the next one due too. The sweep of every table the rules keep in time order.
pub(crate) fn drain_due<K: Hash + Eq, V>(
    cache: &mut LruCache<K, V>,
    limit: usize,
    due: impl Fn(&V) -> bool,
    mut gone: impl FnMut(K, V),
) -> bool {
    for _ in 0..limit {
        if !cache.peek_lru().is_some_and(|(_, v)| due(v)) {
            return false;
        }
        if let Some((k, v)) = cache.pop_lru() {
            gone(k, v);
        }
    }
    cache.peek_lru().is_some_and(|(_, v)| due(v))
}

#[cfg(test)]
pub(crate) mod testkit;

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    struct E(u64);
    impl Stamped for E {
        fn stamp(&self) -> u64 {
            self.0
        }
    }

    #[test]
    fn case_insensitive_contains() {
        assert!(contains_ci("Friendly-Scanner 1.0", "friendly-scanner"));
        assert!(!contains_ci("friendly", "friendly-scanner"));
        assert!(contains_ci("x", ""));
    }

    #[test]
    fn limiter_upkeep_forgets_idle_keys_and_shrinks_only_after_a_quiet_minute() {
        let clock = Clock::manual(1_000_000);
        let l: KeyedLimiter<u32> = KeyedLimiter::new(
            Quota::per_second(NonZeroU32::new(10).unwrap()),
            clock.clone(),
        );
        // A flood from 1,000 sources, then a steady 10.
        for k in 0..1_000 {
            assert!(l.check_key(&k).is_ok());
        }
        clock.advance_ms(1_000);
        assert!(!l.upkeep(), "no look at shrinking before a minute of ticks");
        assert!(l.is_empty(), "keys back at full burst are forgotten");
        let steady = |l: &KeyedLimiter<u32>, clock: &Clock, ticks: u32| {
            let mut shrunk = 0;
            for _ in 0..ticks {
                for k in 0..10 {
                    let _ = l.check_key(&k);
                }
                clock.advance_ms(1_000);
                shrunk += l.upkeep() as u32;
            }
            shrunk
        };
        assert_eq!(
            steady(&l, &clock, KeyedLimiter::<u32>::SHRINK_EVERY - 1),
            0,
            "the minute of the flood keeps its size"
        );
        assert_eq!(
            steady(&l, &clock, KeyedLimiter::<u32>::SHRINK_EVERY),
            1,
            "a minute well under the flood's size gives the memory back"
        );
        assert_eq!(
            steady(&l, &clock, 3 * KeyedLimiter::<u32>::SHRINK_EVERY),
            0,
            "steady load: sized for what it holds, never shrunk again"
        );
        assert!(l.check_key(&0).is_ok(), "verdicts unchanged by upkeep");
    }

    #[test]
    fn windows_stay_within_their_cap_dropping_the_oldest_stamp() {
        let w: Windows<u32, E> = Windows::with_capacity(3);
        for k in 0..3 {
            w.with(&k, || E(k as u64), |_| ());
        }
        // 0 restarts its window at 10: now the newest, so 1 is the oldest.
        w.with(&0, || E(0), |e| e.0 = 10);
        // Touched without a new stamp: stays where it was.
        w.with(&2, || E(0), |_| ());
        w.with(&9, || E(11), |_| ());
        assert_eq!(w.len(), 3);
        assert!(!w.lock().contains(&1), "the oldest stamp goes");
        w.with(&8, || E(12), |_| ());
        assert!(
            !w.lock().contains(&2),
            "then the next oldest, touched or not"
        );
        let keys: Vec<u32> = w.lock().iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, vec![8, 9, 0], "newest first");
    }

    #[test]
    fn a_sweep_drops_what_is_due_from_the_front_in_batches() {
        let n = 2 * Windows::<u32, E>::SWEEP_BATCH as u32 + 5;
        let w: Windows<u32, E> = Windows::with_capacity(10_000);
        for k in 0..n {
            w.with(&k, || E(u64::from(k)), |_| ());
        }
        // Window 100 at n + 50: stamps up to n - 50 are due, more than two batches.
        w.expire(u64::from(n) + 50, 100);
        assert_eq!(w.len(), 49);
        assert!(w.lock().iter().all(|(_, e)| e.0 > u64::from(n) - 50));
        w.expire(u64::from(n) + 200, 100);
        assert!(w.is_empty());
        // A stamp moved forward keeps its entry past a sweep of the ones around it.
        w.with(&1, || E(1), |_| ());
        w.with(&2, || E(2), |_| ());
        w.with(&1, || E(0), |e| e.0 = 500);
        w.expire(450, 100);
        let keys: Vec<u32> = w.lock().iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, vec![1]);
    }
}
