//! Three controllers and edges at two sites as one system: registrations made through one edge
//! are listed by the cluster and honoured by the other edges of the site; killing the leader
//! loses no ban and no registration; edges follow the new leader and catch up after restarts.

use sipwarden_tests::controller::*;
use sipwarden_tests::*;
use std::net::UdpSocket;
use std::time::Duration;

const PBX_IP: &str = "127.0.0.61";
const PHONE_IP: &str = "127.0.0.62";
const PHONE2_IP: &str = "127.0.0.63";
const BANNED_IP: &str = "127.0.0.64";

/// An edge `id` of `site` on `ip`, linked to every controller.
fn edge(ip: &str, id: &str, site: &str, pbx: &str, seats: &[Seat]) -> EdgeProc {
    let extra = format!("[[backends]]\naddress = \"{pbx}\"\n\n{}", edge_link(seats));
    let e = EdgeProc::start_with_env(
        ip,
        &extra,
        &[("SIPWARDEN_EDGE__ID", id), ("SIPWARDEN_EDGE__SITE", site)],
    );
    assert!(
        wait_until(Duration::from_secs(10), || e.connected()),
        "edge {id} connected"
    );
    e
}

/// Sends an initial INVITE from `sock` to `edge` and returns the first final status (the PBX
/// answers 200 to anything the edge forwards).
fn invite_status(sock: &UdpSocket, edge: &EdgeProc, n: &mut u32) -> Option<u16> {
    *n += 1;
    sip_status(sock, &edge.addr(), "INVITE", "1001", "cs", *n)
}

/// Registers `user` from `ip` through `edge` with a SIPp phone.
fn register(dir: &std::path::Path, ip: &str, user: &str, edge: &EdgeProc) {
    let run = sipp_client(
        dir,
        "phone_register.xml",
        ip,
        free_port(ip),
        "udp",
        &edge.addr(),
        user,
        1,
        Duration::from_secs(10),
    );
    assert!(run.success, "{} registers: {}", user, run.errors);
}

/// The binding of `aor` as `node` lists it, once it is there (5 s).
fn binding_of(node: &ControllerProc, aor: &str) -> Option<serde_json::Value> {
    let mut found = None;
    wait_until(Duration::from_secs(5), || {
        found = node.registrations().into_iter().find(|b| b["aor"] == aor);
        found.is_some()
    });
    found
}

/// Whether `edge` drops a datagram from `sock` at its gate within `limit`.
fn banned_at(edge: &EdgeProc, sock: &UdpSocket, n: &mut u32, limit: Duration) -> bool {
    wait_until(limit, || {
        let before = edge.events("ban", "drop");
        *n += 1;
        let msg = format!(
            "OPTIONS sip:x@{a} SIP/2.0\r\nVia: SIP/2.0/UDP {l};branch=z9hG4bKbn{n}\r\nMax-Forwards: 70\r\n\
From: <sip:x@{a}>;tag={n}\r\nTo: <sip:x@{a}>\r\nCall-ID: bn{n}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
            a = edge.addr(),
            l = sock.local_addr().unwrap()
        );
        sock.send_to(msg.as_bytes(), edge.addr()).unwrap();
        wait_until(Duration::from_millis(300), || {
            edge.events("ban", "drop") > before
        })
    })
}

