//! Via handling: a typed view of one Via element (parsed here; see [`ViaInfo::parse`]), RFC 3581 `received`/`rport`,
//! and the edge's deterministic branch — an HMAC over the previous hop's Via, the Call-ID and the
//! CSeq number, so retransmissions, CANCEL and non-2xx ACK get the same branch as their INVITE, and
//! a response whose Via stack was forged (to reflect traffic elsewhere) does not verify.

use super::Dest;
use crate::flow::FlowKeys;
use crate::sip::message::is_token;
use crate::sip::Transport;
use crate::sip::{host_is, push_ip, split_at_byte};
use std::net::SocketAddr;

/// RFC 3261 magic cookie, then our own marker.
pub const BRANCH_PREFIX: &str = "z9hG4bKsw";
/// Via parameter the edge adds to its own Via when the request carried credentials.
pub const CREDENTIALS_PARAM: &str = "swc";
const BRANCH_MAC_BYTES: usize = 15;

/// The parts of a Via element the proxy uses, borrowed from the element's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViaInfo<'a> {
    pub transport: Transport,
    /// As written; an IPv6 reference keeps its brackets.
    pub host: &'a str,
    pub port: Option<u16>,
    pub branch: Option<&'a str>,
    pub received: Option<&'a str>,
    /// `None`: no rport; `Some(None)`: rport requested (no value); `Some(Some(p))`: filled in.
    pub rport: Option<Option<u16>>,
}

/// A byte cursor over one Via element.
struct Cursor<'a> {
    s: &'a str,
    i: usize,
}

impl<'a> Cursor<'a> {
    #[inline]
    fn peek(&self) -> Option<u8> {
        self.s.as_bytes().get(self.i).copied()
    }

    /// Skips spaces and tabs; whether there were any.
    fn ws(&mut self) -> bool {
        let from = self.i;
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.i += 1;
        }
        self.i > from
    }

    /// The longest run of bytes satisfying `f` (ASCII, so a char boundary at each end). Inlined
    /// into each caller, so the test is the caller's own and not a call per byte.
    #[inline(always)]
    fn run(&mut self, f: impl Fn(u8) -> bool) -> &'a str {
        let (b, from) = (self.s.as_bytes(), self.i);
        let mut i = from;
        while i < b.len() && f(b[i]) {
            i += 1;
        }
        self.i = i;
        &self.s[from..i]
    }

    /// Consumes `SIP/2.0/` written without white space (as every implementation sends it),
    /// letters in any case; whether it was there.
    #[inline]
    fn sip_2_0(&mut self) -> bool {
        let Some(b) = self.s.as_bytes().get(self.i..self.i + 8) else {
            return false;
        };
        let hit = b[0] | 0x20 == b's'
            && b[1] | 0x20 == b'i'
            && b[2] | 0x20 == b'p'
            && &b[3..] == b"/2.0/";
        if hit {
            self.i += 8;
        }
        hit
    }

    /// A port: digits (leading zeros allowed) for 1–65535. The cursor moves past the digits
    /// whatever they say.
    #[inline]
    fn port(&mut self) -> Option<u16> {
        let digits = self.run(|b| b.is_ascii_digit());
        if digits.is_empty() {
            return None;
        }
        // Held under 2^17, so no run of digits overflows it.
        let n = digits
            .bytes()
            .fold(0u32, |n, d| (n * 10 + u32::from(d - b'0')).min(1 << 17));
        u16::try_from(n).ok().filter(|&p| p != 0)
    }

    /// Everything up to the next `b` or the end.
    fn until(&mut self, b: u8) -> &'a str {
        let from = self.i;
        let rest = self.s.as_bytes().get(from..).unwrap_or_default();
        self.i = from + crate::sip::find(b, rest).unwrap_or(rest.len());
        &self.s[from..self.i]
    }

    /// Consumes `b`, with optional white space around it.
    fn sep(&mut self, b: u8) -> Option<()> {
        self.ws();
        (self.peek() == Some(b)).then(|| self.i += 1)?;
        self.ws();
        Some(())
    }
}

