//! TCP: accept with a global connection cap and a per-source cap, frame by Content-Length, close
//! slow (header timeout) and idle connections, and keep a registry of live connections by peer so
//! responses and PBX→phone requests go back over the phone's own connection (it may be behind NAT).
//!
//! Sending writes straight to the socket from the thread that decided it ([`Conn::send`]) when
//! nothing is queued ahead; only what the socket will not take now waits for the connection's
//! writer task. A message costs no task hand-off (measured: the hand-off and the worker wake-up it
//! caused were a third of the edge's CPU per relayed message).

use super::framer::{Frame, FrameError, Framer};
use super::{Dispatcher, Outbox, ReplyPath};
use crate::config;
use crate::metrics::{Metrics, ReasonLabels};
use crate::proxy::Inbound;
use crate::sip::Transport;
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

/// Messages queued per connection before sends to it fail (a stalled peer must not grow memory).
const WRITE_QUEUE: usize = 256;

/// Messages a connection's task handles before it lets the runtime's other tasks run, when its
/// socket keeps having more to read. Reads that find data never wait, so without this a busy
/// connection (a trunk, or a UAC's one connection under load) kept the worker for as long as its
/// peer kept sending, and the responses coming back on the PBX's connection — on the same worker
/// when the edge has one core — waited behind it. 32 messages are ~0.25 ms of work here; a yield
/// costs a few hundred nanoseconds.
const YIELD_EVERY: usize = 32;

type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The sending side of one connection.
pub struct Conn {
    stream: TcpStream,
    queue: Mutex<Queue>,
    /// Wakes the writer task: bytes were queued, or the connection is closing.
    wake: Notify,
}

#[derive(Default)]
struct Queue {
    /// Bytes the socket has not taken yet, oldest first (the first may be partly written).
    pending: VecDeque<Bytes>,
    closed: bool,
}

impl Conn {
    fn new(stream: TcpStream) -> Arc<Conn> {
        Arc::new(Conn {
            stream,
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
        })
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `bytes` after whatever is queued: written now, without blocking, when nothing is
    /// ahead of it, else queued for the writer task. `false` when the connection is closed or
    /// its queue is full (a stalled peer must not grow memory).
    pub fn send(&self, bytes: Bytes) -> bool {
        let mut q = self.queue();
        if q.closed {
            return false;
        }
        if !q.pending.is_empty() {
            if q.pending.len() >= WRITE_QUEUE {
                return false;
            }
            q.pending.push_back(bytes);
            return true;
        }
        // Written under the lock, so two senders cannot interleave their bytes.
        let mut at = 0;
        while at < bytes.len() {
            match self.stream.try_write(&bytes[at..]) {
                // A socket that takes nothing is full: the writer task waits for it.
                Ok(0) => break,
                Ok(n) => at += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    q.closed = true;
                    drop(q);
                    self.wake.notify_one();
                    return false;
                }
            }
        }
        if at < bytes.len() {
            q.pending.push_back(bytes.slice(at..));
            drop(q);
            self.wake.notify_one();
        }
        true
    }

    /// No more sends; the writer task finishes what is queued and shuts the write side.
    fn close(&self) {
        self.queue().closed = true;
        self.wake.notify_one();
    }

