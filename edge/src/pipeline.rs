//! The threat pipeline: one [`Filter`] trait with four phases, each filter a small type in
//! [`crate::filters`], run in policy order by the [`Firewall`].
//!
//! Phases, cheapest first:
//! - **gate**: before parsing, from the source address alone (bans, flood);
//! - **request**: a parsed request from either side (`Meta::side` says which);
//! - **response**: a parsed response the proxy is about to relay; for PBX answers `peer` is the
//!   Internet party it goes to (brute force, enumeration, registrations, call counts);
//! - **completion**: a request's fate is known (forwarded or not).
//!
//! A filter returns a [`Finding`] or nothing. The firewall turns the first enforcing finding into a
//! [`Verdict`], emits exactly one security event per non-allow verdict (see [`event`]), and carries
//! out bans. A finding of a rule in `dry_run` is logged as such and the message goes on; an `alert`
//! is logged and the message goes on.
//!
//! Policy is an immutable [`Pipeline`] swapped atomically on reload; what must outlive a reload
//! (bans, bindings, calls, per-source windows) lives in [`State`].

pub mod event;
pub mod sipview;

use crate::bans::{Ban, BanOrigin, BanStore};
use crate::clock::Clock;
use crate::filters;
use crate::netset::NetSet;
use crate::policy::Policy;
use crate::proxy::Side;
use crate::sip::Transport;
use arc_swap::ArcSwap;
use event::EventSink;
use ipnet::IpNet;
pub use sipview::SipView;
use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;

/// What every phase knows about a message.
#[derive(Debug, Clone)]
pub struct Meta {
    /// Wall-clock milliseconds, read once per message.
    pub now_ms: u64,
    pub source: SocketAddr,
    pub transport: Transport,
    pub side: Side,
    /// PBX side, or an allowlisted source: never banned or limited.
    pub trusted: bool,
    /// Size of the message in bytes.
    pub len: usize,
}

/// A parsed request and what filters ask of it.
pub struct RequestCx<'a> {
    pub meta: &'a Meta,
    pub sip: SipView<'a>,
    /// Set by the `sanity` rule when the request passed `sip::sanity::check_request` (under the
    /// policy's limits, which are never looser than the proxy's), so the proxy need not repeat it.
    pub sane: std::cell::Cell<bool>,
    /// The From and To AORs, each worked out for the first rule that asks (rate, toll fraud and
    /// the cluster limits all key on them).
    from_aor: std::cell::OnceCell<String>,
    to_aor: std::cell::OnceCell<String>,
}

impl<'a> RequestCx<'a> {
    pub fn new(meta: &'a Meta, sip: SipView<'a>) -> RequestCx<'a> {
        RequestCx {
            meta,
            sip,
            sane: Default::default(),
            from_aor: Default::default(),
            to_aor: Default::default(),
        }
    }

    /// [`sipview::uri_aor`] of the From URI: the caller.
    pub fn from_aor(&self) -> &String {
        self.from_aor
            .get_or_init(|| sipview::uri_aor(self.sip.from_uri()))
    }

    /// [`sipview::uri_aor`] of the To URI: the AOR a REGISTER binds.
    pub fn to_aor(&self) -> &String {
        self.to_aor
            .get_or_init(|| sipview::uri_aor(self.sip.to_uri()))
    }
}

/// A parsed response the proxy will relay.
pub struct ResponseCx<'a> {
    pub meta: &'a Meta,
    pub sip: SipView<'a>,
    pub status: u16,
    /// Where the response goes: for PBX answers, the Internet party that sent the request.
    pub peer: SocketAddr,
    /// `peer` is PBX side or allowlisted: never counted against, never banned.
    pub peer_trusted: bool,
    /// The request carried Authorization or Proxy-Authorization (the edge marks its own Via).
    pub had_credentials: bool,
    /// How the response reaches `peer`.
    pub peer_transport: crate::sip::Transport,
    /// For a 200 to REGISTER: the signed flow token of `peer` (what the edge put in Path).
    pub flow_token: Option<String>,
}

/// What a filter can decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Log and let through.
    Alert,
    /// Answer `code reason`, with one extra header when given (`Retry-After`, `Allow`).
    Reject {
        code: u16,
        reason: &'static str,
        header: Option<(&'static str, Arc<str>)>,
    },
    /// Silent drop.
    Drop,
    /// Drop and ban the message's Internet party for `ttl_s` seconds.
    Ban { ttl_s: u64 },
}

impl Action {
    pub fn label(&self) -> &'static str {
        match self {
            Action::Alert => "alert",
            Action::Reject { .. } => "reject",
            Action::Drop => "drop",
            Action::Ban { .. } => "ban",
        }
    }
}

