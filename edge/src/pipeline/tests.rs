//! The firewall's own rules: verdicts from findings, dry-run, alerts, event contents.

use super::*;
use crate::filters::testkit::{meta, parse, request, T0};
use crate::metrics::Metrics;

/// A filter that always finds `action`.
struct Always(Action, bool);

impl Filter for Always {
    fn name(&self) -> &'static str {
        "always"
    }
    fn dry_run(&self) -> bool {
        self.1
    }
    fn request(&self, _cx: &RequestCx<'_>) -> Option<Finding> {
        Some(Finding::new("always", self.0.clone(), "test"))
    }
}

fn firewall(filters: Vec<Box<dyn Filter>>) -> Firewall {
    let state = Arc::new(State::new(Arc::new(BanStore::new(None, 10))));
    let p = Pipeline {
        policy: Policy::default(),
        allow: std::iter::once("192.0.2.200/32".parse().unwrap()).collect(),
        gate: vec![],
        filters,
    };
    let events = EventSink::new("e1", "s1", Arc::new(Metrics::default()));
    Firewall::new(p, state, Clock::manual(T0), events)
}

fn run(fw: &Firewall, source: &str) -> Verdict {
    let raw = request("INVITE", "100", "200", "User-Agent: ua/1\r\n");
    let m = parse(&raw);
    let meta = meta(T0, source, Side::Internet);
    fw.request(&RequestCx::new(&meta, SipView::new(&m)))
}

#[test]
fn first_enforcing_finding_wins_alerts_and_dry_runs_continue() {
    let fw = firewall(vec![
        Box::new(Always(Action::Alert, false)),
        Box::new(Always(Action::Drop, true)),
        Box::new(Always(Action::Ban { ttl_s: 60 }, false)),
        Box::new(Always(Action::Drop, false)),
    ]);
    assert_eq!(run(&fw, "192.0.2.1:5060"), Verdict::Drop { rule: "always" });
    fw.state.bans.apply(T0);
    let ban = fw
        .state
        .bans
        .lookup("192.0.2.1".parse().unwrap(), T0)
        .unwrap();
    assert_eq!(ban.expires_unix_ms, T0 + 60_000);
    assert_eq!(ban.rule, "always");
}

#[test]
fn an_allowlisted_party_is_never_banned() {
    let fw = firewall(vec![Box::new(Always(Action::Ban { ttl_s: 60 }, false))]);
    assert_eq!(
        run(&fw, "192.0.2.200:5060"),
        Verdict::Allow,
        "downgraded to an alert"
    );
    fw.state.bans.apply(T0);
    assert!(fw.state.bans.snapshot().is_empty());
}

#[test]
fn events_carry_the_message_fields() {
    let sink = EventSink::new("e1", "s1", Arc::new(Metrics::default()));
    let raw = request("INVITE", "100", "200", "User-Agent: ua/1\r\n");
    let m = parse(&raw);
    let meta = meta(T0, "192.0.2.1:5060", Side::Internet);
    let f = Finding::new("scanner", Action::Ban { ttl_s: 5 }, "why");
    let ev = sink.event(&f, true, &meta, meta.source, Some(&SipView::new(&m)));
    assert_eq!(
        (ev.edge.as_str(), ev.site.as_str(), ev.source.as_str()),
        ("e1", "s1", "192.0.2.1:5060")
    );
    assert_eq!(
        (
            ev.method.as_str(),
            ev.from_user.as_str(),
            ev.to_user.as_str()
        ),
        ("INVITE", "200", "100")
    );
    assert_eq!(
        (ev.user_agent.as_str(), ev.rule.as_str(), ev.action.as_str()),
        ("ua/1", "scanner", "ban")
    );
    assert!(ev.dry_run);
    assert_eq!(ev.time_unix_ms, T0);
    assert_eq!(ev.call_id, "call-200-100");
}
