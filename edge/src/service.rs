//! [`Service`]: one message through the whole edge, in the order of the data path — pre-parse
//! gate, parse, request filters, the stateless proxy, response observers, completion — inside one
//! `sip` tracing span per parsed message. Pure apart from the pipeline's state: bytes in,
//! [`Decision`] out; the transport carries it out.

use crate::bans::BanStore;
use crate::clock::Clock;
use crate::config::EdgeConfig;
use crate::metrics::{method_label, Metrics};
use crate::pipeline::event::EventSink;
use crate::pipeline::{
    BuildEnv, BuildError, Firewall, Pipeline, RequestCx, ResponseCx, SipView, State, Verdict,
};
use crate::proxy::{self, via, Action, Decision, Dest, Inbound, Outcome, Proxy, Side};
use crate::sip::{header_param, HeaderName, Message};
use std::sync::Arc;
use tracing::field::Empty;

/// The proxy and the firewall in front of it.
pub struct Service {
    pub proxy: Arc<Proxy>,
    pub firewall: Arc<Firewall>,
}

/// A decision and the labels it is counted under.
pub struct Handled {
    pub decision: Decision,
    /// `request` or `response`.
    pub kind: &'static str,
    pub method: &'static str,
    /// The gate dropped it because its source is banned.
    pub banned: bool,
}

/// `(kind, method)` from the start line alone (no parse): responses say `unknown`.
fn start_line_labels(bytes: &[u8]) -> (&'static str, &'static str) {
    if bytes.starts_with(b"SIP/2.0 ") {
        return ("response", "unknown");
    }
    let end = bytes.iter().take(32).position(|&b| b == b' ').unwrap_or(0);
    match std::str::from_utf8(&bytes[..end]) {
        Ok(m) if !m.is_empty() => ("request", method_label(m)),
        _ => ("request", "unknown"),
    }
}

fn dropped(side: Side) -> Decision {
    Decision {
        action: Action::Drop,
        outcome: Outcome::Dropped,
        side,
        reason: None,
    }
}

impl Service {
    /// The firewall for `cfg` in front of `proxy`: its policy built over a fresh [`State`] on
    /// `bans`, events labelled with the edge's id and site. Also returns the [`BuildEnv`] that
    /// later reloads build with.
    pub fn build(
        cfg: &EdgeConfig,
        proxy: Arc<Proxy>,
        bans: Arc<BanStore>,
        clock: Clock,
        metrics: Arc<Metrics>,
    ) -> Result<(Service, BuildEnv), BuildError> {
        let env = BuildEnv {
            trusted: cfg.trusted_pbx.clone(),
            own_addrs: proxy.own_addrs(),
        };
        let state = Arc::new(State::new(bans));
        let pipeline = Pipeline::build(&cfg.policy, &env, &state, &clock)?;
        let events = EventSink::new(&cfg.edge.id, &cfg.edge.site, metrics).with_json_fields(
            // Structured fields for JSON logs, and for traces: an exported security event
            // carries its fields as span-event attributes.
            cfg.log.format == "json" || sipwarden_shared::telemetry::otlp_endpoint().is_some(),
        );
        let firewall = Arc::new(Firewall::new(pipeline, state, clock, events));
        Ok((Service { proxy, firewall }, env))
    }

    /// Whether a connection from `source` may be accepted: not from a banned network, unless
    /// trusted. (Every message is still gated.)
    pub fn admits(&self, source: std::net::SocketAddr) -> bool {
        let fw = &self.firewall;
        self.proxy.is_pbx_addr(source)
            || fw.pipeline().allowed(source)
            || !fw.pipeline().policy.bans.enabled
            || fw
                .state
                .bans
                .lookup(source.ip(), fw.clock.now_ms())
                .is_none()
    }

