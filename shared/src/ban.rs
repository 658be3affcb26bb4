//! The shared ban and registration model: [`Ban`] with its [`BanTarget`], [`BanSource`] and scope,
//! and [`Binding`]. Parsed and validated here once (a bad CIDR or AOR is an error naming the field),
//! converted to and from `sipwarden.v1` protobuf for the wire.

use crate::proto::v1 as pb;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use thiserror::Error;

/// A value that cannot be a ban or binding; the message names the field.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct InvalidField {
    pub field: &'static str,
    pub message: String,
}

fn invalid(field: &'static str, message: impl Into<String>) -> InvalidField {
    InvalidField {
        field,
        message: message.into(),
    }
}

/// What a ban matches.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type", content = "value")]
pub enum BanTarget {
    Ip(IpAddr),
    Cidr(IpNet),
    /// `sip:user@domain`, lower-cased host.
    Aor(String),
    /// Case-insensitive substring of User-Agent.
    UserAgent(String),
}

impl BanTarget {
    /// Reads `kind` (`ip`, `cidr`, `aor`, `user_agent`) and `value`.
    pub fn parse(kind: &str, value: &str) -> Result<BanTarget, InvalidField> {
        let value = value.trim();
        match kind {
            "ip" => value
                .parse()
                .map(BanTarget::Ip)
                .map_err(|_| invalid("target.ip", format!("{value:?} is not an IP address"))),
            "cidr" => {
                let net: IpNet = value.parse().map_err(|_| {
                    invalid(
                        "target.cidr",
                        format!("{value:?} is not a network (a.b.c.d/len)"),
                    )
                })?;
                if net.trunc() != net {
                    return Err(invalid(
                        "target.cidr",
                        format!("{value:?} has host bits set; did you mean {}?", net.trunc()),
                    ));
                }
                Ok(BanTarget::Cidr(net))
            }
            "aor" => {
                let rest = value
                    .strip_prefix("sip:")
                    .or_else(|| value.strip_prefix("sips:"))
                    .ok_or_else(|| invalid("target.aor", "must start with sip: or sips:"))?;
                let (user, host) = rest
                    .split_once('@')
                    .ok_or_else(|| invalid("target.aor", "must be sip:user@domain"))?;
                if user.is_empty() || host.is_empty() || value.contains(char::is_whitespace) {
                    return Err(invalid("target.aor", "must be sip:user@domain"));
                }
                Ok(BanTarget::Aor(format!(
                    "sip:{user}@{}",
                    host.to_ascii_lowercase()
                )))
            }
            "user_agent" => {
                if value.is_empty() || value.len() > 256 {
                    return Err(invalid("target.user_agent", "must be 1 to 256 characters"));
                }
                Ok(BanTarget::UserAgent(value.to_string()))
            }
            other => Err(invalid(
                "target.type",
                format!("{other:?} is not one of ip, cidr, aor, user_agent"),
            )),
        }
    }

    /// `(kind, value)` as [`BanTarget::parse`] reads them.
    pub fn parts(&self) -> (&'static str, String) {
        match self {
            BanTarget::Ip(ip) => ("ip", ip.to_string()),
            BanTarget::Cidr(n) => ("cidr", n.to_string()),
            BanTarget::Aor(a) => ("aor", a.clone()),
            BanTarget::UserAgent(u) => ("user_agent", u.clone()),
        }
    }

    /// The network an address ban covers (`None` for AOR and User-Agent bans).
    pub fn network(&self) -> Option<IpNet> {
        match self {
            BanTarget::Ip(ip) => Some(IpNet::from(*ip)),
            BanTarget::Cidr(n) => Some(*n),
            _ => None,
        }
    }
}

impl std::fmt::Display for BanTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (k, v) = self.parts();
        write!(f, "{k}:{v}")
    }
}

/// Where a ban came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "name")]
pub enum BanSource {
    Manual,
    /// A rule of an edge (`scanner`, `bruteforce`, …).
    AutoRule(String),
    /// An imported feed (`apiban`, …).
    Feed(String),
}

/// One ban as the cluster holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ban {
    pub id: String,
    pub target: BanTarget,
    pub reason: String,
    pub source: BanSource,
    /// Who made it: an operator's token name or an edge id.
    pub created_by: String,
    pub created_unix_ms: u64,
    /// Absolute expiry; `None` is permanent.
    pub expires_unix_ms: Option<u64>,
    /// `None` is global; otherwise the site it applies to.
    pub site: Option<String>,
}

