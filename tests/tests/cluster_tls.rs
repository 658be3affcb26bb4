//! Mutual TLS on every gRPC link: three controllers talk Raft to each other over TLS, an edge
//! with a certificate from the cluster's CA watches them and enforces a ban made through the API,
//! and edges without a certificate, with one from another CA, or without TLS at all are refused.

use sipwarden_tests::controller::*;
use sipwarden_tests::pki::Ca;
use sipwarden_tests::*;
use std::net::UdpSocket;
use std::time::Duration;

const PBX_IP: &str = "127.0.0.76";

#[test]
fn edges_and_controllers_authenticate_each_other_with_certificates() {
    let root = tempfile::tempdir().unwrap();
    let ca = Ca::new(root.path(), "cluster-ca");
    let node = ca.leaf("controller", &["127.0.0.1", "localhost"]);
    let edge_cert = ca.leaf("edge", &["edge-a"]);
    let rogue = Ca::new(root.path(), "rogue-ca").leaf("rogue", &["edge-x"]);

    let server_tls = format!(
        "[grpc.tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n",
        node.cert, node.key, ca.cert
    );
    // Raft between the three runs over TLS too: a leader means the peers verified each other.
    let (seats, ctls) = cluster(root.path(), 3, &server_tls);
    let pbx_port = free_port(PBX_IP);
    let _pbx = SippServer::start(root.path(), "pbx.xml", PBX_IP, pbx_port, "udp");
    let edge = |ip: &str, tls: &str| {
        EdgeProc::start(
            ip,
            &format!(
                "[[backends]]\naddress = \"{PBX_IP}:{pbx_port}\"\n\n{}\n{tls}",
                edge_link(&seats)
            ),
        )
    };
    let client_tls = |cert: &std::path::Path, key: &std::path::Path| {
        format!(
            "[controller.tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            ca.cert, cert, key
        )
    };

    let good = edge("127.0.0.2", &client_tls(&edge_cert.cert, &edge_cert.key));
    assert!(
        wait_until(Duration::from_secs(10), || good.connected()),
        "the edge with the cluster's certificate connects:\n{}",
        good.log()
    );
    let banned = UdpSocket::bind("127.0.0.77:0").unwrap();
    assert!(ctls[0]
        .ctl(OPERATOR, &["ban", "add", "ip", "127.0.0.77"])
        .status
        .success());
    let mut n = 0;
    assert!(
        wait_until(Duration::from_secs(5), || {
            let before = good.events("ban", "drop");
            n += 1;
            let _ = sip_status(&banned, &good.addr(), "OPTIONS", "x", "tls", n);
            good.events("ban", "drop") > before
        }),
        "the ban reached the edge over TLS"
    );

    // No client certificate, one from another CA, or no TLS at all: refused.
    let no_cert = edge(
        "127.0.0.3",
        &format!("[controller.tls]\nca = {:?}\n", ca.cert),
    );
    let wrong_ca = edge("127.0.0.4", &client_tls(&rogue.cert, &rogue.key));
    let plain = edge("127.0.0.5", "");
    for (what, e) in [
        ("no client certificate", &no_cert),
        ("another CA's certificate", &wrong_ca),
        ("no TLS", &plain),
    ] {
        assert!(
            !wait_until(Duration::from_secs(3), || e.connected()),
            "an edge with {what} must be refused"
        );
    }
}
