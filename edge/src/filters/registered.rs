//! `registered`: a new INVITE from the Internet is accepted only from a source address holding a
//! live registration through this edge, from an allowlisted peer or from a configured trunk. The
//! registrations are learned from the PBX's `200 OK` to REGISTER as it passes back (the binding's
//! lifetime is the largest Contact `expires`, else `Expires`, else the default; a 200 listing no
//! Contact ends it). Keyed by source IP: phones behind one NAT share their public address.

use super::action_of;
use crate::netset::NetSet;
use crate::pipeline::{Filter, Finding, RequestCx, ResponseCx, State};
use crate::policy;
use crate::proxy::Side;
use crate::sip::{header_param, split_list, HeaderName, Message};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

/// Live registrations per source address: AOR → expiry (Unix ms).
#[derive(Default)]
pub struct Bindings {
    map: Mutex<HashMap<IpAddr, HashMap<String, u64>>>,
}

impl Bindings {
    /// Upper bound on addresses tracked; a registration flood cannot grow it further.
    pub const MAX_SOURCES: usize = 200_000;

    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, HashMap<String, u64>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records (or, with `expires_ms <= now_ms`, removes) the binding of `aor` from `ip`.
    pub fn set(&self, ip: IpAddr, aor: String, expires_ms: u64, now_ms: u64) {
        let mut map = self.lock();
        if expires_ms <= now_ms {
            if let Some(aors) = map.get_mut(&ip) {
                aors.remove(&aor);
                if aors.is_empty() {
                    map.remove(&ip);
                }
            }
            return;
        }
        if !map.contains_key(&ip) && map.len() >= Self::MAX_SOURCES {
            map.retain(|_, aors| aors.values().any(|&e| e > now_ms));
            if map.len() >= Self::MAX_SOURCES {
                return;
            }
        }
        map.entry(ip).or_default().insert(aor, expires_ms);
    }

    /// Whether `ip` holds a registration live at `now_ms`.
    pub fn live(&self, ip: IpAddr, now_ms: u64) -> bool {
        self.lock()
            .get(&ip)
            .is_some_and(|aors| aors.values().any(|&e| e > now_ms))
    }

    /// Forgets expired bindings; returns how many addresses remain registered.
    pub fn expire(&self, now_ms: u64) -> usize {
        let mut map = self.lock();
        map.retain(|_, aors| {
            aors.retain(|_, e| *e > now_ms);
            !aors.is_empty()
        });
        map.len()
    }
}

/// The binding lifetime a `200` to REGISTER grants, in seconds: the largest Contact `expires`, else
/// the `Expires` header, else `default_s`; 0 when it lists no Contact (all bindings removed).
pub fn granted_expiry_s(m: &Message<'_>, default_s: u64) -> u64 {
    let header = m
        .header(HeaderName::Expires)
        .and_then(|v| v.trim().parse::<u64>().ok());
    let mut any = false;
    let mut best: Option<u64> = None;
    for h in m.all(HeaderName::Contact) {
        let v = m.text(h.value.clone());
        for r in split_list(v) {
            let c = &v[r];
            if c.trim() == "*" {
                continue;
            }
            any = true;
            let e = header_param(c, "expires")
                .and_then(|e| e.trim().parse().ok())
                .or(header)
                .unwrap_or(default_s);
            best = Some(best.map_or(e, |b: u64| b.max(e)));
        }
    }
    if !any {
        return 0;
    }
    best.unwrap_or(default_s)
}

/// The registered-source rule (or only its learning half, when the rule is off).
pub struct Registered {
    cfg: policy::Registered,
    trunks: NetSet<()>,
    state: Arc<State>,
    /// Learn bindings but never refuse.
    observe_only: bool,
}

impl Registered {
    pub fn new(cfg: &policy::Registered, state: &Arc<State>) -> Registered {
        Registered {
            cfg: cfg.clone(),
            trunks: cfg.trunks.iter().copied().collect(),
            state: state.clone(),
            observe_only: false,
        }
    }

    /// Only learns registrations.
    pub fn observer(cfg: &policy::Registered, state: &Arc<State>) -> Registered {
        Registered {
            observe_only: true,
            ..Registered::new(cfg, state)
        }
    }
}

