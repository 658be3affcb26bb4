//! The edge's link to the controller cluster: one task holds a `Watch` stream on one controller,
//! says which revision it has, and applies what arrives to the ban set — a snapshot replaces every
//! cluster ban, deltas add and remove one. When the stream breaks it tries the next controller with
//! backoff, resuming from its revision. Fail-static: with every controller down the last bans stay
//! in force (and in the ban file, so a restart keeps them too). A second task proposes the edge's
//! auto-bans to the cluster, queued (bounded) while no controller answers. Only this module talks
//! gRPC.

use crate::bans::{Ban, BanOrigin, NEVER};
use crate::clock::Clock;
use crate::config::Controller;
use crate::filters::ban::{aor_key, IdentityBan, IdentitySet};
use crate::metrics::Metrics;
use crate::pipeline::State;
use crate::proxy::Peers;
use sipwarden_proto::v1 as pb;
use sipwarden_proto::v1::edge_control_client::EdgeControlClient;
use sipwarden_proto::v1::watch_event::Kind;
use sipwarden_shared::ban::{BanTarget, Binding};
use sipwarden_shared::telemetry;
use smallvec::SmallVec;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// What an edge tells the cluster.
#[derive(Debug, Clone)]
pub enum Report {
    /// An auto-ban one of its rules made, with the trace of the message that caused it (so the
    /// trace runs on through the controllers to the Raft commit).
    Ban {
        ban: Ban,
        trace: opentelemetry::Context,
    },
    /// A registration the PBX accepted (`edge_id` and `site` are filled in by the uplink).
    Binding(Binding),
    /// A registration that ended (de-registration or a refresh that dropped the contact).
    Unbind { aor: String, contact: String },
}

/// The address a cluster binding is filed under, when it is one of `site`'s.
fn site_binding<'a>(b: &'a pb::Binding, site: &str) -> Option<(&'a str, std::net::IpAddr, u64)> {
    if b.site != site {
        return None;
    }
    let ip = b.source.parse::<std::net::SocketAddr>().ok()?.ip();
    Some((&b.aor, ip, u64::try_from(b.expires_unix_ms).ok()?))
}

/// Whether a cluster ban applies at `site` (global, or scoped to it).
fn in_scope(b: &pb::Ban, site: &str) -> bool {
    b.scope_site.is_empty() || b.scope_site == site
}

/// What a cluster ban holds at the edge: an address or network (in the ban store), an account
/// (`aor_key`) or a User-Agent substring (lower-case).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum On {
    Net(ipnet::IpNet),
    Aor(String),
    UserAgent(String),
}

impl On {
    fn of(b: &pb::Ban) -> Option<On> {
        Some(match BanTarget::try_from(b.target.as_ref()?).ok()? {
            BanTarget::Aor(a) => On::Aor(aor_key(&a)),
            BanTarget::UserAgent(u) => On::UserAgent(u.to_ascii_lowercase()),
            t => On::Net(t.network()?),
        })
    }
}

/// One cluster ban on a target, as kept to put it in force again when another ban on the target
/// goes: its id and times (its reason stays with the controllers and in the ban put in force when
/// it came).
#[derive(Debug, Clone)]
struct Holding {
    id: Box<str>,
    /// `NEVER` for a ban without an end.
    expires_unix_ms: u64,
    created_unix_ms: u64,
}

impl Holding {
    fn of(b: &pb::Ban) -> Holding {
        let expires = u64::try_from(b.expires_unix_ms).unwrap_or(0);
        Holding {
            id: b.id.as_str().into(),
            expires_unix_ms: if expires == 0 { NEVER } else { expires },
            created_unix_ms: u64::try_from(b.created_unix_ms).unwrap_or(0),
        }
    }

    fn identity(&self) -> IdentityBan {
        IdentityBan {
            id: self.id.to_string(),
            expires_unix_ms: self.expires_unix_ms,
        }
    }

    /// The ban store's ban of `network` this holding puts in force, with `reason`.
    fn ban(&self, network: ipnet::IpNet, reason: &str) -> Ban {
        Ban {
            network,
            origin: BanOrigin::Cluster,
            rule: format!("cluster:{}", self.id),
            reason: reason.to_string(),
            created_unix_ms: self.created_unix_ms,
            expires_unix_ms: self.expires_unix_ms,
        }
    }
}

/// The bans on one target, one inline.
type Holdings = SmallVec<[Holding; 1]>;

/// The cluster bans in force at this edge, by target. Two bans may name one target — the
/// controllers keep a global ban and one scoped to a site apart — and the target stays banned
/// while either is in force, until the later end of the two: a removal lifts a target only with
/// its last ban, and the removal of a ban never held here (scoped to another site) lifts nothing.
/// A ban's id names one target for its life (the controllers key bans by target), so a removal
/// is found by the target its event carries. Kept lean — addresses apart, keyed by network, one
/// ban inline per target, no reasons: with 1,000,000 bans it sits beside the ban store's own
/// list. Written by the watch stream alone.
#[derive(Debug, Default)]
pub struct Held {
    nets: HashMap<ipnet::IpNet, Holdings>,
    identities: HashMap<On, Holdings>,
}

impl Held {
    fn list_mut(&mut self, on: &On) -> &mut Holdings {
        match on {
            On::Net(n) => self.nets.entry(*n).or_default(),
            _ => self.identities.entry(on.clone()).or_default(),
        }
    }

    fn list(&self, on: &On) -> Option<&Holdings> {
        match on {
            On::Net(n) => self.nets.get(n),
            _ => self.identities.get(on),
        }
    }