impl Ban {
    pub fn live(&self, now_ms: u64) -> bool {
        self.expires_unix_ms.is_none_or(|e| now_ms < e)
    }
}

/// A registration binding learned by an edge from a 200 OK to REGISTER.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    pub aor: String,
    pub contact: String,
    /// `ip:port` the phone sent from.
    pub source: String,
    pub transport: String,
    pub edge_id: String,
    pub flow_token: String,
    pub expires_unix_ms: u64,
    pub user_agent: String,
    /// The site of the edge that holds the binding.
    #[serde(default)]
    pub site: String,
}

impl Binding {
    /// Checks what an edge published, so one bad edge cannot store garbage the others trust.
    /// Errors name the field (`put[i].` is added by the caller). The AOR is normalised as an AOR
    /// ban target is (lower-cased host).
    pub fn validate(mut self) -> Result<Binding, InvalidField> {
        self.aor = match BanTarget::parse("aor", &self.aor) {
            Ok(BanTarget::Aor(a)) => a,
            _ => return Err(invalid("aor", "must be sip:user@domain")),
        };
        let bounded = |field: &'static str, v: &str, max: usize| {
            if v.len() > max || v.chars().any(|c| c.is_control()) {
                Err(invalid(
                    field,
                    format!("at most {max} characters, no control characters"),
                ))
            } else {
                Ok(())
            }
        };
        if self.contact.is_empty() {
            return Err(invalid("contact", "must not be empty"));
        }
        bounded("contact", &self.contact, 512)?;
        if self.source.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "source",
                format!("{:?} is not ip:port", self.source),
            ));
        }
        if !matches!(
            self.transport.as_str(),
            "udp" | "tcp" | "tls" | "ws" | "wss"
        ) {
            return Err(invalid("transport", "one of udp, tcp, tls, ws, wss"));
        }
        bounded("flow_token", &self.flow_token, 256)?;
        bounded("user_agent", &self.user_agent, 256)?;
        bounded("edge_id", &self.edge_id, 64)?;
        bounded("site", &self.site, 64)?;
        if self.expires_unix_ms == 0 {
            return Err(invalid("expires_unix_ms", "must be set"));
        }
        Ok(self)
    }
}

