//! `bruteforce`: digest-authentication guessing, seen in the PBX's answers. Each 401/407 to a
//! request that carried credentials, and each 403, scores `failure_weight`; a 401/407 to a request
//! without credentials (the normal first leg of digest auth) scores the smaller `challenge_weight`.
//! Scores add up per source and per AOR within a window. A source past its threshold is banned; an
//! AOR past its own is flagged (an alert: its attackers may be many addresses). A `200` to a
//! request that carried credentials resets the source and the AOR; one to a request without them
//! (an OPTIONS ping) proves nothing, and must not let a guesser clear its score between tries.

use super::{action_of, Stamped, Windows};
use crate::pipeline::sipview::uri_aor;
use crate::pipeline::{Action, Filter, Finding, ResponseCx, State};
use crate::policy;
use crate::proxy::Side;
use std::net::IpAddr;
use std::sync::Arc;

/// A score within a window.
pub struct Score {
    start_ms: u64,
    score: f64,
    /// The AOR was flagged in this window (flag once).
    flagged: bool,
}

impl Stamped for Score {
    fn stamp(&self) -> u64 {
        self.start_ms
    }
}

/// Scores per source and per AOR; outlive reloads.
#[derive(Default)]
pub struct AuthFailures {
    pub sources: Windows<IpAddr, Score>,
    pub aors: Windows<String, Score>,
}

impl AuthFailures {
    pub fn expire(&self, now_ms: u64, window_ms: u64) {
        self.sources.expire(now_ms, window_ms);
        self.aors.expire(now_ms, window_ms);
    }
}

/// Adds `w` to the score of `key`, restarting an elapsed window; returns the new score and whether
/// this call is the first to pass `threshold` in the window.
fn add<K: std::hash::Hash + Eq + Clone>(
    map: &Windows<K, Score>,
    key: &K,
    w: f64,
    now: u64,
    window_ms: u64,
    threshold: f64,
) -> (f64, bool) {
    map.with(
        key,
        || Score {
            start_ms: now,
            score: 0.0,
            flagged: false,
        },
        |s| {
            if now.saturating_sub(s.start_ms) >= window_ms {
                *s = Score {
                    start_ms: now,
                    score: 0.0,
                    flagged: false,
                };
            }
            s.score += w;
            let first = s.score >= threshold && !s.flagged;
            if first {
                s.flagged = true;
            }
            (s.score, first)
        },
    )
}

/// The brute-force rule.
pub struct BruteForce {
    cfg: policy::BruteForce,
    state: Arc<State>,
}

impl BruteForce {
    pub fn new(cfg: &policy::BruteForce, state: &Arc<State>) -> BruteForce {
        BruteForce {
            cfg: cfg.clone(),
            state: state.clone(),
        }
    }
}

