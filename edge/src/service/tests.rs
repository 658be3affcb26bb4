//! The whole data path without sockets: gate, parse, filters, proxy and observers on a manual
//! clock, with the security events counted.

use super::*;
use crate::backend::Backends;
use crate::bans::BanStore;
use crate::clock::Clock;
use crate::config::{self, EdgeConfig, Listener};
use crate::flow::FlowKeys;
use crate::metrics::Metrics;
use crate::pipeline::{BuildEnv, Pipeline};
use crate::policy::Policy;
use crate::sip::Transport;
use std::net::SocketAddr;

const EDGE: &str = "192.0.2.10:5060";
const PBX: &str = "198.51.100.5:5080";
const PHONE: &str = "203.0.113.7:40000";
const ATTACKER: &str = "203.0.113.66:5070";
const T0: u64 = 1_800_000_000_000;

struct Rig {
    svc: Service,
    metrics: Arc<Metrics>,
    clock: Clock,
    env: BuildEnv,
}

impl Rig {
    fn new(policy: Policy) -> Rig {
        let cfg = EdgeConfig {
            listeners: vec![Listener {
                transport: Transport::Udp,
                address: EDGE.parse().unwrap(),
                ..Listener::default()
            }],
            backends: vec![config::Backend {
                address: PBX.parse().unwrap(),
                ..config::Backend::default()
            }],
            policy,
            ..EdgeConfig::default()
        };
        let bound: Vec<SocketAddr> = vec![EDGE.parse().unwrap()];
        let keys = FlowKeys::new(["unit-test-flow-key-0001"]).unwrap();
        let proxy = Arc::new(Proxy::new(
            &cfg,
            &bound,
            keys,
            Arc::new(Backends::new(&cfg.backends)),
        ));
        let clock = Clock::manual(T0);
        let metrics = Arc::new(Metrics::default());
        let bans = Arc::new(BanStore::new(None, 1000));
        let (svc, env) = Service::build(&cfg, proxy, bans, clock.clone(), metrics.clone()).unwrap();
        Rig {
            svc,
            metrics,
            clock,
            env,
        }
    }

    fn send(&self, from: &str, bytes: &str) -> Decision {
        let d = self
            .svc
            .handle(&Inbound {
                bytes: bytes.as_bytes(),
                source: from.parse().unwrap(),
                transport: Transport::Udp,
                listener: 0,
            })
            .decision;
        // Bans are applied by the ban writer in production; here, at once.
        self.svc.firewall.state.bans.apply(self.clock.now_ms());
        d
    }

