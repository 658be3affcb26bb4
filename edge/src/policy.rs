//! The `[policy]` section of the edge config: one sub-section per threat filter, each with `enabled`
//! and `dry_run` (log what the rule would do, do nothing) and its thresholds. Reloaded without a
//! restart (SIGHUP or a change of the config file); see [`crate::pipeline`] for how it is run.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// What a rule does when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    /// Log a security event and let the message through.
    Alert,
    /// Answer with an error status (the rule decides which).
    Reject,
    /// Drop silently — the right answer to scanners.
    Drop,
    /// Drop and ban the source for the rule's `ban_ttl_s`.
    Ban,
}

/// The whole threat policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    pub bans: Bans,
    pub allowlist: Allowlist,
    pub flood: Flood,
    pub sanity: Sanity,
    pub scanner: Scanner,
    pub methods: Methods,
    pub geoip: GeoIp,
    pub rate: Rate,
    pub bruteforce: BruteForce,
    pub enumeration: Enumeration,
    pub registered: Registered,
    pub tollfraud: TollFraud,
}

/// The ban set checked before parsing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Bans {
    pub enabled: bool,
    pub dry_run: bool,
    /// Networks banned by configuration, for as long as they stay listed.
    pub networks: Vec<IpNet>,
    /// Where the standalone edge keeps its auto and manual bans (relative paths are under
    /// `edge.data_dir`), so a restart keeps them; the journal of changes since the file was last
    /// written whole sits beside it (the same name with the extension `.journal`).
    pub file: PathBuf,
    /// Upper bound on bans held (config bans excluded); the oldest-expiring go first.
    pub max_entries: usize,
}

impl Default for Bans {
    fn default() -> Self {
        Bans {
            enabled: true,
            dry_run: false,
            networks: Vec::new(),
            file: PathBuf::from("bans.json"),
            max_entries: 1_000_000,
        }
    }
}

/// Trusted peers (PBX, trunks, monitoring): never banned, never rate-limited, accepted by the
/// registered-source rule. Backends and `trusted_pbx` are always trusted as well.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Allowlist {
    pub networks: Vec<IpNet>,
}

/// Per-source flood limiter, before parsing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Flood {
    pub enabled: bool,
    pub dry_run: bool,
    /// Sustained messages per second one source may send.
    pub rate_per_s: u32,
    /// Messages one source may send at once above the rate.
    pub burst: u32,
    /// Messages over the limit within `window_s` that turn the flood into a ban (0: never ban).
    pub ban_after: u32,
    pub window_s: u64,
    pub ban_ttl_s: u64,
}

impl Default for Flood {
    fn default() -> Self {
        Flood {
            enabled: true,
            dry_run: false,
            rate_per_s: 100,
            burst: 200,
            ban_after: 500,
            window_s: 10,
            ban_ttl_s: 600,
        }
    }
}

/// Protocol sanity of requests from the Internet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Sanity {
    pub enabled: bool,
    pub dry_run: bool,
    /// `reject` answers 400/416/483/482 as the failure calls for; `drop` is silent.
    pub action: RuleAction,
    pub max_message_bytes: usize,
    /// Highest Max-Forwards accepted (RFC 3261 recommends 70).
    pub max_forwards_limit: u32,
}

impl Default for Sanity {
    fn default() -> Self {
        Sanity {
            enabled: true,
            dry_run: false,
            action: RuleAction::Reject,
            max_message_bytes: 16 * 1024,
            max_forwards_limit: 255,
        }
    }
}

/// One header pattern of a scanner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderPattern {
    /// Header name (compact forms are matched too for From, To, Contact, Call-ID).
    pub header: String,
    /// Case-insensitive substring of the header's value.
    pub contains: String,
}

/// Scanner and attack-tool fingerprints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scanner {
    pub enabled: bool,
    pub dry_run: bool,
    pub action: RuleAction,
    pub ban_ttl_s: u64,
    /// Case-insensitive substrings of User-Agent (or Server) that mark a tool.
    pub user_agents: Vec<String>,
    pub headers: Vec<HeaderPattern>,
}

impl Default for Scanner {
    fn default() -> Self {
        let ua = [
            "friendly-scanner",
            "sipvicious",
            "pplsip",
            "sippts",
            "sipcli",
            "vaxsipuseragent",
            "sundayddr",
            "iwar",
            "sipsak",
            "sip-scan",
            "sipscan",
            "siparmyknife",
            "sivus",
            "smap",
            "sipptk",
            "voipbuster",
        ];
        Scanner {
            enabled: true,
            dry_run: false,
            action: RuleAction::Ban,
            ban_ttl_s: 3600,
            user_agents: ua.iter().map(|s| s.to_string()).collect(),
            headers: vec![
                HeaderPattern {
                    header: "From".into(),
                    contains: "sipvicious".into(),
                },
                HeaderPattern {
                    header: "To".into(),
                    contains: "sipvicious".into(),
                },
            ],
        }
    }
}

