//! `registered`: a new INVITE from the Internet is accepted only from a source address holding a
//! live registration through this edge, from an allowlisted peer or from a configured trunk. The
//! registrations are learned from the PBX's `200 OK` to REGISTER as it passes back (the binding's
//! lifetime is the largest Contact `expires`, else `Expires`, else the default; a 200 listing no
//! Contact ends it). Keyed by source IP: phones behind one NAT share their public address.

use super::{action_of, drain_due};
use crate::cluster::Report;
use crate::netset::NetSet;
use crate::pipeline::{Filter, Finding, RequestCx, ResponseCx, State};
use crate::policy;
use crate::proxy::Side;
use crate::sip::{addr_uri, header_param, split_list, HeaderName, Message};
use lru::LruCache;
use sipwarden_shared::ban::Binding;
use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

/// Live registrations per source address: the edge's own (AOR → expiry, learned from the PBX's
/// answers) and the cluster's (bindings other edges of the site published, and this edge's own
/// from before a restart), plus the REGISTERs in flight whose answer will say which contacts the
/// phone holds.
#[derive(Default)]
pub struct Bindings {
    inner: Mutex<Inner>,
}

struct Inner {
    /// Source address → its keys and their expiries (Unix ms). Local keys are AORs; cluster
    /// keys are `"\0" aor "\0" contact`, which no AOR can be.
    by_ip: HashMap<IpAddr, Source>,
    /// `(due_at, address)` for every address in `by_ip`, soonest first: the sweep looks only at
    /// addresses that may have something expired, not at every registered phone.
    due: BTreeSet<(u64, IpAddr)>,
    /// Cluster binding `(aor, contact)` → the address it is filed under.
    cluster: HashMap<(String, String), IpAddr>,
    /// REGISTERs in flight, oldest first: the hash of `(Call-ID, CSeq)` → the Call-ID (compared
    /// when the answer comes) and what its 200 needs. Keyed by a hash so that neither the
    /// REGISTER nor its answer allocates a key; the hasher's key is random to the process, so no
    /// one can aim a collision (and one would only fail a lookup). In arrival order, so the ones
    /// past `PENDING_MS` are taken from the front without a walk of the rest.
    pending: LruCache<u64, (Box<str>, Pending)>,
    pending_keys: RandomState,
    /// Tests: every key the same, to see a collision handled.
    #[cfg(test)]
    colliding: bool,
}

impl Default for Inner {
    fn default() -> Inner {
        Inner {
            by_ip: HashMap::new(),
            due: BTreeSet::new(),
            cluster: HashMap::new(),
            pending: LruCache::unbounded(),
            pending_keys: RandomState::new(),
            #[cfg(test)]
            colliding: false,
        }
    }
}

/// One source address's registrations.
#[derive(Default)]
struct Source {
    keys: HashMap<String, u64>,
    /// Where the address sits in `Inner::due`: no later than its soonest expiry (a refresh or a
    /// removal may leave it earlier; the sweep then files it again).
    due_at: u64,
}

impl Inner {
    /// Files `key` of `ip` until `expires_ms`, keeping `due` in step.
    fn file(&mut self, ip: IpAddr, key: String, expires_ms: u64) {
        let fresh = !self.by_ip.contains_key(&ip);
        let src = self.by_ip.entry(ip).or_default();
        src.keys.insert(key, expires_ms);
        if fresh || expires_ms < src.due_at {
            if !fresh {
                self.due.remove(&(src.due_at, ip));
            }
            src.due_at = expires_ms;
            self.due.insert((expires_ms, ip));
        }
    }

    /// Drops `key` of `ip`, and the address with its last key.
    fn unfile(&mut self, ip: IpAddr, key: &str) {
        if let Some(src) = self.by_ip.get_mut(&ip) {
            src.keys.remove(key);
            if src.keys.is_empty() {
                let due_at = src.due_at;
                self.by_ip.remove(&ip);
                self.due.remove(&(due_at, ip));
            }
        }
    }

