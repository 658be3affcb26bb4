//! Threat rules end to end through the real edge with SIPp peers: floods cut off without hurting a
//! phone on another address, bans kept across a restart, toll-fraud bursts stopped, policy reloaded
//! by SIGHUP and by a change of the config file.

use sipwarden_tests::*;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

const EDGE_IP: &str = "127.0.0.40";
const PBX_IP: &str = "127.0.0.41";
const PHONE_IP: &str = "127.0.0.42";
const FLOODER_IP: &str = "127.0.0.43";

fn pbx_site(policy: &str) -> (tempfile::TempDir, SippServer, EdgeProc) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port(PBX_IP);
    // `-deadcall_wait 0`: answer a retransmitted REGISTER again, as a registrar's transaction layer
    // would. SIPp otherwise swallows messages of calls it has finished, so one answer lost in the
    // flood (the kernel drops datagrams on a socket the flood fills) would never be repeated.
    let pbx = SippServer::start_with(
        dir.path(),
        "pbx.xml",
        PBX_IP,
        port,
        "udp",
        &["-deadcall_wait", "0"],
    );
    let edge = EdgeProc::start(
        EDGE_IP,
        &format!("[[backends]]\naddress = \"{PBX_IP}:{port}\"\n\n{policy}"),
    );
    (dir, pbx, edge)
}

fn options(from: &UdpSocket, user: &str, n: u32) -> String {
    let local = from.local_addr().unwrap();
    format!(
        "OPTIONS sip:{user}@{EDGE_IP} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bKfl{n}\r\n\
Max-Forwards: 70\r\nFrom: <sip:{user}@{EDGE_IP}>;tag=f{n}\r\nTo: <sip:{user}@{EDGE_IP}>\r\n\
Call-ID: flood-{n}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    )
}

fn flood_received(pbx: &SippServer) -> usize {
    pbx.received_messages()
        .iter()
        .filter(|m| m.starts_with("OPTIONS sip:flood@"))
        .count()
}

#[test]
fn a_flood_is_cut_off_banned_and_the_ban_survives_a_restart() {
    let (dir, pbx, mut edge) = pbx_site(
        "[policy.flood]\nrate_per_s = 50\nburst = 50\nban_after = 200\nwindow_s = 10\nban_ttl_s = 600\n",
    );
    // A phone registers meanwhile from another address.
    let target = edge.addr();
    let phone_dir = dir.path().to_path_buf();
    // SIP over UDP rides out loss by retransmission (T1 doubling to T2): give the phone the
    // transaction's full lifetime rather than SIPp's 4 s default, so a loaded test machine whose
    // kernel drops some of the phone's datagrams during the flood still counts a failure only
    // when a transaction really fails.
    let phone = std::thread::spawn(move || {
        sipp_client_args(
            &phone_dir,
            "phone_register.xml",
            PHONE_IP,
            free_port(PHONE_IP),
            "udp",
            &target,
            "1001",
            40,
            Duration::from_secs(40),
            &["-recv_timeout", "16000"],
        )
    });

    let flooder = UdpSocket::bind(format!("{FLOODER_IP}:0")).unwrap();
    let sent = 20_000u32;
    let start = Instant::now();
    for n in 0..sent {
        let _ = flooder.send_to(options(&flooder, "flood", n).as_bytes(), edge.addr());
        if start.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    let run = phone.join().unwrap();
    assert!(
        run.success,
        "the phone failed during the flood:\n{}\nPBX got {} REGISTERs; edge log tail:\n{}",
        run.errors,
        pbx.received("REGISTER"),
        edge.log()
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        wait_until(Duration::from_secs(5), || edge.events("flood", "ban")
            >= 1.0),
        "the flooder was banned"
    );
    let through = flood_received(&pbx);
    println!(
        "flood: {sent} sent in {:?}, {through} reached the PBX",
        start.elapsed()
    );
    // Burst plus the sustained rate over the seconds the flood lasted, and a margin for the
    // ban batch.
    let bound = 50 + 50 * (start.elapsed().as_secs() as usize + 1) + 50;
    assert!(
        through <= bound,
        "{through} flood messages reached the PBX (bound {bound})"
    );

    // The ban is kept on disk (the ban file's journal, until the file is next written whole)
    // and enforced after a restart.
    let on_disk = ["data/bans.json", "data/bans.journal"].map(|f| edge.dir.path().join(f));
    assert!(
        wait_until(Duration::from_secs(5), || on_disk.iter().any(|f| {
            std::fs::read_to_string(f).is_ok_and(|t| t.contains(FLOODER_IP))
        })),
        "the ban file or its journal holds the flooder"
    );
    edge.restart();
    let before = flood_received(&pbx);
    for n in 0..5 {
        flooder
            .send_to(
                options(&flooder, "flood", 100_000 + n).as_bytes(),
                edge.addr(),
            )
            .unwrap();
    }
    let phone2 = UdpSocket::bind(format!("{PHONE_IP}:0")).unwrap();
    phone2
        .send_to(options(&phone2, "after", 1).as_bytes(), edge.addr())
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || pbx
            .received_messages()
            .iter()
            .any(|m| m.starts_with("OPTIONS sip:after@"))),
        "another address still gets through"
    );
    assert_eq!(
        flood_received(&pbx),
        before,
        "the banned flooder stays out after the restart"
    );
    assert!(edge.events("ban", "drop") >= 5.0);
}