    /// The writer task: drains what [`Conn::send`] could not write at once.
    async fn write_queued(self: Arc<Self>) {
        loop {
            let (front, closed) = {
                let q = self.queue();
                (q.pending.front().cloned(), q.closed)
            };
            let Some(front) = front else {
                if closed {
                    break;
                }
                self.wake.notified().await;
                continue;
            };
            if self.stream.writable().await.is_err() {
                break;
            }
            match self.stream.try_write(&front) {
                Ok(0) => break,
                Ok(n) => {
                    let mut q = self.queue();
                    if n >= front.len() {
                        q.pending.pop_front();
                    } else if let Some(b) = q.pending.front_mut() {
                        *b = b.slice(n..);
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(_) => break,
            }
        }
        let mut q = self.queue();
        q.closed = true;
        q.pending.clear();
        drop(q);
        let _ = socket2::SockRef::from(&self.stream).shutdown(std::net::Shutdown::Write);
    }
}

/// Connections by peer, and what waits for the ones being opened.
#[derive(Default)]
struct Conns {
    live: Map<SocketAddr, Arc<Conn>>,
    /// Messages for a peer whose connection the edge is opening, in the order sent: they go out
    /// first on it (a burst to a new peer opens one connection and keeps its order).
    connecting: Map<SocketAddr, Vec<Bytes>>,
}

/// Live connections and the limits on them.
pub struct Registry {
    conns: Mutex<Conns>,
    per_source: Mutex<Map<IpAddr, usize>>,
    slots: Arc<Semaphore>,
    cfg: config::Tcp,
    metrics: Arc<Metrics>,
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Registry {
    pub fn new(
        cfg: config::Tcp,
        metrics: Arc<Metrics>,
        tracker: TaskTracker,
        stop: CancellationToken,
    ) -> Registry {
        Registry {
            conns: Mutex::new(Conns::default()),
            per_source: Mutex::new(Map::default()),
            slots: Arc::new(Semaphore::new(cfg.max_connections)),
            cfg,
            metrics,
            tracker,
            stop,
        }
    }

    fn closed(&self, reason: &'static str) {
        self.metrics
            .tcp_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Sends `bytes` to `addr` on its live connection (held in `outbox` until its batch ends,
    /// when there is one), or opens one. `false` when it cannot be queued at all.
    pub fn send(
        &self,
        d: &Arc<Dispatcher>,
        addr: SocketAddr,
        listener: usize,
        bytes: Vec<u8>,
        outbox: Option<&mut Outbox>,
    ) -> bool {
        let mut conns = self.conns.lock().expect("registry lock");
        if let Some(conn) = conns.live.get(&addr).cloned() {
            drop(conns);
            return match outbox {
                Some(out) => {
                    out.hold(&conn, bytes);
                    true
                }
                None => conn.send(bytes.into()),
            };
        }
        if let Some(waiting) = conns.connecting.get_mut(&addr) {
            if waiting.len() >= WRITE_QUEUE {
                return false;
            }
            waiting.push(bytes.into());
            return true;
        }
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            drop(conns);
            self.closed("connection_limit");
            return false;
        };
        conns.connecting.insert(addr, vec![bytes.into()]);
        drop(conns);
        let d = d.clone();
        let timeout = Duration::from_millis(self.cfg.connect_timeout_ms);
        self.tracker.spawn(async move {
            match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    // Without it Nagle holds a small message back until the peer's delayed ACK
                    // (measured: 20–40 ms per request relayed over a connection the edge opened).
                    let _ = stream.set_nodelay(true);
                    // Checked on the listeners at start; a failure here keeps the system's.
                    let cc = &d.tcp.cfg.congestion_control;
                    if let Err(e) = set_congestion(socket2::SockRef::from(&stream), cc) {
                        debug!(%addr, error = %e, "congestion control not set");
                    }
                    let conn = Conn::new(stream);
                    {
                        // Under the registry lock: no send can find the connection before the
                        // messages that waited for it are on it.
                        let mut conns = d.tcp.conns.lock().expect("registry lock");
                        for b in conns.connecting.remove(&addr).unwrap_or_default() {
                            if !conn.send(b) {
                                d.send_error(Transport::Tcp);
                            }
                        }
                        conns.live.insert(addr, conn.clone());
                    }
                    run(conn, addr, listener, d, permit, false).await;
                }
                _ => {
                    debug!(%addr, "TCP connect failed");
                    let lost = d
                        .tcp
                        .conns
                        .lock()
                        .expect("registry lock")
                        .connecting
                        .remove(&addr)
                        .map_or(0, |w| w.len());
                    for _ in 0..lost {
                        d.send_error(Transport::Tcp);
                    }
                    d.tcp.closed("connect_failed");
                }
            }
        });
        true
    }
}

/// Sets `tcp.congestion_control` (`name`; empty keeps the system's) on `sock`: on a listener,
/// what it accepts inherits it. The error names the key and the algorithm.
pub fn set_congestion(sock: socket2::SockRef<'_>, name: &str) -> std::io::Result<()> {
    if name.is_empty() {
        return Ok(());
    }
    sock.set_tcp_congestion(name.as_bytes()).map_err(|e| {
        std::io::Error::new(e.kind(), format!("tcp.congestion_control = {name:?}: {e}"))
    })
}

/// Accepts connections on `listener` until `stop`.
pub async fn accept_loop(
    listener: TcpListener,
    idx: usize,
    d: Arc<Dispatcher>,
    stop: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => { tokio::time::sleep(Duration::from_millis(10)).await; continue; }
            },
        };
        let reg = &d.tcp;
        if !d.service.admits(peer) {
            reg.closed("banned");
            continue;
        }
        let Ok(permit) = reg.slots.clone().try_acquire_owned() else {
            reg.closed("connection_limit");
            continue;
        };
        {
            let mut per = reg.per_source.lock().expect("per-source lock");
            let n = per.entry(peer.ip()).or_insert(0);
            if *n >= reg.cfg.max_per_source {
                drop(per);
                reg.closed("per_source_limit");
                continue;
            }
            *n += 1;
        }
        let _ = stream.set_nodelay(true);
        let conn = Conn::new(stream);
        reg.tracker
            .spawn(run(conn, peer, idx, d.clone(), permit, true));
    }
}

