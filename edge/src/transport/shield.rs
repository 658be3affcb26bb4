//! The kernel shield: banned sources that flood (more than `udp.shield_pps` datagrams a second
//! dropped by the gate) are compiled into a classic BPF socket filter on every UDP socket, so the
//! kernel drops their datagrams before they are queued — no copy to user space, no wake-up.
//!
//! A banned source is dropped by the gate anyway, so the filter changes where, not whether: it
//! holds only sources the gate itself dropped as banned (never a trusted or allowlisted party), and
//! a source leaves it as soon as its ban ends or it becomes allowed (checked every second). Classic
//! BPF needs no privilege and has no maps, so the filter is a chain of comparisons: at most
//! [`MAX_V4`] IPv4 and [`MAX_V6`] IPv6 sources, the oldest making room for a new one. The program
//! reads the IP version first, so one filter serves IPv4, IPv6 and dual-stack sockets (an IPv4
//! datagram on an IPv6 socket is still an IPv4 packet). Datagrams the kernel drops are not counted
//! by the edge (the filter cannot count); `sipwarden_edge_shielded_sources` says how many sources
//! are behind it.

use socket2::{SockFilter, SockRef};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};

/// Most IPv4 sources in the filter (one instruction each; its jumps reach at most 255 ahead).
pub const MAX_V4: usize = 200;
/// Most IPv6 sources in the filter (nine instructions each).
pub const MAX_V6: usize = 64;

/// Classic BPF `BPF_RET | BPF_K`: return the constant (a filter's verdict, or a `SO_REUSEPORT`
/// program's socket index).
pub(super) const RET_K: u16 = 0x06;

/// The classic BPF program dropping datagrams from `v4` and `v6` and accepting the rest.
pub fn program(v4: &[Ipv4Addr], v6: &[Ipv6Addr]) -> Vec<SockFilter> {
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const LD_B_ABS: u16 = 0x30; // BPF_LD | BPF_B | BPF_ABS
    const RSH_K: u16 = 0x74; // BPF_ALU | BPF_RSH | BPF_K
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    /// SKF_NET_OFF (-0x100000): offsets from the network header, whatever the transport header.
    const NET: u32 = 0xfff0_0000;
    const ACCEPT: u32 = u32::MAX;
    const DROP: u32 = 0;
    let v4 = &v4[..v4.len().min(MAX_V4)];
    let v6 = &v6[..v6.len().min(MAX_V6)];
    let mut p = Vec::with_capacity(7 + v4.len() + 9 * v6.len());
    // The version nibble: 4 goes on, anything else skips the IPv4 section.
    p.push(SockFilter::new(LD_B_ABS, 0, 0, NET));
    p.push(SockFilter::new(RSH_K, 0, 0, 4));
    let v4_len = v4.len() + 3;
    p.push(SockFilter::new(JEQ_K, 0, v4_len as u8, 4));
    // IPv4: source address at 12; each match jumps to the drop after the accept.
    p.push(SockFilter::new(LD_W_ABS, 0, 0, NET + 12));
    for (i, ip) in v4.iter().enumerate() {
        let to_drop = (v4.len() - i) as u8;
        p.push(SockFilter::new(JEQ_K, to_drop, 0, u32::from(*ip)));
    }
    p.push(SockFilter::new(RET_K, 0, 0, ACCEPT));
    p.push(SockFilter::new(RET_K, 0, 0, DROP));
    // IPv6: source address at 8, four words, each block ending in its own drop so no jump is long.
    for ip in v6 {
        let o = ip.octets();
        for w in 0..4 {
            let word = u32::from_be_bytes([o[4 * w], o[4 * w + 1], o[4 * w + 2], o[4 * w + 3]]);
            // A mismatch skips the rest of the block: 2 per remaining word, then the drop.
            let to_next = (2 * (3 - w) + 1) as u8;
            p.push(SockFilter::new(LD_W_ABS, 0, 0, NET + 8 + 4 * w as u32));
            p.push(SockFilter::new(JEQ_K, 0, to_next, word));
        }
        p.push(SockFilter::new(RET_K, 0, 0, DROP));
    }
    p.push(SockFilter::new(RET_K, 0, 0, ACCEPT));
    p
}

