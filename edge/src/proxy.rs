//! The stateless proxy core (RFC 3261 §16.11): given one parsed message and where it came from,
//! decide where it goes and produce the bytes to send — or the reply, or a drop. No sockets here:
//! the transport layer carries out the [`Action`].
//!
//! - [`request`]: requests in both directions (Via, Max-Forwards, Route, Record-Route, Path, flow
//!   tokens, backend choice).
//! - [`response`]: responses relayed by Via, with our Via's branch verified.
//! - [`via`]: the typed view of a Via element, `received`/`rport`, and our deterministic branch.

pub mod request;
pub mod response;
pub mod via;

use crate::backend::Backends;
use crate::config::{EdgeConfig, ListenerSide};
use crate::flow::FlowKeys;
use crate::sip::{reply, Message, Transport};
use ipnet::IpNet;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// Which side a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// Untrusted: phones, trunks not listed, attackers.
    Internet,
    /// The PBX and trusted peers behind the edge.
    Pbx,
}

impl Side {
    /// Metric label for traffic arriving from this side.
    pub fn label(self) -> &'static str {
        match self {
            Side::Internet => "from_internet",
            Side::Pbx => "from_pbx",
        }
    }

    fn other(self) -> Side {
        match self {
            Side::Internet => Side::Pbx,
            Side::Pbx => Side::Internet,
        }
    }
}

/// One message as received.
#[derive(Debug, Clone, Copy)]
pub struct Inbound<'a> {
    pub bytes: &'a [u8],
    pub source: SocketAddr,
    pub transport: Transport,
    /// Index of the listener (in config order) it arrived on.
    pub listener: usize,
}

/// Where to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    Addr(SocketAddr),
    /// A host name still to be resolved (only for PBX-side targets; Internet-side requests go to
    /// configured backends by address).
    Host(String, u16),
}

/// What the transport layer should do with a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Send `bytes` to `dest` over `transport`, from listener `listener`.
    Forward {
        transport: Transport,
        dest: Dest,
        listener: usize,
        bytes: Vec<u8>,
    },
    /// Send `bytes` back to the source on the connection or socket it came from.
    Reply(Vec<u8>),
    /// Nothing goes out.
    Drop,
}

/// How a message was dealt with, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Forwarded,
    /// Answered by the edge with this status.
    Replied(u16),
    Dropped,
    /// Unparseable: answered 400 where safe, else dropped.
    Malformed,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::Replied(_) => "replied",
            Outcome::Dropped => "dropped",
            Outcome::Malformed => "malformed",
        }
    }
}

/// The proxy's answer for one message.
#[derive(Debug)]
pub struct Decision {
    pub action: Action,
    pub outcome: Outcome,
    pub side: Side,
    /// Why it was not forwarded, for the log line.
    pub reason: Option<String>,
}

/// `host` or `host:port`, with IPv6 in brackets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: Option<u16>,
}

impl HostPort {
    pub fn parse(s: &str) -> Option<HostPort> {
        let s = s.trim();
        if s.is_empty() {
            return None;
        }
        if let Some(rest) = s.strip_prefix('[') {
            let (h, after) = rest.split_once(']')?;
            h.parse::<std::net::Ipv6Addr>().ok()?;
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p.parse().ok()?),
                None if after.is_empty() => None,
                None => return None,
            };
            return Some(HostPort {
                host: format!("[{h}]"),
                port,
            });
        }
        let (h, port) = match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p.parse().ok()?)),
            None => (s, None),
        };
        let ok = !h.is_empty()
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
        ok.then(|| HostPort {
            host: h.to_ascii_lowercase(),
            port,
        })
    }

    fn from_addr(a: SocketAddr) -> HostPort {
        let host = match a.ip() {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("[{ip}]"),
        };
        HostPort {
            host,
            port: Some(a.port()),
        }
    }

    /// Appends `host[:port]` (what Display writes, without the formatting machinery).
    pub fn push_to(&self, out: &mut String) {
        out.push_str(&self.host);
        if let Some(p) = self.port {
            out.push(':');
            out.push_str(itoa::Buffer::new().format(p));
        }
    }
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}", self.host),
            None => f.write_str(&self.host),
        }
    }
}

/// What the proxy needs to know of each listener.
#[derive(Debug, Clone)]
pub struct ListenerInfo {
    pub transport: Transport,
    pub side: ListenerSide,
    pub bind: SocketAddr,
    /// What goes into Via, Record-Route and Path.
    pub advertise: HostPort,
}

/// The other edges of the cluster (from the controllers): where each relays PBX requests for the
/// phones whose connection it holds. Their traffic is PBX side. Swapped whole on change.
#[derive(Debug, Default)]
pub struct Peers {
    inner: arc_swap::ArcSwap<PeerMap>,
}

#[derive(Debug, Default, Clone)]
pub struct PeerMap {
    pub by_id: HashMap<String, SocketAddr>,
    ips: HashSet<IpAddr>,
}

