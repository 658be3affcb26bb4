//! Requests, in both directions (RFC 3261 §16.3–16.6, stateless): check, pick the next hop, then
//! splice in our Via, Record-Route and Path and the decremented Max-Forwards.
//!
//! Internet → PBX: always to a configured backend (never an open relay), stamped with `received` /
//! `rport`; REGISTER gets a Path and dialog-creating requests a Record-Route whose user part is the
//! signed flow token of the phone. PBX → Internet: to the flow named by the token in our Route (a
//! forged one gets 403), else by the next Route or the Request-URI.

use super::via::{self, ViaInfo};
use super::{Action, Decision, Dest, Inbound, Outcome, Proxy, Side};
use crate::flow::{FlowToken, PREFIX};
use crate::sip::{addr_uri, header_param, reply, Edit, HeaderName, Message, Transport};
use smallvec::SmallVec;
use std::fmt::Write;
use std::net::SocketAddr;

/// Max-Forwards the edge sets when a request arrives without one.
const DEFAULT_MAX_FORWARDS: u32 = 70;

pub(super) fn handle(
    p: &Proxy,
    m: &Message<'_>,
    inb: &Inbound<'_>,
    side: Side,
    sane: bool,
) -> Decision {
    match route(p, m, inb, side, sane) {
        Ok(d) => d,
        Err(Refusal { code, reason }) => {
            let retry: &[(&str, &str)] = if code == 503 {
                &[("Retry-After", "5")]
            } else {
                &[]
            };
            refuse(m, inb, side, code, &reason, retry)
        }
    }
}

/// Why a request is answered by the edge instead of forwarded.
struct Refusal {
    code: u16,
    reason: String,
}

fn refusal(code: u16, reason: impl Into<String>) -> Refusal {
    Refusal {
        code,
        reason: reason.into(),
    }
}