/// Bytes of a host name or IPv4 address (letters, digits, `-`, `.`), as a table: the sent-by of
/// every Via of every message is scanned with it.
static HOST: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b.is_ascii_alphanumeric() || b == b'-' || b == b'.';
        i += 1;
    }
    t
};

/// `sent-protocol LWS sent-by` at the start of a Via element (RFC 3261 §20.42): the transport,
/// the host as written (an IPv6 reference keeps its brackets) and the port. Leaves the cursor
/// just past the port.
fn sent_by<'a>(c: &mut Cursor<'a>) -> Option<(Transport, &'a str, Option<u16>)> {
    let element = c.s;
    c.ws();
    // sent-protocol: SIP / 2.0 / transport, white space allowed around the slashes.
    if !c.sip_2_0() {
        if !c.run(is_token).eq_ignore_ascii_case("SIP") {
            return None;
        }
        c.sep(b'/')?;
        if c.run(is_token) != "2.0" {
            return None;
        }
        c.sep(b'/')?;
    }
    let transport = Transport::parse(c.run(is_token))?;
    if !c.ws() {
        return None;
    }
    // sent-by: host [ ":" port ].
    let host = if c.peek() == Some(b'[') {
        let open = c.i;
        let close = open + memchr::memchr(b']', &element.as_bytes()[open..])?;
        element[open + 1..close]
            .parse::<std::net::Ipv6Addr>()
            .ok()?;
        c.i = close + 1;
        &element[open..=close]
    } else {
        c.run(|b| HOST[usize::from(b)])
    };
    if host.is_empty() {
        return None;
    }
    c.ws();
    let port = if c.peek() == Some(b':') {
        c.i += 1;
        c.ws();
        Some(c.port()?)
    } else {
        None
    };
    Some((transport, host, port))
}

/// The sent-by `host` and `port` of a Via element, its parameters not read (loop detection
/// looks at every Via of every request and wants nothing else).
pub fn sent_by_of(element: &str) -> Option<(&str, Option<u16>)> {
    let mut c = Cursor { s: element, i: 0 };
    sent_by(&mut c).map(|(_, host, port)| (host, port))
}

impl<'a> ViaInfo<'a> {
    /// Parses one Via element (`SIP/2.0/UDP host:port;branch=…`, RFC 3261 §20.42 `via-parm`):
    /// white space is allowed around `/`, `:`, `;` and `=`; a parameter value runs to the next `;`.
    ///
    /// Written here rather than through rsip's typed Via: every message crosses this at least
    /// twice on the forward path, and rsip's tokenizer (which formats an error for each grammar
    /// alternative it rejects) was the largest single cost of proxying a message. It reads the
    /// element in one pass and allocates nothing.
    pub fn parse(element: &'a str) -> Option<ViaInfo<'a>> {
        let mut c = Cursor { s: element, i: 0 };
        let (transport, host, port) = sent_by(&mut c)?;
        let mut info = ViaInfo {
            transport,
            host,
            port,
            branch: None,
            received: None,
            rport: None,
        };
        // via-params: each ";" name [ "=" value ].
        loop {
            c.ws();
            match c.peek() {
                None => return Some(info),
                Some(b';') => c.i += 1,
                Some(_) => return None,
            }
            c.ws();
            let name = c.run(is_token);
            if name.is_empty() {
                return None;
            }
            c.ws();
            let value = match c.peek() {
                Some(b'=') => {
                    c.i += 1;
                    let v = c.until(b';').trim_ascii();
                    if v.is_empty() {
                        return None;
                    }
                    Some(v)
                }
                None | Some(b';') => None,
                Some(_) => return None,
            };
            if name.eq_ignore_ascii_case("branch") {
                info.branch = Some(value?);
            } else if name.eq_ignore_ascii_case("received") {
                let v = value?;
                crate::sip::parse_ip(v.trim_start_matches('[').trim_end_matches(']'))?;
                info.received = Some(v);
            } else if name.eq_ignore_ascii_case("rport") {
                info.rport = Some(match value {
                    Some(v) => Some(v.parse().ok()?),
                    None => None,
                });
            }
        }
    }

    /// Where a response to this Via goes (RFC 3261 §18.2.2 with RFC 3581): `received` over
    /// the sent-by host, `rport` over the sent-by port.
    pub fn response_target(&self) -> Dest {
        let port = match self.rport {
            Some(Some(p)) => p,
            _ => self.port.unwrap_or(5060),
        };
        let host = self.received.unwrap_or(self.host);
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        match crate::sip::parse_ip(bare) {
            Some(ip) => Dest::Addr(SocketAddr::new(ip, port)),
            None => Dest::Host(host.to_string(), port),
        }
    }
}

/// The client's top Via element with `received` and `rport` filled in (see [`stamp_received`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamped {
    pub text: String,
    /// Where the `received` value is in `text`.
    received: std::ops::Range<usize>,
    /// The `rport` value written, if one was asked for.
    rport: Option<u16>,
}