    /// Files `b` (in scope here, on `on`), replacing the ban of its id; returns the ban that now
    /// holds `on` when that changed (another ban, or the same with another end).
    fn put(&mut self, on: &On, b: &pb::Ban) -> Option<&Holding> {
        let holding = Holding::of(b);
        let list = self.list_mut(on);
        // Holdings keep their places: a put replaces one in place or adds one at the end.
        let before = Self::best_at(list).map(|i| (i, list[i].expires_unix_ms));
        match list.iter_mut().find(|h| *h.id == *b.id) {
            Some(h) => *h = holding,
            None => list.push(holding),
        }
        let at = Self::best_at(list)?;
        let best = &list[at];
        let same = before == Some((at, best.expires_unix_ms));
        (!same || *best.id == *b.id).then_some(best)
    }

    /// Where the ban of a target that ends last is.
    fn best_at(list: &[Holding]) -> Option<usize> {
        (0..list.len()).max_by_key(|&i| list[i].expires_unix_ms)
    }

    /// Takes ban `id` off `on`: `None` when it was not held there, else the ban that holds `on`
    /// now, if any.
    fn remove(&mut self, on: &On, id: &str) -> Option<Option<&Holding>> {
        let list = match on {
            On::Net(n) => self.nets.get_mut(n),
            _ => self.identities.get_mut(on),
        }?;
        let at = list.iter().position(|h| *h.id == *id)?;
        list.swap_remove(at);
        if list.is_empty() {
            self.forget(on);
            return Some(None);
        }
        Some(self.list(on).and_then(|l| Self::best(l)))
    }

    fn forget(&mut self, on: &On) {
        match on {
            On::Net(n) => self.nets.remove(n),
            _ => self.identities.remove(on),
        };
    }

    /// The ban of a target that ends last.
    fn best(list: &[Holding]) -> Option<&Holding> {
        Self::best_at(list).map(|i| &list[i])
    }
}

/// Puts what holds `on` now in force: its last-ending ban (with `reason` when it is the ban just
/// put, no reason when it is another), or nothing.
fn enforce(state: &State, on: &On, by: Option<&Holding>, put: Option<&pb::Ban>) {
    match (on, by) {
        (On::Net(n), Some(h)) => {
            let reason = put
                .filter(|b| *b.id == *h.id)
                .map_or("", |b| b.reason.as_str());
            state.bans.ban(h.ban(*n, reason))
        }
        (On::Net(n), None) => state.bans.unban_from(*n, BanOrigin::Cluster),
        (On::Aor(a), Some(h)) => state
            .identity
            .update(|s| s.put_aor(a.clone(), h.identity())),
        (On::Aor(a), None) => state.identity.update(|s| s.remove_aor(a)),
        (On::UserAgent(u), Some(h)) => state.identity.update(|s| s.put_user_agent(u, h.identity())),
        (On::UserAgent(u), None) => state.identity.update(|s| s.remove_user_agent(u)),
    }
}

/// Applies one watch event to the edge of `site`; returns the revision the edge now has.
/// Bindings of other sites are not this edge's to enforce (the registered-source rule is per
/// site), nor are bans scoped to another site.
pub fn apply(state: &State, site: &str, now_ms: u64, e: &pb::WatchEvent) -> u64 {
    match &e.kind {
        Some(Kind::Snapshot(s)) => {
            let mut held = Held::default();
            held.nets.reserve(s.bans.len());
            let mut nets = Vec::with_capacity(s.bans.len());
            for b in s.bans.iter().filter(|b| in_scope(b, site)) {
                if let Some(on) = On::of(b) {
                    held.put(&on, b);
                    if let On::Net(n) = on {
                        nets.push((n, b));
                    }
                }
            }
            // Each address or network with the ban on it that ends last, and that ban's reason.
            let list: Vec<Ban> = nets
                .into_iter()
                .filter_map(|(n, b)| {
                    let best = held.nets.get(&n).and_then(|l| Held::best(l))?;
                    (*best.id == *b.id).then(|| best.ban(n, &b.reason))
                })
                .collect();
            let mut identity = IdentitySet::default();
            for (on, h) in &held.identities {
                if let Some(h) = Held::best(h) {
                    match on {
                        On::Aor(a) => identity.put_aor(a.clone(), h.identity()),
                        On::UserAgent(u) => identity.put_user_agent(u, h.identity()),
                        On::Net(_) => {}
                    }
                }
            }
            info!(
                bans = list.len(),
                identity = identity.aor_count() + identity.user_agent_count(),
                bindings = s.bindings.len(),
                revision = e.revision,
                "cluster snapshot"
            );
            state.bans.replace(BanOrigin::Cluster, list);
            state.identity.replace(identity);
            *state.cluster.lock().unwrap_or_else(|p| p.into_inner()) = held;
            state.bindings.clear_cluster();
            for b in &s.bindings {
                if let Some((aor, ip, expires)) = site_binding(b, site) {
                    state
                        .bindings
                        .put_cluster(aor, &b.contact, ip, expires, now_ms);
                }
            }
        }
        Some(Kind::BanPut(b)) => {
            let Some(on) = On::of(b) else {
                return e.revision;
            };
            let mut held = state.cluster.lock().unwrap_or_else(|p| p.into_inner());
            if in_scope(b, site) {
                if let Some(by) = held.put(&on, b) {
                    enforce(state, &on, Some(by), Some(b));
                }
            } else if let Some(by) = held.remove(&on, &b.id) {
                // A ban now scoped to another site is no longer this edge's.
                enforce(state, &on, by, None);
            }
        }
        Some(Kind::BanRemoved(b)) => {
            let Some(on) = On::of(b) else {
                return e.revision;
            };
            let mut held = state.cluster.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(by) = held.remove(&on, &b.id) {
                enforce(state, &on, by, None);
            }
        }
        Some(Kind::BindingPut(b)) => {
            if let Some((aor, ip, expires)) = site_binding(b, site) {
                state
                    .bindings
                    .put_cluster(aor, &b.contact, ip, expires, now_ms);
            }
        }
        Some(Kind::BindingRemoved(k)) => state.bindings.remove_cluster(&k.aor, &k.contact),
        // Policies are used by a later part of the cluster link; edges go to the proxy's peer
        // list (`apply_peers`).
        Some(Kind::Policy(_)) | Some(Kind::EdgePut(_)) | None => {}
    }
    e.revision
}

