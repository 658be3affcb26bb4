//! [`SipView`]: the fields filters read from a parsed message, each extracted on demand from the
//! message's byte ranges (no typed rsip headers on the hot path).

use crate::sip::{addr_uri, find, rfind, HeaderName, Message};

/// A read-only view of one parsed message.
#[derive(Clone, Copy)]
pub struct SipView<'a> {
    pub m: &'a Message<'a>,
}

/// `user` of `sip:user@host;params` (or `sips:`/`tel:`), `None` when there is none.
pub fn uri_user(uri: &str) -> Option<&str> {
    let rest = uri.split_once(':')?.1;
    let (user, _) = rest.split_once('@')?;
    // user;password or user:password
    let user = user.split([':', ';']).next().unwrap_or(user);
    (!user.is_empty()).then_some(user)
}

/// `user@host` (or `host`) of a URI: no scheme, port, parameters or headers. Lower-cased host.
pub fn uri_aor(uri: &str) -> String {
    // Byte searches throughout: several rules take the AOR of every request.
    let upto = |s: &str, b: u8| find(b, s.as_bytes()).unwrap_or(s.len());
    let rest = find(b':', uri.as_bytes()).map_or(uri, |i| &uri[i + 1..]);
    let rest = &rest[..memchr::memchr3(b';', b'?', b'>', rest.as_bytes()).unwrap_or(rest.len())];
    let (user, host) = match rfind(b'@', rest.as_bytes()) {
        Some(i) => (Some(&rest[..upto(&rest[..i], b':')]), &rest[i + 1..]),
        None => (None, rest),
    };
    let host = if host.starts_with('[') {
        &host[..find(b']', host.as_bytes()).map_or(host.len(), |i| i + 1)]
    } else {
        &host[..upto(host, b':')]
    };
    let mut aor = String::with_capacity(host.len() + user.map_or(0, |u| u.len() + 1));
    if let Some(u) = user {
        aor.push_str(u);
        aor.push('@');
    }
    let at = aor.len();
    aor.push_str(host);
    aor[at..].make_ascii_lowercase();
    aor
}

impl<'a> SipView<'a> {
    pub fn new(m: &'a Message<'a>) -> Self {
        SipView { m }
    }

    /// The request method, or the CSeq method of a response.
    pub fn method(&self) -> &'a str {
        self.m
            .method()
            .unwrap_or_else(|| self.m.cseq().map_or("", |(_, m)| m))
    }

    pub fn is_request(&self) -> bool {
        self.m.method().is_some()
    }

    pub fn call_id(&self) -> &'a str {
        self.m.call_id().unwrap_or("")
    }

    pub fn request_uri(&self) -> &'a str {
        self.m.request_uri().unwrap_or("")
    }

    pub fn from_uri(&self) -> &'a str {
        self.m.header(HeaderName::From).map_or("", addr_uri)
    }

    pub fn to_uri(&self) -> &'a str {
        self.m.header(HeaderName::To).map_or("", addr_uri)
    }

    pub fn from_user(&self) -> &'a str {
        uri_user(self.from_uri()).unwrap_or("")
    }

    pub fn to_user(&self) -> &'a str {
        uri_user(self.to_uri()).unwrap_or("")
    }

    /// The user part of the Request-URI: the dialled number or extension.
    pub fn ruri_user(&self) -> &'a str {
        uri_user(self.request_uri()).unwrap_or("")
    }

    pub fn user_agent(&self) -> &'a str {
        self.m.header(HeaderName::UserAgent).unwrap_or("")
    }

    pub fn has_credentials(&self) -> bool {
        self.m.header(HeaderName::Authorization).is_some()
            || self.m.header(HeaderName::ProxyAuthorization).is_some()
    }

    /// The To tag: absent on a dialog-creating request.
    pub fn to_tag(&self) -> Option<&'a str> {
        crate::sip::header_param(self.m.header(HeaderName::To)?, "tag")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_aors() {
        assert_eq!(uri_user("sip:1001@pbx.example;transport=tcp"), Some("1001"));
        assert_eq!(uri_user("sip:alice:secret@h"), Some("alice"));
        assert_eq!(uri_user("sip:pbx.example"), None);
        assert_eq!(uri_user("tel:+4930123"), None);
        assert_eq!(
            uri_aor("sip:1001@PBX.example:5060;transport=tcp"),
            "1001@pbx.example"
        );
        assert_eq!(uri_aor("sips:bob@[2001:db8::1]:5061"), "bob@[2001:db8::1]");
        assert_eq!(uri_aor("sip:pbx.example:5080"), "pbx.example");
    }

    #[test]
    fn view_of_a_request() {
        let raw = "INVITE sip:+88123@pbx SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n\
From: \"A\" <sip:1001@pbx>;tag=a\r\nTo: <sip:+88123@pbx>\r\nCall-ID: c1\r\nCSeq: 1 INVITE\r\n\
User-Agent: friendly-scanner\r\nProxy-Authorization: Digest x\r\n\r\n";
        let m = Message::parse(raw.as_bytes()).unwrap();
        let v = SipView::new(&m);
        assert_eq!(v.method(), "INVITE");
        assert_eq!(v.from_user(), "1001");
        assert_eq!(v.to_user(), "+88123");
        assert_eq!(v.ruri_user(), "+88123");
        assert_eq!(v.user_agent(), "friendly-scanner");
        assert!(v.has_credentials());
        assert_eq!(v.to_tag(), None);
        let r = "SIP/2.0 401 Unauthorized\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nCall-ID: c\r\nCSeq: 2 REGISTER\r\n\r\n";
        let m = Message::parse(r.as_bytes()).unwrap();
        assert_eq!(SipView::new(&m).method(), "REGISTER");
    }
}