impl Stamped {
    /// The stamped element as [`ViaInfo::parse`] would read it, from `top` (the element before
    /// stamping) without parsing it again.
    pub fn via<'s>(&'s self, top: &ViaInfo<'s>) -> ViaInfo<'s> {
        ViaInfo {
            received: Some(&self.text[self.received.clone()]),
            rport: self.rport.map(Some).or(top.rport),
            ..top.clone()
        }
    }
}

/// The client's top Via element with `received` (when the sent-by host is not the source address)
/// and `rport` (when asked for) filled in, as the proxy must before forwarding (RFC 3581 §4).
/// Returns `None` when the element needs no change.
pub fn stamp_received(element: &str, via: &ViaInfo<'_>, source: SocketAddr) -> Option<Stamped> {
    let wants_rport = via.rport == Some(None);
    if !wants_rport && host_is(via.host, source.ip()) {
        return None;
    }
    let mut out = String::with_capacity(element.len() + 48);
    let mut received = None;
    let (first, mut rest) = split_at_byte(element, b';');
    out.push_str(first);
    while let Some(params) = rest {
        let (p, next) = split_at_byte(params, b';');
        rest = next;
        out.push(';');
        let name = p[..crate::sip::find(b'=', p.as_bytes()).unwrap_or(p.len())].trim_ascii();
        if wants_rport && name.eq_ignore_ascii_case("rport") {
            out.push_str("rport=");
            out.push_str(itoa::Buffer::new().format(source.port()));
        } else if name.eq_ignore_ascii_case("received") {
            out.push_str("received=");
            let at = out.len();
            push_ip(&mut out, source.ip());
            received = Some(at..out.len());
        } else {
            out.push_str(p);
        }
    }
    let received = match received {
        Some(r) => r,
        None => {
            out.push_str(";received=");
            let at = out.len();
            push_ip(&mut out, source.ip());
            at..out.len()
        }
    };
    Some(Stamped {
        text: out,
        received,
        rport: wants_rport.then_some(source.port()),
    })
}

/// Appends the edge's branch for a request whose previous hop's Via (after [`stamp_received`]) is
/// `prev`.
pub fn push_branch(
    out: &mut String,
    keys: &FlowKeys,
    prev: &ViaInfo<'_>,
    call_id: &str,
    cseq: u32,
) {
    let mut scratch = SentBy::default();
    let mac = keys.branch_mac(&branch_input(
        prev,
        call_id,
        &cseq.to_be_bytes(),
        &mut scratch,
    ));
    out.push_str(BRANCH_PREFIX);
    data_encoding::BASE32_DNSSEC.encode_append(&mac[..BRANCH_MAC_BYTES], out);
}

/// The edge's branch for `prev` as a string (see [`push_branch`]; the proxy writes it in place).
#[cfg(test)]
pub fn branch(keys: &FlowKeys, prev: &ViaInfo<'_>, call_id: &str, cseq: u32) -> String {
    let mut out = String::with_capacity(BRANCH_PREFIX.len() + 24);
    push_branch(&mut out, keys, prev, call_id, cseq);
    out
}