impl Peers {
    /// The relay address of edge `id`.
    pub fn get(&self, id: &str) -> Option<SocketAddr> {
        self.inner.load().by_id.get(id).copied()
    }

    pub fn len(&self) -> usize {
        self.inner.load().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `ip` is a peer edge's.
    pub fn contains_ip(&self, ip: IpAddr) -> bool {
        let m = self.inner.load();
        !m.ips.is_empty() && m.ips.contains(&ip)
    }

    /// Replaces every peer (`None` clears) or adds one.
    pub fn update(&self, replace: bool, peers: impl IntoIterator<Item = (String, SocketAddr)>) {
        let mut next = if replace {
            PeerMap::default()
        } else {
            (**self.inner.load()).clone()
        };
        next.by_id.extend(peers);
        next.ips = next.by_id.values().map(|a| a.ip()).collect();
        self.inner.store(Arc::new(next));
    }
}

/// The proxy: identity, keys, listeners and backends. Shared by every transport task.
#[derive(Debug)]
pub struct Proxy {
    pub edge_id: String,
    pub keys: FlowKeys,
    pub listeners: Vec<ListenerInfo>,
    pub backends: Arc<Backends>,
    pub trusted_pbx: Vec<IpNet>,
    /// Other edges, learned from the controllers.
    pub peers: Arc<Peers>,
}

impl Proxy {
    /// Builds the proxy for `cfg`; `bound` holds each listener's actual address (port 0 resolved).
    pub fn new(
        cfg: &EdgeConfig,
        bound: &[SocketAddr],
        keys: FlowKeys,
        backends: Arc<Backends>,
    ) -> Proxy {
        let listeners = cfg
            .listeners
            .iter()
            .zip(bound)
            .map(|(l, &bind)| {
                let mut advertise = match l.advertise.as_deref().and_then(HostPort::parse) {
                    Some(hp) => hp,
                    None if bind.ip().is_unspecified() => HostPort {
                        host: "127.0.0.1".into(),
                        port: None,
                    },
                    None => HostPort::from_addr(bind),
                };
                if advertise.port.is_none() {
                    advertise.port = Some(bind.port());
                }
                ListenerInfo {
                    transport: l.transport,
                    side: l.side,
                    bind,
                    advertise,
                }
            })
            .collect();
        Proxy {
            edge_id: cfg.edge.id.clone(),
            keys,
            listeners,
            backends,
            trusted_pbx: cfg.trusted_pbx.clone(),
            peers: Arc::new(Peers::default()),
        }
    }

    /// Handles one message: parse, then the request or response path. Never panics on input.
    pub fn handle(&self, inb: &Inbound<'_>) -> Decision {
        let side = self.side(inb);
        match Message::parse(inb.bytes) {
            Err(e) => malformed(inb.bytes, &e, side),
            Ok(m) => self.handle_message(&m, inb, side, false),
        }
    }

    /// The request or response path for a parsed message from `side`. `sane`: the request
    /// already passed `sip::sanity::check_request` (the `sanity` rule checked it).
    pub fn handle_message(
        &self,
        m: &Message<'_>,
        inb: &Inbound<'_>,
        side: Side,
        sane: bool,
    ) -> Decision {
        if m.method().is_some() {
            request::handle(self, m, inb, side, sane)
        } else {
            response::handle(self, m, inb, side)
        }
    }

    /// Whether `addr` is a backend or in a trusted-PBX network.
    pub fn is_pbx_addr(&self, addr: SocketAddr) -> bool {
        self.backends.is_backend(addr)
            || self.trusted_pbx.iter().any(|n| n.contains(&addr.ip()))
            || self.peers.contains_ip(addr.ip())
    }

    /// The address other edges should relay to: `controller.relay`, else the first UDP listener
    /// facing the PBX (its bound address, or its advertised one when bound to a wildcard).
    pub fn relay_address(&self, configured: &str) -> Option<SocketAddr> {
        if !configured.is_empty() {
            return configured.parse().ok();
        }
        let l = &self.listeners[self.listener_toward(Side::Pbx, Transport::Udp)];
        if l.transport != Transport::Udp {
            return None;
        }
        if !l.bind.ip().is_unspecified() {
            return Some(l.bind);
        }
        let ip: IpAddr = l.advertise.host.parse().ok()?;
        Some(SocketAddr::new(
            ip,
            l.advertise.port.unwrap_or(l.bind.port()),
        ))
    }

    /// The side `inb` came from: the listener's side, else a backend address and port or a trusted
    /// CIDR make it PBX traffic.
    pub fn side(&self, inb: &Inbound<'_>) -> Side {
        match self.listeners.get(inb.listener).map(|l| l.side) {
            Some(ListenerSide::Pbx) => Side::Pbx,
            Some(ListenerSide::Internet) => Side::Internet,
            _ if self.is_pbx_addr(inb.source) => Side::Pbx,
            _ => Side::Internet,
        }
    }

