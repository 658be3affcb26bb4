//! SIP message handling for a stateless proxy: an index of a message's header lines over its raw
//! bytes ([`message`]), byte splicing to forward it ([`edit`]), locally generated replies
//! ([`reply`]) and request sanity checks ([`sanity`]).

pub mod edit;
pub mod message;
pub mod reply;
pub mod sanity;

use std::net::IpAddr;

pub use edit::Edit;
pub use message::{HeaderName, Message, ParseError, StartLine};

/// The transports a SIP message can travel on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

impl Transport {
    /// The token used in a Via header (`SIP/2.0/UDP`).
    pub fn via_token(self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
            Transport::Tls => "TLS",
        }
    }

    /// The lower-case name used in URI `transport=` parameters and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }

    /// Reads a Via protocol token or URI parameter value, case-insensitively.
    pub fn parse(s: &str) -> Option<Transport> {
        if s.eq_ignore_ascii_case("udp") {
            Some(Transport::Udp)
        } else if s.eq_ignore_ascii_case("tcp") {
            Some(Transport::Tcp)
        } else if s.eq_ignore_ascii_case("tls") {
            Some(Transport::Tls)
        } else {
            None
        }
    }

    /// Whether messages on this transport arrive as a byte stream that needs framing.
    pub fn is_stream(self) -> bool {
        !matches!(self, Transport::Udp)
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Splits a comma-separated header value (`Via`, `Route`, …) into element byte ranges relative to
/// `value`, ignoring commas inside quotes and angle brackets, and trimming white space; empty
/// elements are skipped.
pub fn split_list(value: &str) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let bytes = value.as_bytes();
    let mut at = 0;
    std::iter::from_fn(move || {
        while at <= bytes.len() {
            let start = at;
            let end = element_end(bytes, start);
            at = end + 1;
            let (mut s, mut e) = (start, end);
            while s < e && matches!(bytes[s], b' ' | b'\t' | b'\r' | b'\n') {
                s += 1;
            }
            while e > s && matches!(bytes[e - 1], b' ' | b'\t' | b'\r' | b'\n') {
                e -= 1;
            }
            if s < e {
                return Some(s..e);
            }
        }
        None
    })
}

/// Where the list element starting at `i` ends: at the first comma outside a quoted string and
/// outside angle brackets, or at the end. Jumps from one byte that matters to the next with
/// `memchr` (the elements are Vias and Routes of 50–200 bytes, scanned several times a message).
/// A quoted string may hold `\`-escaped bytes, and a quote also opens one inside brackets.
fn element_end(bytes: &[u8], mut i: usize) -> usize {
    let n = bytes.len();
    let mut angle = false;
    while i < n {
        let rest = &bytes[i..];
        let hit = if angle {
            memchr::memchr2(b'>', b'"', rest)
        } else {
            memchr::memchr3(b',', b'"', b'<', rest)
        };
        let Some(k) = hit else {
            return n;
        };
        i += k;
        match bytes[i] {
            b',' => return i,
            b'<' => angle = true,
            b'>' => angle = false,
            _ => {
                // A quote: skip to the one that closes it.
                i += 1;
                loop {
                    match memchr::memchr2(b'"', b'\\', bytes.get(i..).unwrap_or_default()) {
                        None => return n,
                        Some(k) if bytes[i + k] == b'\\' => i += k + 2,
                        Some(k) => {
                            i += k;
                            break;
                        }
                    }
                }
            }
        }
        i += 1;
    }
    n
}

/// The URI inside a name-addr (`"Bob" <sip:bob@x;lr>;tag=1` → `sip:bob@x;lr`), or the whole value
/// when it is an addr-spec.
pub fn addr_uri(value: &str) -> &str {
    let b = value.as_bytes();
    match (find(b'<', b), rfind(b'>', b)) {
        (Some(a), Some(z)) if a < z => &value[a + 1..z],
        _ => value[..find(b';', b).unwrap_or(b.len())].trim_ascii(),
    }
}

/// The value of parameter `name` in a header value's `;`-separated parameters after the URI
/// (`tag` in `<sip:a@b>;tag=x`). `Some("")` for a parameter with no value.
pub fn header_param<'a>(value: &'a str, name: &str) -> Option<&'a str> {
    let b = value.as_bytes();
    let mut rest = match rfind(b'>', b) {
        Some(i) => &value[i + 1..],
        None => match find(b';', b) {
            Some(i) => &value[i + 1..],
            None => return None,
        },
    };
    loop {
        let (p, next) = split_at_byte(rest, b';');
        let (k, v) = match find(b'=', p.as_bytes()) {
            Some(i) => (&p[..i], &p[i + 1..]),
            None => (p, ""),
        };
        if k.trim_ascii().eq_ignore_ascii_case(name) {
            return Some(v.trim_ascii());
        }
        rest = next?;
    }
}

/// Where the first `b` is in `s`: a plain scan for the short strings URI and parameter parsing
/// look in, where the byte is usually a few places in and `memchr`'s setup cost more than the
/// search; `memchr` past 32 bytes.
#[inline]
pub fn find(b: u8, s: &[u8]) -> Option<usize> {
    if s.len() < 32 {
        s.iter().position(|&c| c == b)
    } else {
        memchr::memchr(b, s)
    }
}

