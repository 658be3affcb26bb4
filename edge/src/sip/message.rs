//! A parsed view of one SIP message: rsip's tokenizer finds the start line and header lines, and this
//! keeps their byte ranges in the original buffer so the proxy can forward by splicing rather than
//! re-serializing. Header values are turned into typed values only where a caller asks.

use smallvec::SmallVec;
use std::ops::Range;
use thiserror::Error;

/// Why a message could not be read. The text goes into logs and `400` reason phrases.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ParseError {
    #[error("no blank line ends the header section")]
    NoHeaderEnd,
    #[error("start line or header syntax is invalid")]
    Syntax,
    #[error("header section is not UTF-8")]
    NotUtf8,
    #[error("header folding is not supported")]
    Folding,
    #[error("control character in the header section")]
    Control,
}

/// Header names the proxy cares about, compact forms folded in (RFC 3261 §7.3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeaderName {
    Via,
    From,
    To,
    CallId,
    CSeq,
    MaxForwards,
    ContentLength,
    Contact,
    Route,
    RecordRoute,
    Path,
    UserAgent,
    Expires,
    Authorization,
    ProxyAuthorization,
    Other,
}

/// How many [`HeaderName`]s there are (the per-message index of first occurrences has a slot each).
const HEADER_KINDS: usize = HeaderName::Other as usize + 1;

impl HeaderName {
    pub fn classify(name: &str) -> HeaderName {
        if !name.bytes().all(is_token) {
            return HeaderName::Other;
        }
        HeaderName::of(name.as_bytes())
    }

    /// [`HeaderName::classify`] of a name's bytes, which must all be [`is_token`]s (as the parser
    /// hands them over). Every header line of every message comes
    /// through here, so the candidate is picked by length and first letter and then compared
    /// once, rather than by trying each name in turn.
    pub fn of(name: &[u8]) -> HeaderName {
        use HeaderName::*;
        let Some(&first) = name.first() else {
            return Other;
        };
        let (want, h): (&[u8], HeaderName) = match (name.len(), first | 0x20) {
            (1, b'v') => return Via,
            (1, b'f') => return From,
            (1, b't') => return To,
            (1, b'i') => return CallId,
            (1, b'l') => return ContentLength,
            (1, b'm') => return Contact,
            (2, b't') => (b"to", To),
            (3, b'v') => (b"via", Via),
            (4, b'f') => (b"from", From),
            (4, b'c') => (b"cseq", CSeq),
            (4, b'p') => (b"path", Path),
            (5, b'r') => (b"route", Route),
            (7, b'c') => {
                if name[1] | 0x20 == b'a' {
                    (b"call-id", CallId)
                } else {
                    (b"contact", Contact)
                }
            }
            (7, b'e') => (b"expires", Expires),
            (10, b'u') => (b"user-agent", UserAgent),
            (12, b'm') => (b"max-forwards", MaxForwards),
            (12, b'r') => (b"record-route", RecordRoute),
            (13, b'a') => (b"authorization", Authorization),
            (14, b'c') => (b"content-length", ContentLength),
            (19, b'p') => (b"proxy-authorization", ProxyAuthorization),
            _ => return Other,
        };
        // Setting bit 5 lower-cases a letter and leaves `-` and digits as they are; of the other
        // token characters none becomes a letter or `-`, so for a token this is an exact
        // case-insensitive comparison (`classify` turns away anything else). One OR and XOR
        // per byte, folded, where `eq_ignore_ascii_case` maps both sides through a table.
        let diff = name
            .iter()
            .zip(want)
            .fold(0u8, |d, (&c, &w)| d | ((c | 0x20) ^ w));
        if diff == 0 {
            h
        } else {
            Other
        }
    }
}

/// One header line: where it is and what it is called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: HeaderName,
    /// From the first byte of the name to just past the line's CRLF.
    pub line: Range<usize>,
    /// The value, without the colon, leading white space or CRLF.
    pub value: Range<usize>,
}

