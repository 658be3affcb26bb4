//! `bans`: drops messages from banned networks before they are parsed, and refuses requests of a
//! banned account (AOR) or User-Agent once they are.

use crate::bans::BanStore;
use crate::pipeline::{Action, Filter, Finding, Meta, RequestCx, State};
use crate::policy::Bans;
use crate::proxy::Side;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::Arc;

/// Cluster bans that match a request's identity rather than its address: AORs (`user@host`,
/// host lower-case) and User-Agent substrings (lower-case), each with its ban id. Rare and small,
/// so changes copy the set.
#[derive(Debug, Default, Clone)]
pub struct IdentitySet {
    pub aors: HashMap<String, String>,
    pub user_agents: Vec<(String, String)>,
}

/// The identity bans in force, swapped whole.
#[derive(Default)]
pub struct IdentityBans {
    set: ArcSwap<IdentitySet>,
}

impl IdentityBans {
    pub fn load(&self) -> arc_swap::Guard<Arc<IdentitySet>> {
        self.set.load()
    }

    pub fn replace(&self, set: IdentitySet) {
        self.set.store(Arc::new(set));
    }

    pub fn update(&self, f: impl FnOnce(&mut IdentitySet)) {
        let mut next = (**self.set.load()).clone();
        f(&mut next);
        self.set.store(Arc::new(next));
    }
}

/// The AOR a ban target names, as the edge compares it (`user@host`).
pub fn aor_key(aor: &str) -> String {
    crate::pipeline::sipview::uri_aor(aor)
}

/// Refuses requests from a banned AOR (403) and drops those of a banned User-Agent.
pub struct IdentityGate {
    dry_run: bool,
    state: Arc<State>,
}

impl IdentityGate {
    pub fn new(cfg: &Bans, state: &Arc<State>) -> IdentityGate {
        IdentityGate {
            dry_run: cfg.dry_run,
            state: state.clone(),
        }
    }
}

impl Filter for IdentityGate {
    fn name(&self) -> &'static str {
        "bans"
    }

    fn dry_run(&self) -> bool {
        self.dry_run
    }

    fn request(&self, cx: &RequestCx<'_>) -> Option<Finding> {
        let set = self.state.identity.load();
        if cx.meta.trusted
            || cx.meta.side != Side::Internet
            || (set.aors.is_empty() && set.user_agents.is_empty())
        {
            return None;
        }
        if !set.aors.is_empty() {
            let from = aor_key(cx.sip.from_uri());
            let to = (cx.sip.method() == "REGISTER").then(|| aor_key(cx.sip.to_uri()));
            for aor in std::iter::once(from).chain(to) {
                if let Some(id) = set.aors.get(&aor) {
                    return Some(Finding::new(
                        "ban.aor",
                        Action::Reject {
                            code: 403,
                            reason: "Forbidden",
                            header: None,
                        },
                        format!("account {aor} banned ({id})"),
                    ));
                }
            }
        }
        let ua = cx.sip.user_agent();
        if !ua.is_empty() {
            for (needle, id) in &set.user_agents {
                if super::contains_ci(ua, needle) {
                    return Some(Finding::new(
                        "ban.user_agent",
                        Action::Drop,
                        format!("User-Agent banned ({id})"),
                    ));
                }
            }
        }
        None
    }
}

/// The ban-set check of the gate.
pub struct BanGate {
    dry_run: bool,
    bans: Arc<BanStore>,
}

impl BanGate {
    pub fn new(cfg: &Bans, state: &State) -> BanGate {
        BanGate {
            dry_run: cfg.dry_run,
            bans: state.bans.clone(),
        }
    }
}

impl Filter for BanGate {
    fn name(&self) -> &'static str {
        "bans"
    }

    fn dry_run(&self) -> bool {
        self.dry_run
    }

    fn gate(&self, meta: &Meta) -> Option<Finding> {
        if meta.trusted {
            return None;
        }
        let ban = self.bans.lookup(meta.source.ip(), meta.now_ms)?;
        // Detail left static for banned-source floods; the ban's rule and reason were logged when
        // it was made.
        let detail = match ban.origin {
            crate::bans::BanOrigin::Config => "source in a configured banned network",
            _ => "source banned",
        };
        Some(Finding::new("ban", Action::Drop, detail))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bans::{Ban, BanOrigin};
    use crate::filters::testkit::*;
    use crate::proxy::Side;

    #[test]
    fn banned_sources_are_dropped_unless_trusted() {
        let state = State::new(Arc::new(BanStore::new(None, 10)));
        state.bans.ban(Ban {
            network: "192.0.2.0/24".parse().unwrap(),
            origin: BanOrigin::Manual,
            rule: "op".into(),
            reason: "r".into(),
            created_unix_ms: T0,
            expires_unix_ms: T0 + 1_000,
        });
        state.bans.apply(T0);
        let f = BanGate::new(&Bans::default(), &state);
        let m = meta(T0, "192.0.2.9:5060", Side::Internet);
        assert_eq!(f.gate(&m).unwrap().action, Action::Drop);
        assert!(f
            .gate(&meta(T0, "198.51.100.1:5060", Side::Internet))
            .is_none());
        let mut trusted = m.clone();
        trusted.trusted = true;
        assert!(f.gate(&trusted).is_none(), "allowlist wins");
        assert!(
            f.gate(&meta(T0 + 1_000, "192.0.2.9:5060", Side::Internet))
                .is_none(),
            "TTL over"
        );
    }

    #[test]
    fn banned_accounts_and_user_agents_are_refused() {
        use crate::filters::testkit::*;
        let state = Arc::new(State::new(Arc::new(BanStore::new(None, 10))));
        let f = IdentityGate::new(&Bans::default(), &state);
        let check = |from: &str, extra: &str| {
            let raw = request("INVITE", "2000", from, extra);
            let m = parse(&raw);
            let meta = meta(T0, "192.0.2.1:5060", Side::Internet);
            f.request(&req_cx(&meta, &m))
                .map(|x| (x.rule, x.action.label()))
        };
        assert_eq!(check("1001", ""), None);
        state.identity.update(|s| {
            s.aors.insert(aor_key("sip:1001@PBX.example"), "b1".into());
            s.user_agents.push(("sipvicious".into(), "b2".into()));
        });
        assert_eq!(check("1001", ""), Some(("ban.aor", "reject")));
        assert_eq!(check("1002", ""), None);
        assert_eq!(
            check("1002", "User-Agent: SIPVicious 0.3\r\n"),
            Some(("ban.user_agent", "drop"))
        );
    }
}
