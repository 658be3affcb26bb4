//! The standalone edge between real SIPp phones and real SIPp PBXs on loopback: registration with
//! Path, calls in both directions over UDP and TCP, flow-token tampering, backend failover.

use sipwarden_tests::*;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

const PHONE_IP: &str = "127.0.0.20";
const EDGE_IP: &str = "127.0.0.1";
const PBX_IP: &str = "127.0.0.1";

fn backend(port: u16, priority: u32, transport: &str) -> String {
    format!("[[backends]]\naddress = \"{PBX_IP}:{port}\"\ntransport = \"{transport}\"\npriority = {priority}\n")
}

fn health(interval_ms: u64, timeout_ms: u64) -> String {
    format!(
        "[health]\ninterval_ms = {interval_ms}\ntimeout_ms = {timeout_ms}\nfall = 2\nrise = 1\n"
    )
}

/// REGISTER through the edge reaches the registrar with a signed Path, and three calls
/// (INVITE/200/ACK/BYE, in-dialog requests along the edge's Record-Route) complete.
fn register_and_call(transport: &str) {
    let pbx_port = free_port(PBX_IP);
    let dir = tempfile::tempdir().unwrap();
    let pbx = SippServer::start(dir.path(), "pbx.xml", PBX_IP, pbx_port, transport);
    let edge = EdgeProc::start(
        EDGE_IP,
        &(backend(pbx_port, 1, transport) + &health(1000, 300)),
    );

    let reg = sipp_client(
        dir.path(),
        "phone_register.xml",
        PHONE_IP,
        free_port(PHONE_IP),
        transport,
        &edge.addr(),
        "alice",
        1,
        Duration::from_secs(15),
    );
    assert!(
        reg.success,
        "REGISTER over {transport} failed:\n{}\n{}",
        reg.errors,
        edge.log()
    );
    assert!(
        reg.messages.contains("Path: <sip:sw1"),
        "the 200 echoes the edge's Path"
    );
    assert_eq!(pbx.received("REGISTER"), 1);

    let call = sipp_client(
        dir.path(),
        "phone_call.xml",
        PHONE_IP,
        free_port(PHONE_IP),
        transport,
        &edge.addr(),
        "100",
        3,
        Duration::from_secs(20),
    );
    assert!(
        call.success,
        "calls over {transport} failed:\n{}\n{}",
        call.errors,
        edge.log()
    );
    assert_eq!(pbx.received("INVITE"), 3);
    assert_eq!(
        pbx.received("BYE"),
        3,
        "BYE followed the route set back through the edge"
    );

    let m = edge.metrics();
    let invites = metric(
        &m,
        r#"sipwarden_edge_messages_total{kind="request",method="INVITE",direction="from_internet",outcome="forwarded"}"#,
    );
    assert_eq!(invites, Some(3.0), "{m}");
}

#[test]
fn udp_register_carries_path_and_calls_complete() {
    register_and_call("udp");
}

#[test]
fn tcp_register_carries_path_and_calls_complete() {
    register_and_call("tcp");
}

/// A phone registers; the PBX then calls it using only the Path as Route. The edge routes the
/// INVITE by the flow token (over the phone's own TCP connection when it registered over TCP), and
/// ACK and BYE from the PBX follow the Record-Route back to the phone.
fn pbx_calls_registered_phone(phone_transport: &str, pbx_transport: &str) {
    let pbx_port = free_port(PBX_IP);
    let dir = tempfile::tempdir().unwrap();
    let pbx = SippServer::start(
        dir.path(),
        "pbx_callback.xml",
        PBX_IP,
        pbx_port,
        pbx_transport,
    );
    let edge = EdgeProc::start(
        EDGE_IP,
        &(backend(pbx_port, 1, pbx_transport) + &health(1000, 300)),
    );
    let run = sipp_client(
        dir.path(),
        "phone_register_answer.xml",
        PHONE_IP,
        free_port(PHONE_IP),
        phone_transport,
        &edge.addr(),
        "alice",
        1,
        Duration::from_secs(20),
    );
    assert!(
        run.success,
        "PBX→phone call (phone {phone_transport}, PBX {pbx_transport}) failed:\n{}\n{}",
        run.errors,
        edge.log()
    );
    assert!(
        run.messages.contains("INVITE sip:alice@"),
        "the phone received the PBX's INVITE"
    );
    let bye_answered = |pbx: &SippServer| {
        pbx.received_messages()
            .iter()
            .any(|m| m.starts_with("SIP/2.0 200 ") && m.contains("CSeq: 11 BYE"))
    };
    assert!(
        wait_until(Duration::from_secs(5), || bye_answered(&pbx)),
        "the phone's 200 to the PBX's BYE came back through the edge"
    );
}

