//! Edges and controllers as one system: two edges at two "sites" (127.0.0.2 and 127.0.0.3) watch
//! a controller; a ban added with `sipwardenctl` stops traffic from that address at both, and the
//! time from the API's acknowledgement to enforcement at each edge is measured.

use sipwarden_tests::controller::*;
use sipwarden_tests::*;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

const PBX_IP: &str = "127.0.0.51";
const PHONE_IP: &str = "127.0.0.52";

fn options(from: &UdpSocket, n: u32) -> String {
    let local = from.local_addr().unwrap();
    format!(
        "OPTIONS sip:probe@127.0.0.2 SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bKcb{n}\r\n\
Max-Forwards: 70\r\nFrom: <sip:probe@127.0.0.2>;tag=p{n}\r\nTo: <sip:probe@127.0.0.2>\r\n\
Call-ID: cluster-probe-{n}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    )
}

fn gate_drops(edge: &EdgeProc) -> f64 {
    edge.events("ban", "drop")
}

/// One controller, a SIPp PBX, and two edges at two sites (127.0.0.2 and 127.0.0.3) connected to
/// the controller.
struct TwoSites {
    ctl: ControllerProc,
    pbx: SippServer,
    edges: [EdgeProc; 2],
    _root: tempfile::TempDir,
}

impl TwoSites {
    fn start() -> TwoSites {
        let root = tempfile::tempdir().unwrap();
        let ctl = ControllerProc::single(root.path());
        let pbx_port = free_port(PBX_IP);
        let pbx = SippServer::start(root.path(), "pbx.xml", PBX_IP, pbx_port, "udp");
        let link = format!(
            "[[backends]]\naddress = \"{PBX_IP}:{pbx_port}\"\n\n[controller]\nendpoints = [\"{}\"]\nsecret = \"{EDGE_SECRET}\"\n",
            ctl.grpc
        );
        let edges = [
            EdgeProc::start("127.0.0.2", &link),
            EdgeProc::start("127.0.0.3", &link),
        ];
        for e in &edges {
            assert!(
                wait_until(Duration::from_secs(10), || e.connected()),
                "edge {} connected to the controller",
                e.ip
            );
        }
        TwoSites {
            ctl,
            pbx,
            edges,
            _root: root,
        }
    }
}

#[test]
fn a_ban_through_sipwardenctl_reaches_both_sites() {
    let sites = TwoSites::start();
    let (ctl, edges) = (&sites.ctl, &sites.edges);

    let phone = UdpSocket::bind(format!("{PHONE_IP}:0")).unwrap();
    let out = ctl.ctl(
        OPERATOR,
        &[
            "ban",
            "add",
            "ip",
            PHONE_IP,
            "--reason",
            "cluster test",
            "--ttl",
            "600",
        ],
    );
    let acked = Instant::now();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Probe both edges from the banned address until each drops it at the gate.
    let mut enforced: [Option<Duration>; 2] = [None, None];
    let mut n = 0;
    while enforced.iter().any(Option::is_none) && acked.elapsed() < Duration::from_secs(10) {
        for (i, e) in edges.iter().enumerate() {
            if enforced[i].is_none() {
                n += 1;
                phone
                    .send_to(options(&phone, n).as_bytes(), e.addr())
                    .unwrap();
                if gate_drops(e) >= 1.0 {
                    enforced[i] = Some(acked.elapsed());
                }
            }
        }
    }
    let [Some(a), Some(b)] = enforced else {
        panic!("the ban did not reach both edges within 10 s: {enforced:?}");
    };
    println!(
        "ban acknowledged → enforced: site A {} ms, site B {} ms (target < 200 ms)",
        a.as_millis(),
        b.as_millis()
    );

    // Unbanned through the API: both edges let the address through again.
    let out = ctl.ctl(
        OPERATOR,
        &["ban", "rm", "--target", &format!("ip:{PHONE_IP}")],
    );
    assert!(out.status.success());
    for e in edges {
        assert!(
            wait_until(Duration::from_secs(5), || {
                let before = gate_drops(e);
                n += 1;
                phone
                    .send_to(options(&phone, n).as_bytes(), e.addr())
                    .unwrap();
                std::thread::sleep(Duration::from_millis(20));
                gate_drops(e) == before
            }),
            "edge {} lifted the ban",
            e.ip
        );
    }
}

/// SIPVicious scans site A; A's scanner rule bans it, the ban goes through the controller to site
/// B, and B drops the scanner at the gate before any of its packets is parsed or forwarded.
#[test]
fn an_attack_on_site_a_is_banned_at_site_b_before_it_arrives() {
    const ATTACKER: &str = "127.0.0.53";
    let sites = TwoSites::start();
    let (ctl, pbx) = (&sites.ctl, &sites.pbx);
    let [a, b] = &sites.edges;

    let scan = |edge: &EdgeProc| {
        let port = edge.sip_port.to_string();
        sipvicious::run(
            "sipvicious_svmap",
            ATTACKER,
            &["-p", &port, &edge.ip],
            Duration::from_secs(30),
        )
    };
    let at_a = scan(a);
    assert!(at_a.output.contains("found nothing"), "{}", at_a.output);
    assert_eq!(a.events("scanner", "ban"), 1.0, "site A banned the scanner");
    // The cluster has it (proposed by edge A, attributed to it).
    let bans = ctl.bans(true).unwrap();
    let ban = bans
        .iter()
        .find(|x| x["target"]["value"] == ATTACKER)
        .expect("the auto-ban reached the cluster");
    assert_eq!(ban["created_by"], "edge:edge-test");
    assert_eq!(ban["source"]["kind"], "auto_rule");
    // Site B got it through the watch stream.
    assert!(wait_until(Duration::from_secs(5), || b
        .bans_active("cluster")
        >= 1.0));

    let before = pbx.received_messages().len();
    let at_b = scan(b);
    assert!(at_b.output.contains("found nothing"), "{}", at_b.output);
    assert!(
        b.events("ban", "drop") >= 1.0,
        "site B dropped the scanner at the gate"
    );
    assert_eq!(
        b.events("scanner", "ban"),
        0.0,
        "site B never had to parse it"
    );
    let after: Vec<String> = pbx.received_messages()[before..].to_vec();
    assert!(
        after.iter().all(|m| !m.contains("friendly-scanner")),
        "nothing of the scan reached the PBX through B"
    );
}

/// Whether `edge` drops the next datagram from `sock` at its gate (waits up to `limit`).
fn gate_drops_from(edge: &EdgeProc, sock: &UdpSocket, n: &mut u32, limit: Duration) -> bool {
    wait_until(limit, || {
        let before = gate_drops(edge);
        *n += 1;
        sock.send_to(options(sock, *n).as_bytes(), edge.addr())
            .unwrap();
        wait_until(Duration::from_millis(300), || gate_drops(edge) > before)
    })
}

fn ban_ip(node: &ControllerProc, ip: &str) -> bool {
    let body = format!(r#"{{"target":{{"type":"ip","value":"{ip}"}},"reason":"failover test"}}"#);
    node.request("POST", "/api/v1/bans", Some(OPERATOR), Some(&body))
        .is_some_and(|(s, _)| s == 201)
}

/// Three controllers; the edge watches the first. Killing it moves the edge to another controller
/// without losing a ban; with every controller down the edge keeps enforcing; when they come back
/// it catches up.
#[test]
fn edges_fail_over_between_controllers_and_stay_static_when_all_are_down() {
    let root = tempfile::tempdir().unwrap();
    let seats: Vec<Seat> = (1..=3).map(Seat::new).collect();
    let mut ctls: Vec<ControllerProc> = seats
        .iter()
        .map(|s| ControllerProc::start(root.path(), s, &seats, false, 10_000))
        .collect();
    let refs: Vec<&ControllerProc> = ctls.iter().collect();
    agreed_leader(&refs, Duration::from_secs(15)).expect("a leader");
    let pbx_port = free_port(PBX_IP);
    let _pbx = SippServer::start(root.path(), "pbx.xml", PBX_IP, pbx_port, "udp");
    let endpoints: Vec<String> = seats.iter().map(|s| format!("\"{}\"", s.grpc)).collect();
    let link = format!(
        "[[backends]]\naddress = \"{PBX_IP}:{pbx_port}\"\n\n[controller]\nendpoints = [{}]\nsecret = \"{EDGE_SECRET}\"\nreconnect_max_ms = 500\n",
        endpoints.join(", ")
    );
    let edge = EdgeProc::start("127.0.0.2", &link);
    assert!(wait_until(Duration::from_secs(10), || edge.connected()));

    let socks: Vec<UdpSocket> = (54..=56)
        .map(|i| UdpSocket::bind(format!("127.0.0.{i}:0")).unwrap())
        .collect();
    let ip = |i: usize| socks[i].local_addr().unwrap().ip().to_string();
    let mut n = 0u32;

    assert!(ban_ip(&ctls[1], &ip(0)));
    assert!(
        gate_drops_from(&edge, &socks[0], &mut n, Duration::from_secs(5)),
        "first ban enforced"
    );

    // Kill the controller the edge watches (the first endpoint).
    ctls[0].kill();
    let survivors: Vec<&ControllerProc> = ctls[1..].iter().collect();
    agreed_leader(&survivors, Duration::from_secs(15)).expect("a leader among the survivors");
    assert!(ban_ip(&ctls[2], &ip(1)));
    assert!(
        gate_drops_from(&edge, &socks[1], &mut n, Duration::from_secs(10)),
        "a ban made after the failover reaches the edge"
    );
    assert!(
        gate_drops_from(&edge, &socks[0], &mut n, Duration::from_secs(2)),
        "the first still holds"
    );

    // Every controller down: the edge keeps enforcing what it has.
    ctls[1].kill();
    ctls[2].kill();
    assert!(
        wait_until(Duration::from_secs(10), || !edge.connected()),
        "the edge noticed"
    );
    assert!(gate_drops_from(
        &edge,
        &socks[0],
        &mut n,
        Duration::from_secs(2)
    ));
    assert!(gate_drops_from(
        &edge,
        &socks[1],
        &mut n,
        Duration::from_secs(2)
    ));

    // They come back; the edge reconnects and catches up with a ban made since.
    for c in &mut ctls {
        c.restart();
    }
    let refs: Vec<&ControllerProc> = ctls.iter().collect();
    agreed_leader(&refs, Duration::from_secs(15)).expect("a leader after the restart");
    assert!(ban_ip(&ctls[0], &ip(2)));
    assert!(
        gate_drops_from(&edge, &socks[2], &mut n, Duration::from_secs(10)),
        "the edge caught up after the controllers came back"
    );
    assert!(gate_drops_from(
        &edge,
        &socks[0],
        &mut n,
        Duration::from_secs(2)
    ));
}
