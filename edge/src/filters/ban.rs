//! `bans`: drops messages from banned networks before they are parsed.

use crate::bans::BanStore;
use crate::pipeline::{Action, Filter, Finding, Meta, State};
use crate::policy::Bans;
use std::sync::Arc;

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
}