    /// The `host:port`s this edge answers to (advertised and bound), for Via loop detection.
    pub fn own_addrs(&self) -> Vec<(String, u16)> {
        let mut out = Vec::new();
        for l in &self.listeners {
            if let Some(p) = l.advertise.port {
                out.push((l.advertise.host.clone(), p));
            }
            if !l.bind.ip().is_unspecified() {
                out.push((l.bind.ip().to_string(), l.bind.port()));
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Whether `host:port` (port absent = 5060) names this edge.
    pub fn is_self(&self, host: &str, port: Option<u16>) -> bool {
        let port = port.unwrap_or(5060);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        self.listeners.iter().any(|l| {
            let adv = l
                .advertise
                .host
                .trim_start_matches('[')
                .trim_end_matches(']');
            let host_match = adv.eq_ignore_ascii_case(host)
                || (!l.bind.ip().is_unspecified() && crate::sip::host_is(host, l.bind.ip()));
            host_match && (l.advertise.port == Some(port) || l.bind.port() == port)
        })
    }

    /// [`Proxy::is_self`] for an address (a next hop), without writing it out as text.
    pub fn is_self_addr(&self, a: SocketAddr) -> bool {
        self.listeners.iter().any(|l| {
            let host_match = crate::sip::host_is(&l.advertise.host, a.ip())
                || (!l.bind.ip().is_unspecified() && l.bind.ip() == a.ip());
            host_match && (l.advertise.port == Some(a.port()) || l.bind.port() == a.port())
        })
    }

    /// The listener to send from toward `side` over `transport`: one facing that side with that
    /// transport, else any with the transport, else the first.
    pub fn listener_toward(&self, side: Side, transport: Transport) -> usize {
        let faces = |l: &ListenerInfo| {
            matches!(
                (l.side, side),
                (ListenerSide::Both, _)
                    | (ListenerSide::Pbx, Side::Pbx)
                    | (ListenerSide::Internet, Side::Internet)
            )
        };
        self.listeners
            .iter()
            .position(|l| l.transport == transport && faces(l))
            .or_else(|| self.listeners.iter().position(|l| l.transport == transport))
            .unwrap_or(0)
    }
}

/// The decision for input that failed to parse: `400` where a reply is safe, else a drop.
pub fn malformed(bytes: &[u8], e: &crate::sip::ParseError, side: Side) -> Decision {
    let action = match bad_request_reply(bytes, &e.to_string()) {
        Some(bytes) => Action::Reply(bytes),
        None => Action::Drop,
    };
    Decision {
        action,
        outcome: Outcome::Malformed,
        side,
        reason: Some(format!("malformed: {e}")),
    }
}

/// A `400` for input that failed to parse, when enough of it is readable to answer safely: the
/// start line is a request line, and Via, From, To, Call-ID and CSeq can be found. Otherwise `None`
/// (silent drop: answering garbage only helps reflection attacks).
pub(crate) fn bad_request_reply(buf: &[u8], why: &str) -> Option<Vec<u8>> {
    let end = crate::sip::message::head_end(buf).unwrap_or(buf.len().min(8192));
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let first = lines.next()?;
    let mut parts = first.splitn(3, ' ');
    let (method, _uri, version) = (parts.next()?, parts.next()?, parts.next()?);
    if version != "SIP/2.0" || method == "ACK" || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let mut fields: [Option<&str>; 5] = [None; 5];
    let names = [
        ["via", "v"],
        ["from", "f"],
        ["to", "t"],
        ["call-id", "i"],
        ["cseq", "cseq"],
    ];
    for line in lines {
        let Some((n, v)) = line.split_once(':') else {
            continue;
        };
        let n = n.trim();
        for (i, alts) in names.iter().enumerate() {
            if fields[i].is_none() && alts.iter().any(|a| a.eq_ignore_ascii_case(n)) {
                fields[i] = Some(v.trim());
            }
        }
    }
    let [Some(via), Some(from), Some(to), Some(call_id), Some(cseq)] = fields else {
        return None;
    };
    let reason = format!("Bad Request ({})", why.replace(['\r', '\n'], " "));
    let mut out = format!("SIP/2.0 400 {reason}\r\nVia: {via}\r\nFrom: {from}\r\n");
    if crate::sip::header_param(to, "tag").is_some() {
        out.push_str(&format!("To: {to}\r\n"));
    } else {
        out.push_str(&format!("To: {to};tag=sw400\r\n"));
    }
    out.push_str(&format!(
        "Call-ID: {call_id}\r\nCSeq: {cseq}\r\nServer: {}\r\nContent-Length: 0\r\n\r\n",
        reply::SERVER
    ));
    Some(out.into_bytes())
}

#[cfg(test)]
mod tests;