    /// Forgets, soonest due first, the keys expired at `now_ms` of at most `limit` addresses (a
    /// cluster key also from `cluster`); returns whether addresses were left due.
    fn sweep(&mut self, now_ms: u64, limit: usize) -> bool {
        for _ in 0..limit {
            let Some(&(due_at, ip)) = self.due.first() else {
                return false;
            };
            if due_at > now_ms {
                return false;
            }
            self.due.pop_first();
            let Some(src) = self.by_ip.get_mut(&ip) else {
                continue;
            };
            let cluster = &mut self.cluster;
            src.keys.retain(|key, &mut e| {
                let live = e > now_ms;
                if !live {
                    if let Some((aor, contact)) =
                        key.strip_prefix('\0').and_then(|k| k.split_once('\0'))
                    {
                        let id = (aor.to_string(), contact.to_string());
                        if cluster.get(&id) == Some(&ip) {
                            cluster.remove(&id);
                        }
                    }
                }
                live
            });
            match src.keys.values().min() {
                Some(&soonest) => {
                    src.due_at = soonest;
                    self.due.insert((soonest, ip));
                }
                None => {
                    self.by_ip.remove(&ip);
                }
            }
        }
        self.due.first().is_some_and(|&(t, _)| t <= now_ms)
    }

    fn pending_key(&self, call_id: &str, cseq: u32) -> u64 {
        #[cfg(test)]
        if self.colliding {
            return 0;
        }
        self.pending_keys.hash_one((call_id, cseq))
    }

    /// Forgets, from the front, the REGISTERs in flight that arrived `PENDING_MS` or more
    /// before `now_ms`.
    fn drop_stale_pending(&mut self, now_ms: u64) {
        let due = |(_, p): &(Box<str>, Pending)| p.at_ms + Bindings::PENDING_MS <= now_ms;
        drain_due(&mut self.pending, usize::MAX, due, |_, _| ());
    }
}

/// What a REGISTER asked for, kept until its answer (or `PENDING_MS`).
#[derive(Debug, Clone)]
pub struct Pending {
    /// Contact URIs (no parameters).
    pub contacts: Vec<String>,
    /// The REGISTER removes its contacts (`expires=0` or `Expires: 0`).
    pub removing: bool,
    pub user_agent: String,
    pub at_ms: u64,
}

fn cluster_key(aor: &str, contact: &str) -> String {
    format!("\0{aor}\0{contact}")
}

impl Bindings {
    /// Upper bound on addresses tracked; a registration flood cannot grow it further.
    pub const MAX_SOURCES: usize = 200_000;
    /// Upper bound on REGISTERs awaiting their answer.
    pub const MAX_PENDING: usize = 50_000;
    /// How long a REGISTER waits for its answer (SIP transaction timeout, 64 × T1).
    pub const PENDING_MS: u64 = 32_000;

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Addresses the sweep takes per hold of the lock.
    pub const SWEEP_BATCH: usize = 1_000;

    fn put(inner: &mut Inner, ip: IpAddr, key: String, expires_ms: u64, now_ms: u64) -> bool {
        if !inner.by_ip.contains_key(&ip) && inner.by_ip.len() >= Self::MAX_SOURCES {
            inner.sweep(now_ms, usize::MAX);
            if inner.by_ip.len() >= Self::MAX_SOURCES {
                return false;
            }
        }
        inner.file(ip, key, expires_ms);
        true
    }

    /// Records (or, with `expires_ms <= now_ms`, removes) the binding of `aor` from `ip`.
    pub fn set(&self, ip: IpAddr, aor: String, expires_ms: u64, now_ms: u64) {
        let mut inner = self.lock();
        if expires_ms <= now_ms {
            inner.unfile(ip, &aor);
        } else {
            Self::put(&mut inner, ip, aor, expires_ms, now_ms);
        }
    }

    /// Files a cluster binding of `contact` under `aor` at `ip` (moving it if it was elsewhere).
    pub fn put_cluster(&self, aor: &str, contact: &str, ip: IpAddr, expires_ms: u64, now_ms: u64) {
        let mut inner = self.lock();
        let id = (aor.to_string(), contact.to_string());
        let key = cluster_key(aor, contact);
        if let Some(old) = inner.cluster.get(&id).copied() {
            if old != ip {
                inner.unfile(old, &key);
            }
        }
        if Self::put(&mut inner, ip, key, expires_ms, now_ms) {
            inner.cluster.insert(id, ip);
        } else {
            // Refused at the cap: its old filing is gone too.
            inner.cluster.remove(&id);
        }
    }

    /// Forgets the cluster binding of `contact` under `aor`.
    pub fn remove_cluster(&self, aor: &str, contact: &str) {
        let mut inner = self.lock();
        if let Some(ip) = inner
            .cluster
            .remove(&(aor.to_string(), contact.to_string()))
        {
            inner.unfile(ip, &cluster_key(aor, contact));
        }
    }

