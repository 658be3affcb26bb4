//! The controller's Prometheus metrics (`sipwarden_controller_…`) on `/metrics`: Raft (term,
//! leader, commit and applied index), the replicated state (revision, bans by source kind,
//! registrations, edges), each watching edge's lag, edge RPCs, admin requests, and the counter
//! store's latency. State and Raft gauges are read at scrape time; the rest is counted as it
//! happens. Labels stay low-cardinality (edge ids, RPC names, status codes).

use crate::raft::node::Handle;
use prometheus_client::encoding::{text::encode, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// `manual`, `auto` or `feed`.
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EdgeLabels {
    pub edge: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub rpc: &'static str,
    /// `ok` or the gRPC code's name.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    /// `memory` or `redis`.
    pub store: &'static str,
}

/// Every metric the controller exports.
pub struct Metrics {
    registry: Registry,
    term: Gauge,
    leader: Gauge,
    is_leader: Gauge,
    commit: Gauge,
    applied: Gauge,
    revision: Gauge,
    bans: Family<SourceLabels, Gauge>,
    registrations: Gauge,
    edges_known: Gauge,
    pub edges_watching: Gauge,
    pub watch_lag: Family<EdgeLabels, Gauge>,
    pub edge_rpcs: Family<RpcLabels, Counter>,
    pub admin_requests: Family<HttpLabels, Counter>,
    pub limit_store: Family<StoreLabels, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::with_prefix("sipwarden_controller");
        macro_rules! reg {
            ($name:literal, $help:literal, $m:expr) => {{
                let m = $m;
                r.register($name, $help, m.clone());
                m
            }};
        }
        let term = reg!("raft_term", "Current Raft term", Gauge::default());
        let leader = reg!(
            "raft_leader",
            "Id of the leader this node knows (0: none)",
            Gauge::default()
        );
        let is_leader = reg!(
            "raft_is_leader",
            "1 when this node is the leader",
            Gauge::default()
        );
        let commit = reg!(
            "raft_commit_index",
            "Highest log index known committed",
            Gauge::default()
        );
        let applied = reg!(
            "raft_applied_index",
            "Highest log index applied to the state",
            Gauge::default()
        );
        let revision = reg!(
            "state_revision",
            "Revision of the replicated state",
            Gauge::default()
        );
        let bans = reg!(
            "bans_active",
            "Bans in the replicated state, by source kind",
            Family::<SourceLabels, Gauge>::default()
        );
        let registrations = reg!(
            "registrations_active",
            "Registration bindings in the replicated state",
            Gauge::default()
        );
        let edges_known = reg!(
            "edges_known",
            "Edges recorded in the replicated state",
            Gauge::default()
        );
        let edges_watching = reg!(
            "edges_watching",
            "Edges with a watch stream open on this node",
            Gauge::default()
        );
        let watch_lag = reg!(
            "watch_lag_revisions",
            "Revisions a watching edge is behind this node's state",
            Family::<EdgeLabels, Gauge>::default()
        );
        let edge_rpcs = reg!(
            "edge_rpcs",
            "Calls from edges, by RPC and result",
            Family::<RpcLabels, Counter>::default()
        );
        let admin_requests = reg!(
            "admin_requests",
            "REST admin requests, by method and status",
            Family::<HttpLabels, Counter>::default()
        );
        let limit_store = reg!(
            "limit_store_seconds",
            "Time to add one push of counter increments in the store",
            Family::<StoreLabels, Histogram>::new_with_constructor(|| Histogram::new(
                [0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5].into_iter()
            ))
        );
        Metrics {
            registry: r,
            term,
            leader,
            is_leader,
            commit,
            applied,
            revision,
            bans,
            registrations,
            edges_known,
            edges_watching,
            watch_lag,
            edge_rpcs,
            admin_requests,
            limit_store,
        }
    }
}

fn g(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Metrics {
    /// Reads Raft and state gauges from `handle`, then encodes everything as Prometheus text.
    pub fn encode(&self, handle: &Handle) -> String {
        let st = handle.status.borrow().clone();
        self.term.set(g(st.term));
        self.leader.set(g(st.leader));
        self.is_leader
            .set(i64::from(st.leader != 0 && st.leader == st.id));
        self.commit.set(g(st.commit));
        self.applied.set(g(st.applied));
        let (revision, by_source, registrations, edges) = handle.read(|s| {
            (
                s.revision(),
                s.ban_counts(),
                s.binding_count(),
                s.edges().count(),
            )
        });
        self.revision.set(g(revision));
        for (i, source) in ["manual", "auto", "feed"].into_iter().enumerate() {
            self.bans
                .get_or_create(&SourceLabels { source })
                .set(by_source[i] as i64);
        }
        self.registrations.set(registrations as i64);
        self.edges_known.set(edges as i64);
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        sipwarden_shared::promtext::to_prometheus_text(&out)
    }

    /// Counts one edge RPC.
    pub fn rpc<T>(&self, rpc: &'static str, r: &Result<T, tonic::Status>) {
        let result = match r {
            Ok(_) => "ok",
            Err(s) => code_name(s.code()),
        };
        self.edge_rpcs
            .get_or_create(&RpcLabels { rpc, result })
            .inc();
    }
}

fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match c {
        Ok => "ok",
        InvalidArgument => "invalid_argument",
        Unauthenticated => "unauthenticated",
        PermissionDenied => "permission_denied",
        FailedPrecondition => "failed_precondition",
        Unavailable => "unavailable",
        NotFound => "not_found",
        DeadlineExceeded => "deadline_exceeded",
        _ => "other",
    }
}