/// A rule fired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// `scanner`, `tollfraud.prefix`, …: the label on metrics and events.
    pub rule: &'static str,
    pub action: Action,
    /// Why, for the event; static where the hot path must not allocate.
    pub detail: Cow<'static, str>,
}

impl Finding {
    pub fn new(
        rule: &'static str,
        action: Action,
        detail: impl Into<Cow<'static, str>>,
    ) -> Finding {
        Finding {
            rule,
            action,
            detail: detail.into(),
        }
    }
}

/// The pipeline's answer for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Reject {
        code: u16,
        reason: &'static str,
        header: Option<(&'static str, Arc<str>)>,
        rule: &'static str,
    },
    /// Drop (also after a ban).
    Drop {
        rule: &'static str,
    },
}

/// One threat filter. Every phase defaults to "nothing to say"; a filter implements the phases it
/// needs. Filters are pure over their inputs, their policy and [`State`], with time in [`Meta`].
pub trait Filter: Send + Sync {
    /// The policy section it comes from (`flood`, `scanner`, …).
    fn name(&self) -> &'static str;
    /// Whether its findings are only logged.
    fn dry_run(&self) -> bool;
    fn gate(&self, _meta: &Meta) -> Option<Finding> {
        None
    }
    fn request(&self, _cx: &RequestCx<'_>) -> Option<Finding> {
        None
    }
    fn response(&self, _cx: &ResponseCx<'_>) -> Option<Finding> {
        None
    }
    /// After a request was forwarded (`true`) or answered/dropped by the edge (`false`).
    fn completion(&self, _cx: &RequestCx<'_>, _forwarded: bool) {}
    /// Periodic upkeep (forget idle rate-limiter keys).
    fn housekeep(&self) {}
}

/// State that outlives policy reloads.
pub struct State {
    pub bans: Arc<BanStore>,
    pub bindings: filters::registered::Bindings,
    pub calls: filters::tollfraud::Calls,
    pub auth: filters::bruteforce::AuthFailures,
    pub enumeration: filters::enumeration::Probes,
    pub flood: filters::flood::Excess,
    pub dialing: filters::tollfraud::Dialing,
    /// Cluster bans of accounts and User-Agents.
    pub identity: filters::ban::IdentityBans,
    /// The cluster bans in force here by id (the watch stream's).
    pub cluster: std::sync::Mutex<crate::cluster::Held>,
    /// Cluster-wide rate limits and this edge's share of their counts.
    pub counters: filters::limits::ClusterCounters,
    /// Where auto-bans and registrations go for the cluster, when the edge is connected.
    uplink: std::sync::OnceLock<(
        tokio::sync::mpsc::Sender<crate::cluster::Report>,
        prometheus_client::metrics::counter::Counter,
    )>,
}

impl State {
    pub fn new(bans: Arc<BanStore>) -> State {
        State {
            bans,
            bindings: Default::default(),
            calls: Default::default(),
            auth: Default::default(),
            enumeration: Default::default(),
            flood: Default::default(),
            dialing: Default::default(),
            counters: Default::default(),
            identity: Default::default(),
            cluster: Default::default(),
            uplink: std::sync::OnceLock::new(),
        }
    }

    /// Sends what the cluster must learn to `tx` from now on (the cluster link publishes it);
    /// what a full channel refuses is counted in `dropped`.
    pub fn set_uplink(
        &self,
        tx: tokio::sync::mpsc::Sender<crate::cluster::Report>,
        dropped: prometheus_client::metrics::counter::Counter,
    ) {
        let _ = self.uplink.set((tx, dropped));
    }

    /// Whether reports go anywhere: a standalone edge builds none.
    pub fn reporting(&self) -> bool {
        self.uplink.get().is_some()
    }

    /// Queues `r` for the cluster when the edge has one. The cluster link drains the channel into
    /// its own queue even while a call to a controller is out, so the channel fills only when that
    /// task cannot run; then the newest is dropped, and counted.
    pub fn report(&self, r: crate::cluster::Report) {
        if let Some((tx, dropped)) = self.uplink.get() {
            if tx.try_send(r).is_err() {
                dropped.inc();
            }
        }
    }