    /// Forgets every cluster binding (before a snapshot is applied).
    pub fn clear_cluster(&self) {
        let mut inner = self.lock();
        let all: Vec<_> = inner.cluster.drain().collect();
        for ((aor, contact), ip) in all {
            inner.unfile(ip, &cluster_key(&aor, &contact));
        }
    }

    /// Remembers what the REGISTER `(call_id, cseq)` asked for until its answer.
    pub fn pending(&self, call_id: &str, cseq: u32, p: Pending) {
        let mut inner = self.lock();
        let key = inner.pending_key(call_id, cseq);
        if inner.pending.len() >= Self::MAX_PENDING && !inner.pending.contains(&key) {
            inner.drop_stale_pending(p.at_ms);
            if inner.pending.len() >= Self::MAX_PENDING {
                return;
            }
        }
        // A retransmission replaces its first copy and moves to the back.
        inner.pending.push(key, (call_id.into(), p));
    }

    /// What the REGISTER `(call_id, cseq)` asked for, once.
    pub fn answered(&self, call_id: &str, cseq: u32) -> Option<Pending> {
        let mut inner = self.lock();
        let key = inner.pending_key(call_id, cseq);
        match inner.pending.peek(&key) {
            Some((id, _)) if **id == *call_id => inner.pending.pop(&key).map(|(_, p)| p),
            _ => None,
        }
    }

    /// Whether `ip` holds a registration live at `now_ms`.
    pub fn live(&self, ip: IpAddr, now_ms: u64) -> bool {
        self.lock()
            .by_ip
            .get(&ip)
            .is_some_and(|src| src.keys.values().any(|&e| e > now_ms))
    }

    /// Forgets expired bindings and REGISTERs never answered; returns how many addresses remain
    /// registered.
    pub fn expire(&self, now_ms: u64) -> usize {
        // In batches, so that the receive threads get the lock in between.
        while self.lock().sweep(now_ms, Self::SWEEP_BATCH) {}
        let mut inner = self.lock();
        inner.drop_stale_pending(now_ms);
        inner.by_ip.len()
    }
}

/// A Contact URI without its parameters, lower-cased: what a registrar's answer is matched on
/// (registrars echo the URI but may reorder or drop parameters).
pub fn contact_uri(contact: &str) -> String {
    let uri = addr_uri(contact);
    uri.split(';')
        .next()
        .unwrap_or(uri)
        .trim()
        .to_ascii_lowercase()
}