#[test]
fn a_toll_fraud_burst_is_stopped() {
    let (dir, pbx, edge) = pbx_site("[policy.registered]\ntrunks = [\"127.0.0.42/32\"]\n");
    // 20 calls to +882 16… (international networks): all refused by the edge.
    let run = sipp_client_args(
        dir.path(),
        "phone_dial.xml",
        PHONE_IP,
        free_port(PHONE_IP),
        "udp",
        &edge.addr(),
        "0088216",
        20,
        Duration::from_secs(30),
        &["-r", "10"],
    );
    assert!(run.success, "{}", run.errors);
    assert_eq!(pbx.received("INVITE"), 0, "no premium call reached the PBX");
    assert_eq!(edge.events("tollfraud.prefix", "reject"), 20.0);

    // A sequential sweep (+4930555 1, 2, 3, …) is banned at the 5th number.
    let run = sipp_client_args(
        dir.path(),
        "phone_dial.xml",
        PHONE_IP,
        free_port(PHONE_IP),
        "udp",
        &edge.addr(),
        "+4930555",
        8,
        Duration::from_secs(30),
        &["-r", "5"],
    );
    println!(
        "sweep: success={} (calls after the ban time out)",
        run.success
    );
    assert_eq!(edge.events("tollfraud.sequential", "ban"), 1.0);
    assert_eq!(
        pbx.received("INVITE"),
        4,
        "four calls of the sweep got through"
    );
}

fn message(from: &UdpSocket, n: u32) -> String {
    let local = from.local_addr().unwrap();
    format!(
        "MESSAGE sip:100@{EDGE_IP} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bKm{n}\r\n\
Max-Forwards: 70\r\nFrom: <sip:1001@{EDGE_IP}>;tag=m{n}\r\nTo: <sip:100@{EDGE_IP}>\r\n\
Call-ID: msg-{n}\r\nCSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n"
    )
}

fn status(sock: &UdpSocket) -> Option<u16> {
    let mut buf = [0u8; 4096];
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let (n, _) = sock.recv_from(&mut buf).ok()?;
    String::from_utf8_lossy(&buf[8..n.min(11)]).parse().ok()
}

fn reloads(edge: &EdgeProc, result: &str) -> f64 {
    metric(
        &edge.metrics(),
        &format!("sipwarden_edge_policy_reloads_total{{reason=\"{result}\"}}"),
    )
    .unwrap_or(0.0)
}