/// Whether `ours` is the branch this edge would have made for `prev`, under any of the keys.
pub fn verify_branch(
    keys: &FlowKeys,
    ours: &str,
    prev: &ViaInfo<'_>,
    call_id: &str,
    cseq: u32,
) -> bool {
    let Some(enc) = ours.strip_prefix(BRANCH_PREFIX) else {
        return false;
    };
    let b32 = &data_encoding::BASE32_DNSSEC;
    if b32.decode_len(enc.len()) != Ok(BRANCH_MAC_BYTES) {
        return false;
    }
    let mut tag = [0u8; BRANCH_MAC_BYTES];
    if b32.decode_mut(enc.as_bytes(), &mut tag).is_err() {
        return false;
    }
    let mut scratch = SentBy::default();
    keys.verify_branch_mac(
        &branch_input(prev, call_id, &cseq.to_be_bytes(), &mut scratch),
        &tag,
    )
}

/// Room for the sent-by in lower case and the rport digits that [`branch_input`] hashes: on the
/// stack, unless the host is too long for it.
struct SentBy {
    stack: [u8; 96],
    heap: Vec<u8>,
}

impl Default for SentBy {
    fn default() -> Self {
        SentBy {
            stack: [0; 96],
            heap: Vec::new(),
        }
    }
}

impl SentBy {
    /// Writes `host[:port]` lower-cased, then the rport digits; returns the two.
    fn fill(&mut self, host: &str, port: Option<u16>, rport: Option<u16>) -> (&[u8], &[u8]) {
        let mut p = itoa::Buffer::new();
        let port = port.map_or("", |n| p.format(n));
        let mut r = itoa::Buffer::new();
        let rport = rport.map_or("", |n| r.format(n));
        let colon = usize::from(!port.is_empty());
        let sent_by = host.len() + colon + port.len();
        let need = sent_by + rport.len();
        let buf = if need <= self.stack.len() {
            &mut self.stack[..need]
        } else {
            self.heap.resize(need, 0);
            &mut self.heap[..]
        };
        buf[..host.len()].copy_from_slice(host.as_bytes());
        buf[..host.len()].make_ascii_lowercase();
        if colon == 1 {
            buf[host.len()] = b':';
        }
        buf[host.len() + colon..sent_by].copy_from_slice(port.as_bytes());
        buf[sent_by..].copy_from_slice(rport.as_bytes());
        let buf: &[u8] = buf;
        buf.split_at(sent_by)
    }
}