/// The first line of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartLine {
    Request {
        method: Range<usize>,
        uri: Range<usize>,
    },
    Response {
        code: u16,
    },
}

/// A message read from `buf`, which it borrows.
#[derive(Debug)]
pub struct Message<'a> {
    pub buf: &'a [u8],
    /// The start line and header lines (up to the CRLF of the last), checked UTF-8 once.
    head: &'a str,
    pub start: StartLine,
    /// Byte offset just past the start line's CRLF: where new top headers go.
    pub start_end: usize,
    /// On the stack for the header counts real traffic has; a longer message spills to the heap.
    pub headers: SmallVec<[Header; 16]>,
    /// For each known header name, 1 + the index in `headers` of its first line (0: absent), so
    /// the dozen lookups each message gets cost no scan.
    first: [u8; HEADER_KINDS],
    /// The CSeq number and where its method is, read once (every rule and the proxy ask).
    cseq: Option<(u32, Range<usize>)>,
    /// Byte offset of the body (just past the blank line).
    pub body_start: usize,
}

/// Where the blank line that ends the header section starts, if there is one.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    memchr::memmem::find(buf, b"\r\n\r\n")
}

/// RFC 3261 §25.1 `token` characters (methods, header and parameter names).
#[inline]
pub fn is_token(b: u8) -> bool {
    TOKEN[b as usize]
}

