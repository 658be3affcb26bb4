//! The load benchmark's light UAS: answers what the benchmark's workloads send as SIPp's UAS
//! (`bench_uas.xml`) does — 200 to OPTIONS, REGISTER, INVITE and BYE, nothing to ACK — at a
//! fraction of its CPU, so that at high rates on a small host the load generator keeps headroom
//! and a proxy's latency is measured rather than the load's queueing (`SW_BENCH_UAS=floor`).
//!
//! The 200 carries the request's Via, From, To (with a tag when it had none), Call-ID and CSeq;
//! to an INVITE its Record-Route and a Contact of the UAS's own, to the others the request's
//! Contact. No transaction state, no retransmission: a request is answered each time it comes.
//!
//! `floor_uas LISTEN` (UDP: one `recv` and one `send` per datagram, the answer to its source, with
//! the socket buffers SIPp is given, `bench::SOCKET_BUFFER`) or
//! `floor_uas --tcp LISTEN` (a thread per connection; the answers to what one `read` returns go
//! out in one `write`). Runs until killed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};

/// Larger than any datagram the benchmark's SIPp sends.
const MAX_DATAGRAM: usize = 65_535;

/// Bytes a TCP connection may hold without a complete message before it is closed.
const MAX_PENDING: usize = 64 * 1024;

fn main() -> std::io::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let tcp = args.first().is_some_and(|a| a == "--tcp");
    if tcp {
        args.remove(0);
    }
    let [listen] = args.as_slice() else {
        eprintln!("usage: floor_uas [--tcp] LISTEN (a socket address)");
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse().unwrap_or_else(|e| {
        eprintln!("LISTEN {listen:?} is not a socket address: {e}");
        std::process::exit(2)
    });
    if tcp {
        serve_tcp(listen)
    } else {
        serve_udp(listen)
    }
}

fn serve_udp(listen: SocketAddr) -> std::io::Result<()> {
    let sock = UdpSocket::bind(listen)?;
    // The buffers SIPp's UAS is given in its place: with the system default (208 KB here) the
    // receive queue overflowed whenever this process waited a few milliseconds for the load's
    // vCPU at 36,250 OPTIONS/s, and each lost request came back as SIPp's retransmission 0.5–1 s
    // later, which the benchmark then counted as the UAS being behind.
    let size = sipwarden_tests::bench::SOCKET_BUFFER
        .parse()
        .expect("SOCKET_BUFFER is a byte count");
    let s = socket2::SockRef::from(&sock);
    s.set_recv_buffer_size(size)?;
    s.set_send_buffer_size(size)?;
    let contact = contact(listen, "udp");
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut out = Vec::new();
    let mut tags = 0u64;
    loop {
        let (n, source) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            // An ICMP error for an earlier answer: the next datagram may come from elsewhere.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
            Err(e) => return Err(e),
        };
        out.clear();
        if answer(&buf[..n], &contact, &mut tags, &mut out) {
            let _ = sock.send_to(&out, source);
        }
    }
}

fn serve_tcp(listen: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen)?;
    let contact = contact(listen, "tcp");
    loop {
        let (conn, _) = listener.accept()?;
        let _ = conn.set_nodelay(true);
        let contact = contact.clone();
        std::thread::spawn(move || serve_conn(conn, &contact));
    }
}

/// Answers the messages of one connection until it ends or sends what is not SIP.
fn serve_conn(mut conn: TcpStream, contact: &str) {
    let mut pending: Vec<u8> = Vec::with_capacity(MAX_PENDING);
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::new();
    let mut tags = 0u64;
    while let Ok(n) = conn.read(&mut buf) {
        if n == 0 {
            return;
        }
        pending.extend_from_slice(&buf[..n]);
        out.clear();
        let mut at = 0;
        while let Some(len) = framed(&pending[at..]) {
            answer(&pending[at..at + len], contact, &mut tags, &mut out);
            at += len;
        }
        pending.drain(..at);
        if pending.len() > MAX_PENDING || (!out.is_empty() && conn.write_all(&out).is_err()) {
            return;
        }
    }
}

