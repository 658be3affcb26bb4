//! `scanner`: User-Agent and header fingerprints of SIP attack tools (SIPVicious, SIPPTS, sipcli,
//! …). Scanners deserve no answer: the default action is a silent drop and a ban.

use super::{action_of, automaton};
use crate::pipeline::{BuildError, Filter, Finding, RequestCx};
use crate::policy;
use crate::proxy::Side;
use crate::sip::HeaderName;
use aho_corasick::AhoCorasick;

/// The fingerprint rule. Each header's patterns are one case-insensitive Aho–Corasick automaton:
/// a User-Agent is read once whatever the number of patterns (a loop of substring searches was
/// the rule's whole cost).
pub struct Scanner {
    cfg: policy::Scanner,
    user_agents: Option<AhoCorasick>,
    /// One entry per distinct header: its name as configured, its kind, its patterns' automaton
    /// and the patterns.
    headers: Vec<HeaderPatterns>,
}

struct HeaderPatterns {
    name: String,
    kind: HeaderName,
    automaton: AhoCorasick,
    patterns: Vec<String>,
}

/// What a pattern build error names.
const PATTERNS: &str = "policy.scanner patterns";

impl Scanner {
    pub fn new(cfg: &policy::Scanner) -> Result<Scanner, BuildError> {
        let user_agents = if cfg.user_agents.is_empty() {
            None
        } else {
            Some(automaton(&cfg.user_agents, PATTERNS)?)
        };
        let mut names: Vec<&str> = Vec::new();
        for h in &cfg.headers {
            if !names.iter().any(|n| n.eq_ignore_ascii_case(&h.header)) {
                names.push(&h.header);
            }
        }
        let headers = names
            .into_iter()
            .map(|name| {
                let patterns: Vec<String> = cfg
                    .headers
                    .iter()
                    .filter(|h| h.header.eq_ignore_ascii_case(name))
                    .map(|h| h.contains.clone())
                    .collect();
                Ok(HeaderPatterns {
                    name: name.to_string(),
                    kind: HeaderName::classify(name),
                    automaton: automaton(&patterns, PATTERNS)?,
                    patterns,
                })
            })
            .collect::<Result<_, BuildError>>()?;
        Ok(Scanner {
            cfg: cfg.clone(),
            user_agents,
            headers,
        })
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
        if let Some(hit) = self.user_agents.as_ref().and_then(|a| a.find(ua)) {
            let p = &self.cfg.user_agents[hit.pattern().as_usize()];
            return Some(Finding::new(
                "scanner",
                action(),
                format!("User-Agent {ua:?} matches {p:?}"),
            ));
        }
        for h in &self.headers {
            let value = match h.kind {
                HeaderName::Other => cx.sip.m.header_named(&h.name),
                known => cx.sip.m.header(known),
            };
            let Some(v) = value else {
                continue;
            };
            if let Some(hit) = h.automaton.find(v) {
                return Some(Finding::new(
                    "scanner",
                    action(),
                    format!(
                        "{} {v:?} matches {:?}",
                        h.name,
                        h.patterns[hit.pattern().as_usize()]
                    ),
                ));
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
        let s = Scanner::new(&policy::Scanner::default()).unwrap();
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
        let s = Scanner::new(&cfg).unwrap();
        let f = check(
            &s,
            &request("INVITE", "100", "1", "X-Scan: eviltool v2\r\n"),
        )
        .unwrap();
        assert_eq!(f.action, Action::Drop);
        assert!(f.detail.contains("X-Scan"));
        let s = Scanner::new(&policy::Scanner::default()).unwrap();
        let raw = request("OPTIONS", "100", "sipvicious", "");
        assert!(check(&s, &raw).is_some(), "From user sipvicious");
    }
}