/// Applies the edges a watch event names to the proxy's peers (every edge but `me`).
pub fn apply_peers(peers: &Peers, me: &str, e: &pb::WatchEvent) {
    let parse = |x: &pb::EdgeInfo| {
        (x.id != me)
            .then(|| x.relay.parse().ok().map(|a| (x.id.clone(), a)))
            .flatten()
    };
    match &e.kind {
        Some(Kind::Snapshot(s)) => peers.update(true, s.edges.iter().filter_map(parse)),
        Some(Kind::EdgePut(x)) => peers.update(false, parse(x)),
        _ => {}
    }
}

/// Most auto-bans queued while no controller takes them; past this the oldest are dropped.
pub const QUEUE_CAP: usize = 10_000;
/// Most bans per `ProposeBans` call.
const BATCH: usize = 500;

/// The proto spec of an auto-ban.
pub fn ban_spec(b: &Ban) -> pb::BanSpec {
    use pb::ban_target::Target;
    let host = (b.network.prefix_len() == b.network.max_prefix_len()).then(|| b.network.addr());
    let target = match host {
        Some(ip) => Target::Ip(ip.to_string()),
        None => Target::Cidr(b.network.to_string()),
    };
    pb::BanSpec {
        target: Some(pb::BanTarget {
            target: Some(target),
        }),
        reason: b.reason.chars().take(512).collect(),
        ttl_s: 0,
        expires_unix_ms: if b.expires_unix_ms == NEVER {
            0
        } else {
            b.expires_unix_ms
        },
        site: String::new(),
        source: format!("auto:{}", b.rule),
    }
}

/// The edge as the cluster knows it: who it is, where the controllers are and the credential it
/// presents. Shared by the watch stream, the uplink and the counter pusher.
pub struct Link {
    pub cfg: Controller,
    pub edge_id: String,
    pub site: String,
    /// Where other edges relay to this one (`ip:port`, empty: nowhere).
    pub relay: String,
    /// Other edges, for the proxy.
    pub peers: Arc<Peers>,
    /// Set when the first snapshot is applied (readiness).
    pub synced: Arc<std::sync::atomic::AtomicBool>,
    bearer: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    pub metrics: Arc<Metrics>,
}

impl Link {
    /// `None` (with a warning) when the secret cannot be sent as a header.
    pub fn new(
        cfg: Controller,
        edge_id: String,
        site: String,
        relay: String,
        peers: Arc<Peers>,
        metrics: Arc<Metrics>,
    ) -> Option<Link> {
        let Ok(bearer) = format!("Bearer {}", cfg.secret).parse() else {
            warn!("controller.secret is not a valid header value; staying standalone");
            return None;
        };
        Some(Link {
            cfg,
            edge_id,
            site,
            relay,
            peers,
            synced: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            bearer,
            metrics,
        })
    }

    /// `msg` as a request carrying the edge's credential.
    pub fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.metadata_mut()
            .insert("authorization", self.bearer.clone());
        req
    }

    fn backoff_max(&self) -> Duration {
        Duration::from_millis(self.cfg.reconnect_max_ms.max(50))
    }
}

/// What one round of the uplink sends: the first `BATCH` reports, split by RPC.
fn batch_of(queue: &VecDeque<Report>) -> (usize, Batch) {
    let mut b = Batch::default();
    let n = queue.len().min(BATCH);
    for r in queue.iter().take(n) {
        match r {
            Report::Ban { ban, trace } => {
                b.bans.push(ban_spec(ban));
                b.traces.push(trace.clone());
            }
            Report::Binding(x) => b.put.push(pb::Binding::from(x)),
            Report::Unbind { aor, contact } => b.removed.push(pb::BindingKey {
                aor: aor.clone(),
                contact: contact.clone(),
            }),
        }
    }
    (n, b)
}

/// One round of the uplink.
#[derive(Default)]
struct Batch {
    bans: Vec<pb::BanSpec>,
    /// The trace of each ban's message.
    traces: Vec<opentelemetry::Context>,
    put: Vec<pb::Binding>,
    removed: Vec<pb::BindingKey>,
}

