//! The edge's configuration: `#[serde(default)]` structs whose defaults are the embedded standalone
//! set-up of DESIGN.md, loaded from TOML and `SIPWARDEN_*` variables by
//! [`sipwarden_shared::config`], checked by one [`EdgeConfig::validate`].

use crate::sip::Transport;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use sipwarden_shared::config::{self, ConfigError, EnvSource};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Which side of the two-port firewall a listener faces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ListenerSide {
    /// Both: a single-listener deployment where the source address decides the side.
    #[default]
    Both,
    /// Only the Internet side: everything received is filtered as untrusted.
    Internet,
    /// Only the PBX side: everything received is PBX traffic.
    Pbx,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EdgeConfig {
    pub edge: Identity,
    pub listeners: Vec<Listener>,
    pub udp: Udp,
    pub tcp: Tcp,
    pub backends: Vec<Backend>,
    pub health: Health,
    /// CIDRs whose traffic is PBX-side (trunks, a PBX cluster) besides the backends themselves.
    pub trusted_pbx: Vec<IpNet>,
    pub flow: Flow,
    pub http: Http,
    pub shutdown: Shutdown,
    pub log: Log,
    /// The threat policy, reloadable at run time.
    pub policy: crate::policy::Policy,
    pub reload: Reload,
    /// The controller cluster; no endpoints: a standalone edge.
    pub controller: Controller,
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Controller {
    /// gRPC addresses of controllers (`host:port`), tried in turn.
    pub endpoints: Vec<String>,
    /// The controllers' `edges.secret`.
    pub secret: String,
    /// Longest wait between reconnection attempts.
    pub reconnect_max_ms: u64,
    /// How often counter increments for cluster-wide limits are pushed (50 to 5000 ms).
    pub counters_ms: u64,
    /// `ip:port` where other edges relay PBX requests for phones connected here. Empty: the first
    /// UDP listener facing the PBX.
    pub relay: String,
    /// TLS to the controllers: the CA their certificates chain to, and this edge's certificate
    /// and key when they require client certificates (mutual TLS). Unset: plain HTTP/2.
    pub tls: sipwarden_shared::tls::TlsFiles,
}

impl Default for Controller {
    fn default() -> Self {
        Controller {
            endpoints: Vec::new(),
            secret: String::new(),
            reconnect_max_ms: 2000,
            counters_ms: 250,
            relay: String::new(),
            tls: Default::default(),
        }
    }
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("endpoints", &self.endpoints)
            .field("secret", &"[redacted]")
            .field("reconnect_max_ms", &self.reconnect_max_ms)
            .field("counters_ms", &self.counters_ms)
            .field("relay", &self.relay)
            .field("tls", &self.tls.enabled())
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Reload {
    /// How often the config file is checked for changes, which reload the policy (0: only on
    /// SIGHUP).
    pub watch_ms: u64,
}

impl Default for Reload {
    fn default() -> Self {
        Reload { watch_ms: 2000 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Identity {
    /// Names this edge in flow tokens, logs and (later) the controller.
    pub id: String,
    pub site: String,
    /// Where the standalone edge keeps its generated flow key (and, later, its ban file).
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Listener {
    pub transport: Transport,
    pub address: SocketAddr,
    pub side: ListenerSide,
    /// Host (and optional port) written into Via, Record-Route and Path; needed when `address` is
    /// unspecified (`0.0.0.0`) or behind NAT. Defaults to the bound address.
    pub advertise: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Udp {
    /// Sockets bound to each UDP listener with `SO_REUSEPORT`; the kernel hashes each flow to one.
    pub sockets: usize,
    /// Receive threads blocking on each socket. With two, a datagram that arrives while one
    /// thread is busy or waiting for a core wakes the other instead of queueing behind it, for
    /// more wake-ups and so more CPU per message.
    pub threads_per_socket: usize,
    /// Share of one core (0 to 1) that the receive threads may spend handling datagrams (over a
    /// 500 ms window) before the kernel spreads flows over every socket by its hash; below 0.7 of
    /// it every flow goes to the first socket again, so fewer threads wake for the same traffic.
    /// 0: always spread.
    pub spread_at: f64,
    /// Hold (µs from a datagram's arrival in the kernel to the send of what came of it) that at
    /// most 1% of datagrams may exceed over a 500 ms window while every flow goes to the first
    /// socket; past it the second socket's threads wait on the first socket too, so a datagram
    /// that arrives while its thread is busy or waiting for a core wakes another. They go back
    /// to their own after 5 s in which fewer than 0.1% of datagrams were held that long.
    /// 0: they never join.
    pub hold_target_us: u64,
    pub max_datagram: usize,
    /// What a receive batch has produced is sent (one `sendmmsg`) once this many datagrams wait,
    /// and at the end of the batch: a datagram at the head of a large batch does not wait for the
    /// whole batch to be handled. 32 (the batch) sends once per batch.
    pub flush_every: usize,
    /// Datagrams a second from one banned IPv4 source, dropped by the gate, that move the source
    /// into the kernel shield (a BPF socket filter that drops it before user space); 0 disables.
    pub shield_pps: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tcp {
    pub max_connections: usize,
    pub max_per_source: usize,
    pub max_message_size: usize,
    /// A message's header section must arrive within this time once it has started (slowloris).
    pub header_timeout_ms: u64,
    /// A connection with no traffic for this long is closed.
    pub idle_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// What the messages of one read produce goes out per connection in one send, but at least
    /// every this many messages: a burst read at once is not held back for the whole burst. A
    /// connection's task also sends what it holds whenever it yields (every 32 messages handled
    /// without waiting), so values above 32 act as 32.
    pub flush_every: usize,
    /// The kernel's TCP congestion control for the edge's SIP connections (`TCP_CONGESTION` on
    /// its listeners, inherited by what they accept, and on the connections it opens), such as
    /// `cubic` or `reno`; empty keeps the system's (`net.ipv4.tcp_congestion_control`). BBR
    /// paces every write, and without the `fq` qdisc the kernel paces it itself, which holds
    /// back the tail of a burst of signalling (see ARCHITECTURE.md). An algorithm outside
    /// `net.ipv4.tcp_allowed_congestion_control` needs `CAP_NET_ADMIN`.
    pub congestion_control: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Backend {
    pub address: SocketAddr,
    pub transport: Transport,
    /// Lower is preferred; traffic goes to the healthy backends of the lowest priority.
    pub priority: u32,
    /// Share of calls among backends of equal priority.
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Health {
    /// OPTIONS probe period per backend.
    pub interval_ms: u64,
    /// How long a probe waits for any response; an unanswered probe is retried at once.
    pub timeout_ms: u64,
    /// Consecutive failed probes that mark a backend down.
    pub fall: u32,
    /// Consecutive answered probes that mark it up again.
    pub rise: u32,
}

#[derive(Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Flow {
    /// HMAC secrets (≥ 16 characters): the first signs, all verify. Empty: the edge generates one in
    /// `data_dir` and keeps it.
    pub keys: Vec<String>,
}

impl std::fmt::Debug for Flow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Flow {{ keys: [{} redacted] }}", self.keys.len())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Http {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Shutdown {
    /// How long open TCP connections get to drain after SIGTERM before the edge exits anyway.
    pub grace_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Log {
    /// `text` or `json`.
    pub format: String,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        let any: SocketAddr = "0.0.0.0:5060".parse().expect("literal");
        EdgeConfig {
            edge: Identity::default(),
            listeners: vec![
                Listener {
                    transport: Transport::Udp,
                    address: any,
                    ..Listener::default()
                },
                Listener {
                    transport: Transport::Tcp,
                    address: any,
                    ..Listener::default()
                },
            ],
            udp: Udp::default(),
            tcp: Tcp::default(),
            backends: vec![Backend::default()],
            health: Health::default(),
            trusted_pbx: Vec::new(),
            flow: Flow::default(),
            http: Http::default(),
            shutdown: Shutdown::default(),
            log: Log::default(),
            policy: crate::policy::Policy::default(),
            reload: Reload::default(),
            controller: Controller::default(),
        }
    }
}

impl Default for Identity {
    fn default() -> Self {
        Identity {
            id: "edge-1".into(),
            site: "default".into(),
            data_dir: PathBuf::from("./data"),
        }
    }
}

impl Default for Listener {
    fn default() -> Self {
        Listener {
            transport: Transport::Udp,
            address: "0.0.0.0:5060".parse().expect("literal"),
            side: ListenerSide::Both,
            advertise: None,
        }
    }
}

impl Default for Udp {
    fn default() -> Self {
        Udp {
            sockets: std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 16)),
            // Two threads per socket cut the tail on a host shared with other busy processes,
            // but cost 10–25% more CPU per message (see ARCHITECTURE.md): one is the default.
            threads_per_socket: 1,
            spread_at: 0.35,
            hold_target_us: 1_000,
            max_datagram: 65_507,
            flush_every: 4,
            shield_pps: 1000,
        }
    }
}

impl Default for Tcp {
    fn default() -> Self {
        Tcp {
            max_connections: 8192,
            max_per_source: 32,
            max_message_size: 65_536,
            header_timeout_ms: 5_000,
            idle_timeout_ms: 600_000,
            connect_timeout_ms: 2_000,
            // Every send on loopback or a LAN also runs the receiver's TCP input and wake-up: the
            // fewer sends a burst takes, the sooner its last message leaves (see ARCHITECTURE.md).
            flush_every: 32,
            congestion_control: String::new(),
        }
    }
}

impl Default for Backend {
    fn default() -> Self {
        Backend {
            address: "127.0.0.1:5080".parse().expect("literal"),
            transport: Transport::Udp,
            priority: 1,
            weight: 1,
        }
    }
}

impl Default for Health {
    fn default() -> Self {
        Health {
            interval_ms: 5_000,
            timeout_ms: 1_000,
            fall: 2,
            rise: 1,
        }
    }
}

impl Default for Http {
    fn default() -> Self {
        Http {
            listen: "127.0.0.1:9060".parse().expect("literal"),
        }
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown { grace_ms: 5_000 }
    }
}

impl Default for Log {
    fn default() -> Self {
        Log {
            format: "text".into(),
        }
    }
}

/// Variables with the prefix that are flags, not config keys.
pub const RESERVED_ENV: &[&str] = &["SIPWARDEN_CONFIG"];

impl EdgeConfig {
    /// Defaults, then the TOML file (if any), then the environment; then [`EdgeConfig::validate`].
    pub fn load(file: Option<(&str, &str)>, env: &dyn EnvSource) -> Result<Self, ConfigError> {
        let cfg: EdgeConfig = config::load(file, env, RESERVED_ENV)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Every rule a configuration must meet, each failure naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.edge.id.is_empty() || self.edge.id.len() > 64 {
            return bad("edge.id must be 1 to 64 characters".into());
        }
        if self.listeners.is_empty() {
            return bad("listeners: at least one SIP listener is needed".into());
        }
        for (i, l) in self.listeners.iter().enumerate() {
            if l.transport == Transport::Tls {
                return bad(format!(
                    "listeners[{i}].transport: tls is not available yet (udp or tcp)"
                ));
            }
            if let Some(a) = &l.advertise {
                if crate::proxy::HostPort::parse(a).is_none() {
                    return bad(format!(
                        "listeners[{i}].advertise: `{a}` is not host or host:port"
                    ));
                }
            }
        }
        if self.backends.is_empty() {
            return bad("backends: at least one PBX backend is needed".into());
        }
        for (i, b) in self.backends.iter().enumerate() {
            if b.weight == 0 {
                return bad(format!("backends[{i}].weight must be at least 1"));
            }
            if b.transport == Transport::Tls {
                return bad(format!("backends[{i}].transport: tls is not available yet"));
            }
        }
        if self.udp.sockets == 0 || self.udp.sockets > 64 {
            return bad("udp.sockets must be 1 to 64".into());
        }
        if self.udp.threads_per_socket == 0 || self.udp.threads_per_socket > 8 {
            return bad("udp.threads_per_socket must be 1 to 8".into());
        }
        if !(0.0..=1.0).contains(&self.udp.spread_at) {
            return bad("udp.spread_at must be 0 to 1".into());
        }
        if self.udp.hold_target_us > 1_000_000 {
            return bad("udp.hold_target_us must be 0 to 1000000".into());
        }
        if self.udp.max_datagram < 1024 || self.udp.max_datagram > 65_535 {
            return bad("udp.max_datagram must be 1024 to 65535".into());
        }
        if self.tcp.max_connections == 0 || self.tcp.max_per_source == 0 {
            return bad("tcp.max_connections and tcp.max_per_source must be at least 1".into());
        }
        if self.tcp.max_message_size < 1024 {
            return bad("tcp.max_message_size must be at least 1024".into());
        }
        if self.udp.flush_every == 0 {
            return bad("udp.flush_every must be at least 1".into());
        }
        if self.tcp.flush_every == 0 {
            return bad("tcp.flush_every must be at least 1".into());
        }
        let cc = &self.tcp.congestion_control;
        if cc.len() > 15 || !cc.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return bad(
                "tcp.congestion_control must be a kernel congestion control name such as cubic \
                 (up to 15 letters, digits or _), or empty for the system's"
                    .into(),
            );
        }
        if self.tcp.header_timeout_ms == 0 || self.tcp.idle_timeout_ms == 0 {
            return bad("tcp.header_timeout_ms and tcp.idle_timeout_ms must be positive".into());
        }
        if self.health.interval_ms == 0 || self.health.timeout_ms == 0 {
            return bad("health.interval_ms and health.timeout_ms must be positive".into());
        }
        if self.health.timeout_ms >= self.health.interval_ms {
            return bad("health.timeout_ms must be shorter than health.interval_ms".into());
        }
        if self.health.fall == 0 || self.health.rise == 0 {
            return bad("health.fall and health.rise must be at least 1".into());
        }
        if let Some(i) = self.flow.keys.iter().position(|k| k.len() < 16) {
            return bad(format!("flow.keys[{i}] must be at least 16 characters"));
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return bad("log.format must be `text` or `json`".into());
        }
        for (i, e) in self.controller.endpoints.iter().enumerate() {
            let ok = e
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok {
                return bad(format!("controller.endpoints[{i}]: {e:?} is not host:port"));
            }
        }
        if !self.controller.relay.is_empty()
            && self
                .controller
                .relay
                .parse::<std::net::SocketAddr>()
                .is_err()
        {
            return bad("controller.relay must be ip:port".into());
        }
        if let Err(e) = self.controller.tls.validate("controller.tls", false) {
            return bad(e.to_string());
        }
        if !(50..=5000).contains(&self.controller.counters_ms) {
            return bad("controller.counters_ms must be 50 to 5000".into());
        }
        if !self.controller.endpoints.is_empty() && self.controller.secret.len() < 16 {
            return bad(
                "controller.secret must be at least 16 characters when endpoints are set".into(),
            );
        }
        self.policy.validate().map_err(ConfigError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_the_embedded_standalone_edge() {
        let c = EdgeConfig::load(None, &env(&[])).unwrap();
        assert_eq!(c.backends[0].address, "127.0.0.1:5080".parse().unwrap());
        assert_eq!(c.listeners.len(), 2);
        assert_eq!(c.listeners[0].address.port(), 5060);
        assert_eq!(c.http.listen, "127.0.0.1:9060".parse().unwrap());
    }

    #[test]
    fn file_and_environment_override() {
        let file = r#"
[edge]
id = "fra-1"
[[backends]]
address = "127.0.0.1:5090"
priority = 1
[[backends]]
address = "127.0.0.1:5091"
priority = 2
"#;
        let c = EdgeConfig::load(
            Some(("edge.toml", file)),
            &env(&[
                ("SIPWARDEN_HEALTH__INTERVAL_MS", "1700"),
                ("SIPWARDEN_BACKENDS__1__WEIGHT", "3"),
            ]),
        )
        .unwrap();
        assert_eq!(c.edge.id, "fra-1");
        assert_eq!(c.backends.len(), 2);
        assert_eq!(c.backends[1].weight, 3);
        assert_eq!(c.health.interval_ms, 1700);
    }

    #[test]
    fn invalid_values_name_the_key() {
        for (k, v, expect) in [
            ("SIPWARDEN_FLOW__KEYS", r#"["short"]"#, "flow.keys[0]"),
            ("SIPWARDEN_HEALTH__TIMEOUT_MS", "9000", "health.timeout_ms"),
            ("SIPWARDEN_BACKENDS__0__WEIGHT", "0", "backends[0].weight"),
            ("SIPWARDEN_LISTENERS", "[]", "listeners"),
            ("SIPWARDEN_TCP__NOPE", "1", "nope"),
            ("SIPWARDEN_TCP__FLUSH_EVERY", "0", "tcp.flush_every"),
            (
                "SIPWARDEN_TCP__CONGESTION_CONTROL",
                "cubic;reno",
                "tcp.congestion_control",
            ),
            ("SIPWARDEN_UDP__FLUSH_EVERY", "0", "udp.flush_every"),
            (
                "SIPWARDEN_UDP__THREADS_PER_SOCKET",
                "0",
                "udp.threads_per_socket",
            ),
            ("SIPWARDEN_UDP__SOCKETS", "65", "udp.sockets"),
            ("SIPWARDEN_UDP__SPREAD_AT", "1.5", "udp.spread_at"),
            ("SIPWARDEN_UDP__SPREAD_AT", "-0.1", "udp.spread_at"),
            (
                "SIPWARDEN_UDP__HOLD_TARGET_US",
                "1000001",
                "udp.hold_target_us",
            ),
            (
                "SIPWARDEN_BACKENDS__0__ADDRESS",
                "not-an-address",
                "address",
            ),
        ] {
            let err = EdgeConfig::load(None, &env(&[(k, v)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expect), "{k}: {err}");
        }
    }

    #[test]
    fn debug_output_hides_flow_keys() {
        let c = EdgeConfig {
            flow: Flow {
                keys: vec!["super-secret-key-material".into()],
            },
            ..EdgeConfig::default()
        };
        assert!(!format!("{c:?}").contains("super-secret"));
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    #[test]
    fn the_shipped_example_is_valid_and_equals_the_defaults() {
        let text = include_str!("../edge.example.toml");
        let env = std::collections::BTreeMap::new();
        let c = EdgeConfig::load(Some(("edge.example.toml", text)), &env).unwrap();
        let d = EdgeConfig::default();
        assert_eq!(c.listeners, d.listeners);
        assert_eq!(c.backends, d.backends);
        assert_eq!(c.tcp, d.tcp);
        assert_eq!(c.health, d.health);
        assert_eq!(c.http, d.http);
    }
}
