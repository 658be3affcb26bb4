//! [`EventSink`]: turns a [`Finding`] into its security event — a counter on `/metrics`
//! (`sipwarden_edge_security_events_total{rule,action,dry_run}`, every event counted) and one JSON
//! line on the `security` log target — the event as JSON text after the usual prefix with
//! `log.format = "text"`, the event's fields as the line's own fields with `"json"` — emitted
//! inside the message's span so it is also an event of that span. Log lines are capped per second (a flood of banned packets must not become a flood of
//! log lines); the next line written says how many were suppressed.

use super::{Finding, Meta, SipView};
use crate::metrics::{Metrics, SecurityLabels};
use sipwarden_shared::event::SecurityEvent;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Where security events go.
pub struct EventSink {
    edge: String,
    site: String,
    metrics: Arc<Metrics>,
    /// Unix second and lines written in it, packed as `second << 20 | used`.
    budget: AtomicU64,
    suppressed: AtomicU64,
    per_second: u64,
    /// Log format is JSON, or traces are exported: write the event's fields as the event's own
    /// fields (a flat JSON object a shipper can index; span-event attributes) instead of a JSON
    /// text in the message.
    json_fields: bool,
}

impl EventSink {
    /// Security log lines per second before lines are suppressed (still counted).
    pub const LINES_PER_SECOND: u64 = 200;

    pub fn new(edge: &str, site: &str, metrics: Arc<Metrics>) -> EventSink {
        EventSink {
            edge: edge.to_string(),
            site: site.to_string(),
            metrics,
            budget: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            per_second: Self::LINES_PER_SECOND,
            json_fields: false,
        }
    }

    /// Writes events as structured fields (for `log.format = "json"`).
    pub fn with_json_fields(mut self, on: bool) -> Self {
        self.json_fields = on;
        self
    }

    /// Records one event.
    pub fn emit(
        &self,
        f: &Finding,
        dry_run: bool,
        meta: &Meta,
        party: SocketAddr,
        sip: Option<&SipView<'_>>,
    ) {
        self.metrics
            .security_events
            .get_or_create(&SecurityLabels {
                rule: f.rule,
                action: f.action.label(),
                dry_run: if dry_run { "true" } else { "false" },
            })
            .inc();
        if !self.take(meta.now_ms / 1000) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let ev = self.event(f, dry_run, meta, party, sip);
        let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
        if self.json_fields {
            tracing::warn!(
                target: "security",
                time_unix_ms = ev.time_unix_ms,
                edge = %ev.edge,
                site = %ev.site,
                source = %ev.source,
                transport = %ev.transport,
                method = %ev.method,
                call_id = %ev.call_id,
                from_user = %ev.from_user,
                to_user = %ev.to_user,
                user_agent = %ev.user_agent,
                rule = %ev.rule,
                action = %ev.action,
                detail = %ev.detail,
                dry_run = ev.dry_run,
                suppressed,
                "security event"
            );
            return;
        }
        let json = ev.to_json();
        if suppressed > 0 {
            tracing::warn!(target: "security", suppressed, "{json}");
        } else {
            tracing::warn!(target: "security", "{json}");
        }
    }

    /// The event for `f`.
    pub fn event(
        &self,
        f: &Finding,
        dry_run: bool,
        meta: &Meta,
        party: SocketAddr,
        sip: Option<&SipView<'_>>,
    ) -> SecurityEvent {
        let s = |get: for<'v> fn(&SipView<'v>) -> &'v str| {
            sip.map(|v| get(v).to_string()).unwrap_or_default()
        };
        SecurityEvent {
            time_unix_ms: meta.now_ms,
            edge: self.edge.clone(),
            site: self.site.clone(),
            source: party.to_string(),
            transport: meta.transport.as_str().to_string(),
            method: s(|v| v.method()),
            call_id: s(|v| v.call_id()),
            from_user: s(|v| v.from_user()),
            to_user: s(|v| v.to_user()),
            user_agent: s(|v| v.user_agent()),
            rule: f.rule.to_string(),
            action: f.action.label().to_string(),
            detail: f.detail.to_string(),
            dry_run,
        }
    }

    fn take(&self, sec: u64) -> bool {
        let cur = self.budget.load(Ordering::Relaxed);
        let (s, used) = (cur >> 20, cur & 0xf_ffff);
        let next = if s == sec { cur + 1 } else { sec << 20 | 1 };
        if s == sec && used >= self.per_second {
            return false;
        }
        // A lost race costs at most one line of budget either way.
        let _ = self
            .budget
            .compare_exchange(cur, next, Ordering::Relaxed, Ordering::Relaxed);
        true
    }
}
