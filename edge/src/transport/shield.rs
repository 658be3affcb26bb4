//! The kernel shield: banned IPv4 sources that flood (more than `udp.shield_pps` datagrams a second
//! dropped by the gate) are compiled into a classic BPF socket filter on every IPv4 UDP socket, so
//! the kernel drops their datagrams before they are queued — no copy to user space, no wake-up.
//!
//! A banned source is dropped by the gate anyway, so the filter changes where, not whether: it
//! holds only sources the gate itself dropped as banned (never a trusted or allowlisted party), and
//! a source leaves it as soon as its ban ends or it becomes allowed (checked every second). Classic
//! BPF needs no privilege and has no maps, so the filter is a chain of at most [`MAX_SOURCES`]
//! comparisons. Datagrams the kernel drops are not counted by the edge (the filter cannot count);
//! `sipwarden_edge_shielded_sources` says how many sources are behind it.

use socket2::{SockFilter, SockRef};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};

/// Most sources in the filter (each is one instruction; jumps reach at most 255 ahead).
pub const MAX_SOURCES: usize = 200;

/// The classic BPF program dropping datagrams from `sources` (IPv4) and accepting the rest.
pub fn program(sources: &[Ipv4Addr]) -> Vec<SockFilter> {
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    /// SKF_NET_OFF (-0x100000) + 12: the IPv4 source address, whatever the transport header.
    const SRC: u32 = 0xfff0_0000 + 12;
    let n = sources.len().min(MAX_SOURCES);
    let mut p = Vec::with_capacity(n + 3);
    p.push(SockFilter::new(LD_W_ABS, 0, 0, SRC));
    for (i, ip) in sources[..n].iter().enumerate() {
        // From instruction i + 1 to the drop at n + 2.
        let to_drop = (n - i) as u8;
        p.push(SockFilter::new(JEQ_K, to_drop, 0, u32::from(*ip)));
    }
    p.push(SockFilter::new(RET_K, 0, 0, u32::MAX));
    p.push(SockFilter::new(RET_K, 0, 0, 0));
    p
}

/// Sources behind the filter and the sockets it is attached to.
pub struct Shield {
    /// Datagrams a second, dropped by the gate as banned, that put a source behind the filter
    /// (0: never).
    pub pps: u32,
    sockets: Vec<Arc<UdpSocket>>,
    /// Source → when it went behind the filter (Unix ms).
    sources: Mutex<HashMap<Ipv4Addr, u64>>,
}

impl Shield {
    /// A shield over the IPv4 sockets among `sockets`.
    pub fn new(pps: u32, sockets: &[Arc<UdpSocket>]) -> Shield {
        Shield {
            pps,
            sockets: sockets
                .iter()
                .filter(|s| s.local_addr().is_ok_and(|a| a.is_ipv4()))
                .cloned()
                .collect(),
            sources: Mutex::new(HashMap::new()),
        }
    }

    /// A receive thread reports `ip`, which the gate dropped as banned more than `pps` times in a
    /// second. Returns whether the filter changed.
    pub fn add(&self, ip: Ipv4Addr, now_ms: u64) -> bool {
        if self.pps == 0 || self.sockets.is_empty() {
            return false;
        }
        let mut s = self.sources.lock().expect("shield lock");
        if s.contains_key(&ip) {
            return false;
        }
        if s.len() >= MAX_SOURCES {
            // The oldest makes room; if it still floods it comes back.
            if let Some(old) = s.iter().min_by_key(|(_, at)| **at).map(|(ip, _)| *ip) {
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
        s.retain(|ip, _| still_banned(SocketAddr::new(IpAddr::V4(*ip), 0)));
        if s.len() != before {
            self.install(&s);
        }
        s.len()
    }

    fn install(&self, sources: &HashMap<Ipv4Addr, u64>) {
        let list: Vec<Ipv4Addr> = sources.keys().copied().collect();
        for sock in &self.sockets {
            let r = if list.is_empty() {
                SockRef::from(sock.as_ref()).detach_filter()
            } else {
                SockRef::from(sock.as_ref()).attach_filter(&program(&list))
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, "cannot install the kernel shield filter");
            }
        }
        if !list.is_empty() {
            tracing::info!(sources = list.len(), "kernel shield updated");
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
    counts: HashMap<Ipv4Addr, u32, foldhash::fast::RandomState>,
}

impl DropTally {
    /// Counts a gate drop of banned `source` at `now_ms`; reports to `shield` any source that
    /// passed its rate in the second that just ended.
    pub fn count(&mut self, shield: &Shield, source: IpAddr, now_ms: u64) {
        let IpAddr::V4(ip) = source else { return };
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
        from.send_to(tag, to.local_addr().unwrap()).unwrap();
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
    fn programs_stay_within_jump_range() {
        let many: Vec<Ipv4Addr> = (0..1000u32).map(Ipv4Addr::from).collect();
        assert_eq!(program(&many).len(), MAX_SOURCES + 3);
        assert_eq!(program(&[]).len(), 3);
    }
}