    /// Drops window entries and bindings that have expired (called periodically); returns how
    /// many source addresses still hold a registration.
    pub fn expire(&self, now_ms: u64, policy: &Policy) -> usize {
        let registered = self.bindings.expire(now_ms);
        self.calls
            .expire(now_ms, policy.tollfraud.max_call_s * 1000);
        self.auth.expire(now_ms, policy.bruteforce.window_s * 1000);
        self.enumeration
            .expire(now_ms, policy.enumeration.window_s * 1000);
        self.flood.expire(now_ms, policy.flood.window_s * 1000);
        self.dialing
            .expire(now_ms, policy.tollfraud.sequential_window_s * 1000);
        registered
    }
}

/// Why a policy could not be put in force.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Invalid(String),
    #[error("policy.geoip.database {path}: {message}")]
    GeoIp { path: String, message: String },
}

/// What a pipeline needs to know of the edge it runs in.
#[derive(Debug, Clone, Default)]
pub struct BuildEnv {
    /// Networks trusted besides the allowlist (`trusted_pbx`).
    pub trusted: Vec<IpNet>,
    /// The edge's advertised `host:port`s, for Via loop detection.
    pub own_addrs: Vec<(String, u16)>,
}

/// One policy made runnable: the filters in order and the allowlist.
pub struct Pipeline {
    pub policy: Policy,
    allow: NetSet<()>,
    gate: Vec<Box<dyn Filter>>,
    filters: Vec<Box<dyn Filter>>,
}

impl Pipeline {
    /// Builds `policy` for the edge described by `env`.
    pub fn build(
        policy: &Policy,
        env: &BuildEnv,
        state: &Arc<State>,
        clock: &Clock,
    ) -> Result<Pipeline, BuildError> {
        policy.validate().map_err(BuildError::Invalid)?;
        let allow = policy
            .allowlist
            .networks
            .iter()
            .chain(&env.trusted)
            .copied()
            .collect();
        let mut gate: Vec<Box<dyn Filter>> = Vec::new();
        if policy.bans.enabled {
            gate.push(Box::new(filters::ban::BanGate::new(&policy.bans, state)));
        }
        if policy.flood.enabled {
            gate.push(Box::new(filters::flood::Flood::new(
                &policy.flood,
                state,
                clock.clone(),
            )));
        }
        let mut f: Vec<Box<dyn Filter>> = Vec::new();
        if policy.bans.enabled {
            f.push(Box::new(filters::ban::IdentityGate::new(
                &policy.bans,
                state,
            )));
        }
        if policy.sanity.enabled {
            f.push(Box::new(filters::sanity::Sanity::new(
                &policy.sanity,
                &env.own_addrs,
            )));
        }
        if policy.scanner.enabled {
            f.push(Box::new(filters::scanner::Scanner::new(&policy.scanner)?));
        }
        if policy.methods.enabled {
            f.push(Box::new(filters::methods::Methods::new(&policy.methods)));
        }
        if policy.geoip.enabled {
            f.push(Box::new(filters::geoip::GeoIp::open(&policy.geoip)?));
        }
        if policy.rate.enabled {
            f.push(Box::new(filters::rate::Rate::new(
                &policy.rate,
                clock.clone(),
            )));
        }
        // Cluster-wide limits: idle until the controllers define some.
        f.push(Box::new(filters::limits::ClusterLimits::new(state)));
        if policy.registered.enabled {
            f.push(Box::new(filters::registered::Registered::new(
                &policy.registered,
                state,
            )));
        }
        if policy.tollfraud.enabled {
            f.push(Box::new(filters::tollfraud::TollFraud::new(
                &policy.tollfraud,
                state,
            )));
        }
        if policy.bruteforce.enabled {
            f.push(Box::new(filters::bruteforce::BruteForce::new(
                &policy.bruteforce,
                state,
            )));
        }
        if policy.enumeration.enabled {
            f.push(Box::new(filters::enumeration::Enumeration::new(
                &policy.enumeration,
                state,
            )));
        }
        // Registrations and call ends are learned even when the rules that use them are off, so
        // turning a rule on later starts from what is true.
        if !policy.registered.enabled {
            f.push(Box::new(filters::registered::Registered::observer(
                &policy.registered,
                state,
            )));
        }
        Ok(Pipeline {
            policy: policy.clone(),
            allow,
            gate,
            filters: f,
        })
    }

    /// Whether `source` is on the allowlist.
    pub fn allowed(&self, source: SocketAddr) -> bool {
        !self.allow.is_empty() && self.allow.contains(source.ip())
    }
}

/// The pipeline in force, the state it works on and where its events go.
pub struct Firewall {
    pipeline: ArcSwap<Pipeline>,
    pub state: Arc<State>,
    pub clock: Clock,
    pub events: EventSink,
}