/// What the branch MAC covers, as parts borrowed from `prev` or held in `scratch` (the sent-by in
/// lower case and the rport), so a branch allocates nothing.
fn branch_input<'a>(
    prev: &'a ViaInfo<'a>,
    call_id: &'a str,
    cseq: &'a [u8; 4],
    scratch: &'a mut SentBy,
) -> [&'a [u8]; 7] {
    let (sent_by, rport) = scratch.fill(prev.host, prev.port, prev.rport.flatten());
    [
        b"via-branch",
        prev.branch.unwrap_or("").as_bytes(),
        sent_by,
        prev.received.unwrap_or("").as_bytes(),
        rport,
        call_id.as_bytes(),
        cseq,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> FlowKeys {
        FlowKeys::new(["branch-test-secret-0001"]).unwrap()
    }

    #[test]
    fn parses_via_params() {
        let v =
            ViaInfo::parse("SIP/2.0/TCP 10.0.0.1:5070;branch=z9hG4bK776;rport;received=1.2.3.4")
                .unwrap();
        assert_eq!(v.transport, Transport::Tcp);
        assert_eq!(v.host, "10.0.0.1");
        assert_eq!(v.port, Some(5070));
        assert_eq!(v.branch, Some("z9hG4bK776"));
        assert_eq!(v.received, Some("1.2.3.4"));
        assert_eq!(v.rport, Some(None));
        assert!(ViaInfo::parse("garbage").is_none());
    }

    #[test]
    fn parses_the_via_grammar_and_refuses_the_rest() {
        let v =
            ViaInfo::parse("sip / 2.0 / udp  [2001:db8::1] : 5062 ; BRANCH = z9hG4bKq ; RPORT = 7")
                .unwrap();
        assert_eq!(v.transport, Transport::Udp);
        assert_eq!(v.host, "[2001:db8::1]");
        assert_eq!(v.port, Some(5062));
        assert_eq!(v.branch, Some("z9hG4bKq"));
        assert_eq!(v.rport, Some(Some(7)));
        let v = ViaInfo::parse("SIP/2.0/TLS pbx.example.com;maddr=1.2.3.4;ttl=1").unwrap();
        assert_eq!((v.host, v.port), ("pbx.example.com", None));
        let v = ViaInfo::parse("SIP/2.0/UDP h:5060 ; branch=z9hG4bKa ;rport ").unwrap();
        assert_eq!(
            (v.host, v.port, v.branch),
            ("h", Some(5060), Some("z9hG4bKa"))
        );
        assert_eq!(v.rport, Some(None));
        // Any case, leading zeros in the port, white space on one side of a slash only.
        for (text, port) in [
            ("sIp/2.0/uDp h:0005060", Some(5060)),
            ("SIP/2.0 /UDP h:65535", Some(65535)),
            ("SIP/ 2.0/UDP h", None),
        ] {
            let v = ViaInfo::parse(text).unwrap_or_else(|| panic!("refused {text:?}"));
            assert_eq!((v.transport, v.host, v.port), (Transport::Udp, "h", port));
        }
        for bad in [
            "SIP/2.0/UDP",
            "SIP/2.0/UDP ",
            "SIP/3.0/UDP h",
            "XIP/2.0/UDP h",
            "SIP/2.0/SCTP h",
            "SIP/2.0/UDP h:0",
            "SIP/2.0/UDP h:70000",
            "SIP/2.0/UDP h:65536",
            "SIP/2.0/UDP h:99999999999999999999",
            "SIP/2.1/UDP h",
            "SIP/2.0UDP h",
            "SI/2.0/UDP h",
            "SIP/2.0/UDP h:x",
            "SIP/2.0/UDP h;rport=x",
            "SIP/2.0/UDP h;branch",
            "SIP/2.0/UDP h;branch=",
            "SIP/2.0/UDP h;received=not-an-ip",
            "SIP/2.0/UDP h;;branch=z9hG4bKx",
            "SIP/2.0/UDP h\"x",
            "SIP/2.0/UDP [::1",
            "SIP/2.0/UDP [zz::1]:5060",
            "SIP/2.0/UDP [::1]x",
            "SIP/2.0/UDP h x",
            "SIP/2.0/UDPh",
            "SIP/2.0/UDP h:",
            "SIP/2.0/UDP h;branch=z9hG4bKx;=1",
            "SIP/2.0/UDP h;branch=z9hG4bKx;ttl=",
        ] {
            assert!(ViaInfo::parse(bad).is_none(), "accepted {bad:?}");
        }
    }

    #[test]
    fn received_and_rport_follow_rfc3581() {
        let src: SocketAddr = "198.51.100.9:40000".parse().unwrap();
        let e = "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKa;rport";
        let v = ViaInfo::parse(e).unwrap();
        let stamped = stamp_received(e, &v, src).unwrap();
        assert_eq!(
            stamped.text,
            "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKa;rport=40000;received=198.51.100.9"
        );
        let sv = ViaInfo::parse(&stamped.text).unwrap();
        assert_eq!(sv.response_target(), Dest::Addr(src));
        assert_eq!(stamped.via(&v), sv, "derived as parsed");

        // No rport: received only, and the response goes to the sent-by port.
        let e = "SIP/2.0/UDP 10.0.0.1:5062;branch=z9hG4bKb";
        let v = ViaInfo::parse(e).unwrap();
        let stamped = stamp_received(e, &v, src).unwrap();
        assert!(stamped.text.ends_with(";received=198.51.100.9"));
        let sv = ViaInfo::parse(&stamped.text).unwrap();
        assert_eq!(
            sv.response_target(),
            Dest::Addr("198.51.100.9:5062".parse().unwrap())
        );
        assert_eq!(stamped.via(&v), sv, "derived as parsed");

        // A stale received is replaced, a filled-in rport kept; IPv6 sources too.
        let src6: SocketAddr = "[2001:db8::9]:5070".parse().unwrap();
        let e = "SIP/2.0/UDP h.example;received=192.0.2.1;rport=9;branch=z9hG4bKd";
        let v = ViaInfo::parse(e).unwrap();
        let stamped = stamp_received(e, &v, src6).unwrap();
        assert_eq!(
            stamped.text,
            "SIP/2.0/UDP h.example;received=2001:db8::9;rport=9;branch=z9hG4bKd"
        );
        assert_eq!(stamped.via(&v), ViaInfo::parse(&stamped.text).unwrap());

        // Sent-by already the source and no rport: untouched.
        let e = "SIP/2.0/UDP 198.51.100.9:40000;branch=z9hG4bKc";
        assert_eq!(stamp_received(e, &ViaInfo::parse(e).unwrap(), src), None);
    }

    #[test]
    fn branch_is_deterministic_and_verifiable() {
        let k = keys();
        let prev = ViaInfo::parse("SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKx;rport=5;received=1.2.3.4")
            .unwrap();
        let b1 = branch(&k, &prev, "call-1", 7);
        assert!(b1.starts_with("z9hG4bK"));
        assert_eq!(
            b1,
            branch(&k, &prev, "call-1", 7),
            "retransmission and CANCEL match"
        );
        assert_ne!(b1, branch(&k, &prev, "call-1", 8));
        assert_ne!(b1, branch(&k, &prev, "call-2", 7));
        assert!(verify_branch(&k, &b1, &prev, "call-1", 7));

        // A response whose next Via was rewritten to reflect elsewhere does not verify.
        let forged =
            ViaInfo::parse("SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKx;rport=5;received=192.0.2.66")
                .unwrap();
        assert!(!verify_branch(&k, &b1, &forged, "call-1", 7));
        assert!(!verify_branch(&k, "z9hG4bKother", &prev, "call-1", 7));
        let other = FlowKeys::new(["another-cluster-secret"]).unwrap();
        assert!(!verify_branch(&other, &b1, &prev, "call-1", 7));
    }

    #[test]
    fn branch_covers_the_lowercased_sent_by_and_rport() {
        let k = keys();
        let prev = ViaInfo::parse(
            "SIP/2.0/UDP PBX.Example:5070;branch=z9hG4bK1;rport=5071;received=1.2.3.4",
        )
        .unwrap();
        let parts: [&[u8]; 7] = [
            b"via-branch",
            b"z9hG4bK1",
            b"pbx.example:5070",
            b"1.2.3.4",
            b"5071",
            b"call",
            &7u32.to_be_bytes(),
        ];
        let expect = data_encoding::BASE32_DNSSEC.encode(&k.branch_mac(&parts)[..BRANCH_MAC_BYTES]);
        assert_eq!(
            branch(&k, &prev, "call", 7),
            format!("{BRANCH_PREFIX}{expect}")
        );

        // A host too long for the stack room still hashes (and verifies) in full.
        let long = format!(
            "SIP/2.0/UDP {}.example:5060;branch=z9hG4bK2",
            "a".repeat(200)
        );
        let prev = ViaInfo::parse(&long).unwrap();
        let b = branch(&k, &prev, "call", 7);
        assert!(verify_branch(&k, &b, &prev, "call", 7));
        let shorter = format!(
            "SIP/2.0/UDP {}.example:5060;branch=z9hG4bK2",
            "a".repeat(199)
        );
        assert!(!verify_branch(
            &k,
            &b,
            &ViaInfo::parse(&shorter).unwrap(),
            "call",
            7
        ));
        // Wrong lengths and alphabets are refused without decoding into the tag.
        assert!(!verify_branch(&k, &format!("{b}x"), &prev, "call", 7));
        let bad_char = format!("{}!", &b[..b.len() - 1]);
        assert!(!verify_branch(&k, &bad_char, &prev, "call", 7));
    }
}
