//! UDP listeners: `sockets` sockets bound to one address with `SO_REUSEPORT` so the kernel spreads
//! datagrams over several receive tasks.

use super::{Dispatcher, ReplyPath};
use crate::proxy::Inbound;
use crate::sip::Transport;
use socket2::{Domain, Protocol, Socket, Type};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

/// Binds `n` sockets to `addr` (the first one resolves port 0 for the rest).
pub fn bind(addr: SocketAddr, n: usize) -> std::io::Result<Vec<Arc<UdpSocket>>> {
    let mut out = Vec::with_capacity(n);
    let mut at = addr;
    for _ in 0..n {
        let s = Socket::new(Domain::for_address(at), Type::DGRAM, Some(Protocol::UDP))?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        let _ = s.set_recv_buffer_size(4 << 20);
        let _ = s.set_send_buffer_size(4 << 20);
        s.set_nonblocking(true)?;
        s.bind(&at.into())?;
        let sock = UdpSocket::from_std(s.into())?;
        at = sock.local_addr()?;
        out.push(Arc::new(sock));
    }
    Ok(out)
}

/// Receives datagrams until `stop`, each handed to the dispatcher. Datagrams longer than
/// `max_datagram` and keep-alives (CRLFs, NULs) are dropped here.
pub async fn recv_loop(
    sock: Arc<UdpSocket>,
    listener: usize,
    max_datagram: usize,
    dispatcher: Arc<Dispatcher>,
    stop: CancellationToken,
) {
    let mut buf = vec![0u8; max_datagram + 1];
    let reply = ReplyPath::Udp(sock.clone());
    loop {
        let (n, source) = tokio::select! {
            _ = stop.cancelled() => return,
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                // ICMP errors surface here on Linux; they concern an earlier send, not this socket.
                Err(_) => continue,
            },
        };
        let data = &buf[..n];
        if data.iter().all(|b| matches!(b, b'\r' | b'\n' | b' ' | 0)) {
            continue;
        }
        if n > max_datagram {
            dispatcher.oversize(Transport::Udp, source);
            continue;
        }
        let inb = Inbound {
            bytes: data,
            source,
            transport: Transport::Udp,
            listener,
        };
        dispatcher.dispatch(inb, &reply).await;
    }
}
