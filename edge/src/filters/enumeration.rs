//! `enumeration`: extension scanning (svwar and friends) — one source whose requests for many
//! distinct user parts are answered 404, 401, 403 or 407 within a window is banned. A phone asks
//! for its own user part; a scanner walks a range.

use super::{action_of, Stamped, Windows};
use crate::pipeline::{Filter, Finding, ResponseCx, State};
use crate::policy;
use crate::proxy::Side;
use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;

/// The user parts probed by one source in the current window.
pub struct Probe {
    start_ms: u64,
    users: HashSet<String>,
}

impl Stamped for Probe {
    fn stamp(&self) -> u64 {
        self.start_ms
    }
}

/// Per-source probes; outlive reloads.
pub type Probes = Windows<IpAddr, Probe>;

/// The enumeration rule.
pub struct Enumeration {
    cfg: policy::Enumeration,
    state: Arc<State>,
}

impl Enumeration {
    pub fn new(cfg: &policy::Enumeration, state: &Arc<State>) -> Enumeration {
        Enumeration {
            cfg: cfg.clone(),
            state: state.clone(),
        }
    }
}

impl Filter for Enumeration {
    fn name(&self) -> &'static str {
        "enumeration"
    }

    fn dry_run(&self) -> bool {
        self.cfg.dry_run
    }

    fn response(&self, cx: &ResponseCx<'_>) -> Option<Finding> {
        if cx.meta.side != Side::Pbx
            || cx.peer_trusted
            || !matches!(cx.status, 401 | 403 | 404 | 407)
        {
            return None;
        }
        let user = cx.sip.to_user();
        if user.is_empty() {
            return None;
        }
        let now = cx.meta.now_ms;
        let window_ms = self.cfg.window_s * 1000;
        let cap = self.cfg.distinct_users as usize;
        let distinct = self.state.enumeration.with(
            &cx.peer.ip(),
            || Probe {
                start_ms: now,
                users: HashSet::new(),
            },
            |p| {
                if now.saturating_sub(p.start_ms) >= window_ms {
                    p.start_ms = now;
                    p.users.clear();
                }
                if p.users.len() < cap {
                    p.users.insert(user.to_string());
                }
                p.users.len()
            },
        );
        (distinct >= cap).then(|| {
            Finding::new(
                "enumeration",
                action_of(self.cfg.action, self.cfg.ban_ttl_s, 403, "Forbidden"),
                format!(
                    "{distinct} distinct users probed within {} s, last {user:?} answered {}",
                    self.cfg.window_s, cx.status
                ),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bans::BanStore;
    use crate::filters::testkit::*;
    use crate::pipeline::Action;

    fn answer(f: &Enumeration, now: u64, status: u16, peer: &str, user: &str) -> Option<Finding> {
        let raw = response(status, "REGISTER", user, user, "c", "");
        let m = parse(&raw);
        let meta = meta(now, "127.0.0.1:5080", Side::Pbx);
        f.response(&resp_cx(&meta, &m, peer, false))
    }

    #[test]
    fn walking_extensions_is_banned_repeating_one_is_not() {
        let state = Arc::new(State::new(Arc::new(BanStore::new(None, 10))));
        let cfg = policy::Enumeration {
            distinct_users: 4,
            ..Default::default()
        };
        let f = Enumeration::new(&cfg, &state);
        for _ in 0..20 {
            assert!(answer(&f, T0, 401, "192.0.2.1:5060", "1001").is_none());
        }
        assert!(answer(&f, T0, 404, "192.0.2.2:5060", "100").is_none());
        assert!(answer(&f, T0, 404, "192.0.2.2:5060", "101").is_none());
        assert!(
            answer(&f, T0, 200, "192.0.2.2:5060", "102").is_none(),
            "200 is not a probe"
        );
        assert!(answer(&f, T0, 401, "192.0.2.2:5060", "103").is_none());
        let found = answer(&f, T0, 403, "192.0.2.2:5060", "104").unwrap();
        assert_eq!(found.action, Action::Ban { ttl_s: 3600 });
        assert!(
            answer(&f, T0 + 300_000, 404, "192.0.2.2:5060", "105").is_none(),
            "new window"
        );
    }
}