#[test]
fn udp_pbx_calls_registered_phone_by_flow_token() {
    pbx_calls_registered_phone("udp", "udp");
}

#[test]
fn tcp_phone_is_called_back_over_its_own_connection() {
    pbx_calls_registered_phone("tcp", "udp");
}

#[test]
fn tcp_end_to_end_with_a_tcp_pbx() {
    pbx_calls_registered_phone("tcp", "tcp");
}

fn recv_text(sock: &UdpSocket) -> Option<String> {
    let mut buf = [0u8; 65536];
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let (n, _) = sock.recv_from(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// The next message at the test's PBX socket that is not a health check; health-check OPTIONS
/// are answered 200 on the way so the backend stays up.
fn pbx_recv(pbx: &UdpSocket) -> Option<String> {
    let mut buf = [0u8; 65536];
    pbx.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    for _ in 0..20 {
        let (n, from) = pbx.recv_from(&mut buf).ok()?;
        let m = String::from_utf8_lossy(&buf[..n]).into_owned();
        if !m.starts_with("OPTIONS ") {
            return Some(m);
        }
        pbx.send_to(ok_for(&m).as_bytes(), from).ok()?;
    }
    None
}

fn header<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
    msg.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
}

/// The test plays both phone and PBX with plain sockets to forge exactly one byte: the edge must
/// refuse the altered token with 403 and still route the genuine one.
#[test]
fn tampered_flow_token_is_refused() {
    let pbx = UdpSocket::bind((PBX_IP, 0)).unwrap();
    let pbx_port = pbx.local_addr().unwrap().port();
    let edge = EdgeProc::start(
        EDGE_IP,
        &(backend(pbx_port, 1, "udp") + &health(2000, 1000)),
    );
    let phone = UdpSocket::bind((PHONE_IP, 0)).unwrap();
    let phone_addr = phone.local_addr().unwrap();
    let edge_addr = edge.addr();
    let register = format!(
        "REGISTER sip:{edge_addr} SIP/2.0\r\nVia: SIP/2.0/UDP {phone_addr};branch=z9hG4bKt1;rport\r\nFrom: <sip:bob@example.com>;tag=1\r\nTo: <sip:bob@example.com>\r\nCall-ID: tamper-reg\r\nCSeq: 1 REGISTER\r\nContact: <sip:bob@{phone_addr}>\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    );
    phone.send_to(register.as_bytes(), &edge_addr).unwrap();
    let reg = pbx_recv(&pbx).expect("REGISTER reached the PBX");
    assert!(reg.starts_with("REGISTER "), "{reg}");
    let path = header(&reg, "Path").expect("Path header");
    let uri = path.trim_start_matches('<').trim_end_matches('>');
    let token = uri
        .trim_start_matches("sip:")
        .split('@')
        .next()
        .unwrap()
        .to_string();

    let invite = |route_uri: &str, call_id: &str| {
        format!(
            "INVITE sip:bob@{phone_addr} SIP/2.0\r\nVia: SIP/2.0/UDP {PBX_IP}:{pbx_port};branch=z9hG4bK{call_id}\r\nRoute: <{route_uri}>\r\nFrom: <sip:pbx@{PBX_IP}>;tag=p\r\nTo: <sip:bob@example.com>\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        )
    };
    // Flip one character of the token's signature part.
    let mut forged = token.clone();
    let i = forged.len() - 3;
    let c = forged.as_bytes()[i];
    forged.replace_range(i..i + 1, if c == b'a' { "b" } else { "a" });
    pbx.send_to(
        invite(&uri.replace(&token, &forged), "forged-1").as_bytes(),
        &edge_addr,
    )
    .unwrap();
    let answer = pbx_recv(&pbx).expect("an answer to the forged INVITE");
    assert!(answer.contains("forged-1"), "{answer}");
    assert!(answer.starts_with("SIP/2.0 403 "), "{answer}");
    phone
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 4096];
    assert!(
        phone.recv_from(&mut buf).is_err(),
        "nothing reached the phone"
    );
    assert!(edge.log().contains("flow token"), "the refusal is logged");

    // The genuine token still routes.
    pbx.send_to(invite(uri, "genuine-1").as_bytes(), &edge_addr)
        .unwrap();
    let at_phone = recv_text(&phone).expect("the genuine INVITE reaches the phone");
    assert!(
        at_phone.starts_with("INVITE sip:bob@") && at_phone.contains("genuine-1"),
        "{at_phone}"
    );
}

/// Two PBXs, priority 1 and 2. Calls go to the primary; after it is killed, traffic moves to the
/// secondary once the health checks notice — within interval + fall × timeout.
#[test]
fn killing_the_primary_fails_over_to_the_secondary() {
    let dir = tempfile::tempdir().unwrap();
    let (p1, p2) = (free_port(PBX_IP), free_port(PBX_IP));
    let mut primary = SippServer::start(dir.path(), "pbx.xml", PBX_IP, p1, "udp");
    let secondary = SippServer::start(dir.path(), "pbx.xml", PBX_IP, p2, "udp");
    let (interval, timeout) = (1000u64, 250u64);
    let edge = EdgeProc::start(
        EDGE_IP,
        &(backend(p1, 1, "udp")
            + &backend(p2, 2, "udp")
            + &health(interval, timeout)
            // These phones call without registering first.
            + "[policy.registered]\nenabled = false\n"),
    );

    let run = sipp_client(
        dir.path(),
        "phone_call.xml",
        PHONE_IP,
        free_port(PHONE_IP),
        "udp",
        &edge.addr(),
        "100",
        2,
        Duration::from_secs(15),
    );
    assert!(run.success, "{}", run.errors);
    assert_eq!(
        (primary.received("INVITE"), secondary.received("INVITE")),
        (2, 0)
    );

    primary.proc.signal("KILL");
    primary
        .proc
        .wait_exit(Duration::from_secs(5))
        .expect("primary exited");
    let killed = Instant::now();
    let down = format!(r#"sipwarden_edge_backend_up{{backend="{PBX_IP}:{p1}/udp"}} 0"#);
    assert!(
        wait_until(Duration::from_secs(10), || edge.metrics().contains(&down)),
        "primary never marked down"
    );
    let detected = killed.elapsed();
    let bound = Duration::from_millis(interval + 2 * timeout + 500);
    println!(
        "failover detected {} ms after the primary was killed (bound {} ms)",
        detected.as_millis(),
        bound.as_millis()
    );
    assert!(detected <= bound, "took {detected:?}");

    let run = sipp_client(
        dir.path(),
        "phone_call.xml",
        PHONE_IP,
        free_port(PHONE_IP),
        "udp",
        &edge.addr(),
        "100",
        2,
        Duration::from_secs(15),
    );
    assert!(
        run.success,
        "calls after failover failed:\n{}\n{}",
        run.errors,
        edge.log()
    );
    assert_eq!(
        secondary.received("INVITE"),
        2,
        "the secondary took the calls"
    );
}
