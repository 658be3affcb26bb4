//! `rate`: REGISTER, INVITE and OPTIONS limits per source address and per AOR, each a GCRA keyed
//! limiter (`governor`) allowing the per-minute count as a burst. Refusals are `503` with a
//! `Retry-After` saying when the next request would conform, or a drop or ban, per policy.

use super::{action_of, KeyedLimiter};
use crate::clock::Clock;
use crate::pipeline::{Action, Filter, Finding, RequestCx};
use crate::policy::{self, MethodLimits, RuleAction};
use crate::proxy::Side;
use governor::clock::Clock as _;
use governor::Quota;
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

fn limiter<K: Hash + Eq + Clone>(per_min: u32, clock: &Clock) -> Option<KeyedLimiter<K>> {
    let n = NonZeroU32::new(per_min)?;
    Some(KeyedLimiter::new(
        Quota::per_minute(n).allow_burst(n),
        clock.clone(),
    ))
}

/// The limits of one method.
struct Limits {
    method: &'static str,
    per_source: Option<KeyedLimiter<IpAddr>>,
    per_aor: Option<KeyedLimiter<String>>,
    cfg: MethodLimits,
}

/// The rate rule.
pub struct Rate {
    cfg: policy::Rate,
    clock: Clock,
    limits: Vec<Limits>,
}

impl Rate {
    pub fn new(cfg: &policy::Rate, clock: Clock) -> Rate {
        let limits = [
            ("REGISTER", &cfg.register),
            ("INVITE", &cfg.invite),
            ("OPTIONS", &cfg.options),
        ]
        .into_iter()
        .map(|(method, l)| Limits {
            method,
            per_source: limiter(l.per_source_per_min, &clock),
            per_aor: limiter(l.per_aor_per_min, &clock),
            cfg: l.clone(),
        })
        .collect();
        Rate {
            cfg: cfg.clone(),
            clock,
            limits,
        }
    }

    fn finding(&self, what: String, wait: std::time::Duration) -> Finding {
        let action = match self.cfg.action {
            RuleAction::Reject => Action::Reject {
                code: 503,
                reason: "Service Unavailable",
                header: Some((
                    "Retry-After",
                    Arc::from(wait.as_secs().max(1).to_string().as_str()),
                )),
            },
            other => action_of(other, self.cfg.ban_ttl_s, 503, "Service Unavailable"),
        };
        Finding::new("rate", action, what)
    }
}

/// The AOR a request is counted against: To for REGISTER, From (the caller) otherwise.
fn aor<'c>(method: &str, cx: &'c RequestCx<'_>) -> &'c String {
    if method == "REGISTER" {
        cx.to_aor()
    } else {
        cx.from_aor()
    }
}

impl Filter for Rate {
    fn name(&self) -> &'static str {
        "rate"
    }

    fn dry_run(&self) -> bool {
        self.cfg.dry_run
    }

    fn request(&self, cx: &RequestCx<'_>) -> Option<Finding> {
        if cx.meta.side != Side::Internet || cx.meta.trusted {
            return None;
        }
        let method = cx.sip.method();
        let l = self.limits.iter().find(|l| l.method == method)?;
        // In-dialog requests (re-INVITE) are part of a call already admitted.
        if method == "INVITE" && cx.sip.to_tag().is_some() {
            return None;
        }
        let now = self.clock.now();
        if let Some(lim) = &l.per_source {
            if let Err(nu) = lim.check_key(&cx.meta.source.ip()) {
                return Some(self.finding(
                    format!(
                        "{method} from {} over {}/min",
                        cx.meta.source.ip(),
                        l.cfg.per_source_per_min
                    ),
                    nu.wait_time_from(now),
                ));
            }
        }
        if let Some(lim) = &l.per_aor {
            let aor = aor(method, cx);
            if let Err(nu) = lim.check_key(aor) {
                return Some(self.finding(
                    format!("{method} for {aor} over {}/min", l.cfg.per_aor_per_min),
                    nu.wait_time_from(now),
                ));
            }
        }
        None
    }

    fn housekeep(&self) {
        for l in &self.limits {
            if let Some(s) = &l.per_source {
                s.upkeep();
            }
            if let Some(a) = &l.per_aor {
                a.upkeep();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filters::testkit::*;

    fn rate(cfg: policy::Rate) -> (Rate, Clock) {
        let clock = Clock::manual(T0);
        (Rate::new(&cfg, clock.clone()), clock)
    }

    fn check(r: &Rate, clock: &Clock, raw: &str, source: &str) -> Option<Finding> {
        let m = parse(raw);
        let meta = meta(clock.now_ms(), source, Side::Internet);
        r.request(&req_cx(&meta, &m))
    }

    #[test]
    fn per_source_limit_replies_503_with_retry_after() {
        let cfg = policy::Rate {
            register: MethodLimits {
                per_source_per_min: 3,
                per_aor_per_min: 0,
            },
            ..Default::default()
        };
        let (r, clock) = rate(cfg);
        let reg = request("REGISTER", "100", "100", "");
        for _ in 0..3 {
            assert!(check(&r, &clock, &reg, "192.0.2.1:5060").is_none());
        }
        match check(&r, &clock, &reg, "192.0.2.1:5060").unwrap().action {
            Action::Reject {
                code: 503,
                header: Some(("Retry-After", s)),
                ..
            } => assert_eq!(&*s, "20"),
            other => panic!("{other:?}"),
        }
        assert!(
            check(&r, &clock, &reg, "192.0.2.2:5060").is_none(),
            "other source"
        );
        clock.advance_ms(20_000);
        assert!(
            check(&r, &clock, &reg, "192.0.2.1:5060").is_none(),
            "one back after 20 s"
        );
    }

    #[test]
    fn per_aor_limit_spans_sources_and_methods_are_separate() {
        let cfg = policy::Rate {
            action: RuleAction::Drop,
            invite: MethodLimits {
                per_source_per_min: 0,
                per_aor_per_min: 2,
            },
            ..Default::default()
        };
        let (r, clock) = rate(cfg);
        let inv = request("INVITE", "5551234", "1001", "");
        assert!(check(&r, &clock, &inv, "192.0.2.1:5060").is_none());
        assert!(check(&r, &clock, &inv, "192.0.2.2:5060").is_none());
        let f = check(&r, &clock, &inv, "192.0.2.3:5060").unwrap();
        assert_eq!(f.action, Action::Drop);
        assert!(f.detail.contains("1001@pbx.example"), "{}", f.detail);
        let other = request("INVITE", "5551234", "1002", "");
        assert!(check(&r, &clock, &other, "192.0.2.3:5060").is_none());
        let opt = request("OPTIONS", "1", "1001", "");
        assert!(check(&r, &clock, &opt, "192.0.2.3:5060").is_none());
        let reinvite = inv.replace(
            "To: <sip:5551234@pbx.example>",
            "To: <sip:5551234@pbx.example>;tag=x",
        );
        assert!(
            check(&r, &clock, &reinvite, "192.0.2.3:5060").is_none(),
            "in-dialog"
        );
    }
}
