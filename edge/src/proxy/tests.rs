//! Unit tests of the proxy core: Via and branch, Max-Forwards, Route, Record-Route, Path, flow
//! tokens and response relaying, all without sockets.

use super::*;
use crate::backend::Backends;
use crate::config::{self, EdgeConfig, Listener};
use crate::flow::{FlowKeys, FlowToken};
use crate::sip::{HeaderName, Message, Transport};

const EDGE: &str = "192.0.2.10:5060";
const PBX: &str = "198.51.100.5:5080";
const PHONE: &str = "203.0.113.7:40000";

fn proxy() -> Proxy {
    let cfg = EdgeConfig {
        listeners: vec![
            Listener {
                transport: Transport::Udp,
                address: EDGE.parse().unwrap(),
                ..Listener::default()
            },
            Listener {
                transport: Transport::Tcp,
                address: EDGE.parse().unwrap(),
                ..Listener::default()
            },
        ],
        backends: vec![config::Backend {
            address: PBX.parse().unwrap(),
            ..config::Backend::default()
        }],
        ..EdgeConfig::default()
    };
    let bound: Vec<SocketAddr> = vec![EDGE.parse().unwrap(), EDGE.parse().unwrap()];
    let keys = FlowKeys::new(["unit-test-flow-key-0001"]).unwrap();
    Proxy::new(&cfg, &bound, keys, Arc::new(Backends::new(&cfg.backends)))
}

fn from(source: &str, transport: Transport, bytes: &[u8]) -> Decision {
    let p = proxy();
    let listener = if transport == Transport::Udp { 0 } else { 1 };
    p.handle(&Inbound {
        bytes,
        source: source.parse().unwrap(),
        transport,
        listener,
    })
}

fn invite(extra: &str) -> String {
    format!(
        "INVITE sip:100@192.0.2.10 SIP/2.0\r\n\
Via: SIP/2.0/UDP 10.1.1.1:5060;branch=z9hG4bKph1;rport\r\n\
{extra}From: <sip:alice@example.com>;tag=a1\r\n\
To: <sip:100@192.0.2.10>\r\n\
Call-ID: call-1@phone\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:alice@10.1.1.1:5060>\r\n\
Content-Length: 0\r\n\r\n"
    )
}

fn forwarded(d: Decision) -> (Transport, Dest, String) {
    match d.action {
        Action::Forward {
            transport,
            dest,
            bytes,
            ..
        } => (transport, dest, String::from_utf8(bytes).unwrap()),
        other => panic!("not forwarded: {other:?} ({:?})", d.reason),
    }
}

fn replied(d: Decision) -> String {
    match d.action {
        Action::Reply(bytes) => String::from_utf8(bytes).unwrap(),
        other => panic!("not a reply: {other:?}"),
    }
}

fn values(msg: &str, h: HeaderName) -> Vec<String> {
    let m = Message::parse(msg.as_bytes()).unwrap();
    m.elements(h).map(|(_, r)| m.text(r).to_string()).collect()
}

#[test]
fn internet_invite_goes_to_the_backend_with_via_rr_and_received() {
    let (t, dest, out) = forwarded(from(
        PHONE,
        Transport::Udp,
        invite("Max-Forwards: 70\r\n").as_bytes(),
    ));
    assert_eq!(t, Transport::Udp);
    assert_eq!(dest, Dest::Addr(PBX.parse().unwrap()));
    let vias = values(&out, HeaderName::Via);
    assert_eq!(vias.len(), 2);
    assert!(
        vias[0].starts_with("SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKsw"),
        "{}",
        vias[0]
    );
    assert_eq!(
        vias[1],
        "SIP/2.0/UDP 10.1.1.1:5060;branch=z9hG4bKph1;rport=40000;received=203.0.113.7"
    );
    let rr = values(&out, HeaderName::RecordRoute);
    assert_eq!(rr.len(), 1, "same listener both ways: one Record-Route");
    assert!(
        rr[0].starts_with("<sip:sw1") && rr[0].ends_with("@192.0.2.10:5060;lr>"),
        "{}",
        rr[0]
    );
    let m = Message::parse(out.as_bytes()).unwrap();
    assert_eq!(m.header(HeaderName::MaxForwards), Some("69"));
    assert_eq!(m.body(), b"");
    // The token in the Record-Route names the phone's flow.
    let user = rr[0].trim_start_matches("<sip:").split('@').next().unwrap();
    let flow = proxy().keys.verify(user).unwrap();
    assert_eq!(
        flow,
        FlowToken {
            transport: Transport::Udp,
            addr: PHONE.parse().unwrap(),
            edge: "edge-1".into()
        }
    );
}

