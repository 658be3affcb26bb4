//! [`SecurityEvent`]: what an edge reports for every non-allow verdict — one JSON log line on target
//! `security`, a labelled counter, a span event and (when connected) a report to the controller.

use serde::{Deserialize, Serialize};

/// One security event. Strings are empty when the message did not carry the field (a pre-parse
/// drop knows only source and transport).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SecurityEvent {
    pub time_unix_ms: u64,
    pub edge: String,
    pub site: String,
    /// `ip:port` of the Internet-side party the verdict is about.
    pub source: String,
    pub transport: String,
    pub method: String,
    pub call_id: String,
    pub from_user: String,
    pub to_user: String,
    pub user_agent: String,
    /// The rule that decided, e.g. `scanner`, `bruteforce`, `tollfraud.prefix`.
    pub rule: String,
    /// `alert`, `reject`, `drop` or `ban`.
    pub action: String,
    /// Human-readable why, e.g. `User-Agent matches "friendly-scanner"`.
    pub detail: String,
    /// The rule is in dry-run: the action was logged, not taken.
    pub dry_run: bool,
}

impl SecurityEvent {
    /// The single-line JSON form written to the `security` log target.
    pub fn to_json(&self) -> String {
        // Serializing a struct of strings, integers and booleans cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

impl From<&SecurityEvent> for crate::proto::v1::SecurityEvent {
    fn from(e: &SecurityEvent) -> Self {
        crate::proto::v1::SecurityEvent {
            time_unix_ms: i64::try_from(e.time_unix_ms).unwrap_or(i64::MAX),
            edge_id: e.edge.clone(),
            site: e.site.clone(),
            source: e.source.clone(),
            transport: e.transport.clone(),
            method: e.method.clone(),
            call_id: e.call_id.clone(),
            from_user: e.from_user.clone(),
            to_user: e.to_user.clone(),
            user_agent: e.user_agent.clone(),
            rule: e.rule.clone(),
            action: e.action.clone(),
            detail: e.detail.clone(),
            dry_run: e.dry_run,
        }
    }
}

impl From<crate::proto::v1::SecurityEvent> for SecurityEvent {
    fn from(e: crate::proto::v1::SecurityEvent) -> Self {
        SecurityEvent {
            time_unix_ms: u64::try_from(e.time_unix_ms).unwrap_or(0),
            edge: e.edge_id,
            site: e.site,
            source: e.source,
            transport: e.transport,
            method: e.method,
            call_id: e.call_id,
            from_user: e.from_user,
            to_user: e.to_user,
            user_agent: e.user_agent,
            rule: e.rule,
            action: e.action,
            detail: e.detail,
            dry_run: e.dry_run,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_line_and_proto_round_trip() {
        let e = SecurityEvent {
            time_unix_ms: 1_700_000_000_123,
            edge: "edge-1".into(),
            source: "192.0.2.7:5060".into(),
            rule: "scanner".into(),
            action: "ban".into(),
            detail: "User-Agent \"friendly-scanner\"\nnext".into(),
            ..Default::default()
        };
        let line = e.to_json();
        assert!(!line.contains('\n'), "one line: {line}");
        let back: SecurityEvent = serde_json::from_str(&line).unwrap();
        assert_eq!(back, e);
        let p = crate::proto::v1::SecurityEvent::from(&e);
        assert_eq!(SecurityEvent::from(p), e);
    }
}