/// [`find`] from the end.
#[inline]
pub fn rfind(b: u8, s: &[u8]) -> Option<usize> {
    if s.len() < 32 {
        s.iter().rposition(|&c| c == b)
    } else {
        memchr::memrchr(b, s)
    }
}

/// `s` up to the first `b` (ASCII), and what follows it if there is one.
#[inline]
pub fn split_at_byte(s: &str, b: u8) -> (&str, Option<&str>) {
    match find(b, s.as_bytes()) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    }
}

/// An IP address as `str::parse` reads one (dotted quad with no leading zeros, or IPv6 text),
/// the dotted quad read by hand: Via and URI hosts are parsed on every message, and the
/// standard parser's generic machinery cost more than the rest of reading the Via.
pub fn parse_ip(s: &str) -> Option<IpAddr> {
    match dotted_quad(s.as_bytes()) {
        Some(octets) => Some(IpAddr::from(octets)),
        None if s.contains(':') => s.parse().ok(),
        None => None,
    }
}

/// `a.b.c.d`, each 0–255 in decimal without leading zeros, in one pass.
fn dotted_quad(b: &[u8]) -> Option<[u8; 4]> {
    let mut octets = [0u8; 4];
    let (mut k, mut n, mut digits) = (0, 0u16, 0);
    for &c in b {
        match c {
            b'0'..=b'9' => {
                // A second digit after a leading zero, or a fourth digit.
                if (digits > 0 && n == 0) || digits == 3 {
                    return None;
                }
                n = n * 10 + u16::from(c - b'0');
                digits += 1;
            }
            b'.' if digits > 0 && k < 3 => {
                octets[k] = u8::try_from(n).ok()?;
                (k, n, digits) = (k + 1, 0, 0);
            }
            _ => return None,
        }
    }
    if digits == 0 || k != 3 {
        return None;
    }
    octets[3] = u8::try_from(n).ok()?;
    Some(octets)
}

/// Appends `ip` as a Via `received` or URI host writes it (IPv6 without brackets); IPv4 without
/// the formatting machinery, which cost more than the rest of stamping a Via.
pub fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(a) => {
            let mut digits = itoa::Buffer::new();
            for (i, o) in a.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                out.push_str(digits.format(o));
            }
        }
        IpAddr::V6(a) => {
            use std::fmt::Write;
            let _ = write!(out, "{a}");
        }
    }
}

