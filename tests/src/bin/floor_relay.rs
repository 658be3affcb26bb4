//! The load benchmark's floor: a bare UDP relay that does nothing a proxy must do (no parsing, no
//! filter, no Via, no batching) and so shows what any relay costs on the host and adds to a
//! transaction's latency there, measured beside the edge and Kamailio in the same run.
//!
//! `floor_relay LISTEN UPSTREAM`: each source that sends to LISTEN gets a socket of its own
//! connected to UPSTREAM, as a NAT would; what arrives on LISTEN from that source leaves through
//! that socket, and what arrives on that socket goes back to the source from LISTEN. One thread
//! receives on LISTEN, one per source on its socket: one `recv` and one `send` per datagram.
//! Runs until killed.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;

/// Larger than any datagram the benchmark's SIPp sends.
const MAX_DATAGRAM: usize = 65_535;

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream] = args.as_slice() else {
        eprintln!("usage: floor_relay LISTEN UPSTREAM (socket addresses)");
        std::process::exit(2);
    };
    let parse = |name: &str, s: &str| -> SocketAddr {
        s.parse().unwrap_or_else(|e| {
            eprintln!("{name} {s:?} is not a socket address: {e}");
            std::process::exit(2)
        })
    };
    let (listen, upstream) = (parse("LISTEN", listen), parse("UPSTREAM", upstream));
    let front = Arc::new(UdpSocket::bind(listen)?);
    let mut flows: HashMap<SocketAddr, UdpSocket> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, source) = front.recv_from(&mut buf)?;
        let sock = match flows.get(&source) {
            Some(s) => s,
            None => {
                let s = UdpSocket::bind(SocketAddr::new(listen.ip(), 0))?;
                s.connect(upstream)?;
                let (back, front) = (s.try_clone()?, front.clone());
                std::thread::spawn(move || back_to(source, &back, &front));
                flows.entry(source).or_insert(s)
            }
        };
        // A refused send (the upstream gone, a full buffer) loses the datagram, as a network
        // would: SIPp retransmits or counts it failed.
        let _ = sock.send(&buf[..n]);
    }
}

/// Relays what arrives on `back` to `source` through `front`, until `back` fails for good.
fn back_to(source: SocketAddr, back: &UdpSocket, front: &UdpSocket) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        match back.recv(&mut buf) {
            Ok(n) => {
                let _ = front.send_to(&buf[..n], source);
            }
            // The upstream's port unreachable (an ICMP error on a connected socket): the next
            // datagram may find it back.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
            Err(_) => return,
        }
    }
}