/// The `Expires` header of `m`, when it is a number.
fn expires_header(m: &Message<'_>) -> Option<u64> {
    m.header(HeaderName::Expires)
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// Each Contact of `m` but `*`: its URI ([`contact_uri`]) and its `expires` parameter.
fn contacts(m: &Message<'_>) -> Vec<(String, Option<u64>)> {
    let mut out = Vec::new();
    for h in m.all(HeaderName::Contact) {
        let v = m.text(h.value.clone());
        for r in split_list(v) {
            let c = &v[r];
            if c.trim() != "*" {
                let e = header_param(c, "expires").and_then(|e| e.trim().parse().ok());
                out.push((contact_uri(c), e));
            }
        }
    }
    out
}

/// The Contacts of a `200` to REGISTER with the lifetime each was granted, in seconds: its
/// `expires` parameter, else the `Expires` header, else `default_s`.
pub fn granted_contacts(m: &Message<'_>, default_s: u64) -> Vec<(String, u64)> {
    let header = expires_header(m);
    contacts(m)
        .into_iter()
        .map(|(c, e)| (c, e.or(header).unwrap_or(default_s)))
        .collect()
}

/// The binding lifetime a `200` to REGISTER grants, in seconds: the largest Contact `expires`, else
/// the `Expires` header, else `default_s`; 0 when it lists no Contact (all bindings removed).
pub fn granted_expiry_s(m: &Message<'_>, default_s: u64) -> u64 {
    granted_contacts(m, default_s)
        .iter()
        .map(|(_, e)| *e)
        .max()
        .unwrap_or(0)
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
        if m.side == Side::Internet && cx.sip.method() == "REGISTER" {
            self.remember(cx);
            return None;
        }
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
        if cx.meta.side != Side::Pbx || cx.sip.method() != "REGISTER" {
            return None;
        }
        let (cseq, _) = cx.sip.m.cseq()?;
        if cx.status < 200 {
            return None;
        }
        let asked = self.state.bindings.answered(cx.sip.call_id(), cseq);
        if cx.status != 200 {
            return None;
        }
        let now = cx.meta.now_ms;
        let granted = granted_contacts(cx.sip.m, self.cfg.default_expires_s);
        let aor = crate::pipeline::sipview::uri_aor(cx.sip.to_uri());
        let Some(asked) = asked.filter(|a| !a.contacts.is_empty()) else {
            // A query (no Contact) or an answer to a REGISTER this edge no longer remembers: the
            // source holds the AOR while any binding does.
            let expires_s = granted.iter().map(|(_, e)| *e).max().unwrap_or(0);
            self.state
                .bindings
                .set(cx.peer.ip(), aor, now + expires_s * 1000, now);
            return None;
        };
        // The contacts this phone asked for: granted (listed with a lifetime) or ended. A
        // registrar that rewrote the one contact it was given still answers with one contact.
        let mut mine: Vec<(String, u64)> = asked
            .contacts
            .iter()
            .map(|c| {
                let e = granted.iter().find(|(g, _)| g == c).map_or(0, |(_, e)| *e);
                (c.clone(), e)
            })
            .collect();
        if mine.iter().all(|(_, e)| *e == 0)
            && !asked.removing
            && granted.len() == 1
            && asked.contacts.len() == 1
        {
            mine = granted.clone();
        } else if mine.iter().all(|(_, e)| *e == 0) && granted.len() > 1 {
            // Contacts the edge cannot tell apart: the source holds the AOR, nothing published.
            mine.clear();
            let expires_s = granted.iter().map(|(_, e)| *e).max().unwrap_or(0);
            self.state
                .bindings
                .set(cx.peer.ip(), aor, now + expires_s * 1000, now);
            return None;
        }
        let mut longest = 0;
        let reporting = self.state.reporting();
        for (contact, expires_s) in mine {
            longest = longest.max(expires_s);
            if !reporting {
                continue;
            }
            let report = if expires_s == 0 {
                Report::Unbind {
                    aor: format!("sip:{aor}"),
                    contact,
                }
            } else {
                Report::Binding(Binding {
                    aor: format!("sip:{aor}"),
                    contact,
                    source: cx.peer.to_string(),
                    transport: cx.peer_transport.as_str().to_string(),
                    edge_id: String::new(),
                    flow_token: cx.flow_token.clone().unwrap_or_default(),
                    expires_unix_ms: now + expires_s * 1000,
                    user_agent: asked.user_agent.clone(),
                    site: String::new(),
                })
            };
            self.state.report(report);
        }
        self.state
            .bindings
            .set(cx.peer.ip(), aor, now + longest * 1000, now);
        None
    }
}

