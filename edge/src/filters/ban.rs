//! `bans`: drops messages from banned networks before they are parsed, and refuses requests of a
//! banned account (AOR) or User-Agent once they are.

use crate::bans::BanStore;
use crate::pipeline::{Action, Filter, Finding, Meta, RequestCx, State};
use crate::policy::Bans;
use crate::proxy::Side;
use aho_corasick::AhoCorasick;
use arc_swap::ArcSwap;
use std::sync::Arc;

/// Cluster bans that match a request's identity rather than its address: AORs (`user@host`,
/// host lower-case) and User-Agent substrings (lower-case), each with the id of a ban in force on
/// it and its end. The maps are persistent (`imbl`): a change copies the path to what it changes,
/// not the set, so a cluster pushing thousands of account bans one by one costs what each one
/// changes, while every reader keeps the set it loaded. A ban past its end is not enforced, as an
/// address ban is not, though no controller is there to take it out.
#[derive(Debug, Default, Clone)]
pub struct IdentitySet {
    aors: imbl::HashMap<String, IdentityBan>,
    user_agents: imbl::OrdMap<String, IdentityBan>,
    /// One case-insensitive automaton over `user_agents`, built by `seal` once a change is done
    /// (`None` while there are none, or should the build fail: then each is scanned in turn).
    ua_matcher: Option<Arc<AhoCorasick>>,
    /// The needles the matcher's pattern indexes name, in its order.
    ua_needles: Arc<[String]>,
    unsealed: bool,
}

/// The ban on an identity: its id and when it ends (`bans::NEVER`: never).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityBan {
    pub id: String,
    pub expires_unix_ms: u64,
}

impl IdentityBan {
    fn live(&self, now_ms: u64) -> bool {
        now_ms < self.expires_unix_ms
    }
}

impl IdentitySet {
    /// Bans `aor` (as `aor_key` gives it).
    pub fn put_aor(&mut self, aor: String, ban: IdentityBan) {
        self.aors.insert(aor, ban);
    }

    pub fn remove_aor(&mut self, aor: &str) {
        self.aors.remove(aor);
    }

    /// Bans User-Agents containing `needle` (any case).
    pub fn put_user_agent(&mut self, needle: &str, ban: IdentityBan) {
        let needle = needle.to_ascii_lowercase();
        if self.user_agents.insert(needle, ban).is_none() {
            self.unsealed = true;
        }
    }

    pub fn remove_user_agent(&mut self, needle: &str) {
        if self
            .user_agents
            .remove(&needle.to_ascii_lowercase())
            .is_some()
        {
            self.unsealed = true;
        }
    }

    /// Rebuilds the User-Agent matcher after changes to the needles.
    fn seal(&mut self) {
        if !std::mem::take(&mut self.unsealed) {
            return;
        }
        self.ua_needles = self.user_agents.keys().cloned().collect();
        self.ua_matcher = if self.ua_needles.is_empty() {
            None
        } else {
            match super::automaton(self.ua_needles.iter(), "cluster User-Agent bans") {
                Ok(a) => Some(Arc::new(a)),
                Err(e) => {
                    tracing::warn!(error = %e, "User-Agent bans are matched one by one");
                    None
                }
            }
        };
    }

    /// The id of the ban in force at `now_ms` on account `aor` (as `aor_key` gives it).
    pub fn aor(&self, aor: &str, now_ms: u64) -> Option<&str> {
        self.aors
            .get(aor)
            .filter(|b| b.live(now_ms))
            .map(|b| b.id.as_str())
    }

    /// The id of a ban in force at `now_ms` on a User-Agent that `ua` contains.
    pub fn user_agent(&self, ua: &str, now_ms: u64) -> Option<&str> {
        let live = |needle: &str| {
            self.user_agents
                .get(needle)
                .filter(|b| b.live(now_ms))
                .map(|b| b.id.as_str())
        };
        match &self.ua_matcher {
            // Every match, overlapping ones too: the first needle found may have ended.
            Some(m) => m
                .find_overlapping_iter(ua)
                .find_map(|hit| live(&self.ua_needles[hit.pattern().as_usize()])),
            None => self
                .user_agents
                .keys()
                .filter(|n| super::contains_ci(ua, n))
                .find_map(|n| live(n)),
        }
    }

    pub fn aor_count(&self) -> usize {
        self.aors.len()
    }

    pub fn user_agent_count(&self) -> usize {
        self.user_agents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.aors.is_empty() && self.user_agents.is_empty()
    }
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

