//! TCP: accept with a global connection cap and a per-source cap, frame by Content-Length, close
//! slow (header timeout) and idle connections, and keep a registry of live connections by peer so
//! responses and PBX→phone requests go back over the phone's own connection (it may be behind NAT).

use super::framer::{Frame, FrameError, Framer};
use super::{Dispatcher, ReplyPath};
use crate::config;
use crate::metrics::{Metrics, ReasonLabels};
use crate::proxy::Inbound;
use crate::sip::Transport;
use bytes::Bytes;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

/// Messages queued per connection before sends to it fail (a stalled peer must not grow memory).
const WRITE_QUEUE: usize = 256;

/// Live connections and the limits on them.
pub struct Registry {
    conns: Mutex<HashMap<SocketAddr, mpsc::Sender<Bytes>>>,
    per_source: Mutex<HashMap<IpAddr, usize>>,
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
            conns: Mutex::new(HashMap::new()),
            per_source: Mutex::new(HashMap::new()),
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

    /// Queues `bytes` for `addr` on its live connection, or opens one. `false` when it cannot be
    /// queued at all.
    pub fn send(
        &self,
        d: &Arc<Dispatcher>,
        addr: SocketAddr,
        listener: usize,
        bytes: Bytes,
    ) -> bool {
        let existing = self
            .conns
            .lock()
            .expect("registry lock")
            .get(&addr)
            .cloned();
        if let Some(tx) = existing {
            return tx.try_send(bytes).is_ok();
        }
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            self.closed("connection_limit");
            return false;
        };
        let d = d.clone();
        let timeout = Duration::from_millis(self.cfg.connect_timeout_ms);
        self.tracker.spawn(async move {
            match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    // Without it Nagle holds a small message back until the peer's delayed ACK
                    // (measured: 20–40 ms per request relayed over a connection the edge opened).
                    let _ = stream.set_nodelay(true);
                    let (tx, rx) = mpsc::channel(WRITE_QUEUE);
                    let _ = tx.try_send(bytes);
                    run(stream, addr, listener, d, permit, tx, rx, false).await;
                }
                _ => {
                    debug!(%addr, "TCP connect failed");
                    d.tcp.closed("connect_failed");
                }
            }
        });
        true
    }
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
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        reg.tracker
            .spawn(run(stream, peer, idx, d.clone(), permit, tx, rx, true));
    }
}

/// Serves one connection: a writer task drains the queue; this task reads, frames and dispatches.
#[allow(clippy::too_many_arguments)]
async fn run(
    stream: TcpStream,
    peer: SocketAddr,
    listener: usize,
    d: Arc<Dispatcher>,
    _permit: OwnedSemaphorePermit,
    tx: mpsc::Sender<Bytes>,
    mut rx: mpsc::Receiver<Bytes>,
    inbound: bool,
) {
    let reg = d.tcp.clone();
    reg.conns
        .lock()
        .expect("registry lock")
        .insert(peer, tx.clone());
    d.metrics.tcp_connections.inc();
    let (mut rd, mut wr) = stream.into_split();
    let writer = reg.tracker.spawn(async move {
        while let Some(b) = rx.recv().await {
            if wr.write_all(&b).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });

    let mut framer = Framer::new(reg.cfg.max_message_size);
    let mut chunk = vec![0u8; 16 * 1024];
    let header_timeout = Duration::from_millis(reg.cfg.header_timeout_ms);
    let idle_timeout = Duration::from_millis(reg.cfg.idle_timeout_ms);
    let reply = ReplyPath::Stream(tx.clone());
    'conn: loop {
        let wait = if framer.has_partial() {
            header_timeout
        } else {
            idle_timeout
        };
        let n = tokio::select! {
            _ = reg.stop.cancelled() => break,
            r = tokio::time::timeout(wait, rd.read(&mut chunk)) => match r {
                Err(_) => {
                    reg.closed(if framer.has_partial() { "header_timeout" } else { "idle_timeout" });
                    break;
                }
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => n,
            },
        };
        framer.push(&chunk[..n]);
        loop {
            match framer.next_frame() {
                Ok(None) => break,
                Ok(Some(Frame::Ping)) => {
                    let _ = tx.try_send(Bytes::from_static(b"\r\n"));
                }
                Ok(Some(Frame::Message(msg))) => {
                    let inb = Inbound {
                        bytes: &msg,
                        source: peer,
                        transport: Transport::Tcp,
                        listener,
                    };
                    let _ = d.dispatch(inb, &reply, None);
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
                            let _ = tx.try_send(r.into());
                        }
                    }
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
    }
    {
        let mut conns = reg.conns.lock().expect("registry lock");
        if conns.get(&peer).is_some_and(|t| t.same_channel(&tx)) {
            conns.remove(&peer);
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
    drop(tx);
    let _ = writer.await;
    d.metrics.tcp_connections.dec();
}
