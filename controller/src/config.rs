//! The controller's configuration: TOML and `SIPWARDEN_*` variables through
//! [`sipwarden_shared::config`], flags on top (see `main.rs`), one [`ControllerConfig::validate`].
//! With nothing given it is a single-node cluster with its data in `./data`.

use serde::{Deserialize, Serialize};
use sipwarden_shared::config::{self, ConfigError, EnvSource};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ControllerConfig {
    pub node: NodeSection,
    pub cluster: Cluster,
    /// gRPC: peers, edges and the Admin service.
    pub grpc: Listen,
    /// REST admin API (`/api/v1`), `/metrics`, `/healthz`, `/readyz`.
    pub http: HttpListen,
    pub auth: Auth,
    pub edges: Edges,
    pub counters: Counters,
    pub log: Log,
}

/// Cluster-wide rate limits and where their counts live.
#[derive(Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Counters {
    /// `redis://host:port/db` (or `rediss://`, `redis+unix://`): counts in Redis, shared by
    /// every controller, so they survive a leader change. Empty: in the leader's memory.
    pub redis_url: String,
    pub limits: Vec<Limit>,
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A Redis URL may carry a password.
        f.debug_struct("Counters")
            .field("redis", &!self.redis_url.is_empty())
            .field("limits", &self.limits)
            .finish()
    }
}

/// One cluster-wide limit: at most `max` requests of `methods` per `key` in each `window_s`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limit {
    pub name: String,
    /// `source`, `aor`, `account` or `site`.
    pub key: String,
    pub methods: Vec<String>,
    pub max: u64,
    pub window_s: u64,
    /// `reject`, `drop` or `ban` (source limits only).
    pub action: String,
    pub ban_ttl_s: u64,
}

impl Default for Limit {
    fn default() -> Self {
        Limit {
            name: String::new(),
            key: "source".into(),
            methods: vec!["INVITE".into()],
            max: 0,
            window_s: 60,
            action: "reject".into(),
            ban_ttl_s: 3600,
        }
    }
}

/// How edges authenticate to the controller.
#[derive(Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Edges {
    /// Shared secret every edge presents (≥ 16 characters); empty refuses all edges.
    pub secret: String,
}

impl std::fmt::Debug for Edges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Edges { secret: [redacted] }")
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeSection {
    /// This controller's Raft id (≥ 1), unique in the cluster.
    pub id: u64,
    /// Raft log, snapshots and the generated admin token.
    pub data_dir: PathBuf,
}