/// Publishes what the edge learns to the cluster — auto-bans and registrations: batches what `rx`
/// delivers, queues it (bounded, oldest dropped and counted) while no controller answers, retries
/// on the next endpoint. Both calls are idempotent, so a batch whose answer was lost is sent again.
pub async fn uplink(
    link: Arc<Link>,
    mut rx: tokio::sync::mpsc::Receiver<Report>,
    stop: CancellationToken,
) {
    let metrics = &link.metrics;
    let mut queue: VecDeque<Report> = VecDeque::new();
    let mut endpoints = link.cfg.endpoints.iter().cycle();
    let mut endpoint = endpoints.next().cloned().unwrap_or_default();
    let mut client: Option<EdgeControlClient<tonic::transport::Channel>> = None;
    let mut backoff = Duration::from_millis(50);
    let max = link.backoff_max();
    let mut open = true;
    loop {
        if queue.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = rx.recv() => match r {
                    Some(r) => queue.push_back(r),
                    None => return,
                },
            }
        }
        while let Ok(r) = rx.try_recv() {
            queue.push_back(r);
        }
        shed(&mut queue, 0, metrics);
        let (n, batch) = batch_of(&queue);
        // The call (and the connection it may need), with the channel drained into the queue
        // meanwhile: a controller slow to answer, or one that never does, must not leave the
        // channel to fill, which would refuse the phones' registrations as they come. A call
        // that takes longer than `CALL_TIMEOUT` is tried again on the next controller.
        let attempt = tokio::time::timeout(CALL_TIMEOUT, async {
            if client.is_none() {
                client = connect(&link, &endpoint).await;
            }
            match &mut client {
                Some(c) => send(&link, c, batch, &endpoint).await,
                None => false,
            }
        });
        // The first `n` are in the call: what is shed comes after them.
        let Some(sent) =
            drain_while(attempt, &mut rx, &mut open, &mut queue, n, metrics, &stop).await
        else {
            return;
        };
        let sent = sent.unwrap_or(false);
        if sent {
            queue.drain(..n);
            metrics.reports_queued.set(queue.len() as i64);
            backoff = Duration::from_millis(50);
            continue;
        }
        client = None;
        endpoint = endpoints.next().cloned().unwrap_or_default();
        // The pause before the next try drains the channel too.
        let pause = tokio::time::sleep(backoff);
        if drain_while(pause, &mut rx, &mut open, &mut queue, 0, metrics, &stop)
            .await
            .is_none()
        {
            return;
        }
        backoff = (backoff * 2).min(max);
    }
}

/// Longest a call of the uplink (with the connection it may open) takes before it is tried again
/// on the next controller.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Awaits `work` while taking what `rx` delivers into `queue` (shedding after its first `keep`),
/// until `rx` closes (`open` then false); `None` when `stop` comes first.
async fn drain_while<T>(
    work: impl std::future::Future<Output = T>,
    rx: &mut tokio::sync::mpsc::Receiver<Report>,
    open: &mut bool,
    queue: &mut VecDeque<Report>,
    keep: usize,
    metrics: &Metrics,
    stop: &CancellationToken,
) -> Option<T> {
    tokio::pin!(work);
    loop {
        tokio::select! {
            r = &mut work => return Some(r),
            _ = stop.cancelled() => return None,
            r = rx.recv(), if *open => match r {
                Some(r) => {
                    queue.push_back(r);
                    shed(queue, keep, metrics);
                }
                None => *open = false,
            },
        }
    }
}

/// Drops the oldest reports after the first `keep` (those in a call) while the queue is over
/// `QUEUE_CAP`, counted; sets the queue's gauge.
fn shed(queue: &mut VecDeque<Report>, keep: usize, metrics: &Metrics) {
    while queue.len() > QUEUE_CAP.max(keep) {
        queue.remove(keep);
        metrics.reports_dropped.inc();
    }
    metrics.reports_queued.set(queue.len() as i64);
}

/// Sends one batch; `false` when it must be retried elsewhere.
async fn send(
    link: &Link,
    c: &mut EdgeControlClient<tonic::transport::Channel>,
    batch: Batch,
    endpoint: &str,
) -> bool {
    use tracing::Instrument;
    let Batch {
        bans,
        traces,
        put,
        removed,
    } = batch;
    let settled = |r: Result<(), tonic::Status>, what: &str| match r {
        Ok(()) => true,
        Err(s) if s.code() == tonic::Code::InvalidArgument => {
            // Not retryable: drop the batch rather than block the queue.
            warn!(error = %s, "controller refused {what}");
            true
        }
        Err(s) => {
            debug!(error = %s, %endpoint, "publishing {what} failed; retrying");
            false
        }
    };
    if !bans.is_empty() {
        // The call continues the trace of the first ban's message; the others are linked.
        let span = tracing::info_span!("cluster.propose_bans", bans = bans.len(), %endpoint);
        if let Some((first, rest)) = traces.split_first() {
            telemetry::set_parent(&span, first.clone());
            for t in rest.iter().take(32) {
                telemetry::add_link(&span, t);
            }
        }
        let mut req = link.request(pb::ProposeBansRequest {
            edge_id: link.edge_id.clone(),
            bans,
        });
        telemetry::inject(&span, req.metadata_mut());
        let r = c.propose_bans(req).instrument(span).await;
        if !settled(r.map(drop), "auto-bans") {
            return false;
        }
    }
    if !put.is_empty() || !removed.is_empty() {
        let req = link.request(pb::PutBindingsRequest {
            edge_id: link.edge_id.clone(),
            site: link.site.clone(),
            put,
            removed,
        });
        if !settled(c.put_bindings(req).await.map(drop), "registrations") {
            return false;
        }
    }
    true
}