fn route(
    p: &Proxy,
    m: &Message<'_>,
    inb: &Inbound<'_>,
    side: Side,
    sane: bool,
) -> Result<Decision, Refusal> {
    let method = m.method().unwrap_or_default();
    if !sane {
        crate::sip::sanity::check_request(m, u32::MAX).map_err(|e| refusal(e.code, e.reason))?;
    }
    let (cseq, _) = m.cseq().ok_or_else(|| refusal(400, "Bad CSeq"))?;
    let call_id = m.call_id().unwrap_or_default();
    let ruri = m.request_uri().unwrap_or_default();

    let (_, top_range) = m
        .elements(HeaderName::Via)
        .next()
        .ok_or_else(|| refusal(400, "Missing Via"))?;
    let top_text = m.text(top_range.clone());
    let top = ViaInfo::parse(top_text).ok_or_else(|| refusal(400, "Bad Via"))?;
    let stamped = via::stamp_received(top_text, &top, inb.source);
    let prev = match &stamped {
        Some(s) => s.via(&top),
        None => top.clone(),
    };

    // Checked above (here, or by the sanity rule): absent or a number above zero.
    let max_forwards = m
        .header(HeaderName::MaxForwards)
        .and_then(|v| v.trim_ascii().parse::<u32>().ok());

    // Route: pop every leading entry that names this edge, keeping the flow token if one is there.
    let routes: SmallVec<[_; 4]> = m.elements(HeaderName::Route).collect();
    let mut popped = 0;
    let mut token: Option<FlowToken> = None;
    for (_, r) in &routes {
        let uri = addr_uri(m.text(r.clone()));
        let Some((user, host, port)) = uri_parts(uri) else {
            break;
        };
        if !p.is_self(host, port) {
            break;
        }
        popped += 1;
        if let Some(user) = user.filter(|u| u.starts_with(PREFIX)) {
            match p.keys.verify(user) {
                Ok(t) if token.is_none() => token = Some(t),
                Ok(_) => {}
                Err(e) => return Err(refusal(403, format!("Forbidden ({e})"))),
            }
        }
    }
    let next_route = routes.get(popped).map(|(_, r)| addr_uri(m.text(r.clone())));

    // The next hop. The phone's flow is the inbound one for requests from the Internet (signed
    // straight from the inbound transport and source when a token is needed), else the one a
    // Route token or the target names.
    let mut relay: Option<(SocketAddr, String)> = None;
    let (out_transport, dest, phone_flow) = match side {
        Side::Internet => {
            let hint = next_route
                .or(Some(ruri))
                .and_then(uri_parts)
                .and_then(|(_, h, port)| {
                    let ip = crate::sip::parse_ip(h.trim_start_matches('[').trim_end_matches(']'))?;
                    Some(SocketAddr::new(ip, port.unwrap_or(5060)))
                });
            let b = p
                .backends
                .select(call_id, hint)
                .ok_or_else(|| refusal(503, "Service Unavailable (no healthy PBX)"))?;
            (b.transport, Dest::Addr(b.address), None)
        }
        Side::Pbx => match token {
            // Another edge holds this phone's flow (its TCP/TLS connection, its NAT binding):
            // relay there over UDP with the token in a Route the owner will pop.
            Some(t) if t.edge != p.edge_id && p.peers.get(&t.edge).is_some() => {
                let to = p.peers.get(&t.edge).unwrap_or(t.addr);
                relay = Some((to, p.keys.sign(&t)));
                (Transport::Udp, Dest::Addr(to), Some(t))
            }
            Some(t) => (t.transport, Dest::Addr(t.addr), Some(t)),
            None => {
                let target = next_route.unwrap_or(ruri);
                let (transport, dest) =
                    uri_target(target).ok_or_else(|| refusal(400, "Bad Request-URI or Route"))?;
                if let Dest::Addr(a) = dest {
                    if p.is_self_addr(a) {
                        return Err(refusal(482, "Loop Detected"));
                    }
                }
                let flow = match dest {
                    Dest::Addr(addr) => Some(FlowToken {
                        transport,
                        addr,
                        edge: p.edge_id.clone(),
                    }),
                    Dest::Host(..) => None,
                };
                (transport, dest, flow)
            }
        },
    };

    let out_listener = p.listener_toward(side.other(), out_transport);
    let out = &p.listeners[out_listener];
    let in_l = &p.listeners[inb.listener.min(p.listeners.len() - 1)];

    let mut top_lines = String::with_capacity(256);
    top_lines.push_str("Via: SIP/2.0/");
    top_lines.push_str(out_transport.via_token());
    top_lines.push(' ');
    out.advertise.push_to(&mut top_lines);
    top_lines.push_str(";branch=");
    via::push_branch(&mut top_lines, &p.keys, &prev, call_id, cseq);
    // Marks requests that carried credentials, so the brute-force rule can tell a wrong password
    // from a first challenge when the PBX's answer comes back through this Via.
    if m.header(HeaderName::Authorization).is_some()
        || m.header(HeaderName::ProxyAuthorization).is_some()
    {
        top_lines.push(';');
        top_lines.push_str(via::CREDENTIALS_PARAM);
    }
    if let Some((to, token)) = &relay {
        // The peer answers to where this came from, whatever the Via's sent-by says (several
        // edges may advertise one shared address).
        let _ = write!(top_lines, ";rport\r\nRoute: <sip:{token}@{to};lr>");
    }
    top_lines.push_str("\r\n");

    let initial = header_param(m.header(HeaderName::To).unwrap_or(""), "tag").is_none();
    let dialog_creating = matches!(method, "INVITE" | "SUBSCRIBE" | "REFER" | "NOTIFY");
    if dialog_creating && initial {
        let token = match (side, &phone_flow) {
            (Side::Internet, _) => Some(p.keys.sign_flow(inb.transport, inb.source, &p.edge_id)),
            (Side::Pbx, f) => f.as_ref().map(|f| p.keys.sign(f)),
        };
        // Double Record-Route (RFC 5658) when the two legs use different listeners: the first
        // entry is what the far (UAS) side uses, the second what the near (UAC) side uses.
        if out_listener != inb.listener {
            push_edge_uri(
                &mut top_lines,
                "Record-Route",
                token.as_deref(),
                out,
                out_transport,
            );
            push_edge_uri(
                &mut top_lines,
                "Record-Route",
                token.as_deref(),
                in_l,
                inb.transport,
            );
        } else {
            push_edge_uri(
                &mut top_lines,
                "Record-Route",
                token.as_deref(),
                out,
                out_transport,
            );
        }
    }
    if method == "REGISTER" && side == Side::Internet {
        let token = p.keys.sign_flow(inb.transport, inb.source, &p.edge_id);
        push_edge_uri(&mut top_lines, "Path", Some(&token), out, out_transport);
    }

    // Declared before the edit, which borrows the new Max-Forwards from it.
    let mut digits = itoa::Buffer::new();
    let mut e = Edit::new(m.buf);
    if let Some(s) = &stamped {
        e.replace(top_range, s.text.as_bytes());
    }
    remove_popped_routes(m, &routes, popped, &mut e);
    match (max_forwards, m.all(HeaderName::MaxForwards).next()) {
        (Some(n), Some(h)) => e.replace(h.value.clone(), digits.format(n - 1)),
        _ => {
            top_lines.push_str("Max-Forwards: ");
            top_lines.push_str(digits.format(DEFAULT_MAX_FORWARDS));
            top_lines.push_str("\r\n");
        }
    }
    e.insert(m.start_end, top_lines);

    Ok(Decision {
        action: Action::Forward {
            transport: out_transport,
            dest,
            listener: out_listener,
            bytes: e.finish(),
        },
        outcome: Outcome::Forwarded,
        side,
        reason: None,
    })
}

/// Writes `Name: <sip:[token@]host:port[;transport=x];lr>` for listener `l`.
fn push_edge_uri(
    out: &mut String,
    name: &str,
    token: Option<&str>,
    l: &super::ListenerInfo,
    transport: Transport,
) {
    out.push_str(name);
    out.push_str(": <sip:");
    if let Some(t) = token {
        out.push_str(t);
        out.push('@');
    }
    l.advertise.push_to(out);
    if transport != Transport::Udp {
        out.push_str(";transport=");
        out.push_str(transport.as_str());
    }
    out.push_str(";lr>\r\n");
}

