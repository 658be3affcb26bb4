//! `scanner`: User-Agent and header fingerprints of SIP attack tools (SIPVicious, SIPPTS, sipcli,
//! …). Scanners deserve no answer: the default action is a silent drop and a ban.

use super::{action_of, contains_ci};
use crate::pipeline::{Filter, Finding, RequestCx};
use crate::policy;
use crate::proxy::Side;

/// The fingerprint rule.
pub struct Scanner {
    cfg: policy::Scanner,
    /// Lower-cased User-Agent patterns.
    user_agents: Vec<String>,
    /// `(header, lower-cased pattern)`.
    headers: Vec<(String, String)>,
}

impl Scanner {
    pub fn new(cfg: &policy::Scanner) -> Scanner {
        Scanner {
            cfg: cfg.clone(),
            user_agents: cfg
                .user_agents
                .iter()
                .map(|p| p.to_ascii_lowercase())
                .collect(),
            headers: cfg
                .headers
                .iter()
                .map(|h| (h.header.clone(), h.contains.to_ascii_lowercase()))
                .collect(),
        }
    }
}

impl Filter for Scanner {
    fn name(&self) -> &'static str {
        "scanner"
    }

    fn dry_run(&self) -> bool {
        self.cfg.dry_run
    }

    fn request(&self, cx: &RequestCx<'_>) -> Option<Finding> {
        if cx.meta.side != Side::Internet || cx.meta.trusted {
            return None;
        }
        let action = || action_of(self.cfg.action, self.cfg.ban_ttl_s, 403, "Forbidden");
        let ua = cx.sip.user_agent();
        if let Some(p) = self.user_agents.iter().find(|p| contains_ci(ua, p)) {
            return Some(Finding::new(
                "scanner",
                action(),
                format!("User-Agent {ua:?} matches {p:?}"),
            ));
        }
        for (h, p) in &self.headers {
            if let Some(v) = cx.sip.m.header_named(h) {
                if contains_ci(v, p) {
                    return Some(Finding::new(
                        "scanner",
                        action(),
                        format!("{h} {v:?} matches {p:?}"),
                    ));
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filters::testkit::*;
    use crate::pipeline::Action;
    use crate::policy::HeaderPattern;

    fn check(s: &Scanner, raw: &str) -> Option<Finding> {
        let m = parse(raw);
        let meta = meta(T0, "192.0.2.1:5060", Side::Internet);
        s.request(&req_cx(&meta, &m))
    }

    #[test]
    fn known_tools_are_banned_phones_pass() {
        let s = Scanner::new(&policy::Scanner::default());
        for ua in [
            "friendly-scanner",
            "Friendly-Scanner/1.0",
            "pplsip",
            "sipcli/v1.8",
            "VaxSIPUserAgent/3.1",
            "sundayddr",
            "iWar",
            "sipsak 0.9.6",
        ] {
            let f = check(
                &s,
                &request("OPTIONS", "100", "100", &format!("User-Agent: {ua}\r\n")),
            );
            assert_eq!(
                f.map(|f| f.action),
                Some(Action::Ban { ttl_s: 3600 }),
                "{ua}"
            );
        }
        for ua in [
            "Yealink SIP-T46S 66.86.0.15",
            "Linphone/5.2",
            "Zoiper rv2.10",
        ] {
            let f = check(
                &s,
                &request("REGISTER", "100", "100", &format!("User-Agent: {ua}\r\n")),
            );
            assert!(f.is_none(), "{ua}");
        }
        assert!(
            check(&s, &request("REGISTER", "100", "100", "")).is_none(),
            "no UA"
        );
    }

    #[test]
    fn header_patterns_and_configured_action() {
        let cfg = policy::Scanner {
            action: policy::RuleAction::Drop,
            user_agents: vec![],
            headers: vec![HeaderPattern {
                header: "X-Scan".into(),
                contains: "EvilTool".into(),
            }],
            ..Default::default()
        };
        let s = Scanner::new(&cfg);
        let f = check(
            &s,
            &request("INVITE", "100", "1", "X-Scan: eviltool v2\r\n"),
        )
        .unwrap();
        assert_eq!(f.action, Action::Drop);
        assert!(f.detail.contains("X-Scan"));
        let s = Scanner::new(&policy::Scanner::default());
        let raw = request("OPTIONS", "100", "sipvicious", "");
        assert!(check(&s, &raw).is_some(), "From user sipvicious");
    }
}
