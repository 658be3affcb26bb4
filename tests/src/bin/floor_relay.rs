//! The load benchmark's floor: a bare relay that does nothing a proxy must do (no parsing, no
//! filter, no Via, no batching) and so shows what any relay costs on the host and adds to a
//! transaction's latency there, measured beside the edge and Kamailio in the same run.
//!
//! `floor_relay LISTEN UPSTREAM` (UDP): each source that sends to LISTEN gets a socket of its own
//! connected to UPSTREAM, as a NAT would; what arrives on LISTEN from that source leaves through
//! that socket, and what arrives on that socket goes back to the source from LISTEN. One thread
//! receives on LISTEN, one per source on its socket: one `recv` and one `send` per datagram.
//!
//! `floor_relay --tcp LISTEN UPSTREAM`: each connection accepted on LISTEN gets a connection of its
//! own to UPSTREAM, and a thread each way copies what one side's `read` returns to the other with
//! one `write` (no framing: the bytes go through as they come), as a TCP splice would.
//!
//! Runs until killed.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;

/// Larger than any datagram the benchmark's SIPp sends.
const MAX_DATAGRAM: usize = 65_535;

fn main() -> std::io::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let tcp = args.first().is_some_and(|a| a == "--tcp");
    if tcp {
        args.remove(0);
    }
    let [listen, upstream] = args.as_slice() else {
        eprintln!("usage: floor_relay [--tcp] LISTEN UPSTREAM (socket addresses)");
        std::process::exit(2);
    };
    let parse = |name: &str, s: &str| -> SocketAddr {
        s.parse().unwrap_or_else(|e| {
            eprintln!("{name} {s:?} is not a socket address: {e}");
            std::process::exit(2)
        })
    };
    let (listen, upstream) = (parse("LISTEN", listen), parse("UPSTREAM", upstream));
    if tcp {
        relay_tcp(listen, upstream)
    } else {
        relay_udp(listen, upstream)
    }
}

fn relay_udp(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<()> {
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

fn relay_tcp(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen)?;
    loop {
        let (front, _) = listener.accept()?;
        // A connection the upstream refuses is closed at once: the peer sees it fail.
        let Ok(back) = TcpStream::connect(upstream) else {
            continue;
        };
        // Each write goes out at once, as a proxy's must (SIPp sets the same on its side).
        let _ = front.set_nodelay(true);
        let _ = back.set_nodelay(true);
        let (front2, back2) = (front.try_clone()?, back.try_clone()?);
        std::thread::spawn(move || copy(front, back));
        std::thread::spawn(move || copy(back2, front2));
    }
}

/// Copies what `from` delivers to `to`, one `write_all` per `read`, until either side ends; then
/// shuts both down so the other direction's thread ends too.
fn copy(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
