//! PBX backends: priority groups with weights, health from OPTIONS probes, and a stateless choice —
//! the same Call-ID always lands on the same healthy backend, so every request of a call (and its
//! CANCEL) follows the INVITE without the edge keeping call state.

use crate::config::{self, Health};
use crate::metrics::{BackendLabels, Metrics};
use crate::sip::{Message, Transport};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// One backend and its health.
#[derive(Debug)]
pub struct Backend {
    pub address: SocketAddr,
    pub transport: Transport,
    pub priority: u32,
    pub weight: u32,
    up: AtomicBool,
    /// Consecutive failed probes (while up) or answered probes (while down).
    streak: AtomicU32,
}

/// A chosen backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selected {
    pub address: SocketAddr,
    pub transport: Transport,
}

/// The configured backends. Every backend starts up, so traffic flows before the first probe.
#[derive(Debug)]
pub struct Backends {
    list: Vec<Backend>,
}

impl Backends {
    pub fn new(cfg: &[config::Backend]) -> Backends {
        Backends {
            list: cfg
                .iter()
                .map(|b| Backend {
                    address: b.address,
                    transport: b.transport,
                    priority: b.priority,
                    weight: b.weight.max(1),
                    up: AtomicBool::new(true),
                    streak: AtomicU32::new(0),
                })
                .collect(),
        }
    }

    pub fn list(&self) -> &[Backend] {
        &self.list
    }

    /// Whether `addr` (address and port) is a backend: its traffic is PBX-side.
    pub fn is_backend(&self, addr: SocketAddr) -> bool {
        self.list.iter().any(|b| b.address == addr)
    }

    pub fn any_up(&self) -> bool {
        self.list.iter().any(|b| b.up.load(Ordering::Relaxed))
    }

    /// The backend for a request of call `call_id`: `hint` if it names a healthy backend (an
    /// in-dialog request addressed to the PBX that holds the dialog), else among the healthy
    /// backends of the best priority, weighted, by a hash of the Call-ID.
    pub fn select(&self, call_id: &str, hint: Option<SocketAddr>) -> Option<Selected> {
        let healthy = || self.list.iter().filter(|b| b.up.load(Ordering::Relaxed));
        if let Some(h) = hint {
            if let Some(b) = healthy().find(|b| b.address == h) {
                return Some(b.selected());
            }
        }
        let best = healthy().map(|b| b.priority).min()?;
        let total: u64 = healthy()
            .filter(|b| b.priority == best)
            .map(|b| u64::from(b.weight))
            .sum();
        let mut point = fnv1a(call_id.as_bytes()) % total;
        for b in healthy().filter(|b| b.priority == best) {
            if point < u64::from(b.weight) {
                return Some(b.selected());
            }
            point -= u64::from(b.weight);
        }
        None
    }

    /// Records one probe result for backend `i`; returns the new state when it changed.
    pub fn record(&self, i: usize, answered: bool, h: &Health) -> Option<bool> {
        let b = &self.list[i];
        let up = b.up.load(Ordering::Relaxed);
        if answered == up {
            b.streak.store(0, Ordering::Relaxed);
            return None;
        }
        let n = b.streak.fetch_add(1, Ordering::Relaxed) + 1;
        let needed = if up { h.fall } else { h.rise };
        if n >= needed {
            b.up.store(answered, Ordering::Relaxed);
            b.streak.store(0, Ordering::Relaxed);
            Some(answered)
        } else {
            None
        }
    }
}

impl Backend {
    fn selected(&self) -> Selected {
        Selected {
            address: self.address,
            transport: self.transport,
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }
}

/// FNV-1a: a stable hash, so every edge maps a Call-ID to the same backend.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Probes backend `i` until `stop`: an OPTIONS every `interval`, and at once again after a probe
/// that went unanswered, so a dead backend is marked down within `interval + fall × timeout`.
pub async fn probe_loop(
    backends: Arc<Backends>,
    i: usize,
    health: Health,
    edge_id: String,
    local_ip: std::net::IpAddr,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let b = &backends.list()[i];
    let labels = BackendLabels {
        backend: format!("{}/{}", b.address, b.transport),
    };
    metrics.backend_up.get_or_create(&labels).set(1);
    let timeout = Duration::from_millis(health.timeout_ms);
    let interval = Duration::from_millis(health.interval_ms);
    // A random start makes each probe's Call-ID unique across edges and restarts (a PBX that
    // remembers finished calls would otherwise take another edge's probe as a retransmission);
    // below 2^30 keeps the CSeq valid (< 2^31) for a lifetime of probes.
    let mut seq: u32 = rand::random::<u32>() >> 2;
    loop {
        seq = seq.wrapping_add(1);
        let answered = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(timeout, probe_once(b, &edge_id, local_ip, i, seq)) => {
                matches!(r, Ok(Ok(code)) if code != 503)
            }
        };
        if let Some(up) = backends.record(i, answered, &health) {
            metrics.backend_up.get_or_create(&labels).set(i64::from(up));
            if up {
                info!(backend = %b.address, "PBX backend is up");
            } else {
                warn!(backend = %b.address, "PBX backend is down: OPTIONS unanswered");
            }
        }
        let wait = if answered { interval } else { Duration::ZERO };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        if !answered {
            // A failed probe may have returned at once (ICMP refusal): keep a floor between probes.
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(timeout.min(interval / 4)) => {}
            }
        }
    }
}