fn ms_to_pb(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

impl From<&BanTarget> for pb::BanTarget {
    fn from(t: &BanTarget) -> Self {
        use pb::ban_target::Target;
        let target = match t {
            BanTarget::Ip(ip) => Target::Ip(ip.to_string()),
            BanTarget::Cidr(n) => Target::Cidr(n.to_string()),
            BanTarget::Aor(a) => Target::Aor(a.clone()),
            BanTarget::UserAgent(u) => Target::UserAgent(u.clone()),
        };
        pb::BanTarget {
            target: Some(target),
        }
    }
}

impl TryFrom<&pb::BanTarget> for BanTarget {
    type Error = InvalidField;
    fn try_from(t: &pb::BanTarget) -> Result<Self, InvalidField> {
        use pb::ban_target::Target;
        match &t.target {
            Some(Target::Ip(v)) => BanTarget::parse("ip", v),
            Some(Target::Cidr(v)) => BanTarget::parse("cidr", v),
            Some(Target::Aor(v)) => BanTarget::parse("aor", v),
            Some(Target::UserAgent(v)) => BanTarget::parse("user_agent", v),
            None => Err(invalid("target", "is required")),
        }
    }
}

impl From<&Ban> for pb::Ban {
    fn from(b: &Ban) -> Self {
        let source = match &b.source {
            BanSource::Manual => pb::BanSource::Manual,
            BanSource::AutoRule(_) => pb::BanSource::AutoRule,
            BanSource::Feed(_) => pb::BanSource::Feed,
        };
        pb::Ban {
            id: b.id.clone(),
            target: Some((&b.target).into()),
            reason: b.reason.clone(),
            source: source as i32,
            created_by: b.created_by.clone(),
            created_unix_ms: ms_to_pb(b.created_unix_ms),
            expires_unix_ms: b.expires_unix_ms.map_or(0, ms_to_pb),
            scope_site: b.site.clone().unwrap_or_default(),
        }
    }
}

impl From<&Binding> for pb::Binding {
    fn from(b: &Binding) -> Self {
        pb::Binding {
            aor: b.aor.clone(),
            contact: b.contact.clone(),
            source: b.source.clone(),
            transport: b.transport.clone(),
            edge_id: b.edge_id.clone(),
            flow_token: b.flow_token.clone(),
            expires_unix_ms: ms_to_pb(b.expires_unix_ms),
            user_agent: b.user_agent.clone(),
            site: b.site.clone(),
        }
    }
}

impl From<&pb::Binding> for Binding {
    fn from(b: &pb::Binding) -> Self {
        Binding {
            aor: b.aor.clone(),
            contact: b.contact.clone(),
            source: b.source.clone(),
            transport: b.transport.clone(),
            edge_id: b.edge_id.clone(),
            flow_token: b.flow_token.clone(),
            expires_unix_ms: u64::try_from(b.expires_unix_ms).unwrap_or(0),
            user_agent: b.user_agent.clone(),
            site: b.site.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_name_the_bad_field() {
        assert_eq!(
            BanTarget::parse("cidr", "192.0.2.0/24").unwrap().network(),
            Some("192.0.2.0/24".parse().unwrap())
        );
        assert_eq!(
            BanTarget::parse("aor", "sip:1001@PBX.example").unwrap(),
            BanTarget::Aor("sip:1001@pbx.example".into())
        );
        let e = BanTarget::parse("cidr", "192.0.2.7/24").unwrap_err();
        assert_eq!(e.field, "target.cidr");
        assert!(e.message.contains("192.0.2.0/24"), "{e}");
        assert_eq!(
            BanTarget::parse("ip", "300.1.1.1").unwrap_err().field,
            "target.ip"
        );
        assert_eq!(
            BanTarget::parse("aor", "1001@x").unwrap_err().field,
            "target.aor"
        );
        assert_eq!(
            BanTarget::parse("mac", "x").unwrap_err().field,
            "target.type"
        );
    }

    #[test]
    fn proto_round_trip() {
        for t in [
            BanTarget::Ip("2001:db8::1".parse().unwrap()),
            BanTarget::Cidr("10.0.0.0/8".parse().unwrap()),
            BanTarget::Aor("sip:a@b".into()),
            BanTarget::UserAgent("friendly-scanner".into()),
        ] {
            let p = pb::BanTarget::from(&t);
            assert_eq!(BanTarget::try_from(&p).unwrap(), t);
        }
        let b = Binding {
            aor: "sip:1001@pbx".into(),
            contact: "<sip:1001@10.0.0.5>".into(),
            source: "192.0.2.1:5060".into(),
            transport: "udp".into(),
            edge_id: "e1".into(),
            flow_token: "sw1abc".into(),
            expires_unix_ms: 5,
            user_agent: "ua".into(),
            site: "s".into(),
        };
        assert_eq!(Binding::from(&pb::Binding::from(&b)), b);
    }

    #[test]
    fn bindings_are_validated_naming_the_field() {
        let good = Binding {
            aor: "sip:1001@PBX.example".into(),
            contact: "sip:1001@10.0.0.5:5060".into(),
            source: "192.0.2.1:5060".into(),
            transport: "udp".into(),
            edge_id: "e1".into(),
            flow_token: "sw1abc".into(),
            expires_unix_ms: 5,
            user_agent: "ua".into(),
            site: "s".into(),
        };
        assert_eq!(good.clone().validate().unwrap().aor, "sip:1001@pbx.example");
        let field = |b: Binding| b.validate().unwrap_err().field;
        assert_eq!(
            field(Binding {
                aor: "1001".into(),
                ..good.clone()
            }),
            "aor"
        );
        assert_eq!(
            field(Binding {
                contact: String::new(),
                ..good.clone()
            }),
            "contact"
        );
        assert_eq!(
            field(Binding {
                source: "x".into(),
                ..good.clone()
            }),
            "source"
        );
        assert_eq!(
            field(Binding {
                transport: "sctp".into(),
                ..good.clone()
            }),
            "transport"
        );
        assert_eq!(
            field(Binding {
                user_agent: "a\nb".into(),
                ..good.clone()
            }),
            "user_agent"
        );
        assert_eq!(
            field(Binding {
                expires_unix_ms: 0,
                ..good
            }),
            "expires_unix_ms"
        );
    }
}
