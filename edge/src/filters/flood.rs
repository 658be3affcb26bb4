//! `flood`: a per-source GCRA limiter (`governor`) ahead of the parser; a source that keeps
//! exceeding it within a window is banned.

use super::{KeyedLimiter, Stamped, Windows};
use crate::clock::Clock;
use crate::pipeline::{Action, Filter, Finding, Meta, State};
use crate::policy;
use governor::Quota;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

/// Messages over the limit per source within the current window.
pub struct Over {
    start_ms: u64,
    count: u32,
}

impl Stamped for Over {
    fn stamp(&self) -> u64 {
        self.start_ms
    }
}

/// Per-source excess counts; outlives policy reloads.
pub type Excess = Windows<IpAddr, Over>;

/// The flood limiter.
pub struct Flood {
    cfg: policy::Flood,
    limiter: KeyedLimiter<IpAddr>,
    state: Arc<State>,
}

impl Flood {
    pub fn new(cfg: &policy::Flood, state: &Arc<State>, clock: Clock) -> Flood {
        let nz = |v: u32| NonZeroU32::new(v.max(1)).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::per_second(nz(cfg.rate_per_s)).allow_burst(nz(cfg.burst));
        Flood {
            cfg: cfg.clone(),
            limiter: KeyedLimiter::new(quota, clock),
            state: state.clone(),
        }
    }
}

impl Filter for Flood {
    fn name(&self) -> &'static str {
        "flood"
    }

    fn dry_run(&self) -> bool {
        self.cfg.dry_run
    }

    fn gate(&self, meta: &Meta) -> Option<Finding> {
        if meta.trusted {
            return None;
        }
        let ip = meta.source.ip();
        if self.limiter.check_key(&ip).is_ok() {
            return None;
        }
        let window_ms = self.cfg.window_s * 1000;
        let over = self.state.flood.with(
            &ip,
            || Over {
                start_ms: meta.now_ms,
                count: 0,
            },
            |o| {
                if meta.now_ms.saturating_sub(o.start_ms) >= window_ms {
                    *o = Over {
                        start_ms: meta.now_ms,
                        count: 0,
                    };
                }
                o.count += 1;
                o.count
            },
        );
        if self.cfg.ban_after > 0 && over >= self.cfg.ban_after {
            return Some(Finding::new(
                "flood",
                Action::Ban {
                    ttl_s: self.cfg.ban_ttl_s,
                },
                format!(
                    "{over} messages over {}/s (burst {}) within {} s",
                    self.cfg.rate_per_s, self.cfg.burst, self.cfg.window_s
                ),
            ));
        }
        Some(Finding::new(
            "flood",
            Action::Drop,
            "over the per-source message rate",
        ))
    }

    fn housekeep(&self) {
        self.limiter.upkeep();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bans::BanStore;
    use crate::filters::testkit::*;
    use crate::proxy::Side;

    fn flood(rate: u32, burst: u32, ban_after: u32) -> (Flood, Clock) {
        let clock = Clock::manual(T0);
        let state = Arc::new(State::new(Arc::new(BanStore::new(None, 10))));
        let cfg = policy::Flood {
            rate_per_s: rate,
            burst,
            ban_after,
            window_s: 10,
            ..Default::default()
        };
        (Flood::new(&cfg, &state, clock.clone()), clock)
    }

    #[test]
    fn burst_then_rate_then_ban() {
        let (f, clock) = flood(10, 5, 20);
        let m = |c: &Clock| meta(c.now_ms(), "192.0.2.1:5060", Side::Internet);
        for i in 0..5 {
            assert!(f.gate(&m(&clock)).is_none(), "burst message {i}");
        }
        assert_eq!(f.gate(&m(&clock)).unwrap().action, Action::Drop);
        clock.advance_ms(100); // one token back at 10/s
        assert!(f.gate(&m(&clock)).is_none());
        // Another source is not affected.
        assert!(f
            .gate(&meta(clock.now_ms(), "192.0.2.2:5060", Side::Internet))
            .is_none());
        let mut last = None;
        for _ in 0..19 {
            last = f.gate(&m(&clock));
        }
        assert_eq!(last.unwrap().action, Action::Ban { ttl_s: 600 });
    }

    #[test]
    fn excess_counts_reset_with_the_window_and_trusted_pass() {
        let (f, clock) = flood(1, 1, 3);
        let m = |c: &Clock| meta(c.now_ms(), "192.0.2.1:5060", Side::Internet);
        assert!(f.gate(&m(&clock)).is_none());
        assert_eq!(f.gate(&m(&clock)).unwrap().action, Action::Drop);
        assert_eq!(f.gate(&m(&clock)).unwrap().action, Action::Drop);
        clock.advance_ms(10_000);
        assert!(f.gate(&m(&clock)).is_none());
        assert_eq!(
            f.gate(&m(&clock)).unwrap().action,
            Action::Drop,
            "window restarted at 1"
        );
        let mut t = m(&clock);
        t.trusted = true;
        for _ in 0..10 {
            assert!(f.gate(&t).is_none());
        }
    }
}