#[test]
fn branch_is_stable_for_retransmissions_and_cancel() {
    let (_, _, a) = forwarded(from(PHONE, Transport::Udp, invite("").as_bytes()));
    let (_, _, b) = forwarded(from(PHONE, Transport::Udp, invite("").as_bytes()));
    let cancel = invite("")
        .replace("INVITE sip", "CANCEL sip")
        .replace("1 INVITE", "1 CANCEL");
    let (_, _, c) = forwarded(from(PHONE, Transport::Udp, cancel.as_bytes()));
    let top = |s: &str| values(s, HeaderName::Via)[0].clone();
    assert_eq!(top(&a), top(&b));
    assert_eq!(top(&a), top(&c));
    let (_, _, other_src) = forwarded(from(
        "203.0.113.8:40000",
        Transport::Udp,
        invite("").as_bytes(),
    ));
    assert_ne!(top(&a), top(&other_src));
}

#[test]
fn max_forwards_is_added_decremented_and_483_at_zero() {
    let (_, _, out) = forwarded(from(PHONE, Transport::Udp, invite("").as_bytes()));
    assert_eq!(
        Message::parse(out.as_bytes())
            .unwrap()
            .header(HeaderName::MaxForwards),
        Some("70")
    );
    let (_, _, out) = forwarded(from(
        PHONE,
        Transport::Udp,
        invite("Max-Forwards: 1\r\n").as_bytes(),
    ));
    assert_eq!(
        Message::parse(out.as_bytes())
            .unwrap()
            .header(HeaderName::MaxForwards),
        Some("0")
    );
    let r = replied(from(
        PHONE,
        Transport::Udp,
        invite("Max-Forwards: 0\r\n").as_bytes(),
    ));
    assert!(r.starts_with("SIP/2.0 483 "), "{r}");
    assert!(
        r.contains("received=203.0.113.7"),
        "reply reaches the NATed source: {r}"
    );
    let ack = invite("Max-Forwards: 0\r\n")
        .replace("INVITE sip", "ACK sip")
        .replace("1 INVITE", "1 ACK");
    assert_eq!(
        from(PHONE, Transport::Udp, ack.as_bytes()).action,
        Action::Drop,
        "ACK is never answered"
    );
}

#[test]
fn internet_requests_never_leave_toward_other_hosts() {
    let relay = invite("Route: <sip:192.0.2.99;lr>\r\n")
        .replace("sip:100@192.0.2.10 SIP", "sip:100@192.0.2.99 SIP");
    let (_, dest, _) = forwarded(from(PHONE, Transport::Udp, relay.as_bytes()));
    assert_eq!(dest, Dest::Addr(PBX.parse().unwrap()), "not an open relay");
}

#[test]
fn register_gets_a_signed_path_and_no_record_route() {
    let reg = "REGISTER sip:192.0.2.10 SIP/2.0\r\nVia: SIP/2.0/TCP 10.1.1.1:5060;branch=z9hG4bKr1\r\nFrom: <sip:alice@example.com>;tag=r\r\nTo: <sip:alice@example.com>\r\nCall-ID: reg-1\r\nCSeq: 1 REGISTER\r\nContact: <sip:alice@10.1.1.1;transport=tcp>\r\nContent-Length: 0\r\n\r\n";
    let (t, _, out) = forwarded(from(PHONE, Transport::Tcp, reg.as_bytes()));
    assert_eq!(t, Transport::Udp, "backend transport");
    let path = values(&out, HeaderName::Path);
    assert_eq!(path.len(), 1);
    assert!(values(&out, HeaderName::RecordRoute).is_empty());
    let user = path[0]
        .trim_start_matches("<sip:")
        .split('@')
        .next()
        .unwrap();
    let flow = proxy().keys.verify(user).unwrap();
    assert_eq!(flow.transport, Transport::Tcp);
    assert_eq!(flow.addr, PHONE.parse().unwrap());
}