/// Methods accepted per direction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Methods {
    pub enabled: bool,
    pub dry_run: bool,
    /// `reject` answers 405 Method Not Allowed with an Allow header.
    pub action: RuleAction,
    /// Methods accepted from the Internet; anything else is refused.
    pub from_internet: Vec<String>,
    /// Methods accepted from the PBX side; empty accepts every method.
    pub from_pbx: Vec<String>,
}

impl Default for Methods {
    fn default() -> Self {
        let m = [
            "REGISTER", "INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "PRACK", "UPDATE", "INFO",
            "REFER", "NOTIFY",
        ];
        Methods {
            enabled: true,
            dry_run: false,
            action: RuleAction::Reject,
            from_internet: m.iter().map(|s| s.to_string()).collect(),
            from_pbx: Vec::new(),
        }
    }
}

/// Country allow/deny from a MaxMind database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GeoIp {
    pub enabled: bool,
    pub dry_run: bool,
    pub action: RuleAction,
    pub ban_ttl_s: u64,
    /// A GeoIP2/GeoLite2 Country (or City) `.mmdb` file.
    pub database: PathBuf,
    /// ISO 3166-1 alpha-2 codes; when not empty only these are accepted.
    pub allow_countries: Vec<String>,
    /// Codes refused (checked after `allow_countries`).
    pub deny_countries: Vec<String>,
    /// Whether sources the database does not place (private ranges, gaps) are accepted.
    pub allow_unknown: bool,
}

impl Default for GeoIp {
    fn default() -> Self {
        GeoIp {
            enabled: false,
            dry_run: false,
            action: RuleAction::Drop,
            ban_ttl_s: 3600,
            database: PathBuf::new(),
            allow_countries: Vec::new(),
            deny_countries: Vec::new(),
            allow_unknown: true,
        }
    }
}

/// Per-minute limits of one method (0 turns a limit off).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MethodLimits {
    pub per_source_per_min: u32,
    pub per_aor_per_min: u32,
}

impl MethodLimits {
    fn new(per_source_per_min: u32, per_aor_per_min: u32) -> Self {
        MethodLimits {
            per_source_per_min,
            per_aor_per_min,
        }
    }
}

impl Default for MethodLimits {
    fn default() -> Self {
        MethodLimits::new(0, 0)
    }
}

/// Request rate limits per source address and per AOR.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Rate {
    pub enabled: bool,
    pub dry_run: bool,
    /// `reject` answers 503 with Retry-After; `drop` is silent; `ban` bans the source.
    pub action: RuleAction,
    pub ban_ttl_s: u64,
    /// The AOR of a REGISTER is its To URI; of INVITE and OPTIONS the From URI (the caller).
    pub register: MethodLimits,
    pub invite: MethodLimits,
    pub options: MethodLimits,
}

impl Default for Rate {
    fn default() -> Self {
        Rate {
            enabled: true,
            dry_run: false,
            action: RuleAction::Reject,
            ban_ttl_s: 600,
            register: MethodLimits::new(120, 60),
            invite: MethodLimits::new(120, 60),
            options: MethodLimits::new(300, 0),
        }
    }
}

/// Digest-authentication brute force, seen in the PBX's answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BruteForce {
    pub enabled: bool,
    pub dry_run: bool,
    pub action: RuleAction,
    pub ban_ttl_s: u64,
    pub window_s: u64,
    /// Score per source within the window that fires the rule.
    pub source_threshold: f64,
    /// Score per AOR within the window that flags the AOR (an alert; its attackers may be many).
    pub aor_threshold: f64,
    /// Score of a 401/407 to a request that carried credentials, or of a 403: a wrong password.
    pub failure_weight: f64,
    /// Score of a 401/407 to a request without credentials: the normal first leg of digest auth,
    /// weak evidence on its own.
    pub challenge_weight: f64,
}

impl Default for BruteForce {
    fn default() -> Self {
        BruteForce {
            enabled: true,
            dry_run: false,
            action: RuleAction::Ban,
            ban_ttl_s: 3600,
            window_s: 300,
            source_threshold: 10.0,
            aor_threshold: 30.0,
            failure_weight: 1.0,
            challenge_weight: 0.2,
        }
    }
}

