//! Traces from real processes: an edge exporting over OTLP/gRPC to an in-process receiver — one
//! span per SIP message with its method, Call-ID, source, transport, verdict and rule, the
//! security event as a span event, the edge's identity in the resource.

use sipwarden_tests::otlp::OtlpReceiver;
use sipwarden_tests::*;
use std::net::UdpSocket;
use std::time::Duration;

const PBX_IP: &str = "127.0.0.91";
const PHONE_IP: &str = "127.0.0.92";
const SCANNER_IP: &str = "127.0.0.93";

#[test]
fn each_sip_message_is_a_span_with_its_verdict() {
    let root = tempfile::tempdir().unwrap();
    let otlp = OtlpReceiver::start();
    let pbx_port = free_port(PBX_IP);
    let _pbx = SippServer::start(root.path(), "pbx.xml", PBX_IP, pbx_port, "udp");
    let endpoint = otlp.endpoint();
    let edge = EdgeProc::start_with_env(
        "127.0.0.2",
        &format!("[[backends]]\naddress = \"{PBX_IP}:{pbx_port}\"\n"),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test"),
            ("SIPWARDEN_EDGE__ID", "edge-otel"),
            ("SIPWARDEN_EDGE__SITE", "lab"),
        ],
    );

    // A clean OPTIONS is forwarded and answered by the PBX.
    let phone = UdpSocket::bind(format!("{PHONE_IP}:0")).unwrap();
    assert_eq!(
        sip_status(&phone, &edge.addr(), "OPTIONS", "1001", "otel", 1),
        Some(200)
    );
    let call_id = format!("otel-1-{}", phone.local_addr().unwrap());
    let span = otlp
        .wait_for(Duration::from_secs(10), |s| {
            s.name == "sip" && s.attributes.get("call_id") == Some(&call_id)
        })
        .unwrap_or_else(|| panic!("no span for the OPTIONS; got {:?}", otlp.spans()));
    let a = &span.attributes;
    assert_eq!(a.get("method").map(String::as_str), Some("OPTIONS"));
    assert_eq!(a.get("transport").map(String::as_str), Some("udp"));
    assert!(
        a.get("source").is_some_and(|s| s.starts_with(PHONE_IP)),
        "{a:?}"
    );
    assert_eq!(a.get("verdict").map(String::as_str), Some("forwarded"));
    let r = &span.resource;
    assert_eq!(
        r.get("service.name").map(String::as_str),
        Some("sipwarden-edge")
    );
    assert_eq!(
        r.get("sipwarden.edge.id").map(String::as_str),
        Some("edge-otel")
    );
    assert_eq!(r.get("sipwarden.site").map(String::as_str), Some("lab"));
    assert_eq!(
        r.get("deployment.environment").map(String::as_str),
        Some("test"),
        "OTEL_RESOURCE_ATTRIBUTES is honoured"
    );

    // A scanner is dropped and banned: the span says so and carries the security event.
    let scanner = UdpSocket::bind(format!("{SCANNER_IP}:0")).unwrap();
    let local = scanner.local_addr().unwrap();
    let scan = format!(
        "OPTIONS sip:100@{e} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bKscan1\r\n\
Max-Forwards: 70\r\nFrom: <sip:100@{e}>;tag=s1\r\nTo: <sip:100@{e}>\r\nCall-ID: otel-scan-1\r\n\
CSeq: 1 OPTIONS\r\nUser-Agent: friendly-scanner\r\nContent-Length: 0\r\n\r\n",
        e = edge.addr()
    );
    scanner.send_to(scan.as_bytes(), edge.addr()).unwrap();
    let span = otlp
        .wait_for(Duration::from_secs(10), |s| {
            s.name == "sip"
                && s.attributes.get("call_id").map(String::as_str) == Some("otel-scan-1")
        })
        .expect("a span for the scanner's message");
    assert_eq!(
        span.attributes.get("verdict").map(String::as_str),
        Some("dropped")
    );
    assert_eq!(
        span.attributes.get("rule").map(String::as_str),
        Some("scanner")
    );
    let (_, ev) = span
        .events
        .iter()
        .find(|(name, _)| name == "security event")
        .unwrap_or_else(|| {
            panic!(
                "the security event is an event of the span: {:?}",
                span.events
            )
        });
    assert_eq!(ev.get("rule").map(String::as_str), Some("scanner"));
    assert_eq!(ev.get("action").map(String::as_str), Some("ban"));
    assert!(ev.get("source").is_some_and(|s| s.starts_with(SCANNER_IP)));
}

