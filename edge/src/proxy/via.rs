//! Via handling: a typed view of one Via element (parsed with rsip), RFC 3581 `received`/`rport`,
//! and the edge's deterministic branch — an HMAC over the previous hop's Via, the Call-ID and the
//! CSeq number, so retransmissions, CANCEL and non-2xx ACK get the same branch as their INVITE, and
//! a response whose Via stack was forged (to reflect traffic elsewhere) does not verify.

use super::{Dest, HostPort};
use crate::flow::FlowKeys;
use crate::sip::Transport;
use rsip::headers::untyped::{ToTypedHeader, UntypedHeader};
use std::net::{IpAddr, SocketAddr};

/// RFC 3261 magic cookie, then our own marker.
pub const BRANCH_PREFIX: &str = "z9hG4bKsw";
/// Via parameter the edge adds to its own Via when the request carried credentials.
pub const CREDENTIALS_PARAM: &str = "swc";
const BRANCH_MAC_BYTES: usize = 15;

/// The parts of a Via element the proxy uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViaInfo {
    pub transport: Transport,
    pub host: String,
    pub port: Option<u16>,
    pub branch: Option<String>,
    pub received: Option<String>,
    /// `None`: no rport; `Some(None)`: rport requested (no value); `Some(Some(p))`: filled in.
    pub rport: Option<Option<u16>>,
}

impl ViaInfo {
    /// Parses one Via element (`SIP/2.0/UDP host:port;branch=…`) with rsip's typed Via.
    pub fn parse(element: &str) -> Option<ViaInfo> {
        let typed = rsip::headers::Via::new(element).typed().ok()?;
        let transport = Transport::parse(&typed.transport.to_string())?;
        let host = typed.uri.host_with_port.host.to_string();
        let port = match &typed.uri.host_with_port.port {
            Some(p) => Some(p.to_string().parse().ok()?),
            None => None,
        };
        let mut info = ViaInfo {
            transport,
            host,
            port,
            branch: None,
            received: None,
            rport: None,
        };
        for p in &typed.params {
            match p {
                rsip::Param::Branch(b) => info.branch = Some(b.to_string()),
                rsip::Param::Received(r) => info.received = Some(r.to_string()),
                rsip::Param::Other(name, value)
                    if name.to_string().eq_ignore_ascii_case("rport") =>
                {
                    info.rport = Some(match value {
                        Some(v) => Some(v.to_string().parse().ok()?),
                        None => None,
                    })
                }
                _ => {}
            }
        }
        Some(info)
    }

    /// Where a response to this Via goes (RFC 3261 §18.2.2 with RFC 3581): `received` over
    /// the sent-by host, `rport` over the sent-by port.
    pub fn response_target(&self) -> Dest {
        let port = match self.rport {
            Some(Some(p)) => p,
            _ => self.port.unwrap_or(5060),
        };
        let host = self.received.as_deref().unwrap_or(&self.host);
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        match bare.parse::<IpAddr>() {
            Ok(ip) => Dest::Addr(SocketAddr::new(ip, port)),
            Err(_) => Dest::Host(host.to_string(), port),
        }
    }

    /// The sent-by as `host[:port]`.
    pub fn sent_by(&self) -> HostPort {
        HostPort {
            host: self.host.clone(),
            port: self.port,
        }
    }
}

/// The client's top Via element with `received` (when the sent-by host is not the source address)
/// and `rport` (when asked for) filled in, as the proxy must before forwarding (RFC 3581 §4).
/// Returns `None` when the element needs no change.
pub fn stamp_received(element: &str, via: &ViaInfo, source: SocketAddr) -> Option<String> {
    let host = via.host.trim_start_matches('[').trim_end_matches(']');
    let host_is_source = host.parse::<IpAddr>().is_ok_and(|ip| ip == source.ip());
    let wants_rport = via.rport == Some(None);
    if host_is_source && !wants_rport {
        return None;
    }
    let mut params: Vec<String> = element.split(';').map(|s| s.to_string()).collect();
    let mut have_received = false;
    for p in params.iter_mut().skip(1) {
        let name = p
            .split('=')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if name == "rport" && wants_rport {
            *p = format!("rport={}", source.port());
        } else if name == "received" {
            *p = format!("received={}", source.ip());
            have_received = true;
        }
    }
    if !have_received {
        params.push(format!("received={}", source.ip()));
    }
    Some(params.join(";"))
}

/// The edge's branch for a request whose previous hop's Via (after [`stamp_received`]) is `prev`.
pub fn branch(keys: &FlowKeys, prev: &ViaInfo, call_id: &str, cseq: u32) -> String {
    let mac = keys.mac(
        &branch_input(prev, call_id, cseq)
            .each_ref()
            .map(|v| v.as_slice()),
    );
    let mut out = String::with_capacity(BRANCH_PREFIX.len() + 24);
    out.push_str(BRANCH_PREFIX);
    out.push_str(&data_encoding::BASE32_DNSSEC.encode(&mac[..BRANCH_MAC_BYTES]));
    out
}