/// Sources behind the filter and the sockets it is attached to.
pub struct Shield {
    /// Datagrams a second, dropped by the gate as banned, that put a source behind the filter
    /// (0: never).
    pub pps: u32,
    sockets: Vec<Arc<UdpSocket>>,
    /// Source → when it went behind the filter (Unix ms).
    sources: Mutex<HashMap<IpAddr, u64>>,
}

impl Shield {
    /// A shield over `sockets`.
    pub fn new(pps: u32, sockets: &[Arc<UdpSocket>]) -> Shield {
        Shield {
            pps,
            sockets: sockets.to_vec(),
            sources: Mutex::new(HashMap::new()),
        }
    }

    /// A receive thread reports `ip`, which the gate dropped as banned more than `pps` times in a
    /// second. Returns whether the filter changed.
    pub fn add(&self, ip: IpAddr, now_ms: u64) -> bool {
        if self.pps == 0 || self.sockets.is_empty() {
            return false;
        }
        let ip = ip.to_canonical();
        let mut s = self.sources.lock().expect("shield lock");
        if s.contains_key(&ip) {
            return false;
        }
        let cap = if ip.is_ipv4() { MAX_V4 } else { MAX_V6 };
        let same_family = |a: &IpAddr| a.is_ipv4() == ip.is_ipv4();
        if s.keys().filter(|a| same_family(a)).count() >= cap {
            // The oldest of its family makes room; if it still floods it comes back.
            let oldest = s
                .iter()
                .filter(|(a, _)| same_family(a))
                .min_by_key(|(_, at)| **at)
                .map(|(a, _)| *a);
            if let Some(old) = oldest {
                s.remove(&old);
            }
        }
        s.insert(ip, now_ms);
        self.install(&s);
        true
    }

    /// Drops the sources `still_banned` no longer holds; returns how many remain.
    pub fn prune(&self, still_banned: impl Fn(SocketAddr) -> bool) -> usize {
        let mut s = self.sources.lock().expect("shield lock");
        let before = s.len();
        s.retain(|ip, _| still_banned(SocketAddr::new(*ip, 0)));
        if s.len() != before {
            self.install(&s);
        }
        s.len()
    }

