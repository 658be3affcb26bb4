//! The edge under bad input and at its limits: malformed datagrams and streams, TCP connection
//! limits and slowloris timeouts, `--check-config`, and a graceful SIGTERM.

use sipwarden_tests::*;
use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

const EDGE_IP: &str = "127.0.0.1";

/// A backend nobody answers: the edge starts ready (backends start up) and the tests here never
/// need a PBX to answer.
fn quiet_backend() -> String {
    let port = free_port("127.0.0.1");
    format!("[[backends]]\naddress = \"127.0.0.1:{port}\"\n[health]\ninterval_ms = 60000\ntimeout_ms = 50000\nfall = 5\n")
}

fn answer(sock: &UdpSocket) -> Option<String> {
    let mut buf = [0u8; 65536];
    sock.set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    let (n, _) = sock.recv_from(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

const HEADERS: &str = "Via: SIP/2.0/UDP 127.0.0.30:5999;branch=z9hG4bKbad\r\nFrom: <sip:a@x>;tag=1\r\nTo: <sip:b@x>\r\nCall-ID: bad-1\r\n";

#[test]
fn malformed_datagrams_get_400_or_silence_and_the_edge_stays_up() {
    // The datagram limit comes from the environment, as an operator would override it.
    let edge = EdgeProc::start_with_env(
        EDGE_IP,
        &quiet_backend(),
        &[
            ("SIPWARDEN_UDP__MAX_DATAGRAM", "8192"),
            ("SIPWARDEN_POLICY__SANITY__MAX_MESSAGE_BYTES", "2048"),
        ],
    );
    let own = edge.addr();
    let client = UdpSocket::bind("127.0.0.30:0").unwrap();
    let huge = format!("OPTIONS sip:x SIP/2.0\r\n{HEADERS}CSeq: 1 OPTIONS\r\nX-Pad: {}\r\nContent-Length: 0\r\n\r\n", "a".repeat(9_000));
    let cases: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        ("binary garbage", vec![0x00, 0xff, 0x13, 0x37, 0x80, 0x81], None),
        ("truncated request line", b"INVITE sip:b@x".to_vec(), None),
        ("no blank line", format!("INVITE sip:b@x SIP/2.0\r\n{HEADERS}").into_bytes(), None),
        ("response nobody asked for", b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 10.9.9.9:5060;branch=z9hG4bKx\r\nCall-ID: q\r\nCSeq: 1 INVITE\r\n\r\n".to_vec(), None),
        ("missing CSeq", format!("INVITE sip:b@x SIP/2.0\r\n{HEADERS}Content-Length: 0\r\n\r\n").into_bytes(), Some("SIP/2.0 400 ")),
        ("CSeq method mismatch", format!("INVITE sip:b@x SIP/2.0\r\n{HEADERS}CSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n").into_bytes(), Some("SIP/2.0 400 ")),
        ("Content-Length beyond body", format!("INVITE sip:b@x SIP/2.0\r\n{HEADERS}CSeq: 1 INVITE\r\nContent-Length: 500\r\n\r\nv=0").into_bytes(), Some("SIP/2.0 400 ")),
        ("bad Content-Length", format!("INVITE sip:b@x SIP/2.0\r\n{HEADERS}CSeq: 1 INVITE\r\nContent-Length: abc\r\n\r\n").into_bytes(), Some("SIP/2.0 400 ")),
        ("broken header line", format!("INVITE sip:b@x SIP/2.0\r\n{HEADERS}CSeq: 1 INVITE\r\nthis is not a header\r\n\r\n").into_bytes(), Some("SIP/2.0 400 ")),
        ("Max-Forwards 0", format!("OPTIONS sip:b@x SIP/2.0\r\n{HEADERS}CSeq: 1 OPTIONS\r\nMax-Forwards: 0\r\nContent-Length: 0\r\n\r\n").into_bytes(), Some("SIP/2.0 483 ")),
        ("oversized datagram", huge.into_bytes(), None),
        ("missing Max-Forwards", format!("OPTIONS sip:b@x SIP/2.0\r\n{HEADERS}CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n").into_bytes(), Some("SIP/2.0 400 ")),
        ("unsupported URI scheme", format!("OPTIONS tel:+4930123 SIP/2.0\r\n{HEADERS}CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n").into_bytes(), Some("SIP/2.0 416 ")),
        ("Via loop", format!("OPTIONS sip:b@x SIP/2.0\r\n{HEADERS}Via: SIP/2.0/UDP {own};branch=z9hG4bKsw0\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n").into_bytes(), Some("SIP/2.0 482 ")),
        ("over the policy size limit", format!("OPTIONS sip:b@x SIP/2.0\r\n{HEADERS}CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n{}Content-Length: 0\r\n\r\n", "X-H: 1\r\n".repeat(400)).into_bytes(), Some("SIP/2.0 513 ")),
        ("NUL bytes in a header", format!("OPTIONS sip:b@x SIP/2.0\r\n{HEADERS}CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nSubject: a\0b\r\nContent-Length: 0\r\n\r\n").into_bytes(), Some("SIP/2.0 400 ")),
        ("negative Content-Length", format!("OPTIONS sip:b@x SIP/2.0\r\n{HEADERS}CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: -5\r\n\r\n").into_bytes(), Some("SIP/2.0 400 ")),
    ];
    for (name, bytes, expect) in &cases {
        client.send_to(bytes, edge.addr()).unwrap();
        let got = answer(&client);
        match expect {
            Some(prefix) => {
                let got = got.unwrap_or_else(|| panic!("{name}: no answer"));
                assert!(got.starts_with(prefix), "{name}: {got}");
                assert!(
                    got.contains("Call-ID: bad-1"),
                    "{name}: answer matches the request: {got}"
                );
            }
            None => assert!(got.is_none(), "{name}: unexpected answer {got:?}"),
        }
    }
    assert_eq!(
        http_get(edge.http, "/healthz").map(|r| r.0),
        Some(200),
        "the edge is still up"
    );
    let m = edge.metrics();
    let malformed: f64 = m
        .lines()
        .filter(|l| {
            l.starts_with("sipwarden_edge_messages_total") && l.contains(r#"outcome="malformed""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(malformed >= 4.0, "malformed input is counted: {m}");
    let sanity: f64 = m
        .lines()
        .filter(|l| {
            l.starts_with(r#"sipwarden_edge_security_events_total{rule="sanity",action="reject""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(sanity >= 9.0, "each refused request is a sanity event: {m}");
    assert!(edge.log().contains("malformed"), "and logged");
}

fn read_all(s: &mut TcpStream, limit: Duration) -> (String, bool) {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
        }
    }
}

#[test]
fn tcp_framing_errors_close_the_connection() {
    let extra = quiet_backend()
        + "[tcp]\nmax_message_size = 4096\nheader_timeout_ms = 400\nmax_per_source = 3\n";
    let edge = EdgeProc::start(EDGE_IP, &extra);

    // Missing Content-Length on a stream: 400, then closed.
    let mut s = TcpStream::connect(edge.addr()).unwrap();
    write!(
        s,
        "OPTIONS sip:b@x SIP/2.0\r\n{HEADERS}CSeq: 1 OPTIONS\r\n\r\n"
    )
    .unwrap();
    let (got, closed) = read_all(&mut s, Duration::from_secs(3));
    assert!(
        got.starts_with("SIP/2.0 400 ") && closed,
        "{got:?} closed={closed}"
    );

    // Oversized and garbage: closed without an answer.
    for bytes in [
        format!(
            "INVITE sip:b@x SIP/2.0\r\n{HEADERS}CSeq: 1 INVITE\r\nContent-Length: 100000\r\n\r\n"
        )
        .into_bytes(),
        vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00],
    ] {
        let mut s = TcpStream::connect(edge.addr()).unwrap();
        s.write_all(&bytes).unwrap();
        let (got, closed) = read_all(&mut s, Duration::from_secs(3));
        assert!(got.is_empty() && closed, "{got:?} closed={closed}");
    }

    // Slowloris: half a header section, then nothing — closed after the header timeout.
    let mut s = TcpStream::connect(edge.addr()).unwrap();
    write!(s, "INVITE sip:b@x SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1").unwrap();
    let (_, closed) = read_all(&mut s, Duration::from_secs(3));
    assert!(closed, "slow header section closed by the edge");

    // Keep-alive ping gets a pong and the connection stays.
    let mut s = TcpStream::connect(edge.addr()).unwrap();
    s.write_all(b"\r\n\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut pong = [0u8; 2];
    s.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"\r\n");
    drop(s);
    assert!(wait_until(Duration::from_secs(3), || edge
        .metrics()
        .contains("sipwarden_edge_tcp_connections 0")));

    // Per-source limit: three open connections from one address, the fourth is closed at once.
    let held: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(edge.addr()).unwrap())
        .collect();
    assert!(
        wait_until(Duration::from_secs(3), || edge
            .metrics()
            .contains("sipwarden_edge_tcp_connections 3")),
        "{}",
        edge.metrics()
    );
    let mut extra_conn = TcpStream::connect(edge.addr()).unwrap();
    let (_, closed) = read_all(&mut extra_conn, Duration::from_secs(3));
    assert!(closed, "the connection over the per-source limit is closed");
    let m = edge.metrics();
    for reason in [
        "bad_framing",
        "too_large",
        "garbage",
        "header_timeout",
        "per_source_limit",
    ] {
        assert!(
            m.contains(&format!(
                r#"sipwarden_edge_tcp_closed_total{{reason="{reason}"}}"#
            )),
            "{reason} counted: {m}"
        );
    }
    drop(held);
    assert_eq!(http_get(edge.http, "/healthz").map(|r| r.0), Some(200));
}

#[test]
fn tcp_idle_connections_are_closed_after_their_last_message() {
    let extra = quiet_backend() + "[tcp]\nidle_timeout_ms = 600\n";
    let edge = EdgeProc::start(EDGE_IP, &extra);
    let mut s = TcpStream::connect(edge.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    // Pings 300 ms apart keep it open past one idle timeout: each read pushes the deadline.
    let opened = Instant::now();
    for _ in 0..4 {
        s.write_all(b"\r\n\r\n").unwrap();
        let mut pong = [0u8; 2];
        s.read_exact(&mut pong).unwrap();
        assert_eq!(&pong, b"\r\n");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(opened.elapsed() > Duration::from_millis(1000));
    let (_, closed) = read_all(&mut s, Duration::from_secs(3));
    assert!(closed, "an idle connection is closed");
    assert!(edge
        .metrics()
        .contains(r#"sipwarden_edge_tcp_closed_total{reason="idle_timeout"} 1"#));
}

#[test]
fn check_config_validates_and_names_the_bad_key() {
    let bin = workspace_bin("sipwarden-edge");
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[[backends]]\naddress = \"127.0.0.1:5080\"\n").unwrap();
    let out = Command::new(&bin)
        .arg("--config")
        .arg(&good)
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[health]\ninterval_ms = 100\ntimeout_ms = 500\n").unwrap();
    let out = Command::new(&bin)
        .arg("--config")
        .arg(&bad)
        .arg("--check-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("health.timeout_ms"));

    let out = Command::new(&bin)
        .arg("--config")
        .arg(&good)
        .arg("--check-config")
        .env("SIPWARDEN_TCP__MAX_PER_SOURCE", "0")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "environment overrides are validated too"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_per_source"));
}

#[test]
fn sigterm_drains_and_exits_cleanly() {
    let mut edge = EdgeProc::start(EDGE_IP, &quiet_backend());
    let mut conn = TcpStream::connect(edge.addr()).unwrap();
    assert!(wait_until(Duration::from_secs(3), || edge
        .metrics()
        .contains("sipwarden_edge_tcp_connections 1")));
    edge.proc.signal("TERM");
    let status = edge
        .proc
        .wait_exit(Duration::from_secs(5))
        .expect("exited within the grace period");
    assert!(status.success(), "{status:?}");
    let (_, closed) = read_all(&mut conn, Duration::from_secs(2));
    assert!(closed, "open connections are closed on shutdown");
    let log = edge.log();
    assert!(log.contains("draining") && log.contains("stopped"), "{log}");
}

/// Splits whole messages (`Content-Length: 0`) off the front of `text`; keeps those whose Call-ID
/// starts with `pipe-` (health-check probes and the rest are not the test's).
fn take_pipelined(text: &mut String, got: &mut Vec<String>) {
    while let Some(end) = text.find("\r\n\r\n") {
        let msg: String = text.drain(..end + 4).collect();
        if msg.contains("Call-ID: pipe-") {
            got.push(msg);
        }
    }
}

/// Reads from `s` until `want` of the test's messages have come or `limit` passes.
fn read_pipelined(s: &mut TcpStream, want: usize, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let (mut text, mut got) = (String::new(), Vec::new());
    let mut buf = [0u8; 8192];
    while got.len() < want && Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(_) => {}
        }
        take_pipelined(&mut text, &mut got);
    }
    got
}

fn cseq_of(msg: &str) -> u32 {
    msg.lines()
        .find_map(|l| l.strip_prefix("CSeq: "))
        .and_then(|v| v.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// An OPTIONS for the PBX from the phone at `me` over `transport` (`UDP`, `TCP`), with `call` as
/// its Call-ID (and branch) and `cseq` as its sequence number.
fn options_to_pbx(transport: &str, me: std::net::SocketAddr, call: &str, cseq: usize) -> String {
    format!(
        "OPTIONS sip:pbx@example.com SIP/2.0\r\nVia: SIP/2.0/{transport} {me};branch=z9hG4bK{call};rport\r\nFrom: <sip:alice@example.com>;tag=p\r\nTo: <sip:pbx@example.com>\r\nCall-ID: {call}\r\nCSeq: {cseq} OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    )
}

/// Requests pipelined in one TCP write are relayed to a TCP PBX (the edge sends what one read
/// relays per connection in sends of `tcp.flush_every` messages, 32 by default, so 40 take two)
/// and the answers pipelined back: every message arrives, whole and in order, both ways.
#[test]
fn tcp_pipelined_requests_are_relayed_in_order_both_ways() {
    const N: usize = 40;
    let pbx = std::net::TcpListener::bind("127.0.0.41:0").unwrap();
    let pbx_port = pbx.local_addr().unwrap().port();
    let extra = format!(
        "[[backends]]\naddress = \"127.0.0.41:{pbx_port}\"\ntransport = \"tcp\"\n[health]\ninterval_ms = 60000\ntimeout_ms = 50000\nfall = 5\n"
    );
    let edge = EdgeProc::start(EDGE_IP, &extra);
    // The PBX: the edge's health probe and its relay may come on separate connections; the
    // requests are answered on the one they came on, all in one write.
    let pbx_side = std::thread::spawn(move || {
        pbx.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut conns: Vec<(TcpStream, String, Vec<String>)> = Vec::new();
        let mut buf = [0u8; 8192];
        while Instant::now() < deadline && !conns.iter().any(|c| c.2.len() >= N) {
            if let Ok((c, _)) = pbx.accept() {
                c.set_nonblocking(false).unwrap();
                c.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
                conns.push((c, String::new(), Vec::new()));
            }
            for (c, text, got) in conns.iter_mut() {
                if let Ok(n) = c.read(&mut buf) {
                    text.push_str(&String::from_utf8_lossy(&buf[..n]));
                    take_pipelined(text, got);
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let Some((mut conn, _, requests)) = conns.into_iter().max_by_key(|c| c.2.len()) else {
            return (Vec::new(), None);
        };
        let answers: String = requests.iter().map(|r| ok_for(r)).collect();
        conn.write_all(answers.as_bytes()).unwrap();
        let order: Vec<u32> = requests.iter().map(|r| cseq_of(r)).collect();
        (order, Some(conn))
    });

    let mut phone = TcpStream::connect(edge.addr()).unwrap();
    let me = phone.local_addr().unwrap();
    let mut burst = String::new();
    for i in 1..=N {
        burst.push_str(&options_to_pbx("TCP", me, &format!("pipe-{i}"), i));
    }
    phone.write_all(burst.as_bytes()).unwrap();
    let answers = read_pipelined(&mut phone, N, Duration::from_secs(10));
    let (relayed, _pbx_conn) = pbx_side.join().unwrap();
    let want: Vec<u32> = (1..=N as u32).collect();
    assert_eq!(relayed, want, "requests reach the PBX whole and in order");
    let back: Vec<u32> = answers.iter().map(|a| cseq_of(a)).collect();
    assert_eq!(back, want, "answers reach the phone whole and in order");
    assert!(answers.iter().all(|a| a.starts_with("SIP/2.0 200 OK\r\n")));
}

/// A connection whose peer keeps the edge busy does not hold the others back: with one runtime
/// worker (as on a one-core edge), a request on a second connection is relayed while the first
/// connection's backlog of pipelined requests is still being handled, not after all of it (a
/// connection's task lets the others run every 32 messages while its socket has more). The edge
/// is stopped (SIGSTOP) as soon as the backlog's first request reaches the PBX, the second request
/// is written, and the edge resumed: the backlog's task is then mid-way with the rest of it
/// buffered, so without the yield the second request would wait for all of it.
#[test]
fn a_busy_tcp_connection_does_not_hold_back_another() {
    use nix::sys::signal::{kill, Signal};
    // ~200 KB: buffered whole by the kernel, and ~30 ms of the debug edge's work.
    const N: usize = 600;
    let pbx = std::net::TcpListener::bind("127.0.0.43:0").unwrap();
    let pbx_port = pbx.local_addr().unwrap().port();
    let extra = format!(
        "[[backends]]\naddress = \"127.0.0.43:{pbx_port}\"\ntransport = \"tcp\"\n[health]\ninterval_ms = 60000\ntimeout_ms = 50000\nfall = 5\n\
[policy.flood]\nrate_per_s = 1000000\nburst = 1000000\n\
[policy.rate.options]\nper_source_per_min = 100000000\nper_aor_per_min = 0\n"
    );
    let edge = EdgeProc::start_with_env(EDGE_IP, &extra, &[("TOKIO_WORKER_THREADS", "1")]);
    let edge_pid = nix::unistd::Pid::from_raw(edge.proc.pid() as i32);
    // The PBX: the Call-IDs of the test's requests in the order each connection brought them;
    // `first` hears when the backlog's first request has come.
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Vec<String>>::new()));
    let (first_tx, first) = std::sync::mpsc::channel::<()>();
    {
        let order = order.clone();
        std::thread::spawn(move || {
            for (k, conn) in pbx.incoming().take(4).enumerate() {
                let Ok(mut conn) = conn else { return };
                order.lock().unwrap().push(Vec::new());
                let (order, first_tx) = (order.clone(), first_tx.clone());
                std::thread::spawn(move || {
                    let (mut text, mut buf) = (String::new(), vec![0u8; 65536]);
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 {
                            return;
                        }
                        text.push_str(&String::from_utf8_lossy(&buf[..n]));
                        let mut got = Vec::new();
                        take_pipelined(&mut text, &mut got);
                        let ids: Vec<String> = got
                            .iter()
                            .filter_map(|m| m.lines().find_map(|l| l.strip_prefix("Call-ID: ")))
                            .map(str::to_string)
                            .collect();
                        if ids.iter().any(|id| id == "pipe-busy-1") {
                            let _ = first_tx.send(());
                        }
                        order.lock().unwrap()[k].extend(ids);
                    }
                });
            }
        });
    }
    let request = |me: std::net::SocketAddr, call: &str| options_to_pbx("TCP", me, call, 1);
    let seen = |call: &str| {
        order
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .position(|id| id == call)
    };
    // Both connections up and relaying before the backlog.
    let mut busy = TcpStream::connect(edge.addr()).unwrap();
    let mut other = TcpStream::connect(edge.addr()).unwrap();
    let (busy_me, other_me) = (busy.local_addr().unwrap(), other.local_addr().unwrap());
    busy.write_all(request(busy_me, "pipe-busy-0").as_bytes())
        .unwrap();
    other
        .write_all(request(other_me, "pipe-other-0").as_bytes())
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || seen("pipe-busy-0").is_some()
            && seen("pipe-other-0").is_some()),
        "both connections relay"
    );
    // The backlog; the edge stopped as its first request reaches the PBX; the other request
    // written meanwhile; the edge resumed.
    let burst: String = (1..=N)
        .map(|i| request(busy_me, &format!("pipe-busy-{i}")))
        .collect();
    busy.write_all(burst.as_bytes()).unwrap();
    first
        .recv_timeout(Duration::from_secs(10))
        .expect("the backlog reaches the PBX");
    kill(edge_pid, Signal::SIGSTOP).unwrap();
    let written = other.write_all(request(other_me, "pipe-other-1").as_bytes());
    kill(edge_pid, Signal::SIGCONT).unwrap();
    written.unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || seen("pipe-other-1").is_some()
            && seen(&format!("pipe-busy-{N}")).is_some()),
        "every request reaches the PBX"
    );
    let relayed = order.lock().unwrap().clone();
    let stream = relayed
        .iter()
        .find(|c| c.iter().any(|id| id == "pipe-other-1"))
        .expect("the connection that relayed pipe-other-1");
    let busy_before = stream
        .iter()
        .take_while(|id| *id != "pipe-other-1")
        .filter(|id| id.starts_with("pipe-busy-"))
        .count();
    eprintln!("pipe-other-1 reached the PBX after {busy_before} of the {N} pipelined requests");
    assert!(
        busy_before < N / 2,
        "the other connection's request waited behind {busy_before} of the {N} pipelined ones"
    );
}

/// A burst of UDP requests relayed with a send after every datagram (`udp.flush_every = 1`, so
/// each receive batch sends as it goes rather than once at its end): every request reaches the
/// PBX and every answer the phone, and each datagram's hold is counted once in the delay
/// histogram however many sends its batch took.
#[test]
fn a_udp_burst_sent_as_it_goes_loses_nothing_and_counts_each_hold_once() {
    const N: usize = 40;
    let pbx = UdpSocket::bind("127.0.0.42:0").unwrap();
    let pbx_addr = pbx.local_addr().unwrap();
    let extra = format!(
        "[[backends]]\naddress = \"{pbx_addr}\"\n[health]\ninterval_ms = 60000\ntimeout_ms = 50000\nfall = 5\n"
    );
    let edge = EdgeProc::start_with_env(EDGE_IP, &extra, &[("SIPWARDEN_UDP__FLUSH_EVERY", "1")]);
    let before = delays_counted(&edge.metrics());
    // The PBX answers each request it gets until it has them all (or 10 s pass).
    let pbx_side = std::thread::spawn(move || {
        pbx.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        let mut buf = [0u8; 65536];
        while got.len() < N && Instant::now() < deadline {
            if let Ok((n, from)) = pbx.recv_from(&mut buf) {
                let req = String::from_utf8_lossy(&buf[..n]).into_owned();
                if req.contains("Call-ID: burst-") {
                    pbx.send_to(ok_for(&req).as_bytes(), from).unwrap();
                    got.push(cseq_of(&req));
                }
            }
        }
        got
    });
    let phone = UdpSocket::bind("127.0.0.43:0").unwrap();
    let me = phone.local_addr().unwrap();
    for i in 1..=N {
        let req = options_to_pbx("UDP", me, &format!("burst-{i}"), i);
        phone.send_to(req.as_bytes(), edge.addr()).unwrap();
    }
    let mut answered = Vec::new();
    phone
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 65536];
    while answered.len() < N && Instant::now() < deadline {
        if let Ok((n, _)) = phone.recv_from(&mut buf) {
            let a = String::from_utf8_lossy(&buf[..n]).into_owned();
            assert!(a.starts_with("SIP/2.0 200 OK\r\n"), "{a}");
            answered.push(cseq_of(&a));
        }
    }
    let mut relayed = pbx_side.join().unwrap();
    relayed.sort_unstable();
    answered.sort_unstable();
    let want: Vec<u32> = (1..=N as u32).collect();
    assert_eq!(relayed, want, "every request reaches the PBX");
    assert_eq!(answered, want, "every answer reaches the phone");
    // 40 requests and 40 answers crossed the listener; nothing else did.
    wait_until(Duration::from_secs(5), || {
        delays_counted(&edge.metrics()) - before >= 2.0 * N as f64
    });
    let counted = delays_counted(&edge.metrics()) - before;
    assert_eq!(counted, 2.0 * N as f64, "each hold counted once");
}

/// `sipwarden_edge_udp_delay_seconds_count` in a metrics page.
fn delays_counted(metrics: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("sipwarden_edge_udp_delay_seconds_count "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The kernel thread id of the edge's thread named `name` (`/proc/<pid>/task/*/comm`).
fn thread_named(pid: u32, name: &str) -> Option<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
        .find(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .and_then(|t| t.file_name().to_str()?.parse().ok())
}

/// With two UDP sockets and one thread on each, spread by the kernel's flow hash
/// (`udp.spread_at = 0`), a receive thread that cannot run (held here in a ptrace stop, as if the
/// host gave its core away) does not strand the flows the kernel hashed to its socket: the other
/// socket's thread sees it stalled and takes them. Sixteen phones (sixteen source ports, so both
/// sockets get some) each get their OPTIONS answered through the PBX while `udp-0-0` is stopped.
#[test]
fn a_stalled_udp_thread_does_not_strand_its_flows() {
    stalled_thread_strands_nothing(&[
        ("SIPWARDEN_UDP__SOCKETS", "2"),
        ("SIPWARDEN_UDP__THREADS_PER_SOCKET", "1"),
        ("SIPWARDEN_UDP__SPREAD_AT", "0"),
    ]);
}

/// With the default steering, every flow goes to the first socket while the load is light, so a
/// stop of that socket's thread (`udp-0-0`) would strand them all: the other thread takes what
/// waits there and spreads the flows over both sockets by the kernel's hash, which the edge's
/// metrics show. (Here the second socket's thread never joins the first, `udp.hold_target_us = 0`;
/// joined, it takes them without a spread: `a_joined_thread_takes_the_first_sockets_datagrams…`.)
#[test]
fn a_stuck_first_socket_spreads_the_flows() {
    let edge = stalled_thread_strands_nothing(&[
        ("SIPWARDEN_UDP__SOCKETS", "2"),
        ("SIPWARDEN_UDP__THREADS_PER_SOCKET", "1"),
        ("SIPWARDEN_UDP__HOLD_TARGET_US", "0"),
    ]);
    let m = edge.metrics();
    assert_eq!(
        metric(&m, "sipwarden_edge_udp_listeners_spread "),
        Some(1.0),
        "{m}"
    );
    assert!(metric(&m, "sipwarden_edge_udp_steering_changes_total ").is_some_and(|n| n >= 1.0));
}

/// With one socket and two threads on it (`udp.threads_per_socket = 2`), the thread that is not
/// stopped is woken for every datagram while its sibling cannot run.
#[test]
fn a_stalled_udp_thread_leaves_its_socket_to_the_other_thread() {
    stalled_thread_strands_nothing(&[
        ("SIPWARDEN_UDP__SOCKETS", "1"),
        ("SIPWARDEN_UDP__THREADS_PER_SOCKET", "2"),
    ]);
}

/// When datagrams wait past `udp.hold_target_us` (1 µs here: every datagram does), the second
/// socket's thread joins the first socket, which has every flow while the load is light. Stopped
/// then, `udp-0-0` strands nothing and the flows never move: the joined thread is woken for
/// every datagram, where without joining it would find them stuck and spread the flows
/// (`a_stuck_first_socket_spreads_the_flows`).
#[test]
fn a_joined_thread_takes_the_first_sockets_datagrams_while_its_own_thread_cannot_run() {
    let keepalives = UdpSocket::bind("127.0.0.44:0").unwrap();
    let feeding = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut feeder = None;
    let edge = stalled_thread_strands_nothing_after(
        &[
            ("SIPWARDEN_UDP__SOCKETS", "2"),
            ("SIPWARDEN_UDP__THREADS_PER_SOCKET", "1"),
            ("SIPWARDEN_UDP__HOLD_TARGET_US", "1"),
        ],
        |edge| {
            // Keep-alives (dropped unanswered) are datagrams like any other to the hold: 250 a
            // second, more than a 500 ms window needs to be judged, until the test ends.
            let (to, feeding) = (edge.addr(), feeding.clone());
            feeder = Some(std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(30);
                while feeding.load(std::sync::atomic::Ordering::Relaxed)
                    && Instant::now() < deadline
                {
                    let _ = keepalives.send_to(b"\r\n\r\n", &to);
                    std::thread::sleep(Duration::from_millis(4));
                }
            }));
            assert!(
                wait_until(Duration::from_secs(10), || metric(
                    &edge.metrics(),
                    "sipwarden_edge_udp_listeners_joined "
                ) == Some(1.0)),
                "the threads joined: {}",
                edge.metrics()
            );
        },
    );
    feeding.store(false, std::sync::atomic::Ordering::Relaxed);
    if let Some(f) = feeder {
        f.join().unwrap();
    }
    let m = edge.metrics();
    assert_eq!(
        metric(&m, "sipwarden_edge_udp_listeners_joined "),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "sipwarden_edge_udp_listeners_spread "),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "sipwarden_edge_udp_steering_changes_total "),
        Some(0.0),
        "{m}"
    );
}

/// A PBX on 127.0.0.42 over UDP that answers every OPTIONS (health probes included) with 200
/// until the flag is set: the edge's config for it (backend, slow health checks), the flag, and
/// its thread.
fn answering_pbx() -> (
    String,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<()>,
) {
    let pbx = UdpSocket::bind("127.0.0.42:0").unwrap();
    let pbx_port = pbx.local_addr().unwrap().port();
    let extra = format!(
        "[[backends]]\naddress = \"127.0.0.42:{pbx_port}\"\n[health]\ninterval_ms = 60000\ntimeout_ms = 50000\nfall = 5\n"
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pbx_side = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            pbx.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let mut buf = [0u8; 65536];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((n, from)) = pbx.recv_from(&mut buf) else {
                    continue;
                };
                let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                if m.starts_with("OPTIONS ") {
                    let _ = pbx.send_to(ok_for(&m).as_bytes(), from);
                }
            }
        })
    };
    (extra, stop, pbx_side)
}