/// An auto-ban's trace runs from the offending SIP message at the edge, through the edge's call
/// to the controller (W3C trace context in gRPC metadata), to the controller's Raft proposal
/// being committed.
#[test]
fn an_auto_ban_is_one_trace_from_the_sip_message_to_the_raft_commit() {
    use sipwarden_tests::controller::*;
    let root = tempfile::tempdir().unwrap();
    let otlp = OtlpReceiver::start();
    let endpoint = otlp.endpoint();
    let (seats, ctls) = cluster_env(
        root.path(),
        1,
        "",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let pbx_port = free_port(PBX_IP);
    let _pbx = SippServer::start(root.path(), "pbx.xml", PBX_IP, pbx_port, "udp");
    let edge = EdgeProc::start_with_env(
        "127.0.0.3",
        &format!(
            "[[backends]]\naddress = \"{PBX_IP}:{pbx_port}\"\n\n{}",
            edge_link(&seats)
        ),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );

    // A scanner's first message: banned at once, and its span starts the trace. The SDK drops a
    // span batch whose export fails, so a span can be lost (seen once, under load, when the
    // first message's span never came): a fresh scanner from another address then starts a new
    // trace of the same chain, at most three times.
    let mut sip = None;
    for (attempt, ip) in ["127.0.0.94", "127.0.0.95", "127.0.0.96"]
        .iter()
        .enumerate()
    {
        let scanner = UdpSocket::bind(format!("{ip}:0")).unwrap();
        let local = scanner.local_addr().unwrap();
        let call_id = format!("otel-scan-2-{attempt}");
        let scan = format!(
            "OPTIONS sip:100@{e} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bKscan2{attempt}\r\n\
Max-Forwards: 70\r\nFrom: <sip:100@{e}>;tag=s2\r\nTo: <sip:100@{e}>\r\nCall-ID: {call_id}\r\n\
CSeq: 1 OPTIONS\r\nUser-Agent: friendly-scanner\r\nContent-Length: 0\r\n\r\n",
            e = edge.addr()
        );
        scanner.send_to(scan.as_bytes(), edge.addr()).unwrap();
        sip = otlp.wait_for(Duration::from_secs(10), |s| {
            s.name == "sip" && s.attributes.get("call_id") == Some(&call_id)
        });
        if sip.is_some() {
            break;
        }
    }
    let sip = sip.expect("the scanner's message span");
    let trace = sip.trace_id.clone();
    let in_trace = |name: &'static str, service: &'static str| {
        let trace = trace.clone();
        move |s: &sipwarden_tests::otlp::ReceivedSpan| {
            s.trace_id == trace
                && s.name == name
                && s.resource.get("service.name").map(String::as_str) == Some(service)
        }
    };
    let call = otlp
        .wait_for(
            Duration::from_secs(10),
            in_trace("cluster.propose_bans", "sipwarden-edge"),
        )
        .expect("the edge's call to the controller continues the message's trace");
    let rpc = otlp
        .wait_for(
            Duration::from_secs(10),
            in_trace("grpc", "sipwarden-controller"),
        )
        .unwrap_or_else(|| {
            panic!(
                "the controller's RPC span is in the trace: {:?}",
                otlp.spans()
            )
        });
    assert_eq!(
        rpc.attributes.get("rpc").map(String::as_str),
        Some("/sipwarden.v1.EdgeControl/ProposeBans")
    );
    assert_eq!(
        rpc.parent_span_id, call.span_id,
        "the RPC is the edge call's child"
    );
    let commit = otlp
        .wait_for(
            Duration::from_secs(10),
            in_trace("raft.propose", "sipwarden-controller"),
        )
        .expect("the Raft proposal is in the trace");
    assert_eq!(
        commit.attributes.get("op").map(String::as_str),
        Some("add_bans")
    );
    assert_eq!(
        commit.attributes.get("who").map(String::as_str),
        Some("edge:edge-test")
    );

    // The controller's metrics tell the same story, and pass promtool.
    let text = ctls[0]
        .request("GET", "/metrics", None, None)
        .map(|(_, b)| b)
        .unwrap_or_default();
    assert_eq!(
        metric(&text, "sipwarden_controller_raft_is_leader"),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "sipwarden_controller_bans_active{source=\"auto\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "sipwarden_controller_edges_watching"),
        Some(1.0)
    );
    assert!(
        metric(
            &text,
            "sipwarden_controller_edge_rpcs_total{rpc=\"ProposeBans\",result=\"ok\"}"
        )
        .is_some_and(|v| v >= 1.0),
        "{text}"
    );
    promtool_check_metrics("controller", &text);
    promtool_check_metrics("edge", &edge.metrics());

    // Every metric the shipped dashboard and alert rules use is one these processes export.
    let exported = format!("{text}\n{}", edge.metrics());
    for file in ["dashboard.json", "alerts.yaml"] {
        let path = workspace_root().join("charts/sipwarden/files").join(file);
        let body = std::fs::read_to_string(&path).unwrap();
        for name in metric_names(&body) {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            assert!(
                exported.contains(base),
                "{file} uses {name}, which no sipwarden process exports"
            );
        }
    }
}

/// The `sipwarden_…` metric names in `text`.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("sipwarden_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        if name.starts_with("sipwarden_edge_") || name.starts_with("sipwarden_controller_") {
            out.insert(name.to_string());
        }
        rest = &tail[end..];
    }
    out
}