/// Pushes this edge's counts for the cluster-wide limits every `counters_ms` (every 2 s while
/// no limit is defined, to learn when one is) to the leader, following the leader hint a follower
/// answers with; learns the limits, the cluster totals and the keys over their limit. A failed
/// push keeps its counts for the next one.
pub async fn push_counters(
    link: Arc<Link>,
    state: Arc<State>,
    clock: Clock,
    stop: CancellationToken,
) {
    let counters = &state.counters;
    counters.set_site(&link.site);
    let interval = Duration::from_millis(link.cfg.counters_ms.max(50));
    let idle_every = (2000 / interval.as_millis().max(1)).max(1) as u64;
    let mut endpoints = link.cfg.endpoints.iter().cycle();
    let mut target = endpoints.next().cloned().unwrap_or_default();
    let mut client: Option<EdgeControlClient<tonic::transport::Channel>> = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        n += 1;
        let idle = counters.limits().defs.is_empty();
        if idle && counters.limits().version != 0 && !n.is_multiple_of(idle_every) {
            continue;
        }
        if client.is_none() {
            client = connect(&link, &target).await;
        }
        let Some(c) = &mut client else {
            target = endpoints.next().cloned().unwrap_or_default();
            continue;
        };
        let deltas = counters.take();
        let req = link.request(pb::PushCountersRequest {
            edge_id: link.edge_id.clone(),
            site: link.site.clone(),
            deltas,
            limits_version: counters.limits().version,
        });
        // A controller that does not answer is left like one that failed: the counts go back to
        // pending and the next push tries the next controller.
        let answer = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(CALL_TIMEOUT, c.push_counters(req)) => {
                r.unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer")))
            }
        };
        match answer {
            Ok(r) => {
                let r = r.into_inner();
                pushed(&link.metrics, "ok");
                if r.limits_changed {
                    info!(
                        limits = r.limits.len(),
                        version = r.limits_version,
                        "cluster limits"
                    );
                    link.metrics.cluster_limits.set(r.limits.len() as i64);
                    counters.set_limits(r.limits_version, r.limits);
                }
                counters.learned(&r.sums, &r.over, clock.now_ms());
            }
            Err(s) if s.code() == tonic::Code::InvalidArgument => {
                // Counts for a limit the controllers no longer have: forget them.
                warn!(error = %s, "controller refused counter increments");
                pushed(&link.metrics, "refused");
                counters.learned(&[], &[], clock.now_ms());
            }
            Err(s) => {
                counters.failed();
                client = None;
                let hint = s
                    .metadata()
                    .get(LEADER_HINT)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                pushed(
                    &link.metrics,
                    if hint.is_some() {
                        "redirected"
                    } else {
                        "error"
                    },
                );
                target = match hint {
                    Some(leader) => {
                        debug!(%leader, "following the leader hint");
                        leader
                    }
                    None => {
                        debug!(error = %s, endpoint = %target, "pushing counters failed");
                        endpoints.next().cloned().unwrap_or_default()
                    }
                };
            }
        }
    }
}

fn pushed(m: &Metrics, reason: &'static str) {
    m.limit_pushes
        .get_or_create(&crate::metrics::ReasonLabels { reason })
        .inc();
}

/// The metadata key a follower names the leader's gRPC address in.
pub const LEADER_HINT: &str = "x-sipwarden-leader";

/// A client of the controller at `addr`, if it can be reached now.
async fn connect(link: &Link, addr: &str) -> Option<EdgeControlClient<tonic::transport::Channel>> {
    let channel = channel_to(link, addr).ok()?.connect().await.ok()?;
    Some(EdgeControlClient::new(channel))
}

/// A gRPC endpoint for the controller at `addr` (`host:port`), over TLS when `controller.tls` is
/// set.
fn channel_to(link: &Link, addr: &str) -> Result<tonic::transport::Endpoint, String> {
    Ok(
        sipwarden_shared::tls::endpoint(addr, &link.cfg.tls, "controller.tls")?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true),
    )
}

/// Runs the watch stream (`run`) on a thread of its own, with a runtime of its own, until `stop`;
/// `done` is dropped when it ends. A snapshot is decoded where the stream is polled (1,000,000
/// bans: 0.22–0.44 s of prost) and then filed (0.46 s with 100,000 bindings): on the runtime's
/// workers that would hold up every TCP connection they serve, on each resync.
pub fn spawn_watch<T: Send + 'static>(
    link: Arc<Link>,
    state: Arc<State>,
    clock: Clock,
    stop: CancellationToken,
    done: T,
) -> std::io::Result<()> {
    crate::spawn_on_own_thread("cluster", move || run(link, state, clock, stop), done)
}