#[test]
fn registrations_and_bans_survive_the_leader_and_reach_every_edge_of_the_site() {
    let root = tempfile::tempdir().unwrap();
    let (seats, mut ctls) = cluster(root.path(), 3, "");
    let pbx_port = free_port(PBX_IP);
    let _pbx = SippServer::start(root.path(), "pbx.xml", PBX_IP, pbx_port, "udp");
    let pbx = format!("{PBX_IP}:{pbx_port}");
    // Site A has two edges; site B one.
    let a1 = edge("127.0.0.2", "a1", "site-a", &pbx, &seats);
    let a2 = edge("127.0.0.4", "a2", "site-a", &pbx, &seats);
    let mut b = edge("127.0.0.3", "b1", "site-b", &pbx, &seats);

    let phone = UdpSocket::bind(format!("{PHONE_IP}:0")).unwrap();
    let mut n = 0;
    assert_eq!(
        invite_status(&phone, &a2, &mut n),
        Some(403),
        "no registration yet: the registered-source rule refuses the call"
    );

    // The phone registers through a1; the cluster lists the binding a1 published.
    register(root.path(), PHONE_IP, "1001", &a1);
    let aor = "sip:1001@127.0.0.2";
    let bnd = binding_of(&ctls[0], aor).expect("the registration reached the cluster");
    assert_eq!(bnd["edge_id"], "a1");
    assert_eq!(bnd["site"], "site-a");
    assert_eq!(bnd["transport"], "udp");
    assert_eq!(bnd["user_agent"], "sipwarden-test-phone");
    assert!(bnd["source"]
        .as_str()
        .is_some_and(|s| s.starts_with(PHONE_IP)));
    assert!(bnd["contact"]
        .as_str()
        .is_some_and(|c| c.starts_with(&format!("sip:1001@{PHONE_IP}:"))));
    assert!(bnd["flow_token"]
        .as_str()
        .is_some_and(|t| t.starts_with("sw1")));
    let table = ctls[0].ctl(VIEWER, &["reg", "list"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("site-a"));

    // The other edge of site A lets the registered phone call; site B's edge does not.
    assert!(
        wait_until(Duration::from_secs(5), || invite_status(
            &phone, &a2, &mut n
        ) == Some(200)),
        "a2 honours the registration a1 saw"
    );
    assert_eq!(
        invite_status(&phone, &b, &mut n),
        Some(403),
        "registrations are per site"
    );

    // An account ban (AOR) reaches the edges too: the registered phone's calls are refused
    // until it is lifted.
    let account = "sip:1001@127.0.0.4";
    assert!(ctls[0]
        .ctl(OPERATOR, &["ban", "add", "aor", account])
        .status
        .success());
    assert!(
        wait_until(Duration::from_secs(5), || invite_status(
            &phone, &a2, &mut n
        ) == Some(403)
            && a2.events("ban.aor", "reject") >= 1.0),
        "the account ban is enforced"
    );
    assert!(ctls[0]
        .ctl(
            OPERATOR,
            &["ban", "rm", "--target", &format!("aor:{account}")]
        )
        .status
        .success());
    assert!(
        wait_until(Duration::from_secs(5), || invite_status(
            &phone, &a2, &mut n
        ) == Some(200)),
        "lifted"
    );

    // A ban from the API, then the leader dies.
    let banned = UdpSocket::bind(format!("{BANNED_IP}:0")).unwrap();
    let out = ctls[1].ctl(OPERATOR, &["ban", "add", "ip", BANNED_IP]);
    assert!(out.status.success());
    for e in [&a1, &a2, &b] {
        assert!(banned_at(e, &banned, &mut n, Duration::from_secs(5)));
    }
    let refs: Vec<&ControllerProc> = ctls.iter().collect();
    let leader = agreed_leader(&refs, Duration::from_secs(5)).unwrap();
    let li = ctls.iter().position(|c| c.id == leader).unwrap();
    ctls[li].kill();
    let survivors: Vec<&ControllerProc> = ctls.iter().filter(|c| c.id != leader).collect();
    let new_leader = agreed_leader(&survivors, Duration::from_secs(15)).expect("a new leader");
    println!("leader {leader} killed; {new_leader} leads");

    // Nothing acknowledged is lost, and the edges still enforce both.
    for s in &survivors {
        assert!(
            binding_of(s, aor).is_some(),
            "node {} kept the binding",
            s.id
        );
        assert!(s
            .bans(true)
            .unwrap()
            .iter()
            .any(|x| x["target"]["value"] == BANNED_IP));
    }
    for e in [&a1, &a2, &b] {
        assert!(banned_at(e, &banned, &mut n, Duration::from_secs(2)));
    }
    assert_eq!(invite_status(&phone, &a2, &mut n), Some(200));

    // After the failover a second phone registers at site B; site B's edge restarts and gets
    // it back from the cluster (its own registration, learned before the restart).
    register(root.path(), PHONE2_IP, "1002", &b);
    let survivor = survivors[0];
    assert!(binding_of(survivor, "sip:1002@127.0.0.3").is_some());
    b.restart();
    assert!(wait_until(Duration::from_secs(10), || b.connected()));
    let phone2 = UdpSocket::bind(format!("{PHONE2_IP}:0")).unwrap();
    assert_eq!(
        invite_status(&phone2, &b, &mut n),
        Some(200),
        "the restarted edge knows the registration from the cluster"
    );
    assert!(banned_at(&b, &banned, &mut n, Duration::from_secs(2)));

    // Every controller down: the edges keep enforcing the ban and the registrations.
    for c in ctls.iter_mut() {
        c.kill();
    }
    assert!(wait_until(Duration::from_secs(10), || !a2.connected()));
    assert!(banned_at(&a2, &banned, &mut n, Duration::from_secs(2)));
    assert_eq!(invite_status(&phone, &a2, &mut n), Some(200));
    // They come back and the edges catch up with a ban made since.
    for c in ctls.iter_mut() {
        c.restart();
    }
    let refs: Vec<&ControllerProc> = ctls.iter().collect();
    agreed_leader(&refs, Duration::from_secs(15)).expect("a leader after the restart");
    let late = UdpSocket::bind("127.0.0.65:0").unwrap();
    assert!(ctls[0]
        .ctl(OPERATOR, &["ban", "add", "ip", "127.0.0.65"])
        .status
        .success());
    for e in [&a1, &a2, &b] {
        assert!(
            banned_at(e, &late, &mut n, Duration::from_secs(10)),
            "edge {} caught up",
            e.ip
        );
    }
    assert!(binding_of(&ctls[0], aor).is_some());

    // One address banned twice, everywhere and at site A alone (the controllers keep the two
    // apart): lifting the ban everywhere leaves site A's in force at site A's edges.
    let twice_ip = "127.0.0.66";
    let twice = UdpSocket::bind(format!("{twice_ip}:0")).unwrap();
    let add = |extra: &[&str]| -> String {
        let args = [&["--json", "ban", "add", "ip", twice_ip][..], extra].concat();
        let out = ctls[0].ctl(OPERATOR, &args);
        assert!(out.status.success(), "{out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["id"].as_str().expect("the ban's id").to_string()
    };
    let everywhere = add(&[]);
    let site_a = add(&["--site", "site-a"]);
    assert_ne!(everywhere, site_a);
    for e in [&a1, &a2, &b] {
        assert!(banned_at(e, &twice, &mut n, Duration::from_secs(10)));
    }
    let revision = |e: &EdgeProc| metric(&e.metrics(), "sipwarden_edge_watch_revision");
    let rm = |id: &str| {
        assert!(ctls[0].ctl(OPERATOR, &["ban", "rm", id]).status.success());
    };
    rm(&everywhere);
    assert!(
        wait_until(Duration::from_secs(10), || !banned_at(
            &b,
            &twice,
            &mut n,
            Duration::from_millis(300)
        )),
        "site B's edge lifts the ban"
    );
    let lifted_at = revision(&b).expect("b's watch revision");
    for e in [&a1, &a2] {
        assert!(
            wait_until(Duration::from_secs(10), || revision(e) >= Some(lifted_at)),
            "edge {} saw the removal",
            e.ip
        );
        assert!(
            banned_at(e, &twice, &mut n, Duration::from_secs(2)),
            "edge {} still enforces site A's ban",
            e.ip
        );
    }
    rm(&site_a);
    assert!(
        wait_until(Duration::from_secs(10), || !banned_at(
            &a1,
            &twice,
            &mut n,
            Duration::from_millis(300)
        )),
        "lifted with its last ban"
    );
}

/// Reads SIP messages on `sock` until one satisfies `want` (3 s).
fn recv_until(sock: &UdpSocket, want: impl Fn(&str) -> bool) -> Option<String> {
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let mut buf = [0u8; 8192];
    while std::time::Instant::now() < deadline {
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            if want(&text) {
                return Some(text);
            }
        }
    }
    None
}

/// Two edges share one advertised address (as behind a load balancer) and one flow key. A TCP
/// phone registers through a1; the PBX's call reaches b1, which does not hold the phone's
/// connection: b1 relays it to a1 (learned from the controllers), a1 delivers it over the phone's
/// own connection, and the answers come back the same way.
#[test]
fn a_pbx_request_reaching_another_edge_is_relayed_to_the_one_holding_the_phone() {
    const VIP: &str = "127.0.0.99:5999";
    let root = tempfile::tempdir().unwrap();
    let (seats, _ctls) = cluster(root.path(), 1, "");
    let pbx_port = free_port(PBX_IP);
    let registrar = SippServer::start(root.path(), "pbx.xml", PBX_IP, pbx_port, "udp");
    let extra = format!(
        "[[backends]]\naddress = \"{PBX_IP}:{pbx_port}\"\n\n{}",
        edge_link(&seats)
    );
    let trusted = format!("[\"{PBX_IP}/32\"]");
    let start = |ip: &str, id: &str| {
        let e = EdgeProc::start_with_env(
            ip,
            &extra,
            &[
                ("SIPWARDEN_EDGE__ID", id),
                ("SIPWARDEN_EDGE__SITE", "hq"),
                ("SIPWARDEN_FLOW__KEYS", "[\"shared-cluster-flow-key-0001\"]"),
                ("SIPWARDEN_LISTENERS__0__ADVERTISE", VIP),
                ("SIPWARDEN_LISTENERS__1__ADVERTISE", VIP),
                ("SIPWARDEN_TRUSTED_PBX", &trusted),
            ],
        );
        assert!(wait_until(Duration::from_secs(10), || e.connected()));
        e
    };
    let a1 = start("127.0.0.2", "a1");
    let b1 = start("127.0.0.3", "b1");
    assert!(
        wait_until(Duration::from_secs(5), || metric(
            &b1.metrics(),
            "sipwarden_edge_peer_edges"
        ) == Some(1.0)),
        "b1 knows a1"
    );

    // The phone registers over TCP through a1 and waits for a call.
    let phone_port = free_port(PHONE_IP);
    let dir = root.path().to_path_buf();
    let a1_addr = a1.addr();
    let phone = std::thread::spawn(move || {
        sipp_client(
            &dir,
            "phone_register_answer.xml",
            PHONE_IP,
            phone_port,
            "tcp",
            &a1_addr,
            "alice",
            1,
            Duration::from_secs(15),
        )
    });
    let token = {
        let mut t = None;
        wait_until(Duration::from_secs(5), || {
            t = _ctls[0]
                .registrations()
                .into_iter()
                .find(|b| b["aor"] == format!("sip:alice@{}", a1.ip))
                .and_then(|b| b["flow_token"].as_str().map(str::to_string));
            t.is_some()
        });
        t.expect("the phone's registration is in the cluster")
    };

    // The PBX calls the phone through b1 (on the REGISTER's Call-ID: the SIPp phone maps what it
    // receives to its one call by Call-ID).
    let call_id = registrar
        .received_messages()
        .iter()
        .find(|m| m.starts_with("REGISTER "))
        .and_then(|m| {
            m.lines()
                .find(|l| l.to_ascii_lowercase().starts_with("call-id:"))
                .map(|l| l[8..].trim().to_string())
        })
        .expect("the registrar saw the REGISTER");
    let pbx = UdpSocket::bind(format!("{PBX_IP}:0")).unwrap();
    let local = pbx.local_addr().unwrap();
    let target = format!("sip:alice@{PHONE_IP}:{phone_port};transport=tcp");
    let request = |method: &str, cseq: u32, to_tag: &str, branch: &str| {
        format!(
            "{method} {target} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bK{branch}\r\n\
Route: <sip:{token}@{VIP};lr>\r\nMax-Forwards: 70\r\nFrom: <sip:pbx@{PBX_IP}>;tag=pbx1\r\n\
To: <sip:alice@{PHONE_IP}>{to_tag}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} {method}\r\n\
Contact: <sip:pbx@{local}>\r\nContent-Length: 0\r\n\r\n"
        )
    };
    pbx.send_to(request("INVITE", 1, "", "inv1").as_bytes(), b1.addr())
        .unwrap();
    let ok = recv_until(&pbx, |m| {
        m.starts_with("SIP/2.0 200") && m.contains("INVITE")
    });
    let Some(ok) = ok else {
        let run = phone.join().unwrap();
        panic!("no 200 to the INVITE came back: {}", run.errors);
    };
    let tag = ok
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("to:"))
        .and_then(|l| l.split(";tag=").nth(1))
        .expect("To tag")
        .trim()
        .to_string();
    let to_tag = format!(";tag={tag}");
    pbx.send_to(request("ACK", 1, &to_tag, "ack1").as_bytes(), b1.addr())
        .unwrap();
    pbx.send_to(request("BYE", 2, &to_tag, "bye1").as_bytes(), b1.addr())
        .unwrap();
    assert!(
        recv_until(&pbx, |m| m.starts_with("SIP/2.0 200") && m.contains("BYE")).is_some(),
        "the BYE was answered"
    );
    let run = phone.join().unwrap();
    assert!(run.success, "the phone's call completed: {}", run.errors);
    // a1 delivered it (a PBX-side INVITE forwarded there).
    assert_eq!(
        metric(
            &a1.metrics(),
            "sipwarden_edge_messages_total{kind=\"request\",method=\"INVITE\",direction=\"from_pbx\",outcome=\"forwarded\"}"
        ),
        Some(1.0),
        "a1 carried the call to the phone"
    );
}