impl Registered {
    /// Notes what a REGISTER asks for, so its 200 can tell which contacts this phone holds.
    fn remember(&self, cx: &RequestCx<'_>) {
        let Some((cseq, _)) = cx.sip.m.cseq() else {
            return;
        };
        let asked = contacts(cx.sip.m);
        let removing =
            expires_header(cx.sip.m) == Some(0) || asked.iter().any(|(_, e)| *e == Some(0));
        let contacts = asked.into_iter().take(8).map(|(c, _)| c).collect();
        // Only a cluster binding carries the User-Agent.
        let user_agent: String = if self.state.reporting() {
            cx.sip.user_agent().chars().take(256).collect()
        } else {
            String::new()
        };
        self.state.bindings.pending(
            cx.sip.call_id(),
            cseq,
            Pending {
                contacts,
                removing,
                user_agent,
                at_ms: cx.meta.now_ms,
            },
        );
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

    #[test]
    fn the_phones_own_contact_is_published_and_its_end_too() {
        let (f, state) = setup(policy::Registered::default());
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        state.set_uplink(tx, Default::default());
        let reg = request(
            "REGISTER",
            "1001",
            "1001",
            "Contact: <sip:1001@10.0.0.5:5060;ob>;expires=600\r\nUser-Agent: Yealink T46\r\n",
        );
        let m = parse(&reg);
        let phone = meta(T0, "192.0.2.1:40000", Side::Internet);
        assert!(f.request(&req_cx(&phone, &m)).is_none());
        // The registrar lists every binding of the AOR; only this phone's is published.
        let ok = response(
            200,
            "REGISTER",
            "1001",
            "1001",
            "call-1001-1001",
            "Contact: <sip:1001@10.9.9.9>;expires=100, <sip:1001@10.0.0.5:5060>;expires=300\r\n",
        );
        let m = parse(&ok);
        let pbx = meta(T0, "127.0.0.1:5080", Side::Pbx);
        let mut cx = resp_cx(&pbx, &m, "192.0.2.1:40000", false);
        cx.flow_token = Some("sw1tok".into());
        assert!(f.response(&cx).is_none());
        match rx.try_recv().unwrap() {
            Report::Binding(b) => {
                assert_eq!(b.aor, "sip:1001@pbx.example");
                assert_eq!(b.contact, "sip:1001@10.0.0.5:5060");
                assert_eq!(b.source, "192.0.2.1:40000");
                assert_eq!(b.transport, "udp");
                assert_eq!(b.flow_token, "sw1tok");
                assert_eq!(b.user_agent, "Yealink T46");
                assert_eq!(b.expires_unix_ms, T0 + 300_000);
            }
            other => panic!("{other:?}"),
        }
        assert!(rx.try_recv().is_err(), "one report");
        assert!(state.bindings.live(addr("192.0.2.1:1").ip(), T0 + 299_000));
        assert!(!state.bindings.live(addr("192.0.2.1:1").ip(), T0 + 300_000));
        // A retransmitted 200 finds nothing pending and publishes nothing more.
        assert!(f.response(&cx).is_none());
        assert!(rx.try_recv().is_err());

        // De-registration: the answer no longer lists the phone's contact.
        let unreg = request(
            "REGISTER",
            "1001",
            "1001",
            "Contact: <sip:1001@10.0.0.5:5060>;expires=0\r\n",
        )
        .replace("CSeq: 1 REGISTER", "CSeq: 2 REGISTER");
        let m = parse(&unreg);
        f.request(&req_cx(&phone, &m));
        let ok = response(
            200,
            "REGISTER",
            "1001",
            "1001",
            "call-1001-1001",
            "Contact: <sip:1001@10.9.9.9>;expires=90\r\n",
        )
        .replace("CSeq: 1 REGISTER", "CSeq: 2 REGISTER");
        let m = parse(&ok);
        assert!(f
            .response(&resp_cx(&pbx, &m, "192.0.2.1:40000", false))
            .is_none());
        match rx.try_recv().unwrap() {
            Report::Unbind { aor, contact } => {
                assert_eq!(aor, "sip:1001@pbx.example");
                assert_eq!(contact, "sip:1001@10.0.0.5:5060");
            }
            other => panic!("{other:?}"),
        }
        assert!(!state.bindings.live(addr("192.0.2.1:1").ip(), T0 + 1));
    }

    fn asked(at_ms: u64) -> Pending {
        Pending {
            contacts: vec!["sip:2000@192.0.2.7".into()],
            removing: false,
            user_agent: "ua".into(),
            at_ms,
        }
    }

    #[test]
    fn registers_in_flight_are_answered_once_and_the_stale_make_room_at_the_cap() {
        let b = Bindings::default();
        b.pending("a@x", 1, asked(T0));
        assert!(b.answered("a@x", 2).is_none(), "another CSeq");
        assert!(b.answered("b@x", 1).is_none(), "another Call-ID");
        assert_eq!(b.answered("a@x", 1).unwrap().at_ms, T0);
        assert!(b.answered("a@x", 1).is_none(), "once");
        // Full with REGISTERs 10 ms apart in thousands: none stale yet at the last one.
        let n = Bindings::MAX_PENDING as u64;
        for i in 0..n {
            b.pending(&format!("{i}@x"), 1, asked(T0 + i / 1_000 * 10));
        }
        let last = T0 + (n - 1) / 1_000 * 10;
        b.pending("new@x", 1, asked(last));
        assert!(
            b.answered("new@x", 1).is_none(),
            "refused: nothing stale to drop"
        );
        // A retransmission of one held is still taken.
        b.pending("7@x", 1, asked(last));
        assert_eq!(b.answered("7@x", 1).unwrap().at_ms, last);
        b.pending("filler@x", 1, asked(last));
        // 32 s after the first thousand: those (and only those) make room; 7, sent again, was
        // answered.
        let later = T0 + Bindings::PENDING_MS;
        b.pending("new@x", 1, asked(later));
        assert!(b.answered("new@x", 1).is_some());
        assert!(b.answered("999@x", 1).is_none(), "dropped as stale");
        assert!(b.answered("1000@x", 1).is_some(), "still in flight");
        // The sweep takes what went stale since, from the front.
        b.expire(T0 + 100 + Bindings::PENDING_MS);
        assert!(b.answered("10999@x", 1).is_none());
        assert!(b.answered("11000@x", 1).is_some());
        assert_eq!(b.lock().pending.len(), Bindings::MAX_PENDING - 11_000);
    }

    #[test]
    fn an_answer_whose_key_collides_takes_nothing() {
        let b = Bindings::default();
        b.lock().colliding = true;
        b.pending("a@x", 1, asked(T0));
        assert!(b.answered("b@x", 1).is_none(), "same key, another Call-ID");
        assert!(
            b.answered("a@x", 1).is_some(),
            "still there for its own answer"
        );
    }

    /// Everything `Bindings` holds, flattened: `(address, key) → expiry`, and the cluster map.
    type Held = (
        std::collections::BTreeMap<(IpAddr, String), u64>,
        std::collections::BTreeMap<(String, String), IpAddr>,
    );

    fn held(b: &Bindings) -> Held {
        let inner = b.lock();
        let mut keys = std::collections::BTreeMap::new();
        for (ip, src) in &inner.by_ip {
            for (k, e) in &src.keys {
                keys.insert((*ip, k.clone()), *e);
            }
            // The index: one entry per address, no later than its soonest expiry.
            assert!(inner.due.contains(&(src.due_at, *ip)));
            assert!(src.keys.values().all(|&e| e >= src.due_at));
        }
        assert_eq!(
            inner.due.len(),
            inner.by_ip.len(),
            "one index entry per address"
        );
        let cluster = inner.cluster.iter().map(|(k, v)| (k.clone(), *v)).collect();
        (keys, cluster)
    }

    #[test]
    fn the_sweep_by_due_time_keeps_what_a_walk_of_everything_kept() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let b = Bindings::default();
        // The model: the same operations on plain maps, swept by a walk as before.
        let (mut keys, mut cluster): Held = Default::default();
        let mut now = T0;
        let (mut swept, mut moved) = (0, 0);
        for step in 0..4_000 {
            now += next(30);
            let ip: IpAddr = format!("192.0.2.{}", next(30)).parse().unwrap();
            let aor = format!("sip:{}@x", next(10));
            let contact = format!("sip:c{}@y", next(3));
            let expires = now + next(200);
            match next(6) {
                0 | 1 => {
                    b.set(ip, aor.clone(), expires, now);
                    if expires <= now {
                        keys.remove(&(ip, aor));
                    } else {
                        keys.insert((ip, aor), expires);
                    }
                }
                2 | 3 => {
                    b.put_cluster(&aor, &contact, ip, expires, now);
                    let id = (aor.clone(), contact.clone());
                    if let Some(old) = cluster.get(&id).copied().filter(|&o| o != ip) {
                        keys.remove(&(old, cluster_key(&aor, &contact)));
                        moved += 1;
                    }
                    keys.insert((ip, cluster_key(&aor, &contact)), expires);
                    cluster.insert(id, ip);
                }
                4 => {
                    b.remove_cluster(&aor, &contact);
                    if let Some(old) = cluster.remove(&(aor.clone(), contact.clone())) {
                        keys.remove(&(old, cluster_key(&aor, &contact)));
                    }
                }
                _ => {
                    let before = keys.len();
                    keys.retain(|_, e| *e > now);
                    swept += before - keys.len();
                    cluster.retain(|(a, c), ip| keys.contains_key(&(*ip, cluster_key(a, c))));
                    let registered = b.expire(now);
                    let ips: std::collections::BTreeSet<_> = keys.keys().map(|k| k.0).collect();
                    assert_eq!(registered, ips.len(), "step {step}");
                }
            }
            assert_eq!(held(&b), (keys.clone(), cluster.clone()), "step {step}");
            let probe: IpAddr = format!("192.0.2.{}", next(30)).parse().unwrap();
            let live = keys.iter().any(|((i, _), e)| *i == probe && *e > now);
            assert_eq!(b.live(probe, now), live, "step {step}");
        }
        assert!(
            swept > 500 && moved > 50,
            "the walk expired and moved bindings"
        );
    }
}