/// Whether `ours` is the branch this edge would have made for `prev`, under any of the keys.
pub fn verify_branch(
    keys: &FlowKeys,
    ours: &str,
    prev: &ViaInfo,
    call_id: &str,
    cseq: u32,
) -> bool {
    let Some(enc) = ours.strip_prefix(BRANCH_PREFIX) else {
        return false;
    };
    let Ok(tag) = data_encoding::BASE32_DNSSEC.decode(enc.as_bytes()) else {
        return false;
    };
    tag.len() == BRANCH_MAC_BYTES
        && keys.verify_mac(
            &branch_input(prev, call_id, cseq)
                .each_ref()
                .map(|v| v.as_slice()),
            &tag,
        )
}

fn branch_input(prev: &ViaInfo, call_id: &str, cseq: u32) -> [Vec<u8>; 7] {
    [
        b"via-branch".to_vec(),
        prev.branch.as_deref().unwrap_or("").as_bytes().to_vec(),
        prev.sent_by().to_string().to_ascii_lowercase().into_bytes(),
        prev.received.as_deref().unwrap_or("").as_bytes().to_vec(),
        match prev.rport {
            Some(Some(p)) => p.to_string().into_bytes(),
            _ => Vec::new(),
        },
        call_id.as_bytes().to_vec(),
        cseq.to_be_bytes().to_vec(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> FlowKeys {
        FlowKeys::new(["branch-test-secret-0001"]).unwrap()
    }

    #[test]
    fn parses_via_params() {
        let v =
            ViaInfo::parse("SIP/2.0/TCP 10.0.0.1:5070;branch=z9hG4bK776;rport;received=1.2.3.4")
                .unwrap();
        assert_eq!(v.transport, Transport::Tcp);
        assert_eq!(v.host, "10.0.0.1");
        assert_eq!(v.port, Some(5070));
        assert_eq!(v.branch.as_deref(), Some("z9hG4bK776"));
        assert_eq!(v.received.as_deref(), Some("1.2.3.4"));
        assert_eq!(v.rport, Some(None));
        assert!(ViaInfo::parse("garbage").is_none());
    }

    #[test]
    fn received_and_rport_follow_rfc3581() {
        let src: SocketAddr = "198.51.100.9:40000".parse().unwrap();
        let e = "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKa;rport";
        let v = ViaInfo::parse(e).unwrap();
        let stamped = stamp_received(e, &v, src).unwrap();
        assert_eq!(
            stamped,
            "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKa;rport=40000;received=198.51.100.9"
        );
        let sv = ViaInfo::parse(&stamped).unwrap();
        assert_eq!(sv.response_target(), Dest::Addr(src));

        // No rport: received only, and the response goes to the sent-by port.
        let e = "SIP/2.0/UDP 10.0.0.1:5062;branch=z9hG4bKb";
        let v = ViaInfo::parse(e).unwrap();
        let stamped = stamp_received(e, &v, src).unwrap();
        assert!(stamped.ends_with(";received=198.51.100.9"));
        assert_eq!(
            ViaInfo::parse(&stamped).unwrap().response_target(),
            Dest::Addr("198.51.100.9:5062".parse().unwrap())
        );

        // Sent-by already the source and no rport: untouched.
        let e = "SIP/2.0/UDP 198.51.100.9:40000;branch=z9hG4bKc";
        assert_eq!(stamp_received(e, &ViaInfo::parse(e).unwrap(), src), None);
    }

    #[test]
    fn branch_is_deterministic_and_verifiable() {
        let k = keys();
        let prev = ViaInfo::parse("SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKx;rport=5;received=1.2.3.4")
            .unwrap();
        let b1 = branch(&k, &prev, "call-1", 7);
        assert!(b1.starts_with("z9hG4bK"));
        assert_eq!(
            b1,
            branch(&k, &prev, "call-1", 7),
            "retransmission and CANCEL match"
        );
        assert_ne!(b1, branch(&k, &prev, "call-1", 8));
        assert_ne!(b1, branch(&k, &prev, "call-2", 7));
        assert!(verify_branch(&k, &b1, &prev, "call-1", 7));

        // A response whose next Via was rewritten to reflect elsewhere does not verify.
        let forged =
            ViaInfo::parse("SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKx;rport=5;received=192.0.2.66")
                .unwrap();
        assert!(!verify_branch(&k, &b1, &forged, "call-1", 7));
        assert!(!verify_branch(&k, "z9hG4bKother", &prev, "call-1", 7));
        let other = FlowKeys::new(["another-cluster-secret"]).unwrap();
        assert!(!verify_branch(&other, &b1, &prev, "call-1", 7));
    }
}