fn contact(listen: SocketAddr, transport: &str) -> String {
    format!("Contact: <sip:uas@{listen};transport={transport}>\r\n")
}

/// The length of the complete message at the start of `buf` (head and Content-Length body), if
/// it is all there. Keep-alive CRLFs count as messages of their own (and get no answer).
fn framed(buf: &[u8]) -> Option<usize> {
    if buf.starts_with(b"\r\n") {
        return Some(2);
    }
    let head = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let body = headers(&buf[..head])
        .find(|(name, _)| header(name) == Header::ContentLength)
        .and_then(|(_, v)| std::str::from_utf8(v).ok()?.trim().parse::<usize>().ok())
        .unwrap_or(0);
    (buf.len() >= head + body).then_some(head + body)
}

/// The header lines of a message's head, as (name, value) with the line itself kept whole by
/// [`lines`]; the start line is skipped.
fn headers(head: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    lines(head).skip(1).filter_map(|l| {
        let colon = l.iter().position(|&b| b == b':')?;
        Some((trim(&l[..colon]), trim(&l[colon + 1..])))
    })
}

/// The lines of a head, without their CRLF, up to the blank line.
fn lines(head: &[u8]) -> impl Iterator<Item = &[u8]> {
    head.split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .take_while(|l| !l.is_empty())
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &v[start..end]
}

/// The headers an answer is made of (compact forms included), without allocating: this is the
/// light UAS's whole path per request.
#[derive(Clone, Copy, PartialEq)]
enum Header {
    Via,
    From,
    To,
    CallId,
    CSeq,
    RecordRoute,
    Contact,
    ContentLength,
    Other,
}

fn header(name: &[u8]) -> Header {
    const NAMES: [(&[u8], Option<u8>, Header); 8] = [
        (b"via", Some(b'v'), Header::Via),
        (b"from", Some(b'f'), Header::From),
        (b"to", Some(b't'), Header::To),
        (b"call-id", Some(b'i'), Header::CallId),
        (b"cseq", None, Header::CSeq),
        (b"record-route", None, Header::RecordRoute),
        (b"contact", Some(b'm'), Header::Contact),
        (b"content-length", Some(b'l'), Header::ContentLength),
    ];
    NAMES
        .iter()
        .find(|(full, compact, _)| {
            name.eq_ignore_ascii_case(full)
                || matches!((compact, name), (Some(c), [n]) if n.to_ascii_lowercase() == *c)
        })
        .map_or(Header::Other, |&(_, _, h)| h)
}