/// Sixteen phones get their OPTIONS answered through the PBX while the edge's receive thread
/// `udp-0-0` is held in a ptrace stop, with the UDP layout of `env`. Returns the edge, still running.
fn stalled_thread_strands_nothing(env: &[(&str, &str)]) -> EdgeProc {
    stalled_thread_strands_nothing_after(env, |_| {})
}

/// As [`stalled_thread_strands_nothing`], with `prepare` run on the started edge before the stop.
fn stalled_thread_strands_nothing_after(
    env: &[(&str, &str)],
    prepare: impl FnOnce(&EdgeProc),
) -> EdgeProc {
    use nix::sys::ptrace;
    use nix::sys::wait::{waitpid, WaitPidFlag};
    use nix::unistd::Pid;

    let (extra, stop, pbx_side) = answering_pbx();
    let edge = EdgeProc::start_with_env(EDGE_IP, &extra, env);

    prepare(&edge);
    let tid = thread_named(edge.proc.pid(), "udp-0-0").expect("receive thread udp-0-0");
    let tid = Pid::from_raw(tid);
    ptrace::seize(tid, ptrace::Options::empty()).expect("ptrace the receive thread");
    ptrace::interrupt(tid).expect("stop the receive thread");
    waitpid(tid, Some(WaitPidFlag::__WALL)).expect("the receive thread stopped");

    let phones: Vec<UdpSocket> = (0..16)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.43:0").unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let request = |i: usize, s: &UdpSocket| {
        let me = s.local_addr().unwrap();
        format!(
            "OPTIONS sip:pbx@example.com SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKstall{i};rport\r\nFrom: <sip:p{i}@example.com>;tag=s{i}\r\nTo: <sip:pbx@example.com>\r\nCall-ID: stall-{i}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        )
    };
    let mut answered = [false; 16];
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 65536];
    // Unanswered phones retransmit every 100 ms (as RFC 3261 timer A would, roughly).
    while answered.iter().any(|a| !a) && Instant::now() < deadline {
        for (i, s) in phones.iter().enumerate() {
            if !answered[i] {
                s.send_to(request(i, s).as_bytes(), edge.addr()).unwrap();
            }
        }
        let round = Instant::now() + Duration::from_millis(100);
        while Instant::now() < round {
            for (i, s) in phones.iter().enumerate() {
                if let Ok(n) = s.recv(&mut buf) {
                    answered[i] |= buf[..n].starts_with(b"SIP/2.0 200 ");
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let still_stopped =
        std::fs::read_to_string(format!("/proc/{}/task/{}/stat", edge.proc.pid(), tid))
            .is_ok_and(|s| s.split_whitespace().nth(2) == Some("t"));
    let _ = ptrace::detach(tid, None);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    pbx_side.join().unwrap();
    assert!(still_stopped, "udp-0-0 stayed stopped through the test");
    assert!(
        answered.iter().all(|a| *a),
        "every phone answered while udp-0-0 was stopped: {answered:?}"
    );
    edge
}

/// The edge's thread `name`, held in a ptrace stop until dropped (detached).
struct Stopped {
    pid: u32,
    tid: nix::unistd::Pid,
}

impl Stopped {
    fn thread(edge: &EdgeProc, name: &str) -> Stopped {
        use nix::sys::ptrace;
        use nix::sys::wait::{waitpid, WaitPidFlag};
        let pid = edge.proc.pid();
        let tid = thread_named(pid, name).unwrap_or_else(|| panic!("the edge's thread {name}"));
        let tid = nix::unistd::Pid::from_raw(tid);
        ptrace::seize(tid, ptrace::Options::empty()).expect("ptrace the thread");
        ptrace::interrupt(tid).expect("stop the thread");
        waitpid(tid, Some(WaitPidFlag::__WALL)).expect("the thread stopped");
        Stopped { pid, tid }
    }

    /// Whether it is still in the stop (`t` in its stat).
    fn still(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/task/{}/stat", self.pid, self.tid))
            .is_ok_and(|s| s.split_whitespace().nth(2) == Some("t"))
    }
}

impl Stopped {
    /// Lets the thread go and asserts that it stayed stopped until then and that `got` (what the
    /// phone got back meanwhile) is a 200: the edge answered without the thread.
    fn answered_without(self, got: &[u8], what: &str) {
        let still = self.still();
        drop(self);
        assert!(still, "{what} stayed stopped through the call");
        assert!(
            got.starts_with(b"SIP/2.0 200 "),
            "the phone's OPTIONS over TCP was answered while {what} was stopped: {:?}",
            String::from_utf8_lossy(got)
        );
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = nix::sys::ptrace::detach(self.tid, None);
    }
}

/// Sends a phone's OPTIONS over TCP to `edge` and returns what came back within 5 s (up to the
/// end of the first message's head).
fn tcp_options(edge: &EdgeProc, call_id: &str) -> Vec<u8> {
    let mut phone = TcpStream::connect(edge.addr()).unwrap();
    phone
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let me = phone.local_addr().unwrap();
    phone
        .write_all(
            format!(
                "OPTIONS sip:pbx@example.com SIP/2.0\r\nVia: SIP/2.0/TCP {me};branch=z9hG4bK{call_id}\r\nFrom: <sip:p@example.com>;tag=w2\r\nTo: <sip:pbx@example.com>\r\nCall-ID: {call_id}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") && Instant::now() < deadline {
        if let Ok(n) = phone.read(&mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
    }
    got
}

/// The ban writer runs on a thread of its own, so a writer that cannot go on (held here in a
/// ptrace stop, as if in the `fsync` of a slow disk or a batch of a million bans) holds up no SIP:
/// with one runtime worker (`TOKIO_WORKER_THREADS=1`, as on an edge given one core) a phone's
/// OPTIONS over TCP is relayed to the PBX and answered meanwhile. A scanner banned meanwhile is
/// still stopped by the rule, its ban waits in the queue (not yet counted), and it takes effect
/// once the writer runs again.
#[test]
fn a_stalled_ban_writer_holds_up_no_tcp_connection() {
    let (extra, stop, pbx_side) = answering_pbx();
    let edge = EdgeProc::start_with_env(EDGE_IP, &extra, &[("TOKIO_WORKER_THREADS", "1")]);
    let auto_bans = |edge: &EdgeProc| edge.bans_active("auto");

    let writer = Stopped::thread(&edge, "bans");
    // A scanner is banned by the rule while the writer is stopped.
    let scanner = UdpSocket::bind("127.0.0.44:0").unwrap();
    let scan = format!(
        "OPTIONS sip:100@{e} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bKwscan\r\n\
Max-Forwards: 70\r\nFrom: <sip:100@{e}>;tag=w1\r\nTo: <sip:100@{e}>\r\nCall-ID: writer-scan\r\n\
CSeq: 1 OPTIONS\r\nUser-Agent: friendly-scanner\r\nContent-Length: 0\r\n\r\n",
        e = edge.addr(),
        local = scanner.local_addr().unwrap()
    );
    scanner.send_to(scan.as_bytes(), edge.addr()).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || edge.events("scanner", "ban")
            >= 1.0),
        "the scanner rule banned the scanner"
    );

    // A phone's OPTIONS over TCP, through the edge's one runtime worker.
    let got = tcp_options(&edge, "writer-tcp");
    let queued = auto_bans(&edge);
    writer.answered_without(&got, "the ban writer");
    assert_eq!(queued, 0.0, "the scanner's ban waited for the writer");
    assert!(
        wait_until(Duration::from_secs(5), || auto_bans(&edge) >= 1.0),
        "the scanner's ban took effect once the writer ran again"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    pbx_side.join().unwrap();
}

/// The cluster's watch stream runs on a thread of its own (`cluster`), so a stream held up — in a
/// ptrace stop here, as if decoding and filing a snapshot of a million bans (about a second) —
/// holds up no SIP: with one runtime worker a phone's OPTIONS over TCP is answered meanwhile. A
/// ban made in the cluster meanwhile waits in the stream and is enforced once the thread runs.
#[test]
fn a_stalled_cluster_watch_holds_up_no_tcp_connection() {
    use sipwarden_tests::controller::{ControllerProc, EDGE_SECRET, OPERATOR};
    let root = tempfile::tempdir().unwrap();
    let ctl = ControllerProc::single(root.path());
    let (extra, stop, pbx_side) = answering_pbx();
    let extra = format!(
        "{extra}\n[controller]\nendpoints = [\"{}\"]\nsecret = \"{EDGE_SECRET}\"\n",
        ctl.grpc
    );
    let edge = EdgeProc::start_with_env(EDGE_IP, &extra, &[("TOKIO_WORKER_THREADS", "1")]);
    assert!(
        wait_until(Duration::from_secs(10), || edge.connected()),
        "the edge connected to the controller"
    );
    let cluster_bans = |edge: &EdgeProc| edge.bans_active("cluster");

    let watch = Stopped::thread(&edge, "cluster");
    assert!(ctl
        .ctl(OPERATOR, &["ban", "add", "ip", "127.0.0.45"])
        .status
        .success());
    let got = tcp_options(&edge, "watch-tcp");
    let held = cluster_bans(&edge);
    watch.answered_without(&got, "the watch");
    assert_eq!(held, 0.0, "the cluster's ban waited in the stream");
    assert!(
        wait_until(Duration::from_secs(5), || cluster_bans(&edge) >= 1.0),
        "the cluster's ban took effect once the watch ran again"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    pbx_side.join().unwrap();
}