/// The shipped alert rules pass `promtool check rules` and their unit tests.
#[test]
fn alert_rules_are_valid_and_fire_when_they_should() {
    let promtool = require_tool("promtool", "prometheus");
    let dir = workspace_root().join("charts/sipwarden/files");
    for args in [
        &["check", "rules", "alerts.yaml"][..],
        &["test", "rules", "alerts.test.yaml"][..],
    ] {
        let out = std::process::Command::new(&promtool)
            .current_dir(&dir)
            .args(args)
            .output()
            .expect("promtool");
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("dashboard.json")).unwrap())
            .expect("the dashboard is JSON");
    assert!(dashboard["panels"]
        .as_array()
        .is_some_and(|p| p.len() >= 10));
}

/// `promtool check metrics` on `text` (the Debian `prometheus` package).
fn promtool_check_metrics(what: &str, text: &str) {
    use std::io::Write;
    let promtool = require_tool("promtool", "prometheus");
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics ({what}):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Percent-encodes a PromQL query for a URL.
fn enc(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A real Prometheus (the Debian package) scrapes an edge and a controller; a SIPp phone's
/// registration through the edge moves a counter Prometheus can query, and the controller's Raft
/// gauges are there too.
#[test]
fn prometheus_scrapes_the_edge_and_the_controller() {
    use sipwarden_tests::controller::*;
    let prometheus = require_tool("prometheus", "prometheus");
    let root = tempfile::tempdir().unwrap();
    let (seats, ctls) = cluster(root.path(), 1, "");
    let pbx_port = free_port(PBX_IP);
    let _pbx = SippServer::start(root.path(), "pbx.xml", PBX_IP, pbx_port, "udp");
    let edge = EdgeProc::start(
        "127.0.0.5",
        &format!(
            "[[backends]]\naddress = \"{PBX_IP}:{pbx_port}\"\n\n{}",
            edge_link(&seats)
        ),
    );
    let port = free_port("127.0.0.1");
    let cfg = root.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: edge\n    static_configs:\n      - targets: ['{}']\n  - job_name: controller\n    static_configs:\n      - targets: ['{}']\n",
            edge.http, ctls[0].http
        ),
    )
    .unwrap();
    let log = std::fs::File::create(root.path().join("prometheus.log")).unwrap();
    let _prom = Proc::spawn(
        "prometheus",
        std::process::Command::new(prometheus)
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                root.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log),
    );
    let prom: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || http_get(prom, "/-/ready")
            .is_some_and(|(s, _)| s == 200)),
        "prometheus ready: {}",
        std::fs::read_to_string(root.path().join("prometheus.log")).unwrap_or_default()
    );

    let run = sipp_client(
        root.path(),
        "phone_register.xml",
        PHONE_IP,
        free_port(PHONE_IP),
        "udp",
        &edge.addr(),
        "1001",
        3,
        Duration::from_secs(10),
    );
    assert!(run.success, "{}", run.errors);

    let query = |q: &str| -> Option<f64> {
        let (s, body) = http_get(prom, &format!("/api/v1/query?query={}", enc(q)))?;
        if s != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    };
    let registers = r#"sum(sipwarden_edge_messages_total{kind="request",method="REGISTER",direction="from_internet",outcome="forwarded"})"#;
    assert!(
        wait_until(Duration::from_secs(30), || query(registers) == Some(3.0)),
        "Prometheus sees the 3 REGISTERs: {:?}",
        query(registers)
    );
    // Every datagram the edge received is in its delay histogram: at least the 3 REGISTERs and
    // their 3 answers; Prometheus reads it as a histogram (a quantile comes out, under a second
    // on an idle loopback).
    let delayed = query("sipwarden_edge_udp_delay_seconds_count");
    assert!(
        delayed.is_some_and(|n| n >= 6.0),
        "UDP delay count: {delayed:?}"
    );
    let p99 =
        query("histogram_quantile(0.99, sum by (le) (sipwarden_edge_udp_delay_seconds_bucket))");
    assert!(
        p99.is_some_and(|s| s > 0.0 && s < 1.0),
        "UDP delay p99: {p99:?}"
    );
    // The time the receive threads spent on those datagrams reaches the busy counter when a
    // thread closes its 500 ms window (an idle one does at its next poll timeout).
    assert!(
        wait_until(Duration::from_secs(15), || query(
            "sipwarden_edge_udp_busy_seconds_total"
        )
        .is_some_and(|s| s > 0.0)),
        "UDP busy seconds: {:?}",
        query("sipwarden_edge_udp_busy_seconds_total")
    );
    assert!(
        wait_until(Duration::from_secs(10), || query(
            "sipwarden_controller_raft_is_leader"
        ) == Some(1.0)),
        "and the controller's leadership"
    );
    assert!(
        wait_until(Duration::from_secs(10), || query(
            "sipwarden_edge_controller_connected"
        ) == Some(1.0)),
        "and the edge's link to it"
    );
}