/// Removes the first `popped` Route elements: whole header lines where all their elements went,
/// otherwise the line keeps its remaining elements.
fn remove_popped_routes(
    m: &Message<'_>,
    routes: &[(usize, std::ops::Range<usize>)],
    popped: usize,
    e: &mut Edit<'_>,
) {
    if popped == 0 {
        return;
    }
    let mut i = 0;
    while i < routes.len() {
        let header = routes[i].0;
        let in_line: Vec<_> = routes.iter().filter(|(h, _)| *h == header).collect();
        let gone = in_line
            .iter()
            .filter(|(_, r)| routes[..popped].iter().any(|(_, p)| p == r))
            .count();
        let h = &m.headers[header];
        if gone == in_line.len() {
            e.remove(h.line.clone());
        } else if gone > 0 {
            let keep = in_line[gone..]
                .iter()
                .map(|(_, r)| m.text(r.clone()))
                .collect::<Vec<_>>()
                .join(", ");
            e.replace(h.value.clone(), keep);
        }
        i += in_line.len();
        if i >= popped {
            break;
        }
    }
}

/// `(user, host, port)` of a sip/sips URI (RFC 3261 §19.1.1), borrowed from it; the host as
/// written (an IPv6 reference keeps its brackets). Read by hand: this runs for the Request-URI
/// and each Route of every request, and rsip's typed URI allocates every part.
pub(super) fn uri_parts(uri: &str) -> Option<(Option<&str>, &str, Option<u16>)> {
    let find = |s: &str, b: u8| crate::sip::find(b, s.as_bytes());
    let colon = find(uri, b':')?;
    let scheme = &uri[..colon];
    if !scheme.eq_ignore_ascii_case("sip") && !scheme.eq_ignore_ascii_case("sips") {
        return None;
    }
    let rest = &uri[colon + 1..];
    // Userinfo ends at the '@' (which no other part may hold unescaped).
    let (user, hostport) = match find(rest, b'@') {
        Some(at) => {
            let user = &rest[..find(&rest[..at], b':').unwrap_or(at)];
            if user.is_empty() {
                return None;
            }
            (Some(user), &rest[at + 1..])
        }
        None => (None, rest),
    };
    let end = memchr::memchr2(b';', b'?', hostport.as_bytes()).unwrap_or(hostport.len());
    let hostport = &hostport[..end];
    let (host, port) = if hostport.starts_with('[') {
        let close = find(hostport, b']')?;
        hostport[1..close].parse::<std::net::Ipv6Addr>().ok()?;
        match &hostport[close + 1..] {
            "" => (&hostport[..=close], None),
            p => (&hostport[..=close], Some(p.strip_prefix(':')?)),
        }
    } else {
        match find(hostport, b':') {
            Some(i) => (&hostport[..i], Some(&hostport[i + 1..])),
            None => (hostport, None),
        }
    };
    let host_ok = host.starts_with('[')
        || (!host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'));
    if !host_ok {
        return None;
    }
    let port = match port {
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => Some(p.parse().ok()?),
        Some(_) => return None,
        None => None,
    };
    Some((user, host, port))
}

/// Where a URI sends a request: `transport=` (sips → TLS), host and port (default 5060).
fn uri_target(uri: &str) -> Option<(Transport, Dest)> {
    let u = rsip::Uri::try_from(uri).ok()?;
    let sips = uri
        .get(..5)
        .is_some_and(|s| s.eq_ignore_ascii_case("sips:"));
    let transport = match u.transport() {
        Some(t) => Transport::parse(&t.to_string())?,
        None if sips => Transport::Tls,
        None => Transport::Udp,
    };
    let port = match &u.host_with_port.port {
        Some(p) => p.to_string().parse().ok()?,
        None => 5060,
    };
    let dest = match &u.host_with_port.host {
        rsip::Host::IpAddr(ip) => Dest::Addr(SocketAddr::new(*ip, port)),
        rsip::Host::Domain(d) => Dest::Host(d.to_string(), port),
    };
    Some((transport, dest))
}

/// The edge's own answer to a request it will not forward, with `extra` headers. ACK is never
/// answered.
pub fn refuse(
    m: &Message<'_>,
    inb: &Inbound<'_>,
    side: Side,
    code: u16,
    reason: &str,
    extra: &[(&str, &str)],
) -> Decision {
    if m.method() == Some("ACK") {
        return Decision {
            action: Action::Drop,
            outcome: Outcome::Dropped,
            side,
            reason: Some(format!("{code} {reason} (ACK not answered)")),
        };
    }
    let stamped = m.elements(HeaderName::Via).next().and_then(|(_, r)| {
        let t = m.text(r.clone());
        via::stamp_received(t, &ViaInfo::parse(t)?, inb.source)
    });
    let to_tag = format!("sw{code}");
    let bytes = reply::build(
        m,
        code,
        reason,
        stamped.as_ref().map(|s| s.text.as_str()),
        &to_tag,
        extra,
    );
    Decision {
        action: Action::Reply(bytes),
        outcome: Outcome::Replied(code),
        side,
        reason: Some(format!("{code} {reason}")),
    }
}