/// Keeps a watch stream open to one of `cfg.endpoints` until `stop`, resuming at the revision
/// held on the next controller after a break.
pub async fn run(link: Arc<Link>, state: Arc<State>, clock: Clock, stop: CancellationToken) {
    let metrics = &link.metrics;
    let mut revision = 0u64;
    let mut backoff = Duration::from_millis(50);
    let max = link.backoff_max();
    for endpoint in link.cfg.endpoints.iter().cycle() {
        if stop.is_cancelled() {
            return;
        }
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = watch_once(&link, endpoint, &state, &clock, &mut revision) => r,
        };
        metrics.controller_connected.set(0);
        match result {
            Ok(()) => debug!(%endpoint, "watch stream ended"),
            Err(e) => debug!(%endpoint, error = %e, "controller unreachable"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(max);
        if revision > 0 {
            // Once a stream has carried data, reconnect quickly.
            backoff = backoff.min(Duration::from_millis(200));
        }
    }
}

async fn watch_once(
    link: &Link,
    endpoint: &str,
    state: &Arc<State>,
    clock: &Clock,
    revision: &mut u64,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let channel = channel_to(link, endpoint)?
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    let mut client = EdgeControlClient::new(channel).max_decoding_message_size(256 << 20);
    let metrics = &link.metrics;
    let req = link.request(pb::EdgeHello {
        edge_id: link.edge_id.clone(),
        site: link.site.clone(),
        revision: *revision,
        relay: link.relay.clone(),
    });
    let mut stream = client.watch(req).await?.into_inner();
    info!(%endpoint, revision = *revision, "watching the controller cluster");
    metrics.controller_connected.set(1);
    while let Some(e) = stream.message().await? {
        apply_peers(&link.peers, &link.edge_id, &e);
        metrics.peer_edges.set(link.peers.len() as i64);
        let snapshot = matches!(e.kind, Some(Kind::Snapshot(_)));
        *revision = apply(state, &link.site, clock.now_ms(), &e);
        if snapshot {
            link.synced
                .store(true, std::sync::atomic::Ordering::Release);
        }
        metrics.watch_revision.set(*revision as i64);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pb_ban(id: &str, target: pb::ban_target::Target, expires: i64) -> pb::Ban {
        pb::Ban {
            id: id.into(),
            target: Some(pb::BanTarget {
                target: Some(target),
            }),
            reason: "r".into(),
            expires_unix_ms: expires,
            ..Default::default()
        }
    }

    #[test]
    fn auto_bans_become_specs() {
        let b = Ban {
            network: "192.0.2.7/32".parse().unwrap(),
            origin: BanOrigin::Auto,
            rule: "scanner".into(),
            reason: "UA friendly-scanner".into(),
            created_unix_ms: 1,
            expires_unix_ms: 5_000,
        };
        let s = ban_spec(&b);
        assert_eq!(s.source, "auto:scanner");
        assert_eq!(s.expires_unix_ms, 5_000);
        assert!(
            matches!(s.target.unwrap().target, Some(pb::ban_target::Target::Ip(ip)) if ip == "192.0.2.7")
        );
        let net = Ban {
            network: "2001:db8::/48".parse().unwrap(),
            expires_unix_ms: NEVER,
            ..b
        };
        let s = ban_spec(&net);
        assert_eq!(s.expires_unix_ms, 0);
        assert!(
            matches!(s.target.unwrap().target, Some(pb::ban_target::Target::Cidr(n)) if n == "2001:db8::/48")
        );
    }

    #[test]
    fn snapshot_then_deltas_reach_the_ban_set() {
        use pb::ban_target::Target;
        let state = State::new(Arc::new(crate::bans::BanStore::new(None, 100)));
        let bans = &state.bans;
        let snap = pb::WatchEvent {
            revision: 5,
            kind: Some(Kind::Snapshot(pb::StateSnapshot {
                bans: vec![
                    pb_ban("b1", Target::Ip("192.0.2.1".into()), 0),
                    pb_ban("b2", Target::Cidr("198.51.100.0/24".into()), 10_000),
                    pb_ban("b3", Target::Aor("sip:1001@pbx".into()), 0),
                ],
                ..Default::default()
            })),
        };
        assert_eq!(apply(&state, "s", 0, &snap), 5);
        bans.apply(0);
        assert_eq!(bans.snapshot().len(), 2, "AOR bans are not address bans");
        assert_eq!(
            state.identity.load().aor("1001@pbx", 0),
            Some("b3"),
            "they are identity bans"
        );
        assert!(bans
            .lookup("198.51.100.7".parse().unwrap(), 9_999)
            .is_some());
        assert!(
            bans.lookup("198.51.100.7".parse().unwrap(), 10_000)
                .is_none(),
            "expiry kept"
        );
        let put = pb::WatchEvent {
            revision: 6,
            kind: Some(Kind::BanPut(pb_ban(
                "b4",
                Target::Ip("203.0.113.9".into()),
                0,
            ))),
        };
        let removed = pb::WatchEvent {
            revision: 7,
            kind: Some(Kind::BanRemoved(pb_ban(
                "b1",
                Target::Ip("192.0.2.1".into()),
                0,
            ))),
        };
        apply(&state, "s", 0, &put);
        assert_eq!(apply(&state, "s", 0, &removed), 7);
        bans.apply(0);
        assert!(bans.lookup("203.0.113.9".parse().unwrap(), 0).is_some());
        assert!(bans.lookup("192.0.2.1".parse().unwrap(), 0).is_none());
        // A ban scoped to another site is not enforced here; the AOR ban's removal lifts it.
        let mut other = pb_ban("b5", Target::Ip("203.0.113.50".into()), 0);
        other.scope_site = "elsewhere".into();
        apply(
            &state,
            "s",
            0,
            &pb::WatchEvent {
                revision: 8,
                kind: Some(Kind::BanPut(other)),
            },
        );
        let aor_gone = pb::WatchEvent {
            revision: 9,
            kind: Some(Kind::BanRemoved(pb_ban(
                "b3",
                Target::Aor("sip:1001@pbx".into()),
                0,
            ))),
        };
        apply(&state, "s", 0, &aor_gone);
        bans.apply(0);
        assert!(bans.lookup("203.0.113.50".parse().unwrap(), 0).is_none());
        assert!(state.identity.load().is_empty());
    }

    /// Two bans on one target — a global one and one scoped to this site, as the controllers keep
    /// them — hold it until the later end of the two, and the removal of either, or of a ban
    /// scoped to another site, leaves it banned.
    #[test]
    fn a_target_stays_banned_until_its_last_ban_goes() {
        use pb::ban_target::Target;
        let state = State::new(Arc::new(crate::bans::BanStore::new(None, 100)));
        let ev = |revision, kind| pb::WatchEvent {
            revision,
            kind: Some(kind),
        };
        let addr: std::net::IpAddr = "192.0.2.9".parse().unwrap();
        let scoped = |id: &str, target: Target, site: &str, expires| pb::Ban {
            scope_site: site.into(),
            ..pb_ban(id, target, expires)
        };
        let global = scoped("g", Target::Ip("192.0.2.9".into()), "", 5_000);
        let here = scoped("h", Target::Ip("192.0.2.9".into()), "s", 9_000);
        let there = scoped("t", Target::Ip("192.0.2.9".into()), "elsewhere", 0);
        apply(&state, "s", 0, &ev(1, Kind::BanPut(global.clone())));
        apply(&state, "s", 0, &ev(2, Kind::BanPut(here.clone())));
        apply(&state, "s", 0, &ev(3, Kind::BanPut(there.clone())));
        apply(&state, "s", 0, &ev(4, Kind::BanRemoved(there)));
        state.bans.apply(0);
        assert!(
            state.bans.lookup(addr, 8_999).is_some(),
            "the later end holds"
        );
        assert!(state.bans.lookup(addr, 9_000).is_none());
        apply(&state, "s", 0, &ev(5, Kind::BanRemoved(here.clone())));
        state.bans.apply(0);
        assert!(
            state.bans.lookup(addr, 4_999).is_some(),
            "the global ban holds"
        );
        assert!(state.bans.lookup(addr, 5_000).is_none());
        apply(&state, "s", 0, &ev(6, Kind::BanPut(here)));
        apply(&state, "s", 0, &ev(7, Kind::BanRemoved(global)));
        state.bans.apply(0);
        assert!(
            state.bans.lookup(addr, 8_999).is_some(),
            "the site's ban holds"
        );
        // The same for an account and a User-Agent, from a snapshot.
        let snap = pb::StateSnapshot {
            bans: vec![
                scoped("a1", Target::Aor("sip:1001@PBX".into()), "", 0),
                scoped("a2", Target::Aor("sip:1001@pbx".into()), "s", 0),
                scoped("u1", Target::UserAgent("Evil".into()), "", 0),
                scoped("u2", Target::UserAgent("evil".into()), "s", 0),
            ],
            ..Default::default()
        };
        apply(&state, "s", 0, &ev(8, Kind::Snapshot(snap)));
        state.bans.apply(0);
        assert!(state.bans.lookup(addr, 0).is_none(), "not in the snapshot");
        let gone = |id: &str, target| Kind::BanRemoved(pb_ban(id, target, 0));
        apply(
            &state,
            "s",
            0,
            &ev(9, gone("a2", Target::Aor("sip:1001@pbx".into()))),
        );
        apply(
            &state,
            "s",
            0,
            &ev(10, gone("u1", Target::UserAgent("Evil".into()))),
        );
        let set = Arc::clone(&*state.identity.load());
        assert_eq!(set.aor("1001@pbx", 0), Some("a1"));
        assert_eq!(set.user_agent("an EVIL scanner/1.0", 0), Some("u2"));
        apply(
            &state,
            "s",
            0,
            &ev(11, gone("a1", Target::Aor("sip:1001@pbx".into()))),
        );
        apply(
            &state,
            "s",
            0,
            &ev(12, gone("u2", Target::UserAgent("evil".into()))),
        );
        assert!(state.identity.load().is_empty());
        assert_eq!(
            set.aor("1001@pbx", 0),
            Some("a1"),
            "a reader's set stays as it was"
        );
    }

    /// Random puts (scopes and ends changing under one id), removals and snapshots of a
    /// controller's ban list against what the edge must enforce from it: each target in scope
    /// banned while any ban on it is, until the latest end among them.
    #[test]
    fn enforced_bans_follow_the_cluster_list() {
        use pb::ban_target::Target;
        use rand::{Rng, SeedableRng};
        let targets = [
            Target::Ip("192.0.2.1".into()),
            Target::Cidr("198.51.100.0/24".into()),
            Target::Aor("sip:1001@pbx".into()),
            Target::Aor("sip:1002@pbx".into()),
            Target::UserAgent("Scan".into()),
            Target::UserAgent("evil".into()),
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let state = State::new(Arc::new(crate::bans::BanStore::new(None, 100)));
        let mut list: HashMap<String, pb::Ban> = HashMap::new();
        for revision in 1..3_000u64 {
            // Twelve bans, two on each target (a ban's id names one target for its life).
            let i = rng.random_range(0..12);
            let id = format!("b{i}");
            let kind = match rng.random_range(0..20) {
                0 => Kind::Snapshot(pb::StateSnapshot {
                    bans: list.values().cloned().collect(),
                    ..Default::default()
                }),
                1..=7 => match list.remove(&id) {
                    Some(b) => Kind::BanRemoved(b),
                    None => continue,
                },
                _ => {
                    let site = ["", "s", "elsewhere"][rng.random_range(0..3)];
                    let expires = [0, 5_000, 9_000][rng.random_range(0..3)];
                    let target = targets[i % targets.len()].clone();
                    let b = pb::Ban {
                        scope_site: site.into(),
                        ..pb_ban(&id, target, expires)
                    };
                    list.insert(id, b.clone());
                    Kind::BanPut(b)
                }
            };
            apply(
                &state,
                "s",
                0,
                &pb::WatchEvent {
                    revision,
                    kind: Some(kind),
                },
            );
            state.bans.apply(0);
            let identity = state.identity.load();
            for t in &targets {
                let end = list
                    .values()
                    .filter(|b| in_scope(b, "s"))
                    .filter(|b| b.target.as_ref().and_then(|x| x.target.as_ref()) == Some(t))
                    .map(|b| {
                        if b.expires_unix_ms == 0 {
                            NEVER
                        } else {
                            b.expires_unix_ms as u64
                        }
                    })
                    .max();
                let at = |now| match t {
                    Target::Ip(_) => state.bans.lookup([192, 0, 2, 1].into(), now).is_some(),
                    Target::Cidr(_) => state.bans.lookup([198, 51, 100, 77].into(), now).is_some(),
                    Target::Aor(a) => identity.aor(&aor_key(a), now).is_some(),
                    Target::UserAgent(u) => identity.user_agent(&format!("x {u} y"), now).is_some(),
                };
                let held = at(0);
                assert_eq!(held, end.is_some(), "revision {revision}: {t:?}");
                if let Some(end) = end.filter(|&e| e != NEVER) {
                    assert!(
                        at(end - 1) && !at(end),
                        "revision {revision}: {t:?} ends at {end}"
                    );
                }
            }
        }
    }

    /// A link to a "controller" that takes connections and never answers.
    async fn silent_controller() -> (Arc<Link>, Arc<Metrics>) {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                held.push(s);
            }
        });
        link_to(addr)
    }

    /// A link to a controller at `addr`, and its metrics.
    fn link_to(addr: std::net::SocketAddr) -> (Arc<Link>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::default());
        let cfg = Controller {
            endpoints: vec![addr.to_string()],
            secret: "s".into(),
            ..Default::default()
        };
        let link = Link::new(
            cfg,
            "e1".into(),
            "s".into(),
            String::new(),
            Default::default(),
            metrics.clone(),
        )
        .map(Arc::new)
        .unwrap();
        (link, metrics)
    }

    /// A controller that takes the connection and never answers: the reports that come meanwhile
    /// wait in the uplink's queue, none refused by the channel in front of it (eight here), none
    /// shed. (Before, the uplink read the channel only between calls: one report was queued and
    /// the rest refused.)
    #[tokio::test]
    async fn a_controller_that_never_answers_loses_no_report() {
        let (link, metrics) = silent_controller().await;
        reports_all_queued(link, metrics).await;
    }

    /// No controller at all (the port refuses): the reports that come while the uplink waits to
    /// try again are queued too.
    #[tokio::test]
    async fn with_no_controller_up_no_report_is_lost() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let (link, metrics) = link_to(addr);
        reports_all_queued(link, metrics).await;
    }

    /// Reports 1,000 registrations' ends through a channel of eight and checks that the uplink
    /// (which cannot deliver them) queued them all, none refused or shed.
    async fn reports_all_queued(link: Arc<Link>, metrics: Arc<Metrics>) {
        let state = State::new(Arc::new(crate::bans::BanStore::new(None, 10)));
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        state.set_uplink(tx, metrics.reports_dropped.clone());
        let stop = CancellationToken::new();
        let task = tokio::spawn(uplink(link, rx, stop.clone()));
        for i in 0..1_000 {
            state.report(Report::Unbind {
                aor: format!("sip:{i}@pbx"),
                contact: "c".into(),
            });
            tokio::task::yield_now().await;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while metrics.reports_queued.get() < 1_000 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(metrics.reports_queued.get(), 1_000, "every report queued");
        assert_eq!(metrics.reports_dropped.get(), 0, "none refused or shed");
        stop.cancel();
        task.await.unwrap();
    }

    /// The same controller, for the counter pushes: a push that gets no answer is given up after
    /// `CALL_TIMEOUT` and counted as failed (its counts pending again), not waited on for ever.
    #[tokio::test]
    async fn a_counter_push_without_an_answer_is_given_up() {
        let (link, metrics) = silent_controller().await;
        let state = Arc::new(State::new(Arc::new(crate::bans::BanStore::new(None, 10))));
        let stop = CancellationToken::new();
        let task = tokio::spawn(push_counters(link, state, Clock::system(), stop.clone()));
        let failed = || {
            metrics
                .limit_pushes
                .get_or_create(&crate::metrics::ReasonLabels { reason: "error" })
                .get()
        };
        let deadline = tokio::time::Instant::now() + CALL_TIMEOUT + Duration::from_secs(3);
        while failed() == 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(failed() >= 1, "the unanswered push was given up");
        stop.cancel();
        task.await.unwrap();
    }

    fn pb_binding(aor: &str, contact: &str, source: &str, site: &str) -> pb::Binding {
        pb::Binding {
            aor: aor.into(),
            contact: contact.into(),
            source: source.into(),
            transport: "udp".into(),
            edge_id: "other".into(),
            flow_token: String::new(),
            expires_unix_ms: 60_000,
            user_agent: String::new(),
            site: site.into(),
        }
    }

    #[test]
    fn bindings_of_the_site_make_their_sources_registered() {
        let state = State::new(Arc::new(crate::bans::BanStore::new(None, 10)));
        let ev = |revision, kind| pb::WatchEvent {
            revision,
            kind: Some(kind),
        };
        let a: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        let b: std::net::IpAddr = "192.0.2.2".parse().unwrap();
        let snap = pb::StateSnapshot {
            bindings: vec![
                pb_binding("sip:1001@pbx", "sip:1001@10.0.0.1", "192.0.2.1:5060", "s"),
                pb_binding(
                    "sip:1002@pbx",
                    "sip:1002@10.0.0.2",
                    "192.0.2.2:5060",
                    "elsewhere",
                ),
            ],
            ..Default::default()
        };
        apply(&state, "s", 0, &ev(1, Kind::Snapshot(snap)));
        assert!(state.bindings.live(a, 1));
        assert!(!state.bindings.live(b, 1), "another site's binding");
        assert!(!state.bindings.live(a, 60_000), "expiry kept");
        // The phone moved to another address: the old one is no longer registered.
        apply(
            &state,
            "s",
            0,
            &ev(
                2,
                Kind::BindingPut(pb_binding(
                    "sip:1001@pbx",
                    "sip:1001@10.0.0.1",
                    "192.0.2.2:5060",
                    "s",
                )),
            ),
        );
        assert!(!state.bindings.live(a, 1));
        assert!(state.bindings.live(b, 1));
        apply(
            &state,
            "s",
            0,
            &ev(
                3,
                Kind::BindingRemoved(pb::BindingKey {
                    aor: "sip:1001@pbx".into(),
                    contact: "sip:1001@10.0.0.1".into(),
                }),
            ),
        );
        assert!(!state.bindings.live(b, 1));
        // A local registration is not touched by a snapshot replacing the cluster's.
        state.bindings.set(a, "1003@pbx".into(), 10_000, 0);
        apply(&state, "s", 0, &ev(4, Kind::Snapshot(Default::default())));
        assert!(state.bindings.live(a, 1));
    }
}
