//! The edge-facing service (`sipwarden.v1.EdgeControl`): the watch stream — an edge says which
//! revision it has and gets a snapshot when it has none or fell behind the change window, then
//! every committed change in revision order — and security-event reports. Edges authenticate with
//! the edge secret.

use crate::api::auth::{Caller, Role};
use crate::api::core::{Api, BanIn, TargetIn};
use crate::api::grpc::ban_in;
use crate::counters::Counters;
use crate::metrics::{EdgeLabels, Metrics};
use crate::raft::grpc::authorized;
use crate::raft::node::Handle;
use crate::state::{Change, EdgeInfo, Op, StateMachine};
use sipwarden_proto::v1 as pb;
use sipwarden_proto::v1::edge_control_server::EdgeControl;
use sipwarden_shared::ban::Binding;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tracing::{debug, info};

/// Events buffered per watcher before the stream applies back-pressure.
const BUFFER: usize = 1024;

/// The `EdgeControl` service.
pub struct EdgeService {
    pub handle: Handle,
    /// The secret edges present; empty refuses every edge.
    pub secret: Arc<str>,
    /// Where edges' auto-bans are validated and proposed.
    pub api: Api,
    /// Cluster-wide rate limits and their counts.
    pub counters: Arc<Counters>,
}

/// The metadata key a follower names the leader's gRPC address in.
pub const LEADER_HINT: &str = "x-sipwarden-leader";

/// Most bans one edge may propose in one call.
const MAX_PROPOSED: usize = 1000;

fn ban_event(revision: u64, c: &Change) -> pb::WatchEvent {
    use pb::watch_event::Kind;
    let kind = match c {
        Change::BanPut(b) => Kind::BanPut(b.into()),
        Change::BanRemoved(b) => Kind::BanRemoved(b.into()),
        Change::BindingPut(b) => Kind::BindingPut(b.into()),
        Change::BindingRemoved { aor, contact } => Kind::BindingRemoved(pb::BindingKey {
            aor: aor.clone(),
            contact: contact.clone(),
        }),
        Change::PolicyPut { name, version } => Kind::Policy(pb::PolicyVersion {
            name: name.clone(),
            version: *version,
            body: String::new(),
        }),
        Change::EdgePut(e) => Kind::EdgePut(edge_info(e)),
    };
    pb::WatchEvent {
        revision,
        kind: Some(kind),
    }
}

fn edge_info(e: &EdgeInfo) -> pb::EdgeInfo {
    pb::EdgeInfo {
        id: e.id.clone(),
        site: e.site.clone(),
        relay: e.relay.clone(),
    }
}

/// A snapshot event of `s`.
pub fn snapshot_event(s: &StateMachine) -> pb::WatchEvent {
    let policies = s
        .policies()
        .map(|(name, p)| pb::PolicyVersion {
            name: name.clone(),
            version: p.version,
            body: p.body.clone(),
        })
        .collect();
    pb::WatchEvent {
        revision: s.revision(),
        kind: Some(pb::watch_event::Kind::Snapshot(pb::StateSnapshot {
            bans: s.bans().map(pb::Ban::from).collect(),
            bindings: s.bindings().map(pb::Binding::from).collect(),
            policies,
            edges: s.edges().map(edge_info).collect(),
        })),
    }
}

/// What to send a watcher that has `revision`: a snapshot or the deltas after it.
pub fn catch_up(s: &StateMachine, revision: u64) -> Vec<pb::WatchEvent> {
    if revision == 0 || revision > s.revision() {
        return vec![snapshot_event(s)];
    }
    match s.changes_since(revision) {
        Some(changes) => changes.iter().map(|(r, c)| ban_event(*r, c)).collect(),
        None => vec![snapshot_event(s)],
    }
}

/// An edge as the author of what it proposes (audit trail: `edge:<id>`), with an operator's
/// rights over what the edge service lets it propose.
fn edge_caller(id: &str) -> Caller {
    Caller {
        name: format!("edge:{id}"),
        role: Role::Operator,
    }
}

fn check_edge_id(id: &str) -> Result<(), tonic::Status> {
    if id.is_empty() || id.len() > 64 {
        return Err(tonic::Status::invalid_argument(
            "edge_id: 1 to 64 characters",
        ));
    }
    Ok(())
}

impl EdgeService {
    /// The request's body when it carries the edge secret.
    #[allow(clippy::result_large_err)]
    fn check<T>(&self, req: tonic::Request<T>) -> Result<T, tonic::Status> {
        if self.secret.is_empty() || !authorized(req.metadata(), &self.secret) {
            return Err(tonic::Status::unauthenticated(
                "edge secret missing or wrong",
            ));
        }
        Ok(req.into_inner())
    }
}

/// One open watch stream, in the metrics while it lasts.
struct Watching {
    metrics: Arc<Metrics>,
    edge: String,
}

impl Watching {
    fn new(metrics: Arc<Metrics>, edge: String) -> Watching {
        metrics.edges_watching.inc();
        Watching { metrics, edge }
    }