/// [`is_token`] as a table: one load per byte on the paths that scan every header name.
static TOKEN: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.' | b'!' | b'%' | b'*' | b'_' | b'+' | b'`' | b'\'' | b'~'
            );
        i += 1;
    }
    t
};

fn is_ws(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// `Request-Line` or `Status-Line` (RFC 3261 §7.1, §7.2) of `line` (without its CRLF).
fn start_line(line: &[u8]) -> Result<StartLine, ParseError> {
    const VERSION: &[u8] = b"SIP/2.0";
    if line.len() > VERSION.len() && line[..VERSION.len()].eq_ignore_ascii_case(VERSION) {
        // SIP-Version SP Status-Code SP Reason-Phrase
        let rest = &line[VERSION.len()..];
        if rest[0] != b' ' || rest.len() < 4 || !rest[1..4].iter().all(u8::is_ascii_digit) {
            return Err(ParseError::Syntax);
        }
        if rest.len() > 4 && rest[4] != b' ' {
            return Err(ParseError::Syntax);
        }
        let code = rest[1..4]
            .iter()
            .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
        if !(100..700).contains(&code) {
            return Err(ParseError::Syntax);
        }
        return Ok(StartLine::Response { code });
    }
    // Method SP Request-URI SP SIP-Version
    let a = line
        .iter()
        .position(|&b| b == b' ')
        .ok_or(ParseError::Syntax)?;
    let b = line
        .iter()
        .rposition(|&b| b == b' ')
        .ok_or(ParseError::Syntax)?;
    let (method, uri, version) = (&line[..a], &line[a + 1..b.max(a + 1)], &line[b + 1..]);
    if method.is_empty()
        || !method.iter().all(|&c| is_token(c))
        || b <= a + 1
        || uri.iter().any(|&c| is_ws(c))
        || !uri.contains(&b':')
        || !version.eq_ignore_ascii_case(VERSION)
    {
        return Err(ParseError::Syntax);
    }
    Ok(StartLine::Request {
        method: 0..a,
        uri: a + 1..b,
    })
}

/// The first header line called `name`, found through the index of first occurrences.
fn first_of<'h>(
    headers: &'h [Header],
    first: &[u8; HEADER_KINDS],
    name: HeaderName,
) -> Option<&'h Header> {
    match first[name as usize] {
        // Absent, or beyond the 255th header line (where the index stops): scan.
        0 if headers.len() >= usize::from(u8::MAX) => headers.iter().find(|h| h.name == name),
        0 => None,
        i => Some(&headers[usize::from(i) - 1]),
    }
}

/// `1*DIGIT LWS Method` of the CSeq line `h` of `head` (its value is trimmed at both ends by
/// `parse`): the number and where the method is.
fn read_cseq(head: &str, h: Option<&Header>) -> Option<(u32, Range<usize>)> {
    let h = h?;
    let v = head.get(h.value.clone())?;
    let sp = v.find([' ', '\t'])?;
    let n = &v[..sp];
    let method_at = v.len() - v[sp..].trim_ascii_start().len();
    let method = &v[method_at..];
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || method.is_empty() {
        return None;
    }
    if method.bytes().any(|b| b == b' ' || b == b'\t') {
        return None;
    }
    Some((n.parse().ok()?, h.value.start + method_at..h.value.end))
}

impl<'a> Message<'a> {
    /// Parses `buf`, which must hold exactly one message (UDP datagram or framed stream message).
    ///
    /// The header section is split here rather than by rsip's tokenizer, which builds a formatted
    /// error for every alternative it rejects on the way and cost more than the rest of the parse
    /// together; Via elements are parsed in `proxy::via`, and rsip still types URIs.
    pub fn parse(buf: &'a [u8]) -> Result<Message<'a>, ParseError> {
        // One pass over the line ends: each line is split as it is found, and the first empty
        // line ends the header section (the body is not scanned).
        let mut lines = 0;
        let mut start = StartLine::Response { code: 0 };
        let mut start_end = 0;
        let mut at = 0;
        let mut end = None;
        let mut headers = SmallVec::new();
        let mut first = [0u8; HEADER_KINDS];
        for nl in memchr::memchr_iter(b'\n', buf) {
            // An LF must end a CRLF (a bare CR is caught by the count below).
            if nl <= at || buf[nl - 1] != b'\r' {
                return Err(ParseError::Syntax);
            }
            if nl == at + 1 {
                end = Some(at);
                break;
            }
            let line = at..nl - 1;
            lines += 1;
            let from = std::mem::replace(&mut at, nl + 1);
            if lines == 1 {
                start = start_line(&buf[line])?;
                start_end = at;
                continue;
            }
            let bytes = &buf[line.clone()];
            if bytes.first().copied().is_some_and(is_ws) {
                return Err(ParseError::Folding);
            }
            let name_len = bytes.iter().take_while(|&&b| is_token(b)).count();
            let mut colon = name_len;
            while colon < bytes.len() && is_ws(bytes[colon]) {
                colon += 1;
            }
            if name_len == 0 || bytes.get(colon) != Some(&b':') {
                return Err(ParseError::Syntax);
            }
            let mut v0 = colon + 1;
            while v0 < bytes.len() && is_ws(bytes[v0]) {
                v0 += 1;
            }
            let mut v1 = bytes.len();
            while v1 > v0 && is_ws(bytes[v1 - 1]) {
                v1 -= 1;
            }
            let name = HeaderName::of(&bytes[..name_len]);
            let slot = &mut first[name as usize];
            if *slot == 0 && headers.len() < usize::from(u8::MAX) {
                *slot = headers.len() as u8 + 1;
            }
            headers.push(Header {
                name,
                line: from..nl + 1,
                value: from + v0..from + v1,
            });
        }
        let end = end.ok_or(ParseError::NoHeaderEnd)?;
        // The start line and header lines, each with its CRLF.
        let head = &buf[..end];
        let text = std::str::from_utf8(head).map_err(|_| ParseError::NotUtf8)?;
        // RFC 3261 §25.1: no CTL outside CRLF line ends and HTAB (NUL and friends confuse
        // C parsers downstream). Every LF of the head ends one of its `lines` and follows a CR
        // (checked above), so the head is clean exactly when its bytes below 0x20 other than HTAB
        // number two per line (a bare CR or any other control makes more) and it holds no DEL.
        // Branch-free over 64-byte chunks with byte accumulators, so the compiler vectorizes it.
        let (mut controls, mut del) = (0usize, false);
        for chunk in head.chunks(64) {
            let (mut n, mut d) = (0u8, 0u8);
            for &b in chunk {
                n += u8::from((b < 0x20) & (b != b'\t'));
                d |= u8::from(b == 0x7f);
            }
            controls += usize::from(n);
            del |= d != 0;
        }
        if lines == 0 {
            return Err(ParseError::Syntax);
        }
        if del || controls != 2 * lines {
            // Something is off: a control character, or a bare CR (a syntax error).
            let control = head
                .iter()
                .any(|&b| (b < 0x20 && !matches!(b, b'\r' | b'\n' | b'\t')) || b == 0x7f);
            return Err(if control {
                ParseError::Control
            } else {
                ParseError::Syntax
            });
        }
        // Built in its final place: the header index makes the message a few hundred bytes.
        let cseq = read_cseq(text, first_of(&headers, &first, HeaderName::CSeq));
        Ok(Message {
            buf,
            head: text,
            start,
            start_end,
            headers,
            first,
            body_start: end + 2,
            cseq,
        })
    }

    /// The method of a request, `None` for a response.
    pub fn method(&self) -> Option<&'a str> {
        match &self.start {
            StartLine::Request { method, .. } => Some(self.text(method.clone())),
            StartLine::Response { .. } => None,
        }
    }

    /// The status code of a response, `None` for a request.
    pub fn status(&self) -> Option<u16> {
        match self.start {
            StartLine::Response { code } => Some(code),
            StartLine::Request { .. } => None,
        }
    }

    /// The Request-URI as written.
    pub fn request_uri(&self) -> Option<&str> {
        match &self.start {
            StartLine::Request { uri, .. } => Some(self.text(uri.clone())),
            StartLine::Response { .. } => None,
        }
    }

    /// Text of a range of the header section (known to be UTF-8 by [`Message::parse`]); empty
    /// for a range outside it or not on character boundaries.
    pub fn text(&self, r: Range<usize>) -> &'a str {
        self.head.get(r).unwrap_or("")
    }

    /// The value of the first header called `name`.
    pub fn header(&self, name: HeaderName) -> Option<&'a str> {
        self.first_line(name).map(|h| self.text(h.value.clone()))
    }

    /// The first header line called `name`, found through the index of first occurrences.
    fn first_line(&self, name: HeaderName) -> Option<&Header> {
        first_of(&self.headers, &self.first, name)
    }
    /// The value of the first header whose name (as written, compact forms of known headers
    /// included) is `name`, ignoring case.
    pub fn header_named(&self, name: &str) -> Option<&'a str> {
        let known = HeaderName::classify(name);
        self.headers
            .iter()
            .find(|h| {
                if known != HeaderName::Other {
                    return h.name == known;
                }
                let line = self.text(h.line.clone());
                line.split_once(':')
                    .is_some_and(|(n, _)| n.trim_ascii().eq_ignore_ascii_case(name))
            })
            .map(|h| self.text(h.value.clone()))
    }

    /// Every header line called `name`, in order.
    pub fn all(&self, name: HeaderName) -> impl Iterator<Item = &Header> + '_ {
        self.headers.iter().filter(move |h| h.name == name)
    }

    /// Every comma-separated element of the headers called `name`, in order, as
    /// `(header index, absolute byte range of the element)`.
    pub fn elements(
        &self,
        name: HeaderName,
    ) -> impl Iterator<Item = (usize, Range<usize>)> + use<'_, 'a> {
        self.headers
            .iter()
            .enumerate()
            .filter(move |(_, h)| h.name == name)
            .flat_map(|(i, h)| {
                let at = h.value.start;
                super::split_list(self.text(h.value.clone()))
                    .map(move |r| (i, at + r.start..at + r.end))
            })
    }

    /// The body as sent.
    pub fn body(&self) -> &'a [u8] {
        &self.buf[self.body_start..]
    }

    /// `Call-ID`.
    pub fn call_id(&self) -> Option<&'a str> {
        self.header(HeaderName::CallId)
    }

    /// The CSeq sequence number and method.
    pub fn cseq(&self) -> Option<(u32, &'a str)> {
        let (n, method) = self.cseq.clone()?;
        Some((n, self.text(method)))
    }

    /// The declared Content-Length, `Ok(None)` when absent, `Err` when unreadable.
    pub fn content_length(&self) -> Result<Option<usize>, ParseError> {
        match self.header(HeaderName::ContentLength) {
            None => Ok(None),
            Some(v) => v
                .trim_ascii()
                .parse()
                .map(Some)
                .map_err(|_| ParseError::Syntax),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const INVITE: &str = "INVITE sip:bob@pbx.example SIP/2.0\r\n\
v: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK776;rport\r\n\
Via: SIP/2.0/UDP 10.0.0.9;branch=z9hG4bK1, SIP/2.0/TCP 10.0.0.8;branch=z9hG4bK2\r\n\
Max-Forwards: 70\r\n\
From: \"Alice\" <sip:alice@example.com>;tag=1928\r\n\
To: <sip:bob@pbx.example>\r\n\
i: a84b4c76e66710\r\n\
CSeq: 314159 INVITE\r\n\
Content-Length: 4\r\n\
\r\n\
abcd";

    /// Every name [`HeaderName::of`] knows, in both cases, and near misses of each.
    #[test]
    fn header_names_classify_by_full_name_in_any_case() {
        use HeaderName::*;
        let known = [
            ("via", Via),
            ("v", Via),
            ("from", From),
            ("f", From),
            ("to", To),
            ("t", To),
            ("call-id", CallId),
            ("i", CallId),
            ("cseq", CSeq),
            ("max-forwards", MaxForwards),
            ("content-length", ContentLength),
            ("l", ContentLength),
            ("contact", Contact),
            ("m", Contact),
            ("route", Route),
            ("record-route", RecordRoute),
            ("path", Path),
            ("user-agent", UserAgent),
            ("expires", Expires),
            ("authorization", Authorization),
            ("proxy-authorization", ProxyAuthorization),
        ];
        for (name, h) in known {
            assert_eq!(HeaderName::classify(name), h, "{name}");
            assert_eq!(HeaderName::classify(&name.to_uppercase()), h, "{name}");
            // One letter changed, one added, one taken away: none of them is the header.
            let mut changed = name.to_string().into_bytes();
            let last = changed.len() - 1;
            changed[last] = if changed[last] == b'x' { b'y' } else { b'x' };
            let changed = String::from_utf8(changed).unwrap();
            for other in [changed, format!("{name}s"), name[1..].to_string()] {
                let want = known.iter().find(|(n, _)| n.eq_ignore_ascii_case(&other));
                assert_eq!(
                    HeaderName::classify(&other),
                    want.map_or(Other, |(_, h)| *h),
                    "{other}"
                );
            }
        }
        for other in [
            "",
            "x",
            "c",
            "call-iD2",
            "contacts",
            "Supported",
            "Allow",
            "cseq:",
            "call\rid",
            "max\rforwards",
        ] {
            assert_eq!(HeaderName::classify(other), Other, "{other}");
        }
        assert_eq!(HeaderName::classify("CaLL-Id"), CallId);
        assert_eq!(HeaderName::classify("CONTACT"), Contact);
    }

    #[test]
    fn indexes_headers_over_the_raw_bytes() {
        let m = Message::parse(INVITE.as_bytes()).unwrap();
        assert_eq!(m.method(), Some("INVITE"));
        assert_eq!(m.request_uri(), Some("sip:bob@pbx.example"));
        assert_eq!(m.call_id(), Some("a84b4c76e66710"));
        assert_eq!(m.cseq(), Some((314159, "INVITE")));
        assert_eq!(m.content_length(), Ok(Some(4)));
        assert_eq!(m.body(), b"abcd");
        let vias: Vec<&str> = m
            .elements(HeaderName::Via)
            .map(|(_, r)| m.text(r))
            .collect();
        assert_eq!(vias.len(), 3);
        assert_eq!(vias[0], "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK776;rport");
        assert_eq!(vias[2], "SIP/2.0/TCP 10.0.0.8;branch=z9hG4bK2");
        let first = &m.headers[0];
        assert_eq!(
            &INVITE[first.line.clone()],
            "v: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK776;rport\r\n"
        );
        let last = m.headers.last().unwrap();
        assert_eq!(&INVITE[last.line.clone()], "Content-Length: 4\r\n");
    }

    #[test]
    fn cseq_is_digits_then_one_method() {
        let with = |v: &str| {
            let raw = format!("OPTIONS sip:x@y SIP/2.0\r\nCSeq: {v}\r\n\r\n");
            Message::parse(raw.as_bytes())
                .unwrap()
                .cseq()
                .map(|(n, m)| (n, m.to_string()))
        };
        assert_eq!(with("1 \t INVITE"), Some((1, "INVITE".into())));
        assert_eq!(with("4294967295 BYE"), Some((u32::MAX, "BYE".into())));
        for bad in [
            "+1 INVITE",
            "1 INVITE x",
            "99999999999 INVITE",
            "INVITE",
            "1",
            "x1 BYE",
        ] {
            assert_eq!(with(bad), None, "{bad}");
        }
    }

    #[test]
    fn finds_headers_past_the_indexed_ones() {
        let mut raw = String::from("OPTIONS sip:x@y SIP/2.0\r\n");
        for i in 0..300 {
            raw.push_str(&format!("X-{i}: {i}\r\n"));
        }
        raw.push_str("Call-ID: late\r\nCSeq: 1 OPTIONS\r\n\r\n");
        let m = Message::parse(raw.as_bytes()).unwrap();
        assert_eq!(m.call_id(), Some("late"));
        assert_eq!(m.cseq(), Some((1, "OPTIONS")));
        assert_eq!(m.header(HeaderName::Other), Some("0"));
        assert_eq!(m.header(HeaderName::Via), None);
        assert_eq!(m.header_named("x-299"), Some("299"));
    }

    #[test]
    fn reads_responses() {
        let r = "SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKx\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n\r\n";
        let m = Message::parse(r.as_bytes()).unwrap();
        assert_eq!(m.status(), Some(180));
        assert_eq!(m.method(), None);
        assert_eq!(m.body(), b"");
    }

    #[test]
    fn splits_header_lines_by_hand() {
        let r = "sip/2.0 200\r\nVia : SIP/2.0/UDP h;branch=z9hG4bKx \t\r\nX-Empty:\r\nCall-ID:c\r\n\r\n";
        let m = Message::parse(r.as_bytes()).unwrap();
        assert_eq!(m.status(), Some(200));
        assert_eq!(
            m.header(HeaderName::Via),
            Some("SIP/2.0/UDP h;branch=z9hG4bKx")
        );
        assert_eq!(m.header_named("x-empty"), Some(""));
        assert_eq!(m.call_id(), Some("c"));
        assert_eq!(m.start_end, "sip/2.0 200\r\n".len());
        assert_eq!(
            &r[m.headers[0].line.clone()],
            "Via : SIP/2.0/UDP h;branch=z9hG4bKx \t\r\n"
        );
        // The body is not the header section's business: bare LFs and NULs there are fine.
        let b = "OPTIONS sip:x@y SIP/2.0\r\nCall-ID: c\r\n\r\nbody\nwith\0stuff\r\n\r\n";
        let m = Message::parse(b.as_bytes()).unwrap();
        assert_eq!(m.body(), b"body\nwith\0stuff\r\n\r\n");
        assert_eq!(m.headers.len(), 1);
        assert_eq!(
            Message::parse(b"\r\n\r\nOPTIONS").err(),
            Some(ParseError::Syntax)
        );
        assert_eq!(
            Message::parse(b"OPTIONS sip:x@y SIP/2.0\r\nCall-ID: c\r\n").err(),
            Some(ParseError::NoHeaderEnd)
        );
        let q = "OPTIONS sip:x@y SIP/2.0\r\n\r\n";
        let m = Message::parse(q.as_bytes()).unwrap();
        assert_eq!(m.method(), Some("OPTIONS"));
        assert!(m.headers.is_empty());
        assert_eq!(m.body_start, q.len());
    }

    #[test]
    fn refuses_broken_start_lines_and_line_ends() {
        let cases: &[&str] = &[
            "INV ITE sip:a@b SIP/2.0\r\n\r\n",
            "INVITE sip:a@b SIP/3.0\r\n\r\n",
            "INVITE  SIP/2.0\r\n\r\n",
            "INVITE nocolon SIP/2.0\r\n\r\n",
            "INV(TE sip:a@b SIP/2.0\r\n\r\n",
            " INVITE sip:a@b SIP/2.0\r\n\r\n",
            "SIP/2.0 20 OK\r\n\r\n",
            "SIP/2.0 2000 OK\r\n\r\n",
            "SIP/2.0 099 Low\r\n\r\n",
            "SIP/2.0 700 High\r\n\r\n",
            "INVITE sip:a@b SIP/2.0\nVia: x\r\n\r\n",
            "INVITE sip:a@b SIP/2.0\r\nVia: x\ry\r\n\r\n",
            "INVITE sip:a@b SIP/2.0\r\n: x\r\n\r\n",
            "INVITE sip:a@b SIP/2.0\r\nVia x: y\r\n\r\n",
            "INVITE sip:a@b SIP/2.0\r\nV\u{e9}a: y\r\n\r\n",
            "INVITE sip:a@b SIP/2.0\r\n\tVia: y\r\n\r\n",
        ];
        for c in cases {
            assert!(Message::parse(c.as_bytes()).is_err(), "accepted {c:?}");
        }
    }

    /// Control characters and bare CRs, wherever they sit in the head, each get their own error;
    /// HTAB inside a value and anything in the body pass.
    #[test]
    fn control_characters_and_bare_crs_are_told_apart() {
        let head =
            "INVITE sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKx\r\nCSeq: 1 INVITE\r\n";
        for (bad, want) in [
            ("Subject: a\rb\r\n", ParseError::Syntax),
            ("Subject: ab\r\r\n", ParseError::Syntax),
            ("Subject: a\x00b\r\n", ParseError::Control),
            ("Subject: a\x7fb\r\n", ParseError::Control),
            ("Subject: a\x0bb\r\n", ParseError::Control),
            ("Subject: a\rb\x01\r\n", ParseError::Control),
        ] {
            let msg = format!("{head}{bad}\r\n");
            assert_eq!(Message::parse(msg.as_bytes()).unwrap_err(), want, "{bad:?}");
        }
        let start = "INVITE sip:a@b\x01 SIP/2.0\r\nCSeq: 1 INVITE\r\n\r\n";
        assert_eq!(
            Message::parse(start.as_bytes()).unwrap_err(),
            ParseError::Control
        );
        let fine = format!("{head}Subject: a\tb\r\n\r\nbody\r\x00\x7f");
        assert!(Message::parse(fine.as_bytes()).is_ok());
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        let cases: &[&[u8]] = &[
            b"",
            b"\r\n\r\n",
            b"INVITE\r\n\r\n",
            b"INVITE sip:a@b SIP/2.0\r\nVia SIP/2.0/UDP x\r\n\r\n",
            b"SIP/2.0 99999 Huh\r\nVia: x\r\n\r\n",
            b"INVITE sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP x\r\n",
            b"INVITE sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP x\r\n continued\r\n\r\n",
            &[0xff, 0xfe, 0x00, 0x13, b'\r', b'\n', b'\r', b'\n'],
            b"INVITE sip:a@b SIP/2.0\r\nSubject: \xff\xfe\r\n\r\n",
            b"INVITE sip:a@b SIP/2.0\r\nSubject: a\x00b\r\n\r\n",
        ];
        for c in cases {
            assert!(
                Message::parse(c).is_err(),
                "accepted {:?}",
                String::from_utf8_lossy(c)
            );
        }
    }
}