fn pbx_invite_via(route: &str) -> String {
    format!(
        "INVITE sip:alice@10.1.1.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 198.51.100.5:5080;branch=z9hG4bKpbx1\r\n\
Route: {route}\r\n\
Max-Forwards: 70\r\n\
From: <sip:pbx@198.51.100.5>;tag=p1\r\n\
To: <sip:alice@10.1.1.1>\r\n\
Call-ID: cb-1\r\n\
CSeq: 5 INVITE\r\n\
Content-Length: 0\r\n\r\n"
    )
}

#[test]
fn pbx_request_follows_the_flow_token_and_tampering_gets_403() {
    let p = proxy();
    let token = p.keys.sign(&FlowToken {
        transport: Transport::Tcp,
        addr: PHONE.parse().unwrap(),
        edge: "edge-1".into(),
    });
    let good = pbx_invite_via(&format!("<sip:{token}@192.0.2.10:5060;lr>"));
    let (t, dest, out) = forwarded(from(PBX, Transport::Udp, good.as_bytes()));
    assert_eq!(
        (t, dest),
        (Transport::Tcp, Dest::Addr(PHONE.parse().unwrap()))
    );
    assert!(
        values(&out, HeaderName::Route).is_empty(),
        "our Route is consumed"
    );
    let rr = values(&out, HeaderName::RecordRoute);
    assert_eq!(rr.len(), 2, "UDP in, TCP out: double Record-Route");
    assert!(
        rr[0].contains(";transport=tcp;lr>") && !rr[1].contains("transport="),
        "{rr:?}"
    );
    assert!(values(&out, HeaderName::Via)[0].starts_with("SIP/2.0/TCP 192.0.2.10:5060;"));

    let mut bad_token = token.clone();
    let last = bad_token.pop().unwrap();
    bad_token.push(if last == 'a' { 'b' } else { 'a' });
    let bad = pbx_invite_via(&format!("<sip:{bad_token}@192.0.2.10:5060;lr>"));
    let d = from(PBX, Transport::Udp, bad.as_bytes());
    assert_eq!(d.outcome, Outcome::Replied(403));
    assert!(replied(d).starts_with("SIP/2.0 403 "));
}

#[test]
fn pbx_request_without_token_goes_by_next_route_or_request_uri() {
    let (_, dest, out) = forwarded(from(
        PBX,
        Transport::Udp,
        pbx_invite_via("<sip:192.0.2.10:5060;lr>, <sip:203.0.113.50:5070;lr>").as_bytes(),
    ));
    assert_eq!(dest, Dest::Addr("203.0.113.50:5070".parse().unwrap()));
    assert_eq!(
        values(&out, HeaderName::Route),
        vec!["<sip:203.0.113.50:5070;lr>"]
    );
    let (_, dest, _) = forwarded(from(
        PBX,
        Transport::Udp,
        pbx_invite_via("<sip:198.51.100.77;lr>").as_bytes(),
    ));
    assert_eq!(dest, Dest::Addr("198.51.100.77:5060".parse().unwrap()));
}