/// Appends the answer to `msg` to `out`: `false` (nothing appended) for a response, an ACK, a
/// keep-alive or what is not a request.
fn answer(msg: &[u8], contact: &str, tags: &mut u64, out: &mut Vec<u8>) -> bool {
    let Some(start) = lines(msg).next() else {
        return false;
    };
    let Some(method) = start.split(|&b| b == b' ').next() else {
        return false;
    };
    if start.starts_with(b"SIP/") || method == b"ACK" || !start.ends_with(b"SIP/2.0") {
        return false;
    }
    let invite = method == b"INVITE";
    out.extend_from_slice(b"SIP/2.0 200 OK\r\n");
    for line in lines(msg).skip(1) {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let keep = match header(trim(&line[..colon])) {
            Header::Via | Header::From | Header::CallId | Header::CSeq => true,
            Header::RecordRoute => invite,
            Header::Contact => !invite,
            Header::To => {
                out.extend_from_slice(line);
                if !line.windows(5).any(|w| w.eq_ignore_ascii_case(b";tag=")) {
                    *tags += 1;
                    let _ = write!(out, ";tag=fu{tags}");
                }
                out.extend_from_slice(b"\r\n");
                false
            }
            Header::ContentLength | Header::Other => false,
        };
        if keep {
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
        }
    }
    if invite {
        out.extend_from_slice(contact.as_bytes());
    }
    out.extend_from_slice(b"Content-Length: 0\r\n\r\n");
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVITE: &str = "INVITE sip:100@127.0.0.1:5060 SIP/2.0\r\n\
        Record-Route: <sip:127.0.0.2;lr>\r\n\
        Via: SIP/2.0/TCP 127.0.0.2:5060;branch=z9hG4bK-edge\r\n\
        v: SIP/2.0/TCP 127.0.0.3:5070;branch=z9hG4bK-uac;rport\r\n\
        From: <sip:2000@127.0.0.1>;tag=1c1\r\n\
        To: <sip:100@127.0.0.1:5060>\r\n\
        Call-ID: 1-abc@127.0.0.3\r\n\
        CSeq: 1 INVITE\r\n\
        Contact: <sip:2000@127.0.0.3:5070>\r\n\
        Max-Forwards: 69\r\n\
        Content-Length: 4\r\n\r\nv=0\n";

    fn answered(msg: &str) -> Option<String> {
        let mut out = Vec::new();
        let mut tags = 0;
        answer(
            msg.as_bytes(),
            "Contact: <sip:uas@u>\r\n",
            &mut tags,
            &mut out,
        )
        .then(|| String::from_utf8(out).unwrap())
    }

    #[test]
    fn an_invite_is_answered_with_its_vias_route_and_a_contact_of_our_own() {
        let a = answered(INVITE).expect("answered");
        assert_eq!(
            a,
            "SIP/2.0 200 OK\r\n\
             Record-Route: <sip:127.0.0.2;lr>\r\n\
             Via: SIP/2.0/TCP 127.0.0.2:5060;branch=z9hG4bK-edge\r\n\
             v: SIP/2.0/TCP 127.0.0.3:5070;branch=z9hG4bK-uac;rport\r\n\
             From: <sip:2000@127.0.0.1>;tag=1c1\r\n\
             To: <sip:100@127.0.0.1:5060>;tag=fu1\r\n\
             Call-ID: 1-abc@127.0.0.3\r\n\
             CSeq: 1 INVITE\r\n\
             Contact: <sip:uas@u>\r\n\
             Content-Length: 0\r\n\r\n"
        );
    }

    #[test]
    fn a_bye_keeps_its_to_tag_an_ack_and_a_response_get_nothing() {
        let bye = INVITE
            .replace("INVITE sip", "BYE sip")
            .replace("CSeq: 1 INVITE", "CSeq: 2 BYE")
            .replace(":5060>\r\n", ":5060>;tag=x9\r\n");
        let a = answered(&bye).expect("answered");
        assert!(a.contains("To: <sip:100@127.0.0.1:5060>;tag=x9\r\n"), "{a}");
        assert!(
            !a.contains("Record-Route") && a.contains("Contact: <sip:2000@"),
            "{a}"
        );
        assert_eq!(answered(&INVITE.replace("INVITE sip", "ACK sip")), None);
        assert_eq!(answered("SIP/2.0 200 OK\r\nCSeq: 1 INVITE\r\n\r\n"), None);
        assert_eq!(answered("garbage\r\n\r\n"), None);
    }

    #[test]
    fn a_stream_is_framed_by_content_length_and_keepalives() {
        let two = format!("\r\n{INVITE}{INVITE}");
        let b = two.as_bytes();
        assert_eq!(framed(b), Some(2));
        assert_eq!(framed(&b[2..]), Some(INVITE.len()));
        // A body not all there yet, and a head not all there yet, wait for more.
        assert_eq!(framed(&INVITE.as_bytes()[..INVITE.len() - 1]), None);
        assert_eq!(framed(&INVITE.as_bytes()[..40]), None);
    }
}