    pub fn replace(&self, mut set: IdentitySet) {
        set.seal();
        self.set.store(Arc::new(set));
    }

    /// Applies `f` to a copy of the set in force (cheap: the maps share what `f` leaves alone)
    /// and puts the copy in force.
    pub fn update(&self, f: impl FnOnce(&mut IdentitySet)) {
        let mut next = (**self.set.load()).clone();
        f(&mut next);
        self.replace(next);
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
        if cx.meta.trusted || cx.meta.side != Side::Internet || set.is_empty() {
            return None;
        }
        if set.aor_count() > 0 {
            let from = aor_key(cx.sip.from_uri());
            let to = (cx.sip.method() == "REGISTER").then(|| aor_key(cx.sip.to_uri()));
            for aor in std::iter::once(from).chain(to) {
                if let Some(id) = set.aor(&aor, cx.meta.now_ms) {
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
            if let Some(id) = set.user_agent(ua, cx.meta.now_ms) {
                return Some(Finding::new(
                    "ban.user_agent",
                    Action::Drop,
                    format!("User-Agent banned ({id})"),
                ));
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
            s.put_aor(aor_key("sip:1001@PBX.example"), forever("b1"));
            s.put_user_agent("sipvicious", forever("b2"));
        });
        assert_eq!(check("1001", ""), Some(("ban.aor", "reject")));
        assert_eq!(check("1002", ""), None);
        assert_eq!(
            check("1002", "User-Agent: SIPVicious 0.3\r\n"),
            Some(("ban.user_agent", "drop"))
        );
        assert_eq!(
            check("1002", "User-Agent: SIPVicious\r\n"),
            Some(("ban.user_agent", "drop"))
        );
        assert_eq!(check("1002", "User-Agent: SIPVicio\r\n"), None);
        state.identity.update(|s| s.remove_user_agent("SIPVICIOUS"));
        assert_eq!(check("1002", "User-Agent: SIPVicious 0.3\r\n"), None);
        // Bans past their end are not enforced, though still held (no controller took them out).
        state.identity.update(|s| {
            let ended = |id: &str| IdentityBan {
                id: id.into(),
                expires_unix_ms: T0,
            };
            s.put_aor(aor_key("sip:1001@PBX.example"), ended("b1"));
            s.put_user_agent("sipvicious", ended("b2"));
        });
        assert_eq!(check("1001", "User-Agent: SIPVicious 0.3\r\n"), None);
    }

    fn forever(id: &str) -> IdentityBan {
        IdentityBan {
            id: id.into(),
            expires_unix_ms: crate::bans::NEVER,
        }
    }

    /// The automaton over the User-Agent needles finds what a scan of each finds, and names the
    /// ban in force of a needle it found (overlapping matches included: some have ended), through
    /// puts and removals.
    #[test]
    fn user_agent_matcher_agrees_with_a_scan() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let words = ["ab", "abc", "bc", "cab", "B", "CaBa", "xyz"];
        let bans = IdentityBans::default();
        let mut model: std::collections::BTreeMap<String, IdentityBan> = Default::default();
        for i in 0..2_000 {
            let w = words[rng.random_range(0..words.len())];
            if rng.random_bool(0.5) {
                let ban = IdentityBan {
                    id: format!("u{i}"),
                    expires_unix_ms: rng.random_range(1..4),
                };
                bans.update(|s| s.put_user_agent(w, ban.clone()));
                model.insert(w.to_ascii_lowercase(), ban);
            } else {
                bans.update(|s| s.remove_user_agent(w));
                model.remove(&w.to_ascii_lowercase());
            }
            let set = bans.load();
            let ua: String = (0..rng.random_range(0..8))
                .map(|_| ['a', 'B', 'c', 'x', 'y', 'Z', ' '][rng.random_range(0..7)])
                .collect();
            let now = rng.random_range(0..4);
            let hit = set.user_agent(&ua, now);
            let hits: Vec<&String> = model
                .iter()
                .filter(|(n, b)| crate::filters::contains_ci(&ua, n) && now < b.expires_unix_ms)
                .map(|(_, b)| &b.id)
                .collect();
            match hit {
                Some(id) => assert!(hits.iter().any(|h| *h == id), "{ua:?}: {id} of {model:?}"),
                None => assert!(hits.is_empty(), "{ua:?} missed {hits:?}"),
            }
            assert_eq!(set.user_agent_count(), model.len());
        }
    }
}