/// Reads what the socket holds, without waiting. A read shorter than `buf` found the receive queue
/// empty: it is reported to tokio as `WouldBlock` (keeping the bytes), which clears the socket's
/// readiness at once instead of after one more read that would only return `EAGAIN` — a system
/// call saved per message. Tokio clears only the readiness it reported, so bytes arriving after
/// the read still wake the task.
fn read_now(stream: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    let mut got = 0;
    let r = stream.try_io(tokio::io::Interest::READABLE, || {
        let n = nix::sys::socket::recv(fd, buf, nix::sys::socket::MsgFlags::empty())
            .map_err(std::io::Error::from)?;
        got = n;
        if n > 0 && n < buf.len() {
            return Err(ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match r {
        Err(e) if e.kind() == ErrorKind::WouldBlock && got > 0 => Ok(got),
        r => r,
    }
}

/// Serves one connection: this task reads, frames and dispatches; a writer task drains what could
/// not be sent at once.
#[allow(clippy::too_many_arguments)]
async fn run(
    conn: Arc<Conn>,
    peer: SocketAddr,
    listener: usize,
    d: Arc<Dispatcher>,
    _permit: OwnedSemaphorePermit,
    inbound: bool,
) {
    let reg = d.tcp.clone();
    reg.conns
        .lock()
        .expect("registry lock")
        .live
        .insert(peer, conn.clone());
    d.metrics.tcp_connections.inc();
    let writer = reg.tracker.spawn(conn.clone().write_queued());

    let mut framer = Framer::new(reg.cfg.max_message_size);
    let mut chunk = vec![0u8; 16 * 1024];
    let header_timeout = Duration::from_millis(reg.cfg.header_timeout_ms);
    let idle_timeout = Duration::from_millis(reg.cfg.idle_timeout_ms);
    let reply = ReplyPath::Stream(conn.clone());
    // What the messages of one read relay goes out per connection in one send, after every
    // `tcp.flush_every` of them (default 32, the yield's bound too): each send also runs the
    // receiver's TCP input and wake-up, so the fewer sends a burst takes the sooner its last
    // message leaves, while the bound keeps a message read at the head of a long burst from
    // waiting for all of it (see ARCHITECTURE.md: 32 against 4 at 27,500 OPTIONS/s).
    let mut out = Outbox::streams_only();
    // One timer per connection, re-armed only when it fires early or a partial message needs an
    // earlier deadline: resetting a timer on every read cost more than the read.
    let mut last_read = Instant::now();
    let timer = tokio::time::sleep_until(last_read + idle_timeout);
    tokio::pin!(timer);
    let mut since_yield = 0usize;
    'conn: loop {
        let n = match read_now(&conn.stream, &mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                // Waiting for the socket lets the other tasks run.
                since_yield = 0;
                tokio::select! {
                    _ = reg.stop.cancelled() => break,
                    r = conn.stream.readable() => if r.is_err() { break },
                    _ = &mut timer => {
                        let wait = if framer.has_partial() { header_timeout } else { idle_timeout };
                        let due = last_read + wait;
                        if due <= Instant::now() {
                            reg.closed(if framer.has_partial() { "header_timeout" } else { "idle_timeout" });
                            break;
                        }
                        timer.as_mut().reset(due);
                    },
                }
                continue;
            }
            Err(_) => break,
        };
        last_read = Instant::now();
        framer.push(&chunk[..n]);
        let mut held = 0usize;
        loop {
            match framer.next_frame() {
                Ok(None) => break,
                Ok(Some(Frame::Ping)) => {
                    conn.send(Bytes::from_static(b"\r\n"));
                }
                Ok(Some(Frame::Message(msg))) => {
                    let inb = Inbound {
                        bytes: msg,
                        source: peer,
                        transport: Transport::Tcp,
                        listener,
                    };
                    let _ = d.dispatch(inb, &reply, Some(&mut out));
                    held += 1;
                    since_yield += 1;
                    if held >= reg.cfg.flush_every {
                        out.flush_streams(&d);
                        held = 0;
                    }
                    if since_yield >= YIELD_EVERY {
                        // What is handled leaves first; the rest of the read waits its turn.
                        out.flush_streams(&d);
                        held = 0;
                        since_yield = 0;
                        tokio::task::yield_now().await;
                    }
                }
                Err(e) => {
                    if matches!(
                        e,
                        FrameError::MissingContentLength | FrameError::BadContentLength
                    ) {
                        if let Some(r) = framer
                            .pending_head()
                            .and_then(|h| crate::proxy::bad_request_reply(h, &e.to_string()))
                        {
                            conn.send(r.into());
                        }
                    }
                    out.flush_streams(&d);
                    d.malformed(Transport::Tcp, peer, &e.to_string());
                    reg.closed(match e {
                        FrameError::TooLarge(_) => "too_large",
                        FrameError::Garbage => "garbage",
                        _ => "bad_framing",
                    });
                    break 'conn;
                }
            }
        }
        out.flush_streams(&d);
        if framer.has_partial() && timer.deadline() > last_read + header_timeout {
            timer.as_mut().reset(last_read + header_timeout);
        }
    }
    {
        let mut conns = reg.conns.lock().expect("registry lock");
        if conns.live.get(&peer).is_some_and(|c| Arc::ptr_eq(c, &conn)) {
            conns.live.remove(&peer);
        }
    }
    if inbound {
        let mut per = reg.per_source.lock().expect("per-source lock");
        if let Some(n) = per.get_mut(&peer.ip()) {
            *n -= 1;
            if *n == 0 {
                per.remove(&peer.ip());
            }
        }
    }
    drop(reply);
    conn.close();
    let _ = writer.await;
    d.metrics.tcp_connections.dec();
}