    fn events(&self, rule: &str, action: &str, dry_run: bool) -> u64 {
        let needle = format!(
            "sipwarden_edge_security_events_total{{rule=\"{rule}\",action=\"{action}\",dry_run=\"{dry_run}\"}} "
        );
        self.metrics
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix(&needle).map(|v| v.parse().unwrap()))
            .unwrap_or(0)
    }

    fn all_events(&self) -> u64 {
        self.metrics
            .encode()
            .lines()
            .filter(|l| l.starts_with("sipwarden_edge_security_events_total{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }
}

fn request(method: &str, user: &str, from_user: &str, call_id: &str, extra: &str) -> String {
    format!(
        "{method} sip:{user}@192.0.2.10 SIP/2.0\r\n\
Via: SIP/2.0/UDP 10.1.1.1:5060;branch=z9hG4bK{call_id}{method};rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:{from_user}@192.0.2.10>;tag=a1\r\n\
To: <sip:{user}@192.0.2.10>\r\n\
Call-ID: {call_id}\r\n\
CSeq: 1 {method}\r\n\
Contact: <sip:{from_user}@10.1.1.1:5060>\r\n\
{extra}Content-Length: 0\r\n\r\n"
    )
}

/// The PBX's answer `status` to a request the edge forwarded (its Via lines copied).
fn answer(forwarded: &Decision, status: u16, extra: &str) -> String {
    let Action::Forward { bytes, .. } = &forwarded.action else {
        panic!("not forwarded: {forwarded:?}");
    };
    let req = String::from_utf8(bytes.clone()).unwrap();
    let mut out = format!("SIP/2.0 {status} Answer\r\n");
    for line in req.lines() {
        let name = line.split(':').next().unwrap_or("");
        if ["Via", "From", "Call-ID", "CSeq"].contains(&name) {
            out.push_str(line);
            out.push_str("\r\n");
        }
        if name == "To" {
            out.push_str(line);
            out.push_str(";tag=pbx\r\n");
        }
    }
    out.push_str(extra);
    out.push_str("Content-Length: 0\r\n\r\n");
    out
}

fn forwarded(d: &Decision) -> bool {
    d.outcome == Outcome::Forwarded
}

fn status_of(d: &Decision) -> u16 {
    match &d.action {
        Action::Reply(b) => String::from_utf8_lossy(&b[8..11]).parse().unwrap(),
        other => panic!("not a reply: {other:?}"),
    }
}

fn register(rig: &Rig, from: &str, user: &str) {
    let d = rig.send(
        from,
        &request("REGISTER", user, user, &format!("reg-{user}"), ""),
    );
    assert!(forwarded(&d), "{:?}", d.reason);
    let ok = answer(&d, 200, "Contact: <sip:x@10.1.1.1>;expires=600\r\n");
    assert!(forwarded(&rig.send(PBX, &ok)));
}

#[test]
fn a_scanner_is_dropped_banned_and_then_stopped_before_parsing() {
    let rig = Rig::new(Policy::default());
    let scan = request(
        "OPTIONS",
        "100",
        "100",
        "s1",
        "User-Agent: friendly-scanner\r\n",
    );
    let d = rig.send(ATTACKER, &scan);
    assert_eq!(d.action, Action::Drop, "no answer to a scanner");
    assert_eq!(rig.events("scanner", "ban", false), 1);
    // Anything from that address is now dropped at the gate, even garbage.
    assert_eq!(rig.send(ATTACKER, "\x00\x01garbage").action, Action::Drop);
    let clean = request("OPTIONS", "100", "100", "s2", "");
    assert_eq!(rig.send(ATTACKER, &clean).action, Action::Drop);
    assert_eq!(rig.events("ban", "drop", false), 2);
    // Another address is untouched.
    assert!(forwarded(&rig.send(PHONE, &clean)));
    // After the TTL the ban is gone.
    rig.clock.advance_ms(3600 * 1000);
    assert!(forwarded(&rig.send(ATTACKER, &clean)));
    assert_eq!(rig.all_events(), 3, "one event per non-allow verdict");
}

#[test]
fn dry_run_logs_and_lets_through() {
    let mut p = Policy::default();
    p.scanner.dry_run = true;
    let rig = Rig::new(p);
    let scan = request(
        "OPTIONS",
        "100",
        "100",
        "s1",
        "User-Agent: friendly-scanner\r\n",
    );
    assert!(forwarded(&rig.send(ATTACKER, &scan)));
    assert!(forwarded(&rig.send(ATTACKER, &scan)));
    assert_eq!(rig.events("scanner", "ban", true), 2);
    assert_eq!(rig.events("ban", "drop", false), 0, "nothing banned");
}

#[test]
fn allowlisted_sources_are_never_banned() {
    let mut p = Policy::default();
    p.allowlist.networks = vec!["203.0.113.66/32".parse().unwrap()];
    p.bruteforce.source_threshold = 2.0;
    let rig = Rig::new(p);
    let scan = request(
        "OPTIONS",
        "100",
        "100",
        "s1",
        "User-Agent: friendly-scanner\r\n",
    );
    assert!(
        forwarded(&rig.send(ATTACKER, &scan)),
        "scanner rule leaves trusted alone"
    );
    for i in 0..5 {
        let d = rig.send(
            ATTACKER,
            &request(
                "REGISTER",
                "100",
                "100",
                &format!("b{i}"),
                "Authorization: Digest x\r\n",
            ),
        );
        assert!(forwarded(&d));
        assert!(forwarded(&rig.send(PBX, &answer(&d, 401, ""))));
    }
    assert!(rig.svc.firewall.state.bans.snapshot().is_empty());
}

#[test]
fn password_guessing_is_banned_from_the_pbx_answers() {
    let rig = Rig::new(Policy::default());
    let mut banned_at = None;
    for i in 0..20 {
        let req = request(
            "REGISTER",
            "100",
            "100",
            &format!("bf{i}"),
            "Authorization: Digest username=\"100\"\r\n",
        );
        let d = rig.send(ATTACKER, &req);
        if !forwarded(&d) {
            banned_at = Some(i);
            break;
        }
        let a = rig.send(PBX, &answer(&d, 401, ""));
        if !forwarded(&a) {
            assert_eq!(rig.events("bruteforce", "ban", false), 1);
        }
    }
    assert_eq!(
        banned_at,
        Some(10),
        "the 10th wrong password bans; the 11th try is dropped"
    );
    // A phone that authenticates normally is not affected.
    register(&rig, PHONE, "200");
    assert!(rig
        .svc
        .firewall
        .state
        .bans
        .lookup(
            PHONE.parse::<SocketAddr>().unwrap().ip(),
            rig.clock.now_ms()
        )
        .is_none());
}

#[test]
fn extension_walking_is_banned() {
    let rig = Rig::new(Policy::default());
    let mut answered = 0;
    for ext in 100..130 {
        let d = rig.send(
            ATTACKER,
            &request(
                "REGISTER",
                &ext.to_string(),
                &ext.to_string(),
                &format!("e{ext}"),
                "",
            ),
        );
        if !forwarded(&d) {
            break;
        }
        if forwarded(&rig.send(PBX, &answer(&d, 404, ""))) {
            answered += 1;
        }
    }
    assert_eq!(answered, 7, "the 8th distinct 404 is withheld and bans");
    assert_eq!(rig.events("enumeration", "ban", false), 1);
}

#[test]
fn invites_need_a_registration_and_premium_numbers_are_refused() {
    let rig = Rig::new(Policy::default());
    let call = request("INVITE", "5551234", "200", "c1", "");
    assert_eq!(status_of(&rig.send(PHONE, &call)), 403);
    assert_eq!(rig.events("registered", "reject", false), 1);
    register(&rig, PHONE, "200");
    assert!(forwarded(&rig.send(PHONE, &call)));
    let premium = request("INVITE", "0088216000001", "200", "c2", "");
    assert_eq!(status_of(&rig.send(PHONE, &premium)), 403);
    assert_eq!(rig.events("tollfraud.prefix", "reject", false), 1);
    // Disallowed method: 405 with Allow.
    let msg = request("MESSAGE", "300", "200", "m1", "");
    let d = rig.send(PHONE, &msg);
    let Action::Reply(b) = &d.action else {
        panic!()
    };
    let text = String::from_utf8_lossy(b);
    assert!(
        text.starts_with("SIP/2.0 405") && text.contains("Allow: REGISTER, INVITE"),
        "{text}"
    );
    // Insane request: answered by the sanity rule.
    let bad =
        request("OPTIONS", "1", "200", "x1", "").replace("Max-Forwards: 70", "Max-Forwards: 0");
    assert_eq!(status_of(&rig.send(PHONE, &bad)), 483);
    assert_eq!(rig.events("sanity", "reject", false), 1);
}

#[test]
fn a_reload_changes_rules_and_keeps_bans_and_registrations() {
    let rig = Rig::new(Policy::default());
    register(&rig, PHONE, "200");
    let scan = request(
        "OPTIONS",
        "100",
        "100",
        "s1",
        "User-Agent: friendly-scanner\r\n",
    );
    rig.send(ATTACKER, &scan);
    let mut p = Policy::default();
    p.scanner.enabled = false;
    let fw = &rig.svc.firewall;
    fw.install(Pipeline::build(&p, &rig.env, &fw.state, &rig.clock).unwrap());
    assert_eq!(
        rig.send(ATTACKER, &scan).action,
        Action::Drop,
        "ban survives the reload"
    );
    let other = "203.0.113.99:5060";
    assert!(forwarded(&rig.send(other, &scan)), "scanner rule now off");
    assert!(
        forwarded(&rig.send(PHONE, &request("INVITE", "5551234", "200", "c1", ""))),
        "registration kept"
    );
}

#[test]
fn rate_limits_answer_503_with_retry_after() {
    let mut p = Policy::default();
    p.rate.options.per_source_per_min = 2;
    let rig = Rig::new(p);
    let opt = |i: u32| request("OPTIONS", "1", "200", &format!("o{i}"), "");
    assert!(forwarded(&rig.send(PHONE, &opt(1))));
    assert!(forwarded(&rig.send(PHONE, &opt(2))));
    let d = rig.send(PHONE, &opt(3));
    let Action::Reply(b) = &d.action else {
        panic!()
    };
    let text = String::from_utf8_lossy(b);
    assert!(
        text.starts_with("SIP/2.0 503") && text.contains("Retry-After: 30"),
        "{text}"
    );
}

thread_local! {
    /// `(target, enclosing span name)` of every event on this test's thread.
    static EVENTS: std::cell::RefCell<Vec<(String, Option<String>)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A global subscriber layer recording events per thread: one global subscriber for the whole test
/// binary, so call-site interest is never cached as "none" by a test running without one.
struct Recorder;

impl<S> tracing_subscriber::Layer<S> for Recorder
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_event(&self, event: &tracing::Event<'_>, ctx: tracing_subscriber::layer::Context<'_, S>) {
        let span = ctx.event_span(event).map(|s| s.name().to_string());
        let target = event.metadata().target().to_string();
        EVENTS.with(|e| e.borrow_mut().push((target, span)));
    }
}

fn record_events() {
    use tracing_subscriber::layer::SubscriberExt;
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let _ =
            tracing::subscriber::set_global_default(tracing_subscriber::registry().with(Recorder));
    });
    EVENTS.with(|e| e.borrow_mut().clear());
}

#[test]
fn each_verdict_is_one_security_event_on_the_message_span() {
    record_events();
    let rig = Rig::new(Policy::default());
    let scan = request("OPTIONS", "100", "100", "s1", "User-Agent: sipcli/v1.8\r\n");
    rig.send(ATTACKER, &scan);
    assert!(forwarded(
        &rig.send(PHONE, &request("OPTIONS", "1", "200", "ok1", ""))
    ));
    let events = EVENTS.with(|e| e.borrow().clone());
    let security: Vec<_> = events.iter().filter(|(t, _)| t == "security").collect();
    assert_eq!(
        security.len(),
        1,
        "one event for one verdict, none for the allowed message: {events:?}"
    );
    assert_eq!(
        security[0].1.as_deref(),
        Some("sip"),
        "emitted inside the message span"
    );
}