    /// Handles one received message.
    pub fn handle(&self, inb: &Inbound<'_>) -> Handled {
        let side = self.proxy.side(inb);
        let meta = self
            .firewall
            .meta(inb.source, inb.transport, side, inb.bytes.len());
        let gate = self.firewall.gate(&meta);
        if gate != Verdict::Allow {
            let (kind, method) = start_line_labels(inb.bytes);
            return Handled {
                decision: dropped(side),
                kind,
                method,
                banned: matches!(gate, Verdict::Drop { rule: "ban" }),
            };
        }
        // Borrowed where it was parsed: moving the message out would copy its header index.
        let parsed = Message::parse(inb.bytes);
        let m = match &parsed {
            Ok(m) => m,
            Err(e) => {
                let (kind, method) = start_line_labels(inb.bytes);
                return Handled {
                    decision: proxy::malformed(inb.bytes, e, side),
                    kind,
                    method,
                    banned: false,
                };
            }
        };
        let sip = SipView::new(m);
        let is_request = sip.is_request();
        let span = tracing::info_span!(
            "sip",
            method = sip.method(),
            call_id = sip.call_id(),
            source = %inb.source,
            transport = inb.transport.as_str(),
            verdict = Empty,
            rule = Empty,
        );
        let decision = span.in_scope(|| {
            if is_request {
                self.request(m, inb, side, &meta, &span)
            } else {
                self.response(m, inb, side, &meta, &span)
            }
        });
        Handled {
            decision,
            kind: if is_request { "request" } else { "response" },
            method: method_label(sip.method()),
            banned: false,
        }
    }

    fn request(
        &self,
        m: &Message<'_>,
        inb: &Inbound<'_>,
        side: Side,
        meta: &crate::pipeline::Meta,
        span: &tracing::Span,
    ) -> Decision {
        let cx = RequestCx::new(meta, SipView::new(m));
        let decision = match self.firewall.request(&cx) {
            Verdict::Allow => self.proxy.handle_message(m, inb, side, cx.sane.get()),
            Verdict::Reject {
                code,
                reason,
                header,
                rule,
            } => {
                span.record("rule", rule);
                let extra: Vec<(&str, &str)> = header.iter().map(|(n, v)| (*n, &**v)).collect();
                proxy::request::refuse(m, inb, side, code, reason, &extra)
            }
            Verdict::Drop { rule } => {
                span.record("rule", rule);
                dropped(side)
            }
        };
        span.record("verdict", decision.outcome.label());
        self.firewall
            .completion(&cx, decision.outcome == Outcome::Forwarded);
        decision
    }

    fn response(
        &self,
        m: &Message<'_>,
        inb: &Inbound<'_>,
        side: Side,
        meta: &crate::pipeline::Meta,
        span: &tracing::Span,
    ) -> Decision {
        let decision = self.proxy.handle_message(m, inb, side, false);
        let (peer, peer_transport) = match &decision.action {
            Action::Forward {
                dest: Dest::Addr(a),
                transport,
                ..
            } => (*a, *transport),
            _ => {
                span.record("verdict", decision.outcome.label());
                return decision;
            }
        };
        // Our Via is on top (the proxy verified its branch) and says whether the request carried
        // credentials.
        let top_via = m
            .elements(HeaderName::Via)
            .next()
            .map(|(_, r)| m.text(r.clone()))
            .unwrap_or("");
        let had_credentials = header_param(top_via, via::CREDENTIALS_PARAM).is_some();
        let status = m.status().unwrap_or(0);
        let register = m.cseq().is_some_and(|(_, method)| method == "REGISTER");
        // The flow token the edge put in Path for this phone, for the binding the cluster keeps
        // (signed only when there is a cluster to tell: a standalone edge publishes nothing).
        let flow_token =
            (register && status == 200 && side == Side::Pbx && self.firewall.state.reporting())
                .then(|| {
                    self.proxy.keys.sign(&crate::flow::FlowToken {
                        transport: peer_transport,
                        addr: peer,
                        edge: self.proxy.edge_id.clone(),
                    })
                });
        let cx = ResponseCx {
            meta,
            sip: SipView::new(m),
            status,
            peer,
            peer_trusted: self.proxy.is_pbx_addr(peer) || self.firewall.pipeline().allowed(peer),
            had_credentials,
            peer_transport,
            flow_token,
        };
        let decision = match self.firewall.response(&cx) {
            Verdict::Allow => decision,
            Verdict::Reject { rule, .. } | Verdict::Drop { rule } => {
                // A response is never answered; refusing it means not relaying it.
                span.record("rule", rule);
                dropped(side)
            }
        };
        span.record("verdict", decision.outcome.label());
        decision
    }
}

#[cfg(test)]
mod tests;
