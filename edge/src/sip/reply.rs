//! Responses the edge answers itself (400, 403, 483, 503, …), built from the request per RFC 3261
//! §8.2.6: Via, From, Call-ID and CSeq copied, a To tag added, no body.

use super::{header_param, HeaderName, Message};
use std::fmt::Write;

/// The `Server` header on every response the edge makes.
pub const SERVER: &str = "sipwarden";

/// Builds the response `code reason` to `req`.
///
/// `top_via` replaces the first Via element (the proxy passes it with `received`/`rport` filled in,
/// so the reply reaches a NATed client); `to_tag` is used when the request's To has none; `extra`
/// headers (e.g. `Retry-After`) are appended.
pub fn build(
    req: &Message<'_>,
    code: u16,
    reason: &str,
    top_via: Option<&str>,
    to_tag: &str,
    extra: &[(&str, &str)],
) -> Vec<u8> {
    let mut out = String::with_capacity(512);
    let _ = write!(out, "SIP/2.0 {code} {reason}\r\n");
    for (i, (_, r)) in req.elements(HeaderName::Via).enumerate() {
        let v = match (i, top_via) {
            (0, Some(t)) => t,
            _ => req.text(r.clone()),
        };
        let _ = write!(out, "Via: {v}\r\n");
    }
    if let Some(f) = req.header(HeaderName::From) {
        let _ = write!(out, "From: {f}\r\n");
    }
    if let Some(t) = req.header(HeaderName::To) {
        if header_param(t, "tag").is_none() && code > 100 {
            let _ = write!(out, "To: {t};tag={to_tag}\r\n");
        } else {
            let _ = write!(out, "To: {t}\r\n");
        }
    }
    if let Some(c) = req.call_id() {
        let _ = write!(out, "Call-ID: {c}\r\n");
    }
    if let Some(c) = req.header(HeaderName::CSeq) {
        let _ = write!(out, "CSeq: {c}\r\n");
    }
    for (k, v) in extra {
        let _ = write!(out, "{k}: {v}\r\n");
    }
    let _ = write!(out, "Server: {SERVER}\r\nContent-Length: 0\r\n\r\n");
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_dialog_headers_and_adds_a_tag() {
        let req = "OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/UDP a;branch=z9hG4bK1;rport, SIP/2.0/UDP b\r\nFrom: <sip:a@b>;tag=9\r\nTo: <sip:x>\r\nCall-ID: c1\r\nCSeq: 7 OPTIONS\r\nMax-Forwards: 0\r\n\r\n";
        let m = Message::parse(req.as_bytes()).unwrap();
        let out = build(
            &m,
            483,
            "Too Many Hops",
            Some("SIP/2.0/UDP a;branch=z9hG4bK1;rport=5;received=1.2.3.4"),
            "t1",
            &[("Retry-After", "5")],
        );
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("SIP/2.0 483 Too Many Hops\r\n"));
        assert!(text.contains(
            "Via: SIP/2.0/UDP a;branch=z9hG4bK1;rport=5;received=1.2.3.4\r\nVia: SIP/2.0/UDP b\r\n"
        ));
        assert!(text.contains("To: <sip:x>;tag=t1\r\n"));
        assert!(text.contains("CSeq: 7 OPTIONS\r\n"));
        assert!(text.contains("Retry-After: 5\r\n"));
        let parsed = Message::parse(text.as_bytes()).unwrap();
        assert_eq!(parsed.status(), Some(483));
    }
}
