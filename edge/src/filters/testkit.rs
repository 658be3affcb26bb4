//! Builders for filter unit tests: messages, metas and a manual clock.

use crate::pipeline::{Meta, RequestCx, ResponseCx, SipView};
use crate::proxy::Side;
use crate::sip::{Message, Transport};
use std::net::SocketAddr;

pub const T0: u64 = 1_800_000_000_000;

pub fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

pub fn meta(now_ms: u64, source: &str, side: Side) -> Meta {
    Meta {
        now_ms,
        source: addr(source),
        transport: Transport::Udp,
        side,
        trusted: side == Side::Pbx,
        len: 300,
    }
}

/// A request `method` to `ruri` from `from_user` (To = R-URI user), with `extra` header lines.
pub fn request(method: &str, ruri_user: &str, from_user: &str, extra: &str) -> String {
    format!(
        "{method} sip:{ruri_user}@pbx.example SIP/2.0\r\n\
Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK-{ruri_user}\r\n\
Max-Forwards: 70\r\n\
From: <sip:{from_user}@pbx.example>;tag=f1\r\n\
To: <sip:{ruri_user}@pbx.example>\r\n\
Call-ID: call-{from_user}-{ruri_user}\r\n\
CSeq: 1 {method}\r\n\
{extra}Content-Length: 0\r\n\r\n"
    )
}

/// A response `status` to `method` about `to_user`, from `from_user`, on Call-ID `call_id`.
pub fn response(
    status: u16,
    method: &str,
    from_user: &str,
    to_user: &str,
    call_id: &str,
    extra: &str,
) -> String {
    format!(
        "SIP/2.0 {status} Whatever\r\n\
Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK1\r\n\
From: <sip:{from_user}@pbx.example>;tag=f1\r\n\
To: <sip:{to_user}@pbx.example>;tag=t1\r\n\
Call-ID: {call_id}\r\n\
CSeq: 1 {method}\r\n\
{extra}Content-Length: 0\r\n\r\n"
    )
}

pub fn parse(raw: &str) -> Message<'_> {
    Message::parse(raw.as_bytes()).unwrap()
}

pub fn req_cx<'a>(meta: &'a Meta, m: &'a Message<'a>) -> RequestCx<'a> {
    RequestCx::new(meta, SipView::new(m))
}

/// A response from the PBX going to `peer`.
pub fn resp_cx<'a>(
    meta: &'a Meta,
    m: &'a Message<'a>,
    peer: &str,
    had_credentials: bool,
) -> ResponseCx<'a> {
    ResponseCx {
        meta,
        sip: SipView::new(m),
        status: m.status().unwrap_or(0),
        peer: addr(peer),
        peer_trusted: false,
        had_credentials,
        peer_transport: crate::sip::Transport::Udp,
        flow_token: None,
    }
}