/// Whether host text (a Via sent-by or URI host, IPv6 in brackets or not) names `ip`. IPv4 is
/// compared as text (the canonical dotted quad is the only form an address parses from), the
/// rest parsed.
pub fn host_is(host: &str, ip: IpAddr) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match ip {
        IpAddr::V4(a) => {
            let mut parts = bare.as_bytes().split(|&b| b == b'.');
            let mut digits = itoa::Buffer::new();
            a.octets()
                .into_iter()
                .all(|o| parts.next() == Some(digits.format(o).as_bytes()))
                && parts.next().is_none()
        }
        IpAddr::V6(_) => parse_ip(bare).is_some_and(|h| h == ip),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_is_matches_what_parsing_would() {
        let v4: IpAddr = "198.51.100.9".parse().unwrap();
        let v6: IpAddr = "2001:db8::9".parse().unwrap();
        for (host, ip, want) in [
            ("198.51.100.9", v4, true),
            ("[198.51.100.9]", v4, true),
            ("198.51.100.90", v4, false),
            ("198.51.100", v4, false),
            ("198.51.100.9.1", v4, false),
            ("198.051.100.9", v4, false),
            ("pbx.example", v4, false),
            ("[2001:DB8:0::9]", v6, true),
            ("2001:db8::9", v6, true),
            ("2001:db8::8", v6, false),
            ("198.51.100.9", v6, false),
        ] {
            assert_eq!(host_is(host, ip), want, "{host} {ip}");
            let parsed = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .is_ok_and(|h| h == ip);
            assert_eq!(host_is(host, ip), parsed, "as parsing says: {host}");
        }
        let mut s = String::new();
        push_ip(&mut s, v4);
        s.push(' ');
        push_ip(&mut s, "0.0.0.255".parse().unwrap());
        s.push(' ');
        push_ip(&mut s, v6);
        assert_eq!(s, "198.51.100.9 0.0.0.255 2001:db8::9");
    }

    #[test]
    fn parse_ip_reads_what_the_standard_parser_reads() {
        let mut cases: Vec<String> = [
            "0.0.0.0",
            "127.0.0.1",
            "255.255.255.255",
            "256.1.1.1",
            "1.2.3",
            "1.2.3.4.5",
            "01.2.3.4",
            "1.2.3.04",
            "1..3.4",
            ".1.2.3",
            "1.2.3.",
            "1.2.3.4 ",
            " 1.2.3.4",
            "1.2.3.-4",
            "1.2.3.+4",
            "a.b.c.d",
            "1.2.3.4a",
            "",
            "::1",
            "2001:db8::1",
            "::ffff:1.2.3.4",
            "1:2:3:4:5:6:7:8:9",
            "[::1]",
            "1000.1.1.1",
            "0.0.0.00",
            "192.168.001.1",
            "12345678901234567",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Every string of up to four characters over digits and dots, so the octet rules are
        // all crossed.
        let alphabet = ['0', '1', '2', '5', '9', '.'];
        let mut frontier = vec![String::new()];
        for _ in 0..4 {
            frontier = frontier
                .iter()
                .flat_map(|p| alphabet.iter().map(move |c| format!("{p}{c}")))
                .collect();
            cases.extend(frontier.iter().map(|p| format!("1.{p}")));
            cases.extend(frontier.iter().map(|p| format!("{p}.1.1")));
        }
        for c in &cases {
            assert_eq!(parse_ip(c), c.parse::<IpAddr>().ok(), "{c:?}");
        }
    }

    #[test]
    fn find_and_rfind_agree_with_memchr_on_both_sides_of_the_cut() {
        for len in [0, 1, 5, 31, 32, 33, 80] {
            let mut s = vec![b'a'; len];
            assert_eq!(find(b'x', &s), None);
            assert_eq!(rfind(b'x', &s), None);
            if len > 2 {
                s[1] = b'x';
                s[len - 2] = b'x';
                assert_eq!(find(b'x', &s), memchr::memchr(b'x', &s), "{len}");
                assert_eq!(rfind(b'x', &s), memchr::memrchr(b'x', &s), "{len}");
                assert_eq!((find(b'x', &s), rfind(b'x', &s)), (Some(1), Some(len - 2)));
            }
        }
    }

    #[test]
    fn header_params_and_addr_uri() {
        assert_eq!(header_param("<sip:a@b;x=1>;tag=9 ; Lr", "tag"), Some("9"));
        assert_eq!(header_param("<sip:a@b;x=1>;tag=9 ; Lr", "lr"), Some(""));
        assert_eq!(header_param("<sip:a@b;x=1>;tag=9", "x"), None);
        assert_eq!(header_param("sip:a@b;tag= 7 ", "TAG"), Some("7"));
        assert_eq!(header_param("sip:a@b", "tag"), None);
        assert_eq!(addr_uri("\"B\" <sip:b@x;lr>;tag=1"), "sip:b@x;lr");
        assert_eq!(addr_uri(" sip:b@x ;tag=1"), "sip:b@x");
        assert_eq!(addr_uri(">sip:b@x<"), ">sip:b@x<");
    }

    /// The byte-at-a-time scan `element_end` replaced, kept as the reference it must agree with.
    fn element_end_by_bytes(bytes: &[u8], start: usize) -> usize {
        let (mut quoted, mut angle) = (false, false);
        let mut i = start;
        while i < bytes.len() {
            match bytes[i] {
                b'\\' if quoted => i += 1,
                b'"' => quoted = !quoted,
                b'<' if !quoted => angle = true,
                b'>' if !quoted => angle = false,
                b',' if !quoted && !angle => break,
                _ => {}
            }
            i += 1;
        }
        i.min(bytes.len())
    }

    #[test]
    fn element_end_agrees_with_a_byte_scan_on_every_short_input() {
        // Every string of up to 6 bytes over the bytes that matter (and two that do not), from
        // every start: 137,257 strings.
        const ALPHABET: &[u8] = b",\"<>\\a ";
        let mut checked = 0;
        for len in 0..=6u32 {
            for mut code in 0..ALPHABET.len().pow(len) {
                let mut s = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    s.push(ALPHABET[code % ALPHABET.len()]);
                    code /= ALPHABET.len();
                }
                for start in 0..=s.len() {
                    assert_eq!(
                        element_end(&s, start),
                        element_end_by_bytes(&s, start),
                        "{:?} from {start}",
                        String::from_utf8_lossy(&s)
                    );
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 137_257);
    }

    #[test]
    fn split_list_respects_quotes_and_brackets() {
        let v = r#"<sip:a@x;lr>, "Doe, J" <sip:b@y>,sip:c@z , "#;
        let parts: Vec<&str> = split_list(v).map(|r| &v[r]).collect();
        assert_eq!(
            parts,
            vec!["<sip:a@x;lr>", r#""Doe, J" <sip:b@y>"#, "sip:c@z"]
        );
    }

    #[test]
    fn addr_uri_and_params() {
        assert_eq!(addr_uri(r#""Bob" <sip:bob@x;lr>;tag=1"#), "sip:bob@x;lr");
        assert_eq!(addr_uri("sip:bob@x;tag=1"), "sip:bob@x");
        assert_eq!(
            header_param(r#""Bob" <sip:bob@x;tag=no>;tag=1"#, "tag"),
            Some("1")
        );
        assert_eq!(header_param("sip:bob@x;tag=2", "tag"), Some("2"));
        assert_eq!(header_param("<sip:bob@x>", "tag"), None);
    }
}
