//! Transports: UDP sockets and TCP connections carry bytes in and out; the [`Dispatcher`] hands each
//! message to the proxy and carries out its [`Action`]. The transport knows nothing of policy.
//!
//! - [`udp`]: several `SO_REUSEPORT` sockets per listener, one receive task each.
//! - [`tcp`]: accept with global and per-source limits, header and idle timeouts, direct writes
//!   (a writer task per connection for what the socket does not take at once) and a registry so
//!   responses and PBX→phone requests reuse the phone's connection.
//! - [`framer`]: Content-Length framing and keep-alives on streams.

pub mod framer;
pub mod shield;
pub mod tcp;
pub mod udp;

use crate::metrics::{MessageCounters, MessageLabels, Metrics, TransportLabels};
use crate::proxy::{Action, Dest, Inbound, Outcome};
use crate::service::Service;
use crate::sip::Transport;
use std::net::SocketAddr;
use std::net::UdpSocket;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tracing::{debug, warn};

/// How a reply gets back to where a message came from.
#[derive(Clone)]
pub enum ReplyPath {
    Udp(Arc<UdpSocket>),
    Stream(Arc<tcp::Conn>),
}

/// What a receive loop sends a few messages at a time instead of message by message (every
/// `udp.flush_every` / `tcp.flush_every` messages and at the end of its batch or read):
/// datagrams that leave through the listener a UDP receive thread serves (one `sendmmsg`), and
/// stream writes joined per connection (one send for what it holds for a connection — on
/// loopback each send also runs the receiver's TCP input and wake-up, the largest kernel cost of a
/// relayed message).
pub struct Outbox {
    listener: usize,
    queue: Vec<(SocketAddr, Vec<u8>)>,
    streams: Vec<(Arc<tcp::Conn>, Vec<u8>)>,
}

impl Outbox {
    pub fn new(listener: usize) -> Outbox {
        Outbox {
            listener,
            queue: Vec::with_capacity(udp::BATCH),
            streams: Vec::new(),
        }
    }

    /// For a stream reader: datagrams go out at once, stream writes wait for the batch's end.
    pub fn streams_only() -> Outbox {
        Outbox {
            listener: usize::MAX,
            queue: Vec::new(),
            streams: Vec::new(),
        }
    }

    /// Holds `bytes` for `conn`, after what is already held for it.
    fn hold(&mut self, conn: &Arc<tcp::Conn>, bytes: Vec<u8>) {
        match self.streams.iter_mut().find(|(c, _)| Arc::ptr_eq(c, conn)) {
            Some((_, held)) => held.extend_from_slice(&bytes),
            None => self.streams.push((conn.clone(), bytes)),
        }
    }

    /// Writes the held stream bytes, each connection's in one send.
    pub fn flush_streams(&mut self, d: &Dispatcher) {
        for (conn, bytes) in self.streams.drain(..) {
            if !conn.send(bytes.into()) {
                d.send_error(Transport::Tcp);
            }
        }
    }
}

/// Runs the service (firewall and proxy) over received messages and sends what it decides.
pub struct Dispatcher {
    pub service: Arc<Service>,
    pub metrics: Arc<Metrics>,
    /// UDP sockets per listener index (empty for TCP listeners).
    pub udp: Vec<Vec<Arc<UdpSocket>>>,
    pub tcp: Arc<tcp::Registry>,
    /// Flooding banned sources dropped in the kernel.
    pub shield: shield::Shield,
    counters: MessageCounters,
    log_budget: LogBudget,
}

impl Dispatcher {
    pub fn new(
        service: Arc<Service>,
        metrics: Arc<Metrics>,
        udp: Vec<Vec<Arc<UdpSocket>>>,
        tcp: Arc<tcp::Registry>,
        shield_pps: u32,
    ) -> Dispatcher {
        let all: Vec<Arc<UdpSocket>> = udp.iter().flatten().cloned().collect();
        Dispatcher {
            shield: shield::Shield::new(shield_pps, &all),
            service,
            counters: MessageCounters::new(metrics.messages.clone()),
            metrics,
            udp,
            tcp,
            log_budget: LogBudget::default(),
        }
    }

    /// Handles one received message end to end. UDP datagrams for `outbox`'s listener are queued
    /// there (the receive thread sends its batch at once); everything else is sent now, without
    /// blocking. Returns whether the gate dropped it as coming from a banned source.
    pub fn dispatch(
        self: &Arc<Self>,
        inb: Inbound<'_>,
        reply: &ReplyPath,
        outbox: Option<&mut Outbox>,
    ) -> bool {
        let handled = self.service.handle(&inb);
        let banned = handled.banned;
        let (decision, kind, method) = (handled.decision, handled.kind, handled.method);
        self.counters.inc(&MessageLabels {
            kind,
            method,
            direction: decision.side.label(),
            outcome: decision.outcome.label(),
        });
        if let Some(reason) = &decision.reason {
            if self.log_budget.allow() {
                let level_warn = matches!(decision.outcome, Outcome::Malformed)
                    || reason.contains("flow token")
                    || reason.contains("forged");
                if level_warn {
                    warn!(source = %inb.source, transport = %inb.transport, method, reason = %reason, "message not forwarded");
                } else {
                    debug!(source = %inb.source, transport = %inb.transport, method, reason = %reason, "message not forwarded");
                }
            }
        }
        match decision.action {
            Action::Drop => {}
            Action::Reply(bytes) => self.reply(reply, inb.source, bytes, outbox),
            Action::Forward {
                transport,
                dest,
                listener,
                bytes,
            } => self.send(transport, dest, listener, bytes, outbox),
        }
        banned
    }