impl Filter for BruteForce {
    fn name(&self) -> &'static str {
        "bruteforce"
    }

    fn dry_run(&self) -> bool {
        self.cfg.dry_run
    }

    fn response(&self, cx: &ResponseCx<'_>) -> Option<Finding> {
        if cx.meta.side != Side::Pbx || cx.peer_trusted {
            return None;
        }
        let method = cx.sip.method();
        let aor_uri = if method == "REGISTER" {
            cx.sip.to_uri()
        } else {
            cx.sip.from_uri()
        };
        let ip = cx.peer.ip();
        let now = cx.meta.now_ms;
        let failures = &self.state.auth;
        let weight = match cx.status {
            200 if !cx.had_credentials => return None,
            200 => {
                failures.sources.lock().pop(&ip);
                failures.aors.lock().pop(&uri_aor(aor_uri));
                return None;
            }
            401 | 407 if cx.had_credentials => self.cfg.failure_weight,
            401 | 407 => self.cfg.challenge_weight,
            403 => self.cfg.failure_weight,
            _ => return None,
        };
        let window_ms = self.cfg.window_s * 1000;
        let aor = uri_aor(aor_uri);
        let (aor_score, aor_first) = add(
            &failures.aors,
            &aor,
            weight,
            now,
            window_ms,
            self.cfg.aor_threshold,
        );
        let (score, _) = add(
            &failures.sources,
            &ip,
            weight,
            now,
            window_ms,
            self.cfg.source_threshold,
        );
        if score >= self.cfg.source_threshold {
            return Some(Finding::new(
                "bruteforce",
                action_of(self.cfg.action, self.cfg.ban_ttl_s, 403, "Forbidden"),
                format!(
                    "authentication failures from {ip} scored {score:.1} within {} s (threshold {}), last for {aor}",
                    self.cfg.window_s, self.cfg.source_threshold
                ),
            ));
        }
        if aor_first && self.cfg.aor_threshold > 0.0 {
            return Some(Finding::new(
                "bruteforce.aor",
                Action::Alert,
                format!(
                    "{aor} flagged: authentication failures scored {aor_score:.1} within {} s",
                    self.cfg.window_s
                ),
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bans::BanStore;
    use crate::filters::testkit::*;

    fn setup() -> BruteForce {
        let state = Arc::new(State::new(Arc::new(BanStore::new(None, 10))));
        let cfg = policy::BruteForce {
            source_threshold: 3.0,
            aor_threshold: 5.0,
            ..Default::default()
        };
        BruteForce::new(&cfg, &state)
    }

    fn answer(
        f: &BruteForce,
        now: u64,
        status: u16,
        peer: &str,
        user: &str,
        creds: bool,
    ) -> Option<Finding> {
        let raw = response(status, "REGISTER", user, user, "c", "");
        let m = parse(&raw);
        let meta = meta(now, "127.0.0.1:5080", Side::Pbx);
        f.response(&resp_cx(&meta, &m, peer, creds))
    }

    #[test]
    fn wrong_passwords_ban_challenges_weigh_less() {
        let f = setup();
        for _ in 0..14 {
            assert!(
                answer(&f, T0, 401, "192.0.2.1:5060", "100", false).is_none(),
                "challenges"
            );
        }
        let found = answer(&f, T0, 401, "192.0.2.1:5060", "100", false).unwrap();
        assert_eq!(found.action, Action::Ban { ttl_s: 3600 }, "15 × 0.2 = 3");
        let f = setup();
        assert!(answer(&f, T0, 401, "192.0.2.2:5060", "100", true).is_none());
        assert!(answer(&f, T0, 403, "192.0.2.2:5060", "100", false).is_none());
        assert_eq!(
            answer(&f, T0, 407, "192.0.2.2:5060", "100", true)
                .unwrap()
                .rule,
            "bruteforce"
        );
    }

    #[test]
    fn success_resets_and_windows_expire() {
        let f = setup();
        answer(&f, T0, 401, "192.0.2.1:5060", "100", true);
        answer(&f, T0, 401, "192.0.2.1:5060", "100", true);
        // A 200 to a request without credentials (an OPTIONS between guesses) resets nothing.
        assert!(answer(&f, T0, 200, "192.0.2.1:5060", "100", false).is_none());
        assert_eq!(
            answer(&f, T0, 401, "192.0.2.1:5060", "100", true).map(|f| f.action),
            Some(Action::Ban { ttl_s: 3600 }),
            "not reset by an unauthenticated 200"
        );
        let f = setup();
        answer(&f, T0, 401, "192.0.2.1:5060", "100", true);
        answer(&f, T0, 401, "192.0.2.1:5060", "100", true);
        assert!(answer(&f, T0, 200, "192.0.2.1:5060", "100", true).is_none());
        assert!(
            answer(&f, T0, 401, "192.0.2.1:5060", "100", true).is_none(),
            "reset by 200"
        );
        answer(&f, T0, 401, "192.0.2.1:5060", "100", true);
        let later = T0 + 300_000;
        assert!(
            answer(&f, later, 401, "192.0.2.1:5060", "100", true).is_none(),
            "window passed"
        );
    }

    #[test]
    fn an_aor_attacked_from_many_sources_is_flagged_once() {
        let f = setup();
        let mut flagged = 0;
        for i in 0..10 {
            if let Some(found) = answer(&f, T0, 403, &format!("192.0.2.{i}:5060"), "100", false) {
                assert_eq!(found.rule, "bruteforce.aor");
                assert_eq!(found.action, Action::Alert);
                flagged += 1;
            }
        }
        assert_eq!(flagged, 1);
    }
}