impl Firewall {
    pub fn new(pipeline: Pipeline, state: Arc<State>, clock: Clock, events: EventSink) -> Self {
        state.bans.set_config(pipeline.policy.bans.networks.clone());
        Firewall {
            pipeline: ArcSwap::from_pointee(pipeline),
            state,
            clock,
            events,
        }
    }

    /// The pipeline in force.
    pub fn pipeline(&self) -> arc_swap::Guard<Arc<Pipeline>> {
        self.pipeline.load()
    }

    /// Puts a new policy in force; state (bans, bindings, windows) carries over.
    pub fn install(&self, pipeline: Pipeline) {
        self.state
            .bans
            .set_config(pipeline.policy.bans.networks.clone());
        self.pipeline.store(Arc::new(pipeline));
    }

    /// Builds the [`Meta`] of a message from `source` on `side`.
    pub fn meta(&self, source: SocketAddr, transport: Transport, side: Side, len: usize) -> Meta {
        let trusted = side == Side::Pbx || self.pipeline.load().allowed(source);
        Meta {
            now_ms: self.clock.now_ms(),
            source,
            transport,
            side,
            trusted,
            len,
        }
    }

    /// The pre-parse gate.
    pub fn gate(&self, meta: &Meta) -> Verdict {
        let p = self.pipeline.load();
        for f in &p.gate {
            if let Some(found) = f.gate(meta) {
                if let Some(v) = self.enforce(f.as_ref(), found, meta, meta.source, None) {
                    return v;
                }
            }
        }
        Verdict::Allow
    }

    /// The request phase.
    pub fn request(&self, cx: &RequestCx<'_>) -> Verdict {
        let p = self.pipeline.load();
        for f in &p.filters {
            if let Some(found) = f.request(cx) {
                if let Some(v) =
                    self.enforce(f.as_ref(), found, cx.meta, cx.meta.source, Some(&cx.sip))
                {
                    return v;
                }
            }
        }
        Verdict::Allow
    }

    /// The response phase.
    pub fn response(&self, cx: &ResponseCx<'_>) -> Verdict {
        let p = self.pipeline.load();
        for f in &p.filters {
            if let Some(found) = f.response(cx) {
                if let Some(v) = self.enforce(f.as_ref(), found, cx.meta, cx.peer, Some(&cx.sip)) {
                    return v;
                }
            }
        }
        Verdict::Allow
    }

    /// Periodic upkeep: idle limiter keys, expired windows and bindings. Returns the number of
    /// source addresses holding a registration.
    pub fn housekeep(&self) -> usize {
        let p = self.pipeline.load();
        for f in p.gate.iter().chain(&p.filters) {
            f.housekeep();
        }
        let now = self.clock.now_ms();
        self.state.expire(now, &p.policy)
    }

    /// The completion phase.
    pub fn completion(&self, cx: &RequestCx<'_>, forwarded: bool) {
        for f in &self.pipeline.load().filters {
            f.completion(cx, forwarded);
        }
    }

    /// Emits the event of `found` and returns the verdict when it is enforced.
    fn enforce(
        &self,
        f: &dyn Filter,
        found: Finding,
        meta: &Meta,
        party: SocketAddr,
        sip: Option<&SipView<'_>>,
    ) -> Option<Verdict> {
        let dry = f.dry_run();
        let mut found = found;
        if matches!(found.action, Action::Ban { .. }) && self.pipeline.load().allowed(party) {
            // The allowlist wins over every ban, auto-bans included.
            found.action = Action::Alert;
            found.detail = format!("{} (source allowlisted: not banned)", found.detail).into();
        }
        self.events.emit(&found, dry, meta, party, sip);
        if dry {
            return None;
        }
        match found.action {
            Action::Alert => None,
            Action::Reject {
                code,
                reason,
                header,
            } => Some(Verdict::Reject {
                code,
                reason,
                header,
                rule: found.rule,
            }),
            Action::Drop => Some(Verdict::Drop { rule: found.rule }),
            Action::Ban { ttl_s } => {
                // The gate's own "already banned" drop comes back as Drop, never as Ban.
                let ban = Ban {
                    network: IpNet::from(party.ip()),
                    origin: BanOrigin::Auto,
                    rule: found.rule.to_string(),
                    reason: found.detail.to_string(),
                    created_unix_ms: meta.now_ms,
                    expires_unix_ms: meta.now_ms.saturating_add(ttl_s.saturating_mul(1000)),
                };
                self.state.report(crate::cluster::Report::Ban {
                    ban: ban.clone(),
                    trace: sipwarden_shared::telemetry::current_context(),
                });
                self.state.bans.ban(ban);
                Some(Verdict::Drop { rule: found.rule })
            }
        }
    }
}

#[cfg(test)]
mod tests;
