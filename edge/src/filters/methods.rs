//! `methods`: which methods each side may send (no MESSAGE or SUBSCRIBE from the Internet unless
//! the policy lists them). Refusals are `405 Method Not Allowed` with an `Allow` header.

use crate::pipeline::{Action, Filter, Finding, RequestCx};
use crate::policy::{self, RuleAction};
use crate::proxy::Side;
use std::sync::Arc;

/// The method rule.
pub struct Methods {
    cfg: policy::Methods,
    allow_header: Arc<str>,
}

impl Methods {
    pub fn new(cfg: &policy::Methods) -> Methods {
        Methods {
            cfg: cfg.clone(),
            allow_header: cfg.from_internet.join(", ").into(),
        }
    }
}

impl Filter for Methods {
    fn name(&self) -> &'static str {
        "methods"
    }

    fn dry_run(&self) -> bool {
        self.cfg.dry_run
    }

    fn request(&self, cx: &RequestCx<'_>) -> Option<Finding> {
        let method = cx.sip.method();
        let allowed = match cx.meta.side {
            Side::Internet => &self.cfg.from_internet,
            Side::Pbx if self.cfg.from_pbx.is_empty() => return None,
            Side::Pbx => &self.cfg.from_pbx,
        };
        if allowed.iter().any(|m| m == method) {
            return None;
        }
        let action = match self.cfg.action {
            RuleAction::Reject => Action::Reject {
                code: 405,
                reason: "Method Not Allowed",
                header: (cx.meta.side == Side::Internet)
                    .then(|| ("Allow", self.allow_header.clone())),
            },
            other => super::action_of(other, 600, 405, "Method Not Allowed"),
        };
        let side = match cx.meta.side {
            Side::Internet => "the Internet",
            Side::Pbx => "the PBX side",
        };
        Some(Finding::new(
            "methods",
            action,
            format!("{method} is not accepted from {side}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filters::testkit::*;

    #[test]
    fn internet_methods_are_limited_pbx_unrestricted_by_default() {
        let f = Methods::new(&policy::Methods::default());
        let raw = request("MESSAGE", "100", "200", "");
        let m = parse(&raw);
        let inet = meta(T0, "192.0.2.1:5060", Side::Internet);
        let found = f.request(&req_cx(&inet, &m)).unwrap();
        match found.action {
            Action::Reject {
                code: 405,
                header: Some(("Allow", allow)),
                ..
            } => {
                assert!(allow.contains("INVITE") && !allow.contains("MESSAGE"))
            }
            other => panic!("{other:?}"),
        }
        let pbx = meta(T0, "127.0.0.1:5080", Side::Pbx);
        assert!(f.request(&req_cx(&pbx, &m)).is_none());
        let raw = request("INVITE", "100", "200", "");
        let m = parse(&raw);
        assert!(f.request(&req_cx(&inet, &m)).is_none());
    }

    #[test]
    fn enabling_a_method_and_limiting_the_pbx() {
        let mut cfg = policy::Methods::default();
        cfg.from_internet.push("MESSAGE".into());
        cfg.from_pbx = vec!["INVITE".into()];
        let f = Methods::new(&cfg);
        let raw = request("MESSAGE", "100", "200", "");
        let m = parse(&raw);
        assert!(f
            .request(&req_cx(&meta(T0, "192.0.2.1:1", Side::Internet), &m))
            .is_none());
        assert!(f
            .request(&req_cx(&meta(T0, "127.0.0.1:5080", Side::Pbx), &m))
            .is_some());
    }
}