    fn lag(&self, revisions: u64) {
        self.metrics
            .watch_lag
            .get_or_create(&EdgeLabels {
                edge: self.edge.clone(),
            })
            .set(i64::try_from(revisions).unwrap_or(i64::MAX));
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.metrics.edges_watching.dec();
        self.metrics.watch_lag.remove(&EdgeLabels {
            edge: self.edge.clone(),
        });
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl EdgeControl for EdgeService {
    async fn propose_bans(
        &self,
        req: tonic::Request<pb::ProposeBansRequest>,
    ) -> Result<tonic::Response<pb::ProposeBansResponse>, tonic::Status> {
        let r = async move {
            let r = self.check(req)?;
            check_edge_id(&r.edge_id)?;
            if r.bans.len() > MAX_PROPOSED {
                return Err(tonic::Status::invalid_argument(format!(
                    "bans: at most {MAX_PROPOSED} per call"
                )));
            }
            let input = r
                .bans
                .iter()
                .enumerate()
                .map(|(i, s)| ban_in(s, i))
                .collect::<Result<Vec<_>, _>>()?;
            // Edges may only propose what their rules decide: auto bans with an expiry.
            if let Some(i) = input
                .iter()
                .position(|b| !b.source.as_deref().is_some_and(|s| s.starts_with("auto:")))
            {
                return Err(tonic::Status::invalid_argument(format!(
                    "bans[{i}].source: edges propose auto:<rule> bans only"
                )));
            }
            let who = edge_caller(&r.edge_id);
            self.api.add_bans(&who, &input, true).await?;
            Ok(tonic::Response::new(pb::ProposeBansResponse {
                revision: self.handle.read(|s| s.revision()),
            }))
        }
        .await;
        self.api.metrics.rpc("ProposeBans", &r);
        r
    }

    async fn put_bindings(
        &self,
        req: tonic::Request<pb::PutBindingsRequest>,
    ) -> Result<tonic::Response<pb::PutBindingsResponse>, tonic::Status> {
        let r = async move {
            let r = self.check(req)?;
            check_edge_id(&r.edge_id)?;
            // What an edge says about itself is forced onto its bindings.
            let put = r
                .put
                .iter()
                .map(|b| Binding {
                    edge_id: r.edge_id.clone(),
                    site: r.site.clone(),
                    ..Binding::from(b)
                })
                .collect();
            let removed = r.removed.into_iter().map(|k| (k.aor, k.contact)).collect();
            let who = edge_caller(&r.edge_id);
            self.api.put_bindings(&who, put, removed).await?;
            Ok(tonic::Response::new(pb::PutBindingsResponse {
                revision: self.handle.read(|s| s.revision()),
            }))
        }
        .await;
        self.api.metrics.rpc("PutBindings", &r);
        r
    }

    async fn push_counters(
        &self,
        req: tonic::Request<pb::PushCountersRequest>,
    ) -> Result<tonic::Response<pb::PushCountersResponse>, tonic::Status> {
        let r = async move {
            let r = self.check(req)?;
            check_edge_id(&r.edge_id)?;
            // Counts are summed in one place: the leader (whose store may be Redis, shared by all).
            let st = self.handle.status.borrow().clone();
            if st.leader != st.id {
                let mut s = tonic::Status::failed_precondition("not the leader");
                if let Some((_, addr)) = st.addresses.iter().find(|(id, _)| *id == st.leader) {
                    if let Ok(v) = addr.parse() {
                        s.metadata_mut().insert(LEADER_HINT, v);
                    }
                }
                return Err(s);
            }
            let c = &self.counters;
            let started = std::time::Instant::now();
            let out = c.push(&r.deltas, (self.api.clock)()).await;
            self.api
                .metrics
                .limit_store
                .get_or_create(&crate::metrics::StoreLabels {
                    store: c.store.kind(),
                })
                .observe(started.elapsed().as_secs_f64());
            let out = out?;
            if !out.to_ban.is_empty() {
                // The push is answered now; the ban goes through Raft behind it.
                let api = self.api.clone();
                let who = edge_caller(&r.edge_id);
                let bans: Vec<BanIn> = out
                    .to_ban
                    .iter()
                    .map(|(limit, ip, ttl)| BanIn {
                        target: Some(TargetIn {
                            kind: "ip".into(),
                            value: ip.clone(),
                        }),
                        reason: format!("over the cluster-wide limit {limit}"),
                        ttl_s: i64::try_from(*ttl).ok(),
                        source: Some(format!("auto:limit-{limit}")),
                        ..Default::default()
                    })
                    .collect();
                tokio::spawn(async move {
                    if let Err(e) = api.add_bans(&who, &bans, true).await {
                        tracing::warn!(error = %e, "banning sources over a cluster limit failed");
                    }
                });
            }
            let changed = r.limits_version != c.version;
            Ok(tonic::Response::new(pb::PushCountersResponse {
                limits_version: c.version,
                limits: if changed { c.defs() } else { Vec::new() },
                limits_changed: changed,
                sums: out.sums,
                over: c.over(),
            }))
        }
        .await;
        self.api.metrics.rpc("PushCounters", &r);
        r
    }

    async fn report(
        &self,
        req: tonic::Request<pb::ReportRequest>,
    ) -> Result<tonic::Response<pb::ReportResponse>, tonic::Status> {
        let r = async move {
            let r = self.check(req)?;
            debug!(edge = %r.edge_id, events = r.events.len(), "security events reported");
            Ok(tonic::Response::new(pb::ReportResponse {
                accepted: r.events.len() as u64,
            }))
        }
        .await;
        self.api.metrics.rpc("Report", &r);
        r
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: tonic::Request<pb::EdgeHello>,
    ) -> Result<tonic::Response<WatchStream>, tonic::Status> {
        let r = async move {
            let hello = self.check(req)?;
            check_edge_id(&hello.edge_id)?;
            if hello.site.len() > 64 {
                return Err(tonic::Status::invalid_argument(
                    "site: at most 64 characters",
                ));
            }
            if !hello.relay.is_empty() && hello.relay.parse::<std::net::SocketAddr>().is_err() {
                return Err(tonic::Status::invalid_argument(format!(
                    "relay: {:?} is not ip:port",
                    hello.relay
                )));
            }
            info!(edge = %hello.edge_id, site = %hello.site, revision = hello.revision, relay = %hello.relay, "edge watching");
            // Where the edge relays is recorded (through Raft) when it is new or changed.
            let me = EdgeInfo {
                id: hello.edge_id.clone(),
                site: hello.site.clone(),
                relay: hello.relay.clone(),
            };
            if !me.relay.is_empty() && self.handle.read(|s| s.edge(&me.id) != Some(&me)) {
                let api = self.api.clone();
                tokio::spawn(async move {
                    let who = edge_caller(&me.id);
                    if let Err(e) = api.propose_op(&who, Op::PutEdge(me)).await {
                        tracing::warn!(error = %e, "recording an edge's relay address failed");
                    }
                });
            }
            let (tx, rx) = mpsc::channel(BUFFER);
            let handle = self.handle.clone();
            let watching = Watching::new(self.api.metrics.clone(), hello.edge_id.clone());
            tokio::spawn(async move {
                let mut have = hello.revision;
                let mut first = true;
                let mut status = handle.status.clone();
                loop {
                    // After the first answer, an edge at the current revision needs nothing (even at
                    // revision 0, which would otherwise ask for a snapshot again).
                    let events = handle.read(|s| {
                        if !first && have == s.revision() {
                            Vec::new()
                        } else {
                            catch_up(s, have)
                        }
                    });
                    first = false;
                    for e in events {
                        have = e.revision;
                        if tx.send(Ok(e)).await.is_err() {
                            return;
                        }
                    }
                    watching.lag(handle.read(|s| s.revision()).saturating_sub(have));
                    // Wait for the next applied change (or the edge going away).
                    tokio::select! {
                        r = status.changed() => if r.is_err() { return },
                        _ = tx.closed() => return,
                    }
                }
            });
            let stream: WatchStream = Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx));
            Ok(tonic::Response::new(stream))
        }
        .await;
        self.api.metrics.rpc("Watch", &r);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{BanSelector, Command, NewBan, Op};
    use sipwarden_shared::ban::{BanSource, BanTarget};

    fn add(s: &mut StateMachine, ip: &str) {
        s.apply(&Command {
            at_unix_ms: 1,
            who: "t".into(),
            op: Op::AddBans(vec![NewBan {
                target: BanTarget::parse("ip", ip).unwrap(),
                reason: String::new(),
                source: BanSource::Manual,
                expires_unix_ms: None,
                site: None,
            }]),
        });
    }

    #[test]
    fn snapshot_first_then_deltas_and_a_snapshot_when_too_far_behind() {
        let mut s = StateMachine::new();
        add(&mut s, "192.0.2.1");
        add(&mut s, "192.0.2.2");
        let first = catch_up(&s, 0);
        assert_eq!(first.len(), 1);
        assert!(
            matches!(&first[0].kind, Some(pb::watch_event::Kind::Snapshot(snap)) if snap.bans.len() == 2)
        );
        assert_eq!(first[0].revision, 2);
        s.apply(&Command {
            at_unix_ms: 2,
            who: "t".into(),
            op: Op::RemoveBans(vec![BanSelector::Id("b1".into())]),
        });
        let d = catch_up(&s, 2);
        assert_eq!(d.len(), 1);
        assert!(matches!(&d[0].kind, Some(pb::watch_event::Kind::BanRemoved(b)) if b.id == "b1"));
        assert!(catch_up(&s, 3).is_empty(), "up to date");
        // A revision from the future (another cluster, a wiped store) gets a snapshot.
        assert!(matches!(
            catch_up(&s, 99)[0].kind,
            Some(pb::watch_event::Kind::Snapshot(_))
        ));
        // After a restore the window starts at the snapshot.
        let r = StateMachine::restore(&s.snapshot()).unwrap();
        assert!(matches!(
            catch_up(&r, 1)[0].kind,
            Some(pb::watch_event::Kind::Snapshot(_))
        ));
    }
}