#[test]
fn responses_lose_our_via_and_follow_received_rport() {
    let (_, _, fwd) = forwarded(from(PHONE, Transport::Udp, invite("").as_bytes()));
    let vias = values(&fwd, HeaderName::Via);
    let resp = format!(
        "SIP/2.0 200 OK\r\nVia: {}\r\nVia: {}\r\nFrom: <sip:alice@example.com>;tag=a1\r\nTo: <sip:100@192.0.2.10>;tag=b\r\nCall-ID: call-1@phone\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n",
        vias[0], vias[1]
    );
    let (t, dest, out) = forwarded(from(PBX, Transport::Udp, resp.as_bytes()));
    assert_eq!(
        (t, dest),
        (Transport::Udp, Dest::Addr(PHONE.parse().unwrap()))
    );
    assert_eq!(values(&out, HeaderName::Via), vec![vias[1].clone()]);

    // Our Via sharing its line with the ones below: only our element goes, the rest of the
    // line stays byte for byte.
    for (line, left) in [
        (
            format!("Via: {} , {}\r\n", vias[0], vias[1]),
            format!("Via: {}\r\n", vias[1]),
        ),
        (
            format!(
                "Via: {},{}, SIP/2.0/TCP 10.9.9.9;branch=z9hG4bKx\r\n",
                vias[0], vias[1]
            ),
            format!("Via: {}, SIP/2.0/TCP 10.9.9.9;branch=z9hG4bKx\r\n", vias[1]),
        ),
    ] {
        let two = format!("Via: {}\r\nVia: {}\r\n", vias[0], vias[1]);
        let joined = resp.replace(&two, &line);
        let (_, dest, out) = forwarded(from(PBX, Transport::Udp, joined.as_bytes()));
        assert_eq!(dest, Dest::Addr(PHONE.parse().unwrap()));
        assert_eq!(out, resp.replace(&two, &left), "{line}");
    }

    // A response whose second Via was rewritten to reflect traffic at a victim is dropped.
    let forged = resp.replace("received=203.0.113.7", "received=192.0.2.200");
    let d = from(PBX, Transport::Udp, forged.as_bytes());
    assert_eq!(d.action, Action::Drop);
    // So is a response whose top Via is not ours.
    let stray = resp.replace("192.0.2.10:5060;branch", "192.0.2.11:5060;branch");
    assert_eq!(
        from(PBX, Transport::Udp, stray.as_bytes()).action,
        Action::Drop
    );
}

#[test]
fn bad_requests_get_400_and_garbage_is_dropped() {
    let no_callid = invite("").replace("Call-ID: call-1@phone\r\n", "");
    let d = from(PHONE, Transport::Udp, no_callid.as_bytes());
    assert_eq!(d.outcome, Outcome::Replied(400));
    let bad_cseq = invite("").replace("1 INVITE", "1 BYE");
    assert_eq!(
        from(PHONE, Transport::Udp, bad_cseq.as_bytes()).outcome,
        Outcome::Replied(400)
    );
    let long_body = invite("").replace("Content-Length: 0", "Content-Length: 999");
    assert_eq!(
        from(PHONE, Transport::Udp, long_body.as_bytes()).outcome,
        Outcome::Replied(400)
    );
    let tel = invite("").replace("INVITE sip:100@192.0.2.10", "INVITE tel:+15551234");
    assert!(matches!(
        from(PHONE, Transport::Udp, tel.as_bytes()).outcome,
        Outcome::Replied(400 | 416) | Outcome::Malformed
    ));
    // A Via header with no element in it (only a comma): refused, not indexed blindly.
    let empty_via = invite("").replace(
        "Via: SIP/2.0/UDP 10.1.1.1:5060;branch=z9hG4bKph1;rport",
        "Via: ,",
    );
    let d = from(PHONE, Transport::Udp, empty_via.as_bytes());
    assert!(
        matches!(d.outcome, Outcome::Replied(400) | Outcome::Dropped),
        "{:?}",
        d.outcome
    );
    // Header syntax broken but the dialog headers readable: a 400 is safe.
    let broken = invite("Bad Header Line\r\n");
    let d = from(PHONE, Transport::Udp, broken.as_bytes());
    assert_eq!(d.outcome, Outcome::Malformed);
    assert!(replied(d).starts_with("SIP/2.0 400 "));
    for garbage in [
        &b"\x00\x01\x02garbage"[..],
        b"SIP/2.0 200 OK\r\n\r\n",
        b"HELLO\r\n\r\n",
        &[0xffu8; 300][..],
    ] {
        let d = from(PHONE, Transport::Udp, garbage);
        assert_eq!(
            d.action,
            Action::Drop,
            "{:?}",
            String::from_utf8_lossy(garbage)
        );
    }
}

