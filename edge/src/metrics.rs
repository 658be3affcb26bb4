//! The edge's Prometheus metrics (`sipwarden_edge_…`), registered once and encoded as text for
//! `/metrics`. Labels stay low-cardinality: methods outside the standard set count as `other`.

use prometheus_client::encoding::NoLabelSet;
use prometheus_client::encoding::{text::encode, EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge, MetricType};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MessageLabels {
    /// `request` or `response`.
    pub kind: &'static str,
    /// Request method, or the CSeq method of a response; `unknown` when unparseable.
    pub method: &'static str,
    /// `from_internet` or `from_pbx`.
    pub direction: &'static str,
    /// `forwarded`, `replied`, `dropped` or `malformed`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OriginLabels {
    /// Where a ban came from: `config`, `auto`, `manual` or `cluster`.
    pub origin: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabels {
    pub transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecurityLabels {
    /// The rule that fired (`scanner`, `flood`, `tollfraud.prefix`, …).
    pub rule: &'static str,
    /// `alert`, `reject`, `drop` or `ban`.
    pub action: &'static str,
    /// `true` when the rule is in dry-run and the action was not taken.
    pub dry_run: &'static str,
}

/// Every metric the edge exports.
pub struct Metrics {
    registry: Registry,
    pub messages: Family<MessageLabels, Counter>,
    pub backend_up: Family<BackendLabels, Gauge>,
    pub tcp_connections: Gauge,
    pub tcp_refused: Family<ReasonLabels, Counter>,
    pub send_errors: Family<TransportLabels, Counter>,
    pub security_events: Family<SecurityLabels, Counter>,
    pub bans_active: Family<OriginLabels, Gauge>,
    pub registrations_active: Gauge,
    pub shielded_sources: Gauge,
    pub policy_reloads: Family<ReasonLabels, Counter>,
    pub controller_connected: Gauge,
    pub watch_revision: Gauge,
    pub cluster_limits: Gauge,
    pub peer_edges: Gauge,
    pub limit_pushes: Family<ReasonLabels, Counter>,
    pub reports_queued: Gauge,
    pub reports_dropped: Counter,
    pub udp_delay: Delay,
    pub udp_spread: Gauge,
    pub udp_steering: Counter,
    pub udp_joined: Gauge,
    pub udp_busy: Counter<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sipwarden_edge");
        let messages = Family::<MessageLabels, Counter>::default();
        registry.register(
            "messages",
            "SIP messages handled, by kind, method, direction and outcome",
            messages.clone(),
        );
        let backend_up = Family::<BackendLabels, Gauge>::default();
        registry.register(
            "backend_up",
            "1 when the PBX backend answers OPTIONS health checks",
            backend_up.clone(),
        );
        let tcp_connections = Gauge::default();
        registry.register(
            "tcp_connections",
            "Open SIP TCP connections",
            tcp_connections.clone(),
        );
        let tcp_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "tcp_closed",
            "TCP connections refused or closed by the edge, by reason",
            tcp_refused.clone(),
        );
        let send_errors = Family::<TransportLabels, Counter>::default();
        registry.register(
            "send_errors",
            "Messages that could not be sent, by transport",
            send_errors.clone(),
        );
        let security_events = Family::<SecurityLabels, Counter>::default();
        registry.register(
            "security_events",
            "Non-allow verdicts of the threat pipeline, by rule, action and dry-run",
            security_events.clone(),
        );
        let bans_active = Family::<OriginLabels, Gauge>::default();
        registry.register(
            "bans_active",
            "Networks in the ban set in force",
            bans_active.clone(),
        );
        let shielded_sources = Gauge::default();
        registry.register(
            "shielded_sources",
            "Banned sources dropped in the kernel by the shield's socket filter (not counted per message)",
            shielded_sources.clone(),
        );
        let registrations_active = Gauge::default();
        registry.register(
            "registrations_active",
            "Source addresses with a live registration through this edge",
            registrations_active.clone(),
        );
        let policy_reloads = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "policy_reloads",
            "Policy reload attempts, by result (`ok` or `error`)",
            policy_reloads.clone(),
        );
        let controller_connected = Gauge::default();
        registry.register(
            "controller_connected",
            "1 while a watch stream to a controller is open",
            controller_connected.clone(),
        );
        let watch_revision = Gauge::default();
        registry.register(
            "watch_revision",
            "The cluster revision this edge has applied",
            watch_revision.clone(),
        );
        let cluster_limits = Gauge::default();
        registry.register(
            "cluster_limits",
            "Cluster-wide rate limits in force (as the controllers last said)",
            cluster_limits.clone(),
        );
        let peer_edges = Gauge::default();
        registry.register(
            "peer_edges",
            "Other edges known from the controllers (relay targets, PBX side)",
            peer_edges.clone(),
        );
        let limit_pushes = Family::default();
        registry.register(
            "limit_pushes",
            "Pushes of counter increments to the controllers, by result (`ok`, `redirected`, `error`)",
            limit_pushes.clone(),
        );
        let reports_queued = Gauge::default();
        registry.register(
            "reports_queued",
            "Auto-bans waiting to be proposed to the controllers",
            reports_queued.clone(),
        );
        let reports_dropped = Counter::default();
        registry.register(
            "reports_dropped",
            "Reports (auto-bans, registrations) dropped from a full queue for the controllers",
            reports_dropped.clone(),
        );
        let udp_delay = Delay::default();
        registry.register(
            "udp_delay_seconds",
            "UDP datagrams: time from the kernel's receipt to the send of what the edge made of \
             them (waiting for a receive thread, then handling)",
            udp_delay.clone(),
        );
        let udp_spread = Gauge::default();
        registry.register(
            "udp_listeners_spread",
            "UDP listeners whose flows the kernel spreads over all their sockets (the others send \
             every flow to their first socket while its threads keep up)",
            udp_spread.clone(),
        );
        let udp_steering = Counter::default();
        registry.register(
            "udp_steering_changes",
            "Times a UDP listener's flows moved between one socket and all of them",
            udp_steering.clone(),
        );
        let udp_joined = Gauge::default();
        registry.register(
            "udp_listeners_joined",
            "UDP listeners whose second socket's threads also wait on the first socket, which has \
             every flow, because its datagrams were held past udp.hold_target_us",
            udp_joined.clone(),
        );
        let udp_busy = Counter::<f64, AtomicU64>::default();
        registry.register(
            "udp_busy_seconds",
            "Time the UDP receive threads spent handling datagrams (from a batch's receipt to its \
             send); its rate is the cores they keep busy",
            udp_busy.clone(),
        );
        Metrics {
            registry,
            udp_delay,
            udp_spread,
            udp_steering,
            udp_joined,
            udp_busy,
            reports_queued,
            reports_dropped,
            controller_connected,
            watch_revision,
            cluster_limits,
            peer_edges,
            limit_pushes,
            security_events,
            bans_active,
            registrations_active,
            shielded_sources,
            policy_reloads,
            messages,
            backend_up,
            tcp_connections,
            tcp_refused,
            send_errors,
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        sipwarden_shared::promtext::to_prometheus_text(&out)
    }
}

