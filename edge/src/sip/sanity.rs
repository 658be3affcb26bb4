//! Protocol sanity of a request (RFC 3261 §8.2, §16.3): what must be present and consistent before
//! anything else reads it. Shared by the proxy (every request) and the `sanity` filter (which adds
//! policy limits and reports a security event).

use super::{HeaderName, Message};

/// What is wrong, as the status and reason phrase to answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Problem {
    pub code: u16,
    pub reason: &'static str,
}

const fn problem(code: u16, reason: &'static str) -> Problem {
    Problem { code, reason }
}

/// Checks required headers, CSeq, Content-Length, Max-Forwards and the Request-URI scheme of the
/// request `m`. `max_forwards_limit` caps the Max-Forwards value accepted.
pub fn check_request(m: &Message<'_>, max_forwards_limit: u32) -> Result<(), Problem> {
    let method = m.method().unwrap_or_default();
    for (h, missing) in [
        (HeaderName::Via, problem(400, "Missing Via")),
        (HeaderName::From, problem(400, "Missing From")),
        (HeaderName::To, problem(400, "Missing To")),
        (HeaderName::CallId, problem(400, "Missing Call-ID")),
        (HeaderName::CSeq, problem(400, "Missing CSeq")),
    ] {
        match m.header(h) {
            Some(v) if !v.trim_ascii().is_empty() => {}
            _ => return Err(missing),
        }
    }
    let (_, cseq_method) = m.cseq().ok_or(problem(400, "Bad CSeq"))?;
    if cseq_method != method {
        return Err(problem(400, "CSeq method does not match"));
    }
    match m.content_length() {
        Err(_) => return Err(problem(400, "Bad Content-Length")),
        Ok(Some(n)) if n > m.body().len() => {
            return Err(problem(400, "Content-Length exceeds body"))
        }
        _ => {}
    }
    if let Some(v) = m.header(HeaderName::MaxForwards) {
        match v.trim_ascii().parse::<u32>() {
            Err(_) => return Err(problem(400, "Bad Max-Forwards")),
            Ok(0) => return Err(problem(483, "Too Many Hops")),
            Ok(n) if n > max_forwards_limit => return Err(problem(400, "Max-Forwards too large")),
            Ok(_) => {}
        }
    }
    let ruri = m.request_uri().unwrap_or_default();
    let scheme = ruri.split(':').next().unwrap_or("");
    if !scheme.eq_ignore_ascii_case("sip") && !scheme.eq_ignore_ascii_case("sips") {
        return Err(problem(416, "Unsupported URI Scheme"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(raw: &str) -> Result<(), Problem> {
        check_request(&Message::parse(raw.as_bytes()).unwrap(), 70)
    }

    const OK: &str = "OPTIONS sip:pbx SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n\
From: <sip:a@h>;tag=1\r\nTo: <sip:pbx>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n\
Content-Length: 0\r\n\r\n";

    #[test]
    fn each_failure_has_its_answer() {
        assert_eq!(check(OK), Ok(()));
        let cases = [
            ("Call-ID: c\r\n", "", 400, "Missing Call-ID"),
            (
                "CSeq: 1 OPTIONS",
                "CSeq: 1 INVITE",
                400,
                "CSeq method does not match",
            ),
            ("CSeq: 1 OPTIONS", "CSeq: one OPTIONS", 400, "Bad CSeq"),
            (
                "Content-Length: 0",
                "Content-Length: 10",
                400,
                "Content-Length exceeds body",
            ),
            (
                "Content-Length: 0",
                "Content-Length: -1",
                400,
                "Bad Content-Length",
            ),
            ("Max-Forwards: 70", "Max-Forwards: 0", 483, "Too Many Hops"),
            (
                "Max-Forwards: 70",
                "Max-Forwards: 71",
                400,
                "Max-Forwards too large",
            ),
            (
                "Max-Forwards: 70",
                "Max-Forwards: x",
                400,
                "Bad Max-Forwards",
            ),
            (
                "OPTIONS sip:pbx",
                "OPTIONS http:pbx",
                416,
                "Unsupported URI Scheme",
            ),
            ("To: <sip:pbx>", "To:  ", 400, "Missing To"),
        ];
        for (from, to, code, reason) in cases {
            let raw = OK.replace(from, to);
            assert_eq!(check(&raw), Err(Problem { code, reason }), "{raw}");
        }
    }
}
