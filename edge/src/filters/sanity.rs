//! `sanity`: protocol sanity of requests from the Internet — the checks of
//! [`crate::sip::sanity::check_request`] plus a size limit, a Max-Forwards ceiling and Via loop
//! detection — reported as security events (malformed traffic is how fuzzers and crashers probe).

use crate::pipeline::{Action, Filter, Finding, RequestCx};
use crate::policy::{self, RuleAction};
use crate::proxy::Side;
use crate::sip::HeaderName;

/// The sanity rule.
pub struct Sanity {
    cfg: policy::Sanity,
    /// This edge's advertised `host:port`s, lower-case: a request already carrying a Via with one of
    /// them has looped.
    own: Vec<(String, u16)>,
}

impl Sanity {
    pub fn new(cfg: &policy::Sanity, own: &[(String, u16)]) -> Sanity {
        let own: Vec<(String, u16)> = own
            .iter()
            .map(|(h, p)| (h.trim_matches(['[', ']']).to_ascii_lowercase(), *p))
            .collect();
        Sanity {
            cfg: cfg.clone(),
            own,
        }
    }

    fn finding(&self, code: u16, reason: &'static str) -> Finding {
        let action = match self.cfg.action {
            RuleAction::Drop => Action::Drop,
            _ => Action::Reject {
                code,
                reason,
                header: None,
            },
        };
        Finding::new("sanity", action, reason)
    }

    /// Whether a Via names this edge. Only each Via's sent-by is read, and compared with ours:
    /// every request from the Internet comes through here.
    fn looped(&self, cx: &RequestCx<'_>) -> bool {
        let m = cx.sip.m;
        m.elements(HeaderName::Via).any(|(_, r)| {
            crate::proxy::via::sent_by_of(m.text(r)).is_some_and(|(host, port)| {
                let host = host.trim_matches(['[', ']']);
                let port = port.unwrap_or(5060);
                self.own
                    .iter()
                    .any(|(h, p)| *p == port && h.eq_ignore_ascii_case(host))
            })
        })
    }
}

impl Filter for Sanity {
    fn name(&self) -> &'static str {
        "sanity"
    }

    fn dry_run(&self) -> bool {
        self.cfg.dry_run
    }

    fn request(&self, cx: &RequestCx<'_>) -> Option<Finding> {
        if cx.meta.side != Side::Internet {
            return None;
        }
        if cx.meta.len > self.cfg.max_message_bytes {
            return Some(self.finding(513, "Message Too Large"));
        }
        if let Err(p) = crate::sip::sanity::check_request(cx.sip.m, self.cfg.max_forwards_limit) {
            return Some(self.finding(p.code, p.reason));
        }
        cx.sane.set(true);
        if cx.sip.m.header(HeaderName::MaxForwards).is_none() {
            return Some(self.finding(400, "Missing Max-Forwards"));
        }
        if self.looped(cx) {
            return Some(self.finding(482, "Loop Detected"));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filters::testkit::*;

    fn sanity() -> Sanity {
        Sanity::new(
            &policy::Sanity::default(),
            &[("203.0.113.5".into(), 5060), ("Edge.Example".into(), 5061)],
        )
    }

    fn verdict(raw: &str) -> Option<Finding> {
        let m = parse(raw);
        let meta = meta(T0, "192.0.2.1:5060", Side::Internet);
        sanity().request(&req_cx(&meta, &m))
    }

    fn code(f: Option<Finding>) -> u16 {
        match f.map(|f| f.action) {
            Some(Action::Reject { code, .. }) => code,
            other => panic!("not a reject: {other:?}"),
        }
    }

    #[test]
    fn good_requests_pass_bad_ones_get_their_status() {
        let ok = request("OPTIONS", "100", "200", "");
        assert!(verdict(&ok).is_none());
        assert_eq!(code(verdict(&ok.replace("Max-Forwards: 70\r\n", ""))), 400);
        assert_eq!(
            code(verdict(&ok.replace("CSeq: 1 OPTIONS", "CSeq: 1 INVITE"))),
            400
        );
        assert_eq!(
            code(verdict(&ok.replace("Max-Forwards: 70", "Max-Forwards: 0"))),
            483
        );
        assert_eq!(
            code(verdict(
                &ok.replace("Max-Forwards: 70", "Max-Forwards: 1000")
            )),
            400
        );
        assert_eq!(
            code(verdict(
                &ok.replace("Content-Length: 0", "Content-Length: 99")
            )),
            400
        );
        assert_eq!(
            code(verdict(&ok.replace("OPTIONS sip:", "OPTIONS tel:"))),
            416
        );
        let looped = ok.replace(
            "Max-Forwards",
            "Via: SIP/2.0/UDP 203.0.113.5;branch=z9hG4bKsw1\r\nMax-Forwards",
        );
        assert_eq!(code(verdict(&looped)), 482);
        let via = |v: &str| ok.replace("Max-Forwards", &format!("Via: {v}\r\nMax-Forwards"));
        assert_eq!(
            code(verdict(&via(
                "SIP/2.0/TLS edge.EXAMPLE:5061;branch=z9hG4bKsw2"
            ))),
            482,
            "host names compare without case"
        );
        for other in [
            "SIP/2.0/UDP 203.0.113.5:5070;branch=z9hG4bKsw1",
            "SIP/2.0/UDP 203.0.113.55;branch=z9hG4bKsw1",
            "SIP/2.0/UDP edge.example;branch=z9hG4bKsw1",
        ] {
            assert_eq!(verdict(&via(other)).map(|f| f.rule), None, "{other}");
        }
    }

    #[test]
    fn a_request_that_passes_is_marked_sane_for_the_proxy() {
        let ok = request("OPTIONS", "100", "200", "");
        let meta = meta(T0, "192.0.2.1:5060", Side::Internet);
        let m = parse(&ok);
        let cx = req_cx(&meta, &m);
        assert!(sanity().request(&cx).is_none());
        assert!(cx.sane.get());
        let bad = ok.replace("CSeq: 1 OPTIONS", "CSeq: 1 INVITE");
        let m = parse(&bad);
        let cx = req_cx(&meta, &m);
        assert!(sanity().request(&cx).is_some());
        assert!(!cx.sane.get(), "the proxy checks it again");
    }

    #[test]
    fn size_limit_drop_action_and_pbx_side() {
        let ok = request("OPTIONS", "100", "200", "");
        let m = parse(&ok);
        let mut big = meta(T0, "192.0.2.1:5060", Side::Internet);
        big.len = 20_000;
        assert_eq!(code(sanity().request(&req_cx(&big, &m))), 513);
        let cfg = policy::Sanity {
            action: RuleAction::Drop,
            ..Default::default()
        };
        let drop = Sanity::new(&cfg, &[]);
        assert_eq!(
            drop.request(&req_cx(&big, &m)).unwrap().action,
            Action::Drop
        );
        let pbx = meta(T0, "127.0.0.1:5080", Side::Pbx);
        let bad = ok.replace("Max-Forwards: 70\r\n", "");
        let m = parse(&bad);
        assert!(sanity().request(&req_cx(&pbx, &m)).is_none());
    }
}