/// Extension enumeration: many user parts from one source answered 404/401/403/407.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Enumeration {
    pub enabled: bool,
    pub dry_run: bool,
    pub action: RuleAction,
    pub ban_ttl_s: u64,
    pub window_s: u64,
    /// Distinct user parts within the window that fire the rule.
    pub distinct_users: u32,
}

impl Default for Enumeration {
    fn default() -> Self {
        Enumeration {
            enabled: true,
            dry_run: false,
            action: RuleAction::Ban,
            ban_ttl_s: 3600,
            window_s: 300,
            distinct_users: 8,
        }
    }
}

/// INVITE from the Internet only from a source with a live registration through this edge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Registered {
    pub enabled: bool,
    pub dry_run: bool,
    /// `reject` answers 403.
    pub action: RuleAction,
    pub ban_ttl_s: u64,
    /// Networks of trunks that call in without registering (besides the allowlist).
    pub trunks: Vec<IpNet>,
    /// Binding lifetime assumed when a 200 to REGISTER carries no expiry.
    pub default_expires_s: u64,
}

impl Default for Registered {
    fn default() -> Self {
        Registered {
            enabled: true,
            dry_run: false,
            action: RuleAction::Reject,
            ban_ttl_s: 600,
            trunks: Vec::new(),
            default_expires_s: 3600,
        }
    }
}

/// A destination prefix rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixRule {
    /// E.164 prefix with `+` (`+881`) or a national one (`1900`).
    pub prefix: String,
    pub action: RuleAction,
    /// What the range is, for the event (`premium`, `satellite`, `high-risk`).
    pub label: String,
}

/// Toll fraud: where calls go and how many.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TollFraud {
    pub enabled: bool,
    pub dry_run: bool,
    pub ban_ttl_s: u64,
    /// Dialled prefixes that stand for `+` (`00`, `011`): `0088123` is matched as `+88123`.
    pub international_prefixes: Vec<String>,
    pub prefixes: Vec<PrefixRule>,
    /// New calls per account per minute (0: off) and what crossing it does.
    pub calls_per_min: u32,
    pub calls_per_min_action: RuleAction,
    /// Calls up at once per account (0: off).
    pub concurrent_calls: u32,
    pub concurrent_action: RuleAction,
    /// Consecutive calls to numbers one apart (…01, …02, …03) that fire the rule (0: off).
    pub sequential_run: u32,
    pub sequential_window_s: u64,
    pub sequential_action: RuleAction,
    /// A call not ended by BYE is forgotten after this long.
    pub max_call_s: u64,
}

impl Default for TollFraud {
    fn default() -> Self {
        let rule = |prefix: &str, action, label: &str| PrefixRule {
            prefix: prefix.into(),
            action,
            label: label.into(),
        };
        use RuleAction::{Alert, Reject};
        TollFraud {
            enabled: true,
            dry_run: false,
            ban_ttl_s: 3600,
            international_prefixes: vec!["00".into(), "011".into()],
            prefixes: vec![
                rule("+881", Reject, "satellite"),
                rule("+882", Reject, "international networks"),
                rule("+883", Reject, "international networks"),
                rule("+870", Reject, "satellite"),
                rule("+979", Reject, "international premium"),
                rule("+1900", Reject, "premium"),
                rule("+1976", Reject, "premium"),
                rule("+449", Reject, "premium"),
                rule("+53", Alert, "high-risk"),
                rule("+235", Alert, "high-risk"),
                rule("+239", Alert, "high-risk"),
                rule("+247", Alert, "high-risk"),
                rule("+252", Alert, "high-risk"),
                rule("+290", Alert, "high-risk"),
                rule("+675", Alert, "high-risk"),
                rule("+677", Alert, "high-risk"),
                rule("+678", Alert, "high-risk"),
                rule("+686", Alert, "high-risk"),
                rule("+688", Alert, "high-risk"),
                rule("+690", Alert, "high-risk"),
                rule("+691", Alert, "high-risk"),
                rule("+692", Alert, "high-risk"),
            ],
            calls_per_min: 30,
            calls_per_min_action: Reject,
            concurrent_calls: 10,
            concurrent_action: Reject,
            sequential_run: 5,
            sequential_window_s: 120,
            sequential_action: RuleAction::Ban,
            max_call_s: 4 * 3600,
        }
    }
}