impl Filter for Registered {
    fn name(&self) -> &'static str {
        "registered"
    }

    fn dry_run(&self) -> bool {
        self.cfg.dry_run
    }

    fn request(&self, cx: &RequestCx<'_>) -> Option<Finding> {
        let m = &cx.meta;
        if self.observe_only
            || m.side != Side::Internet
            || m.trusted
            || cx.sip.method() != "INVITE"
            || cx.sip.to_tag().is_some()
            || self.trunks.contains(m.source.ip())
            || self.state.bindings.live(m.source.ip(), m.now_ms)
        {
            return None;
        }
        Some(Finding::new(
            "registered",
            action_of(self.cfg.action, self.cfg.ban_ttl_s, 403, "Forbidden"),
            "INVITE from a source without a live registration",
        ))
    }

    fn response(&self, cx: &ResponseCx<'_>) -> Option<Finding> {
        if cx.meta.side != Side::Pbx || cx.status != 200 || cx.sip.method() != "REGISTER" {
            return None;
        }
        let expires_s = granted_expiry_s(cx.sip.m, self.cfg.default_expires_s);
        let aor = crate::pipeline::sipview::uri_aor(cx.sip.to_uri());
        self.state.bindings.set(
            cx.peer.ip(),
            aor,
            cx.meta.now_ms + expires_s * 1000,
            cx.meta.now_ms,
        );
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bans::BanStore;
    use crate::filters::testkit::*;
    use crate::pipeline::Action;

    fn setup(cfg: policy::Registered) -> (Registered, Arc<State>) {
        let state = Arc::new(State::new(Arc::new(BanStore::new(None, 10))));
        (Registered::new(&cfg, &state), state)
    }

    fn invite(f: &Registered, now: u64, source: &str) -> Option<Finding> {
        let raw = request("INVITE", "5551234", "1001", "");
        let m = parse(&raw);
        let meta = meta(now, source, Side::Internet);
        f.request(&req_cx(&meta, &m))
    }

    fn registered(f: &Registered, now: u64, peer: &str, contact: &str) {
        let raw = response(200, "REGISTER", "1001", "1001", "r1", contact);
        let m = parse(&raw);
        let meta = meta(now, "127.0.0.1:5080", Side::Pbx);
        assert!(f.response(&resp_cx(&meta, &m, peer, false)).is_none());
    }

    #[test]
    fn invite_needs_a_live_registration() {
        let (f, _) = setup(policy::Registered::default());
        let found = invite(&f, T0, "192.0.2.1:5060").unwrap();
        assert_eq!(found.action.label(), "reject");
        registered(
            &f,
            T0,
            "192.0.2.1:40000",
            "Contact: <sip:1001@10.0.0.5>;expires=60\r\n",
        );
        assert!(
            invite(&f, T0 + 1_000, "192.0.2.1:5060").is_none(),
            "any port of that address"
        );
        assert!(invite(&f, T0 + 1_000, "192.0.2.2:5060").is_some());
        assert!(
            invite(&f, T0 + 60_000, "192.0.2.1:5060").is_some(),
            "expired"
        );
    }

    #[test]
    fn deregistration_trunks_and_reinvites() {
        let cfg = policy::Registered {
            trunks: vec!["198.51.100.0/24".parse().unwrap()],
            action: policy::RuleAction::Drop,
            ..Default::default()
        };
        let (f, state) = setup(cfg);
        registered(
            &f,
            T0,
            "192.0.2.1:5060",
            "Expires: 300\r\nContact: <sip:1001@10.0.0.5>\r\n",
        );
        assert!(invite(&f, T0, "192.0.2.1:5060").is_none());
        registered(&f, T0, "192.0.2.1:5060", "");
        assert_eq!(
            invite(&f, T0, "192.0.2.1:5060").unwrap().action,
            Action::Drop
        );
        assert!(invite(&f, T0, "198.51.100.20:5060").is_none(), "trunk");
        let raw = request("INVITE", "1", "1001", "")
            .replace("To: <sip:1@pbx.example>", "To: <sip:1@pbx.example>;tag=9");
        let m = parse(&raw);
        let meta = meta(T0, "192.0.2.9:5060", Side::Internet);
        assert!(f.request(&req_cx(&meta, &m)).is_none(), "in-dialog");
        registered(
            &f,
            T0,
            "192.0.2.7:5060",
            "Contact: <sip:a@h>;expires=10, <sip:b@h>;expires=20\r\n",
        );
        assert_eq!(state.bindings.expire(T0 + 15_000), 1);
        assert_eq!(state.bindings.expire(T0 + 20_000), 0);
    }
}