impl Default for NodeSection {
    fn default() -> Self {
        NodeSection {
            id: 1,
            data_dir: PathBuf::from("./data"),
        }
    }
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Cluster {
    /// `id=host:port` of every initial member (gRPC addresses), this node included. Empty: a
    /// single-node cluster.
    pub peers: Vec<String>,
    /// This node joins a running cluster (an admin adds it with `cluster add`): it starts with no
    /// voters and learns them from the leader.
    pub join: bool,
    /// Shared secret controllers present to each other (≥ 16 characters; required with peers).
    pub peer_secret: String,
    pub tick_ms: u64,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Applied entries between two snapshots (each compacts the log).
    pub snapshot_every: u64,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("peers", &self.peers)
            .field("join", &self.join)
            .field("peer_secret", &"[redacted]")
            .field("tick_ms", &self.tick_ms)
            .field("snapshot_every", &self.snapshot_every)
            .finish()
    }
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster {
            peers: Vec::new(),
            join: false,
            peer_secret: String::new(),
            tick_ms: 100,
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_every: 10_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Listen {
    pub listen: SocketAddr,
    /// TLS for every gRPC link: this node's certificate and key (served, and presented to
    /// peers) and the CA that peers', edges' and gRPC admin clients' certificates must chain to
    /// (mutual TLS). Unset: plain HTTP/2.
    pub tls: sipwarden_shared::tls::TlsFiles,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            listen: "127.0.0.1:7400".parse().expect("literal"),
            tls: Default::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpListen {
    pub listen: SocketAddr,
}

impl Default for HttpListen {
    fn default() -> Self {
        HttpListen {
            listen: "127.0.0.1:7480".parse().expect("literal"),
        }
    }
}

/// A bearer token: its name (in the audit trail), role and SHA-256 (hex) — never the token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Token {
    pub name: String,
    pub role: String,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Auth {
    pub tokens: Vec<Token>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Log {
    pub format: String,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            format: "text".into(),
        }
    }
}

/// `id=host:port`.
pub fn parse_peer(s: &str) -> Option<(u64, String)> {
    let (id, addr) = s.split_once('=')?;
    let id: u64 = id.trim().parse().ok().filter(|i| *i > 0)?;
    let addr = addr.trim();
    let (host, port) = addr.rsplit_once(':')?;
    (!host.is_empty() && port.parse::<u16>().is_ok()).then(|| (id, addr.to_string()))
}

impl ControllerConfig {
    /// Defaults, then the TOML file, then `SIPWARDEN_*`; validated.
    pub fn load(file: Option<(&str, &str)>, env: &dyn EnvSource) -> Result<Self, ConfigError> {
        let cfg: ControllerConfig = config::load(file, env, &["SIPWARDEN_CONFIG"])?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The initial members `(id, address)`.
    pub fn members(&self) -> Vec<(u64, String)> {
        self.cluster
            .peers
            .iter()
            .filter_map(|p| parse_peer(p))
            .collect()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.node.id == 0 {
            return bad("node.id must be at least 1".into());
        }
        for (i, p) in self.cluster.peers.iter().enumerate() {
            if parse_peer(p).is_none() {
                return bad(format!("cluster.peers[{i}]: {p:?} is not id=host:port"));
            }
        }
        let members = self.members();
        if !members.is_empty()
            && !self.cluster.join
            && !members.iter().any(|(id, _)| *id == self.node.id)
        {
            return bad(format!(
                "cluster.peers must include this node (id {})",
                self.node.id
            ));
        }
        if (members.len() > 1 || self.cluster.join) && self.cluster.peer_secret.len() < 16 {
            return bad(
                "cluster.peer_secret must be at least 16 characters in a multi-node cluster".into(),
            );
        }
        if self.cluster.tick_ms == 0 || self.cluster.heartbeat_ticks == 0 {
            return bad("cluster.tick_ms and cluster.heartbeat_ticks must be > 0".into());
        }
        if self.cluster.election_ticks <= self.cluster.heartbeat_ticks {
            return bad("cluster.election_ticks must be greater than heartbeat_ticks".into());
        }
        if self.cluster.snapshot_every == 0 {
            return bad("cluster.snapshot_every must be > 0".into());
        }
        if let Err(e) = self.grpc.tls.validate("grpc.tls", true) {
            return bad(e.to_string());
        }
        if self.grpc.listen == self.http.listen {
            return bad("grpc.listen and http.listen must differ".into());
        }
        for (i, t) in self.auth.tokens.iter().enumerate() {
            if !matches!(t.role.as_str(), "viewer" | "operator" | "admin") {
                return bad(format!(
                    "auth.tokens[{i}].role must be viewer, operator or admin"
                ));
            }
            if t.sha256.len() != 64 || !t.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return bad(format!("auth.tokens[{i}].sha256 must be 64 hex digits"));
            }
            if t.name.trim().is_empty() {
                return bad(format!("auth.tokens[{i}].name is empty"));
            }
        }
        if !self.edges.secret.is_empty() && self.edges.secret.len() < 16 {
            return bad("edges.secret must be at least 16 characters".into());
        }
        let url = &self.counters.redis_url;
        if !url.is_empty()
            && !["redis://", "rediss://", "redis+unix://", "unix://"]
                .iter()
                .any(|p| url.starts_with(p))
        {
            return bad(
                "counters.redis_url must start with redis://, rediss:// or redis+unix://".into(),
            );
        }
        let mut names = std::collections::HashSet::new();
        for (i, l) in self.counters.limits.iter().enumerate() {
            let at = |field: &str| format!("counters.limits[{i}].{field}");
            if l.name.is_empty()
                || l.name.len() > 64
                || !l
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return bad(format!("{}: 1 to 64 of a-z, 0-9, - and _", at("name")));
            }
            if !names.insert(&l.name) {
                return bad(format!("{}: {:?} is defined twice", at("name"), l.name));
            }
            if !matches!(l.key.as_str(), "source" | "aor" | "account" | "site") {
                return bad(format!(
                    "{} must be source, aor, account or site",
                    at("key")
                ));
            }
            if l.methods.is_empty()
                || l.methods
                    .iter()
                    .any(|m| m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()))
            {
                return bad(format!(
                    "{}: upper-case SIP methods, at least one",
                    at("methods")
                ));
            }
            if l.max == 0 {
                return bad(format!("{} must be at least 1", at("max")));
            }
            if l.window_s == 0 || l.window_s > 86_400 {
                return bad(format!("{}: 1 to 86400 seconds", at("window_s")));
            }
            match l.action.as_str() {
                "reject" | "drop" => {}
                "ban" if l.key == "source" => {
                    if l.ban_ttl_s == 0 {
                        return bad(format!("{} must be at least 1", at("ban_ttl_s")));
                    }
                }
                "ban" => return bad(format!("{}: ban is for source limits only", at("action"))),
                _ => return bad(format!("{} must be reject, drop or ban", at("action"))),
            }
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return bad("log.format must be `text` or `json`".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn defaults_are_a_single_node_cluster() {
        let c = ControllerConfig::load(None, &BTreeMap::new()).unwrap();
        assert_eq!(c.node.id, 1);
        assert!(c.members().is_empty());
        assert_eq!(c.grpc.listen.to_string(), "127.0.0.1:7400");
        assert_eq!(c.http.listen.to_string(), "127.0.0.1:7480");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("[cluster]\npeers = [\"1=127.0.0.1:7400\", \"x\"]\npeer_secret = \"0123456789abcdef\"", "cluster.peers[1]"),
            ("[cluster]\npeers = [\"2=127.0.0.1:7400\", \"3=127.0.0.1:7401\"]\npeer_secret = \"0123456789abcdef\"", "include this node"),
            ("[cluster]\npeers = [\"1=127.0.0.1:7400\", \"2=127.0.0.1:7401\"]", "peer_secret"),
            ("[[auth.tokens]]\nname = \"a\"\nrole = \"root\"\nsha256 = \"00\"", "auth.tokens[0].role"),
            ("[counters]\nredis_url = \"localhost:6379\"", "counters.redis_url"),
            ("[[counters.limits]]\nname = \"x\"\nmax = 0", "counters.limits[0].max"),
            ("[[counters.limits]]\nname = \"x\"\nmax = 1\nkey = \"aor\"\naction = \"ban\"", "counters.limits[0].action"),
            ("[[counters.limits]]\nname = \"x\"\nmax = 1\n[[counters.limits]]\nname = \"x\"\nmax = 2", "counters.limits[1].name"),
            ("[[counters.limits]]\nname = \"x\"\nmax = 1\nmethods = [\"invite\"]", "counters.limits[0].methods"),
        ];
        for (toml, key) in cases {
            let e = ControllerConfig::load(Some(("c.toml", toml)), &BTreeMap::new())
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{toml}: {e}");
        }
        let secret = Cluster {
            peer_secret: "very-secret-value-1".into(),
            ..Default::default()
        };
        assert!(!format!("{secret:?}").contains("very-secret"));
    }
}