impl Policy {
    /// Checks what serde cannot; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        let f = &self.flood;
        if f.enabled && (f.rate_per_s == 0 || f.burst == 0) {
            return Err("policy.flood.rate_per_s and policy.flood.burst must be > 0".into());
        }
        if f.enabled && f.ban_after > 0 && f.window_s == 0 {
            return Err("policy.flood.window_s must be > 0 when ban_after is set".into());
        }
        if self.sanity.max_message_bytes < 256 {
            return Err("policy.sanity.max_message_bytes must be at least 256".into());
        }
        if matches!(self.sanity.action, RuleAction::Alert | RuleAction::Ban) {
            return Err("policy.sanity.action must be reject or drop".into());
        }
        for (i, p) in self.scanner.user_agents.iter().enumerate() {
            if p.trim().is_empty() {
                return Err(format!("policy.scanner.user_agents[{i}] is empty"));
            }
        }
        for (i, p) in self.scanner.headers.iter().enumerate() {
            if p.header.trim().is_empty() || p.contains.trim().is_empty() {
                return Err(format!(
                    "policy.scanner.headers[{i}] needs a header and a pattern"
                ));
            }
        }
        for (key, list) in [
            ("policy.methods.from_internet", &self.methods.from_internet),
            ("policy.methods.from_pbx", &self.methods.from_pbx),
        ] {
            if let Some(m) = list
                .iter()
                .find(|m| m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()))
            {
                return Err(format!("{key}: {m:?} is not an upper-case SIP method"));
            }
        }
        let g = &self.geoip;
        if g.enabled && g.database.as_os_str().is_empty() {
            return Err("policy.geoip.database is required when geoip is enabled".into());
        }
        for (key, list) in [
            ("policy.geoip.allow_countries", &g.allow_countries),
            ("policy.geoip.deny_countries", &g.deny_countries),
        ] {
            if let Some(c) = list
                .iter()
                .find(|c| c.len() != 2 || !c.bytes().all(|b| b.is_ascii_alphabetic()))
            {
                return Err(format!("{key}: {c:?} is not an ISO 3166-1 alpha-2 code"));
            }
        }
        let b = &self.bruteforce;
        for (key, v) in [
            ("source_threshold", b.source_threshold),
            ("aor_threshold", b.aor_threshold),
            ("failure_weight", b.failure_weight),
            ("challenge_weight", b.challenge_weight),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(format!(
                    "policy.bruteforce.{key} must be a non-negative number"
                ));
            }
        }
        if b.enabled && (b.window_s == 0 || b.source_threshold <= 0.0) {
            return Err(
                "policy.bruteforce.window_s and source_threshold must be > 0 when enabled".into(),
            );
        }
        let e = &self.enumeration;
        if e.enabled && (e.window_s == 0 || e.distinct_users < 2) {
            return Err(
                "policy.enumeration.window_s must be > 0 and distinct_users at least 2".into(),
            );
        }
        let t = &self.tollfraud;
        for (i, r) in t.prefixes.iter().enumerate() {
            let digits = r.prefix.strip_prefix('+').unwrap_or(&r.prefix);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!(
                    "policy.tollfraud.prefixes[{i}].prefix {:?} must be digits, optionally after +",
                    r.prefix
                ));
            }
            if r.action == RuleAction::Drop {
                return Err(format!(
                    "policy.tollfraud.prefixes[{i}].action must be alert, reject or ban"
                ));
            }
        }
        for (i, p) in t.international_prefixes.iter().enumerate() {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!(
                    "policy.tollfraud.international_prefixes[{i}] must be digits"
                ));
            }
        }
        if t.sequential_run == 1 {
            return Err("policy.tollfraud.sequential_run must be 0 (off) or at least 2".into());
        }
        if t.max_call_s == 0 {
            return Err("policy.tollfraud.max_call_s must be > 0".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        Policy::default().validate().unwrap();
    }

    #[test]
    fn errors_name_the_key() {
        let mut p = Policy::default();
        p.geoip.enabled = true;
        assert!(p.validate().unwrap_err().contains("policy.geoip.database"));
        let mut p = Policy::default();
        p.tollfraud.prefixes[0].prefix = "+88x".into();
        assert!(p.validate().unwrap_err().contains("prefixes[0]"));
        let mut p = Policy::default();
        p.methods.from_internet.push("message".into());
        assert!(p.validate().unwrap_err().contains("from_internet"));
        let mut p = Policy::default();
        p.bruteforce.failure_weight = f64::NAN;
        assert!(p.validate().unwrap_err().contains("failure_weight"));
        let mut p = Policy::default();
        p.sanity.action = RuleAction::Ban;
        assert!(p.validate().unwrap_err().contains("policy.sanity.action"));
    }
}