/// Upper bounds of [`Delay`]'s buckets, µs; a last bucket holds the rest.
pub const DELAY_BOUNDS_US: [u64; 12] = [
    25, 50, 100, 250, 500, 750, 1_000, 1_500, 2_500, 5_000, 10_000, 100_000,
];

/// A latency histogram filled in bulk: a receive thread counts its batch's datagrams in a
/// [`DelayTally`] of its own and adds it here once per batch (a few atomic additions), where
/// `prometheus_client`'s histogram takes a lock per observation.
#[derive(Clone, Debug, Default)]
pub struct Delay(Arc<DelayInner>);

#[derive(Debug, Default)]
struct DelayInner {
    buckets: [AtomicU64; DELAY_BOUNDS_US.len() + 1],
    sum_ns: AtomicU64,
}

/// One thread's delays not yet added to a [`Delay`].
#[derive(Debug, Default)]
pub struct DelayTally {
    buckets: [u64; DELAY_BOUNDS_US.len() + 1],
    sum_ns: u64,
}

impl DelayTally {
    pub fn record(&mut self, ns: u64) {
        let i = DELAY_BOUNDS_US.partition_point(|&b| b * 1_000 < ns);
        self.buckets[i] += 1;
        self.sum_ns = self.sum_ns.saturating_add(ns);
    }
}

impl Delay {
    /// Adds `tally` and empties it.
    pub fn add(&self, tally: &mut DelayTally) {
        for (shared, n) in self.0.buckets.iter().zip(tally.buckets.iter_mut()) {
            if *n > 0 {
                shared.fetch_add(std::mem::take(n), Ordering::Relaxed);
            }
        }
        if tally.sum_ns > 0 {
            self.0
                .sum_ns
                .fetch_add(std::mem::take(&mut tally.sum_ns), Ordering::Relaxed);
        }
    }