#[test]
fn sighup_reloads_the_policy_and_a_bad_policy_is_refused() {
    let (_dir, pbx, edge) = pbx_site("[reload]\nwatch_ms = 0\n");
    let phone = UdpSocket::bind(format!("{PHONE_IP}:0")).unwrap();
    phone
        .send_to(message(&phone, 1).as_bytes(), edge.addr())
        .unwrap();
    assert_eq!(status(&phone), Some(405), "MESSAGE refused by default");

    let cfg = edge.config_path();
    let original = std::fs::read_to_string(&cfg).unwrap();
    let allowed = format!(
        "{original}\n[policy.methods]\nfrom_internet = [\"REGISTER\", \"INVITE\", \"ACK\", \"BYE\", \"CANCEL\", \"OPTIONS\", \"MESSAGE\"]\n"
    );
    std::fs::write(&cfg, &allowed).unwrap();
    edge.proc.signal("HUP");
    assert!(wait_until(Duration::from_secs(5), || reloads(&edge, "ok") >= 1.0));
    phone
        .send_to(message(&phone, 2).as_bytes(), edge.addr())
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || pbx.received("MESSAGE") == 1),
        "MESSAGE now forwarded"
    );

    std::fs::write(&cfg, format!("{allowed}\n[policy.flood]\nrate_per_s = 0\n")).unwrap();
    edge.proc.signal("HUP");
    assert!(wait_until(Duration::from_secs(5), || reloads(
        &edge, "error"
    ) >= 1.0));
    // The log line is written just before the counter moves; allow for the write to land.
    assert!(
        wait_until(Duration::from_secs(5), || edge
            .log()
            .contains("policy.flood.rate_per_s")),
        "the refusal names the key"
    );
    phone
        .send_to(message(&phone, 3).as_bytes(), edge.addr())
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || pbx.received("MESSAGE") == 2),
        "the policy in force stayed"
    );
}

#[test]
fn a_changed_config_file_is_picked_up() {
    let (_dir, pbx, edge) = pbx_site("[reload]\nwatch_ms = 100\n");
    let phone = UdpSocket::bind(format!("{PHONE_IP}:0")).unwrap();
    let cfg = edge.config_path();
    let original = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!("{original}\n[policy.methods]\nfrom_internet = [\"REGISTER\", \"INVITE\", \"MESSAGE\"]\n"),
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || reloads(&edge, "ok") >= 1.0),
        "the file watch reloaded the policy"
    );
    phone
        .send_to(message(&phone, 1).as_bytes(), edge.addr())
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || pbx.received("MESSAGE") == 1),
        "MESSAGE now forwarded"
    );
}

#[test]
fn geoip_drops_a_denied_country_from_a_built_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("country.mmdb");
    std::fs::write(
        &db,
        mmdb::country_db(&[("127.0.0.42/32", "DE"), ("127.0.0.44/32", "NG")]),
    )
    .unwrap();
    let (_d, pbx, edge) = pbx_site(&format!(
        "[policy.geoip]\nenabled = true\ndatabase = \"{}\"\ndeny_countries = [\"NG\"]\n",
        db.display()
    ));
    let denied = UdpSocket::bind("127.0.0.44:0").unwrap();
    let allowed = UdpSocket::bind(format!("{PHONE_IP}:0")).unwrap();
    denied
        .send_to(options(&denied, "geo-ng", 1).as_bytes(), edge.addr())
        .unwrap();
    allowed
        .send_to(options(&allowed, "geo-de", 2).as_bytes(), edge.addr())
        .unwrap();
    assert!(wait_until(Duration::from_secs(5), || pbx
        .received_messages()
        .iter()
        .any(|m| m.starts_with("OPTIONS sip:geo-de@"))));
    assert!(
        !pbx.received_messages()
            .iter()
            .any(|m| m.starts_with("OPTIONS sip:geo-ng@")),
        "the denied country was dropped"
    );
    assert_eq!(edge.events("geoip", "drop"), 1.0);
    let events = edge.security_events();
    let json = events
        .iter()
        .find(|e| e["rule"] == "geoip")
        .expect("a security log line");
    assert_eq!(
        json["source"].as_str().unwrap().split(':').next(),
        Some("127.0.0.44")
    );
    assert_eq!(json["action"], "drop");
    assert!(json["detail"].as_str().unwrap().contains("NG"));
}