/// Sends one OPTIONS and waits for its response; returns the status code.
async fn probe_once(
    b: &Backend,
    edge_id: &str,
    local_ip: std::net::IpAddr,
    i: usize,
    seq: u32,
) -> std::io::Result<u16> {
    let call_id = format!("hc-{edge_id}-{i}-{seq}");
    match b.transport {
        Transport::Udp => {
            let sock = UdpSocket::bind(SocketAddr::new(local_ip, 0)).await?;
            sock.connect(b.address).await?;
            let local = sock.local_addr()?;
            sock.send(&options(b, local, Transport::Udp, &call_id, seq))
                .await?;
            let mut buf = vec![0u8; 8192];
            loop {
                let n = sock.recv(&mut buf).await?;
                if let Some(code) = matching_status(&buf[..n], &call_id) {
                    return Ok(code);
                }
            }
        }
        Transport::Tcp | Transport::Tls => {
            let mut s = TcpStream::connect(b.address).await?;
            let local = s.local_addr()?;
            s.write_all(&options(b, local, Transport::Tcp, &call_id, seq))
                .await?;
            let mut buf = Vec::with_capacity(4096);
            let mut chunk = [0u8; 4096];
            while buf.len() < 65_536 {
                let n = s.read(&mut chunk).await?;
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(end) = crate::sip::message::head_end(&buf) {
                    if let Some(code) = matching_status(&buf[..end + 4], &call_id) {
                        return Ok(code);
                    }
                    buf.drain(..end + 4);
                }
            }
            Err(std::io::ErrorKind::UnexpectedEof.into())
        }
    }
}

fn matching_status(bytes: &[u8], call_id: &str) -> Option<u16> {
    let m = Message::parse(bytes).ok()?;
    (m.call_id() == Some(call_id)).then_some(m.status()?)
}

fn options(b: &Backend, local: SocketAddr, t: Transport, call_id: &str, seq: u32) -> Vec<u8> {
    format!(
        "OPTIONS sip:{a} SIP/2.0\r\n\
Via: SIP/2.0/{tp} {local};branch=z9hG4bKswhc{seq:x}{h:x}\r\n\
Max-Forwards: 70\r\n\
From: <sip:sipwarden@{local}>;tag=hc{seq:x}\r\n\
To: <sip:{a}>\r\n\
Call-ID: {call_id}\r\n\
CSeq: {seq} OPTIONS\r\n\
User-Agent: sipwarden-health\r\n\
Content-Length: 0\r\n\r\n",
        a = b.address,
        tp = t.via_token(),
        h = fnv1a(call_id.as_bytes()) & 0xffff_ffff,
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(list: &[(&str, u32, u32)]) -> Vec<config::Backend> {
        list.iter()
            .map(|(a, p, w)| config::Backend {
                address: a.parse().unwrap(),
                transport: Transport::Udp,
                priority: *p,
                weight: *w,
            })
            .collect()
    }

    #[test]
    fn prefers_priority_then_weight_and_sticks_per_call() {
        let b = Backends::new(&cfg(&[
            ("10.0.0.1:5060", 1, 3),
            ("10.0.0.2:5060", 1, 1),
            ("10.0.0.3:5060", 2, 1),
        ]));
        let mut counts = [0u32; 3];
        for n in 0..4000 {
            let s = b.select(&format!("call-{n}"), None).unwrap();
            counts[b.list.iter().position(|x| x.address == s.address).unwrap()] += 1;
            assert_eq!(
                b.select(&format!("call-{n}"), None),
                Some(s),
                "same call, same backend"
            );
        }
        assert_eq!(
            counts[2], 0,
            "priority 2 unused while priority 1 is healthy"
        );
        let ratio = f64::from(counts[0]) / f64::from(counts[1]);
        assert!((2.4..3.8).contains(&ratio), "weights 3:1, got {counts:?}");
    }

    #[test]
    fn fails_over_by_health_and_honours_hints() {
        let h = Health {
            interval_ms: 1000,
            timeout_ms: 100,
            fall: 2,
            rise: 1,
        };
        let b = Backends::new(&cfg(&[("10.0.0.1:5060", 1, 1), ("10.0.0.2:5060", 2, 1)]));
        assert_eq!(b.record(0, false, &h), None, "one miss is not enough");
        assert_eq!(b.record(0, false, &h), Some(false));
        assert_eq!(
            b.select("c", None).unwrap().address,
            "10.0.0.2:5060".parse().unwrap()
        );
        assert_eq!(
            b.select("c", Some("10.0.0.1:5060".parse().unwrap()))
                .unwrap()
                .address,
            "10.0.0.2:5060".parse().unwrap(),
            "a hint naming a dead backend is ignored"
        );
        assert_eq!(b.record(1, false, &h), None);
        assert_eq!(b.record(1, false, &h), Some(false));
        assert_eq!(b.select("c", None), None);
        assert!(!b.any_up());
        assert_eq!(b.record(0, true, &h), Some(true));
        assert_eq!(
            b.select("c", None).unwrap().address,
            "10.0.0.1:5060".parse().unwrap()
        );
        assert!(b.is_backend("10.0.0.2:5060".parse().unwrap()));
        assert!(!b.is_backend("10.0.0.2:5061".parse().unwrap()));
    }
}
