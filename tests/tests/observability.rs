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

    let scanner = UdpSocket::bind("127.0.0.94:0").unwrap();
    let local = scanner.local_addr().unwrap();
    let scan = format!(
        "OPTIONS sip:100@{e} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bKscan2\r\n\
Max-Forwards: 70\r\nFrom: <sip:100@{e}>;tag=s2\r\nTo: <sip:100@{e}>\r\nCall-ID: otel-scan-2\r\n\
CSeq: 1 OPTIONS\r\nUser-Agent: friendly-scanner\r\nContent-Length: 0\r\n\r\n",
        e = edge.addr()
    );
    scanner.send_to(scan.as_bytes(), edge.addr()).unwrap();
    let sip = otlp
        .wait_for(Duration::from_secs(10), |s| {
            s.name == "sip"
                && s.attributes.get("call_id").map(String::as_str) == Some("otel-scan-2")
        })
        .expect("the scanner's message span");
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