    fn install(&self, sources: &HashMap<IpAddr, u64>) {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for ip in sources.keys() {
            match ip {
                IpAddr::V4(a) => v4.push(*a),
                IpAddr::V6(a) => v6.push(*a),
            }
        }
        for sock in &self.sockets {
            let r = if sources.is_empty() {
                SockRef::from(sock.as_ref()).detach_filter()
            } else {
                SockRef::from(sock.as_ref()).attach_filter(&program(&v4, &v6))
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, "cannot install the kernel shield filter");
            }
        }
        if !sources.is_empty() {
            tracing::info!(ipv4 = v4.len(), ipv6 = v6.len(), "kernel shield updated");
        }
    }

    pub fn len(&self) -> usize {
        self.sources.lock().expect("shield lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A receive thread's count of banned-source drops in the current second.
#[derive(Default)]
pub struct DropTally {
    second: u64,
    counts: HashMap<IpAddr, u32, foldhash::fast::RandomState>,
}

impl DropTally {
    /// Counts a gate drop of banned `source` at `now_ms`; reports to `shield` any source that
    /// passed its rate in the second that just ended.
    pub fn count(&mut self, shield: &Shield, source: IpAddr, now_ms: u64) {
        let ip = source.to_canonical();
        let second = now_ms / 1000;
        if second != self.second {
            for (ip, n) in self.counts.drain() {
                if n >= shield.pps {
                    shield.add(ip, now_ms);
                }
            }
            self.second = second;
        }
        if self.counts.len() < 10_000 {
            *self.counts.entry(ip).or_insert(0) += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn bound(ip: &str) -> Arc<UdpSocket> {
        let s = UdpSocket::bind((ip, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        Arc::new(s)
    }

    /// Sends from `from` to `to` and says whether `to` received it.
    fn delivered(from: &UdpSocket, to: &UdpSocket, tag: &[u8]) -> bool {
        delivered_at(from, to.local_addr().unwrap(), to, tag)
    }

    /// Sends from `from` to `dest` and says whether `to` (bound there) received it.
    fn delivered_at(from: &UdpSocket, dest: SocketAddr, to: &UdpSocket, tag: &[u8]) -> bool {
        from.send_to(tag, dest).unwrap();
        let mut buf = [0u8; 64];
        // Bounded: the read timeout ends the wait.
        loop {
            match to.recv(&mut buf) {
                Ok(n) if &buf[..n] == tag => return true,
                Ok(_) => continue,
                Err(_) => return false,
            }
        }
    }

    #[test]
    fn the_filter_drops_shielded_sources_in_the_kernel_and_lifts_with_the_ban() {
        let edge = bound("127.0.0.1");
        let attacker = bound("127.0.0.66");
        let phone = bound("127.0.0.67");
        let shield = Shield::new(100, std::slice::from_ref(&edge));
        assert!(delivered(&attacker, &edge, b"before"));
        let mut tally = DropTally::default();
        for i in 0..150 {
            tally.count(&shield, "127.0.0.66".parse().unwrap(), 5_000 + i);
        }
        assert!(shield.is_empty(), "reported only when the second ends");
        tally.count(&shield, "127.0.0.67".parse().unwrap(), 6_000);
        assert_eq!(shield.len(), 1);
        assert!(!delivered(&attacker, &edge, b"during"));
        assert!(delivered(&phone, &edge, b"phone"));
        // The ban ends: the filter goes.
        assert_eq!(shield.prune(|_| false), 0);
        assert!(delivered(&attacker, &edge, b"after"));
    }

    #[test]
    fn ipv6_sources_are_dropped_and_ipv4_passes_a_dual_stack_socket() {
        // A dual-stack socket: IPv6 from ::1, IPv4 from 127.0.0.67 (arriving as an IPv4 packet).
        let edge = Arc::new(UdpSocket::bind("[::]:0").unwrap());
        edge.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let port = edge.local_addr().unwrap().port();
        let edge_v6 = Arc::new(UdpSocket::bind("[::1]:0").unwrap());
        edge_v6
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let attacker = UdpSocket::bind("[::1]:0").unwrap();
        let phone = bound("127.0.0.67");
        let to = |s: &UdpSocket, tag: &[u8], target: &UdpSocket| {
            let dest: SocketAddr = match s.local_addr().unwrap() {
                SocketAddr::V6(_) => format!("[::1]:{}", target.local_addr().unwrap().port()),
                SocketAddr::V4(_) => format!("127.0.0.1:{port}"),
            }
            .parse()
            .unwrap();
            delivered_at(s, dest, target, tag)
        };
        let shield = Shield::new(1, &[edge.clone(), edge_v6.clone()]);
        assert!(to(&attacker, b"v6 before", &edge));
        assert!(shield.add("::1".parse().unwrap(), 1));
        assert!(!to(&attacker, b"v6 during", &edge), "dual-stack socket");
        assert!(!to(&attacker, b"v6 only", &edge_v6), "IPv6-only socket");
        assert!(
            to(&phone, b"v4 phone", &edge),
            "IPv4 on the dual-stack socket"
        );
        // IPv4-mapped reports land on the IPv4 source.
        assert!(shield.add("::ffff:127.0.0.67".parse().unwrap(), 2));
        assert!(!to(&phone, b"v4 shielded", &edge));
        assert_eq!(shield.prune(|_| false), 0);
        assert!(to(&attacker, b"v6 after", &edge));
        assert!(to(&phone, b"v4 after", &edge));
    }

    #[test]
    fn programs_stay_within_jump_range() {
        let many4: Vec<Ipv4Addr> = (0..1000u32).map(Ipv4Addr::from).collect();
        let many6: Vec<Ipv6Addr> = (0..1000u128).map(Ipv6Addr::from).collect();
        let p = program(&many4, &many6);
        assert_eq!(p.len(), 7 + MAX_V4 + 9 * MAX_V6);
        assert!(p.len() <= 4096, "BPF_MAXINSNS");
        assert_eq!(program(&[], &[]).len(), 7);
    }
}