    /// Count, sum in seconds and per-bucket (upper bound in seconds, count) — not cumulative.
    pub fn get(&self) -> (u64, f64, Vec<(f64, u64)>) {
        let bounds = DELAY_BOUNDS_US
            .iter()
            .map(|&us| us as f64 / 1e6)
            .chain(std::iter::once(f64::MAX));
        let buckets: Vec<(f64, u64)> = bounds
            .zip(self.0.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.0.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        (count, sum, buckets)
    }
}

impl EncodeMetric for Delay {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (count, sum, buckets) = self.get();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// A method name as a bounded label value.
/// Methods counted under their own name; the rest are `other`.
const KNOWN: &[&str] = &[
    "INVITE",
    "ACK",
    "BYE",
    "CANCEL",
    "REGISTER",
    "OPTIONS",
    "SUBSCRIBE",
    "NOTIFY",
    "REFER",
    "INFO",
    "UPDATE",
    "PRACK",
    "MESSAGE",
    "PUBLISH",
];

pub fn method_label(method: &str) -> &'static str {
    KNOWN
        .iter()
        .find(|k| **k == method)
        .copied()
        .unwrap_or("other")
}

/// The message counters of [`Metrics::messages`], each looked up in the family once and then
/// kept: counting a message is one atomic add instead of hashing its label set under the family's
/// lock (a visible share of the cost of a gate drop).
pub struct MessageCounters {
    family: Family<MessageLabels, Counter>,
    slots: Vec<std::sync::OnceLock<Counter>>,
}

impl MessageCounters {
    const KINDS: [&'static str; 2] = ["request", "response"];
    const DIRECTIONS: [&'static str; 2] = ["from_internet", "from_pbx"];
    const OUTCOMES: [&'static str; 4] = ["forwarded", "replied", "dropped", "malformed"];
    /// `KNOWN`, then `other` and `unknown`.
    const METHODS: usize = KNOWN.len() + 2;

    pub fn new(family: Family<MessageLabels, Counter>) -> MessageCounters {
        let n = Self::KINDS.len() * Self::METHODS * Self::DIRECTIONS.len() * Self::OUTCOMES.len();
        MessageCounters {
            family,
            slots: (0..n).map(|_| std::sync::OnceLock::new()).collect(),
        }
    }

    fn slot(l: &MessageLabels) -> Option<usize> {
        let kind = Self::KINDS.iter().position(|k| *k == l.kind)?;
        let method = match l.method {
            "other" => KNOWN.len(),
            "unknown" => KNOWN.len() + 1,
            m => KNOWN.iter().position(|k| *k == m)?,
        };
        let dir = Self::DIRECTIONS.iter().position(|d| *d == l.direction)?;
        let out = Self::OUTCOMES.iter().position(|o| *o == l.outcome)?;
        Some(
            ((kind * Self::METHODS + method) * Self::DIRECTIONS.len() + dir) * Self::OUTCOMES.len()
                + out,
        )
    }

    /// Counts one message under `labels`.
    pub fn inc(&self, labels: &MessageLabels) {
        match Self::slot(labels) {
            Some(i) => {
                self.slots[i]
                    .get_or_init(|| self.family.get_or_create(labels).clone())
                    .inc();
            }
            None => {
                self.family.get_or_create(labels).inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_counters_are_the_family_series() {
        let m = Metrics::default();
        let c = MessageCounters::new(m.messages.clone());
        let l = |method, outcome| MessageLabels {
            kind: "request",
            method,
            direction: "from_internet",
            outcome,
        };
        c.inc(&l("OPTIONS", "dropped"));
        c.inc(&l("OPTIONS", "dropped"));
        c.inc(&l("unknown", "malformed"));
        c.inc(&l("WEIRD", "forwarded"));
        assert_eq!(m.messages.get_or_create(&l("OPTIONS", "dropped")).get(), 2);
        assert_eq!(
            m.messages.get_or_create(&l("unknown", "malformed")).get(),
            1
        );
        assert_eq!(m.messages.get_or_create(&l("WEIRD", "forwarded")).get(), 1);
        assert_eq!(m.messages.get_or_create(&l("INVITE", "dropped")).get(), 0);
    }

    #[test]
    fn encodes_labelled_counters() {
        let m = Metrics::default();
        m.messages
            .get_or_create(&MessageLabels {
                kind: "request",
                method: method_label("INVITE"),
                direction: "from_internet",
                outcome: "forwarded",
            })
            .inc();
        let text = m.encode();
        assert!(text.contains(
            r#"sipwarden_edge_messages_total{kind="request",method="INVITE",direction="from_internet",outcome="forwarded"} 1"#
        ), "{text}");
        assert_eq!(method_label("FOO"), "other");
    }

    #[test]
    fn delays_land_in_their_buckets_and_encode_cumulatively() {
        let m = Metrics::default();
        let mut t = DelayTally::default();
        for ns in [10_000, 25_000, 25_001, 700_000, 3_000_000_000] {
            t.record(ns);
        }
        m.udp_delay.add(&mut t);
        // The tally is emptied: adding it again changes nothing.
        m.udp_delay.add(&mut t);
        let (count, sum, buckets) = m.udp_delay.get();
        assert_eq!(count, 5);
        assert!((sum - 3.000_760_001).abs() < 1e-9, "{sum}");
        // A bound is inclusive: 10 and 25 µs are at most 25 µs, 25.001 µs is not; 700 µs is at
        // most 750 µs; 3 s is past every bound.
        assert_eq!(buckets[0], (25e-6, 2));
        assert_eq!(buckets[1], (50e-6, 1));
        assert_eq!(buckets[5], (750e-6, 1));
        assert_eq!(buckets[DELAY_BOUNDS_US.len()].1, 1);
        let text = m.encode();
        for line in [
            r#"sipwarden_edge_udp_delay_seconds_bucket{le="0.000025"} 2"#,
            r#"sipwarden_edge_udp_delay_seconds_bucket{le="0.00005"} 3"#,
            r#"sipwarden_edge_udp_delay_seconds_bucket{le="0.0005"} 3"#,
            r#"sipwarden_edge_udp_delay_seconds_bucket{le="0.00075"} 4"#,
            r#"sipwarden_edge_udp_delay_seconds_bucket{le="+Inf"} 5"#,
            "sipwarden_edge_udp_delay_seconds_count 5",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }
}
