//! SIP message handling for a stateless proxy: an index of a message's header lines over its raw
//! bytes ([`message`]), byte splicing to forward it ([`edit`]), locally generated replies
//! ([`reply`]) and request sanity checks ([`sanity`]).

pub mod edit;
pub mod message;
pub mod reply;
pub mod sanity;

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
            let end = i.min(bytes.len());
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

/// The URI inside a name-addr (`"Bob" <sip:bob@x;lr>;tag=1` → `sip:bob@x;lr`), or the whole value
/// when it is an addr-spec.
pub fn addr_uri(value: &str) -> &str {
    match (value.find('<'), value.rfind('>')) {
        (Some(a), Some(b)) if a < b => &value[a + 1..b],
        _ => value.split(';').next().unwrap_or(value).trim(),
    }
}

/// The value of parameter `name` in a header value's `;`-separated parameters after the URI
/// (`tag` in `<sip:a@b>;tag=x`). `Some("")` for a parameter with no value.
pub fn header_param<'a>(value: &'a str, name: &str) -> Option<&'a str> {
    let params = match value.rfind('>') {
        Some(i) => &value[i + 1..],
        None => value.split_once(';').map(|(_, p)| p).unwrap_or(""),
    };
    params.split(';').find_map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