    fn reply(&self, path: &ReplyPath, to: SocketAddr, bytes: Vec<u8>, outbox: Option<&mut Outbox>) {
        let ok = match (path, outbox) {
            (ReplyPath::Udp(_), Some(out)) => {
                out.queue.push((to, bytes));
                true
            }
            (ReplyPath::Udp(sock), None) => udp::send_now(sock, &bytes, to),
            (ReplyPath::Stream(conn), Some(out)) => {
                out.hold(conn, bytes);
                true
            }
            (ReplyPath::Stream(conn), None) => conn.send(bytes.into()),
        };
        if !ok {
            self.send_error(Transport::Udp);
        }
    }

    /// Sends `bytes` to `dest` over `transport` (queued in `outbox` when it is a datagram for
    /// the outbox's listener).
    pub fn send(
        self: &Arc<Self>,
        transport: Transport,
        dest: Dest,
        listener: usize,
        bytes: Vec<u8>,
        outbox: Option<&mut Outbox>,
    ) {
        let addr = match dest {
            Dest::Addr(a) => a,
            Dest::Host(host, port) => {
                // Rare (PBX-side targets by name): resolve off the receive path.
                let me = self.clone();
                tokio::spawn(async move {
                    match tokio::net::lookup_host((host.as_str(), port)).await {
                        Ok(mut addrs) => match addrs.next() {
                            Some(a) => me.send_to_addr(transport, a, listener, bytes, None),
                            None => me.send_error(transport),
                        },
                        Err(e) => {
                            debug!(%host, error = %e, "cannot resolve next hop");
                            me.send_error(transport);
                        }
                    }
                });
                return;
            }
        };
        self.send_to_addr(transport, addr, listener, bytes, outbox);
    }

    fn send_to_addr(
        self: &Arc<Self>,
        transport: Transport,
        addr: SocketAddr,
        listener: usize,
        bytes: Vec<u8>,
        outbox: Option<&mut Outbox>,
    ) {
        match transport {
            Transport::Udp => {
                if let Some(out) = outbox.filter(|o| o.listener == listener) {
                    out.queue.push((addr, bytes));
                    return;
                }
                let sock = self
                    .udp
                    .get(listener)
                    .and_then(|s| s.first())
                    .or_else(|| self.udp.iter().find_map(|s| s.first()));
                let ok = match sock {
                    Some(s) => udp::send_now(s, &bytes, addr),
                    None => false,
                };
                if !ok {
                    self.send_error(transport);
                }
            }
            Transport::Tcp | Transport::Tls => {
                if !self.tcp.send(self, addr, listener, bytes, outbox) {
                    self.send_error(transport);
                }
            }
        }
    }

    /// Counts and logs (within the log budget) input that never reached the parser.
    pub fn malformed(&self, transport: Transport, source: SocketAddr, why: &str) {
        self.counters.inc(&MessageLabels {
            kind: "request",
            method: "unknown",
            direction: if self.service.proxy.is_pbx_addr(source) {
                "from_pbx"
            } else {
                "from_internet"
            },
            outcome: Outcome::Malformed.label(),
        });
        if self.log_budget.allow() {
            warn!(%source, %transport, reason = why, "malformed input dropped");
        }
    }

    /// A datagram over the size limit.
    pub fn oversize(&self, transport: Transport, source: SocketAddr) {
        self.malformed(transport, source, "datagram exceeds udp.max_datagram");
    }

    pub fn send_error(&self, transport: Transport) {
        self.metrics
            .send_errors
            .get_or_create(&TransportLabels {
                transport: transport.as_str(),
            })
            .inc();
    }
}

/// Caps "message not forwarded" log lines at 50 a second, so garbage floods cannot flood the log;
/// the per-outcome counters still count every message.
#[derive(Default)]
struct LogBudget {
    /// Second (Unix time) and lines used in it, packed as `second << 16 | used`.
    state: AtomicU64,
}

impl LogBudget {
    const PER_SECOND: u64 = 50;

    fn allow(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let cur = self.state.load(Ordering::Relaxed);
        let (sec, used) = (cur >> 16, cur & 0xffff);
        let next = if sec == now {
            (now << 16) | (used + 1)
        } else {
            now << 16 | 1
        };
        if sec == now && used >= Self::PER_SECOND {
            return false;
        }
        self.state
            .compare_exchange(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
}