#[test]
fn no_healthy_backend_is_503_with_retry_after() {
    let p = proxy();
    let h = config::Health {
        interval_ms: 1000,
        timeout_ms: 100,
        fall: 1,
        rise: 1,
    };
    p.backends.record(0, false, &h);
    let bytes = invite("");
    let d = p.handle(&Inbound {
        bytes: bytes.as_bytes(),
        source: PHONE.parse().unwrap(),
        transport: Transport::Udp,
        listener: 0,
    });
    let r = replied(d);
    assert!(
        r.starts_with("SIP/2.0 503 ") && r.contains("Retry-After: 5\r\n"),
        "{r}"
    );
}

#[test]
fn source_decides_the_side_on_a_shared_listener() {
    let p = proxy();
    let side = |src: &str| {
        p.side(&Inbound {
            bytes: b"",
            source: src.parse().unwrap(),
            transport: Transport::Udp,
            listener: 0,
        })
    };
    assert_eq!(side(PBX), Side::Pbx);
    assert_eq!(
        side("198.51.100.5:5099"),
        Side::Internet,
        "same host, other port: still untrusted"
    );
    assert_eq!(side(PHONE), Side::Internet);
}

#[test]
fn a_phone_held_by_another_edge_is_reached_through_that_edge() {
    let p = proxy();
    let relay: SocketAddr = "192.0.2.20:5060".parse().unwrap();
    let token = p.keys.sign(&FlowToken {
        transport: Transport::Tcp,
        addr: PHONE.parse().unwrap(),
        edge: "edge-2".into(),
    });
    let req = pbx_invite_via(&format!("<sip:{token}@192.0.2.10:5060;lr>"));
    let inb = Inbound {
        bytes: req.as_bytes(),
        source: PBX.parse().unwrap(),
        transport: Transport::Udp,
        listener: 0,
    };
    // Unknown edge: straight to the phone's address (UDP phones behind a shared address work).
    let (t, dest, _) = forwarded(p.handle(&inb));
    assert_eq!(
        (t, dest),
        (Transport::Tcp, Dest::Addr(PHONE.parse().unwrap()))
    );

    p.peers.update(true, [("edge-2".to_string(), relay)]);
    let (t, dest, out) = forwarded(p.handle(&inb));
    assert_eq!((t, dest), (Transport::Udp, Dest::Addr(relay)));
    let routes = values(&out, HeaderName::Route);
    assert_eq!(routes.len(), 1, "{routes:?}");
    let owner = routes[0]
        .trim_start_matches("<sip:")
        .split('@')
        .next()
        .unwrap();
    let flow = p.keys.verify(owner).unwrap();
    assert_eq!(
        (flow.edge.as_str(), flow.addr),
        ("edge-2", PHONE.parse().unwrap()),
        "the owner finds the flow in the Route"
    );
    assert!(routes[0].ends_with("@192.0.2.20:5060;lr>"));
    assert!(values(&out, HeaderName::Via)[0].contains(";rport"));
    // The owner's traffic is PBX side from now on.
    assert!(p.is_pbx_addr("192.0.2.20:40000".parse().unwrap()));
}

#[test]
fn uri_parts_reads_sip_uris_by_hand() {
    use super::request::uri_parts;
    assert_eq!(
        uri_parts("sip:alice:secret@Example.COM:5070;transport=tcp?subject=x"),
        Some((Some("alice"), "Example.COM", Some(5070)))
    );
    assert_eq!(
        uri_parts("SIPS:[2001:db8::1]:5061;lr"),
        Some((None, "[2001:db8::1]", Some(5061)))
    );
    assert_eq!(
        uri_parts("sip:+15551234;npdi@10.0.0.1"),
        Some((Some("+15551234;npdi"), "10.0.0.1", None))
    );
    assert_eq!(
        uri_parts("sip:sw1.abc@192.0.2.10;lr"),
        Some((Some("sw1.abc"), "192.0.2.10", None))
    );
    for bad in [
        "tel:+15551234",
        "sip:",
        "sip:@h",
        "sip:h:",
        "sip:h:x",
        "sip:h:99999",
        "sip:[::1",
        "sip:[zz::1]",
        "sip:[::1]5060",
        "sip:bad host",
        "sip:h\"x",
    ] {
        assert_eq!(uri_parts(bad), None, "{bad}");
    }
}
