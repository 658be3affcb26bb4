//! UDP listeners: `sockets` sockets bound to one address with `SO_REUSEPORT`, each served by
//! `threads_per_socket` threads (default one).
//!
//! A receive thread blocks in `recvmmsg` (up to [`BATCH`] datagrams per call, `MSG_WAITFORONE`),
//! runs the service on each datagram in place and sends what the batch produced on its own socket
//! by `sendmmsg`: once `udp.flush_every` datagrams wait ([`Limits`]) and at the batch's end. The
//! service is synchronous, so nothing here crosses into the async runtime:
//! no task wake-up, no `epoll` round per datagram, no hand-off between worker threads — the
//! kernel wakes the thread that then does all the work, as Kamailio's UDP workers do. Rare work
//! that must wait (a next hop by name, a TCP connect) is spawned onto the runtime, which the thread
//! has entered.
//!
//! Which socket gets a datagram is steered ([`Group`]): while the first socket's threads keep up
//! (their handling under `udp.spread_at` of a core), a one-instruction `SO_ATTACH_REUSEPORT_CBPF`
//! program gives every flow to the first socket; past it, or when that socket is stuck, the program
//! steps aside and the kernel's flow hash spreads flows over all. Wake-ups are most of what a
//! datagram costs on a shared VM, and two threads each woken for part of the traffic wake ~3 times
//! as often as one woken for all of it: at 5,000 calls/s on two shared cores, CPU per call fell
//! from 49.5–53.5 µs (flows on two sockets) to 39.5–44.5 µs (one), the datagrams' p99 hold the
//! same (0.65–0.72 ms).
//!
//! One thread woken for every flow wakes least, but a datagram that arrives while it is busy, or
//! woken and waiting for a core, waits for it. So while flows are on the first socket and more
//! than 1% of a window's datagrams are held past `udp.hold_target_us` (arrival in the kernel to
//! the send of what came of it), the second socket's threads wait on the first socket too, and
//! the kernel wakes one of them for such a datagram; after 5 s in which under 0.1% were held that
//! long they go back to their own ([`want_join`]). On two cores shared with SIPp at 15,000
//! OPTIONS/s this took the median time a request spent in the edge from ~450 µs to 70–90 µs, at
//! 15–50% more CPU per transaction; at 5,000/s nothing waits that long and nothing changes.
//!
//! `SO_REUSEPORT` hashes each flow to one socket, and the PBX's responses are one flow. A datagram
//! that arrives while its socket's thread is busy, or woken but waiting for a core (the sender's,
//! on loopback), would wait for that thread. With two threads on a socket the kernel wakes one
//! waiting thread per arrival, so such a datagram wakes the other, which often runs at once on
//! another core: at 13,750 OPTIONS/s on two shared cores the edge's median hold of a datagram
//! fell from 410–470 µs to 50–75 µs and its p99 by 10–30%, but at 5,000/s its CPU per
//! OPTIONS rose by ~10% and per call by ~20% (more wake-ups, smaller batches), so one thread per
//! socket is the default and two an operator's choice.
//!
//! Across sockets, a thread that has finished its batch looks (non-blocking) at another socket
//! none of whose threads has taken datagrams for [`STALLED`] and handles what waits there
//! ([`Group`]); an idle thread does the same at each poll timeout. Measured at 16,000 OPTIONS/s on
//! two shared cores with one thread per socket, the edge's p99 fell by about 0.3 ms at no
//! measurable CPU cost. Finding there a datagram that has waited [`STUCK`] spreads the flows.

use super::{Dispatcher, Outbox, ReplyPath};
use crate::proxy::Inbound;
use crate::sip::Transport;
use nix::errno::Errno;
use nix::sys::socket::{
    recvmmsg, sendmmsg, sendto, setsockopt, sockopt, ControlMessageOwned, MsgFlags, MultiHeaders,
    SockaddrStorage,
};
use nix::sys::time::TimeSpec;
use smallvec::SmallVec;
use socket2::{Domain, Protocol, Socket, Type};
use std::io::{IoSlice, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Datagrams per `recvmmsg` / `sendmmsg` call.
pub const BATCH: usize = 32;

/// How long a receive thread blocks before it looks at the stop token.
const POLL: Duration = Duration::from_millis(100);

/// Binds `n` sockets to `addr` (the first one resolves port 0 for the rest). The sockets are
/// blocking, with a receive timeout of [`POLL`].
pub fn bind(addr: SocketAddr, n: usize) -> std::io::Result<Vec<Arc<UdpSocket>>> {
    let mut out = Vec::with_capacity(n);
    let mut at = addr;
    for _ in 0..n {
        let s = Socket::new(Domain::for_address(at), Type::DGRAM, Some(Protocol::UDP))?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        let _ = s.set_recv_buffer_size(4 << 20);
        let _ = s.set_send_buffer_size(4 << 20);
        s.set_read_timeout(Some(POLL))?;
        s.bind(&at.into())?;
        let sock: UdpSocket = s.into();
        // The kernel's receive time of each datagram, for the delay histogram.
        setsockopt(&sock, sockopt::ReceiveTimestampns, &true).map_err(std::io::Error::from)?;
        at = sock.local_addr()?;
        out.push(Arc::new(sock));
    }
    Ok(out)
}

/// Sends one datagram without blocking (from async code, or to another listener's socket).
pub fn send_now(sock: &UdpSocket, bytes: &[u8], to: SocketAddr) -> bool {
    let addr = SockaddrStorage::from(to);
    sendto(sock.as_raw_fd(), bytes, &addr, MsgFlags::MSG_DONTWAIT).is_ok()
}

fn socket_addr(s: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = s.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    s.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}

/// Whether a datagram is only a keep-alive (CRLFs, spaces, NULs).
fn keepalive(data: &[u8]) -> bool {
    data.iter().all(|b| matches!(b, b'\r' | b'\n' | b' ' | 0))
}

/// How long every thread of a socket may go without taking datagrams before a receive thread of
/// another socket that has finished its own batch looks at that socket (non-blocking): a batch
/// takes a few hundred microseconds at most, so longer means they are waiting for a core, or have
/// nothing to do (then the look finds nothing; it is made at most once per period per socket).
const STALLED: Duration = Duration::from_micros(400);

/// A socket where another thread finds a datagram that has waited this long is stuck rather than
/// waiting out a burst: its group spreads flows over every socket.
const STUCK: Duration = Duration::from_millis(20);

/// How often a group weighs its load to decide where the kernel sends its flows.
const WINDOW: Duration = Duration::from_millis(500);

/// Share of `spread_at` below which spread flows go back to one socket. Spread over several
/// threads, the same traffic keeps them busy ~20% less in sum than one thread that handles bigger
/// batches and is preempted more often in the middle of one, so the way back sits lower: a load
/// just under the mark does not flap.
const BACK_AT: f64 = 0.7;

/// Whether flows should be spread over every socket (`true`) or concentrated on the first, given
/// where they are now, `busy` µs of handling over `elapsed` µs, and `spread_at`: the busy share of
/// one core above which one socket's threads no longer suffice (0: always spread).
fn want_spread(spread: bool, busy: u64, elapsed: u64, spread_at: f64) -> bool {
    if spread_at <= 0.0 {
        return true;
    }
    let share = busy as f64 / elapsed.max(1) as f64;
    if spread {
        share >= spread_at * BACK_AT
    } else {
        share > spread_at
    }
}

/// A window of fewer datagrams than this tells nothing of their hold: it counts as calm.
const JUDGE_MIN: u64 = 100;

/// Consecutive calm windows (under 0.1% of datagrams held past the target) after which joined
/// threads go back to their own sockets.
const LEAVE_AFTER: u32 = 10;

/// Whether the second socket's threads should wait on the first socket too, given whether they do
/// now, the calm windows behind them and, of the window's `datagrams`, how many were held past the
/// target (`late`); with the calm windows to carry into the next. More than 1% late joins them at
/// once; they leave after [`LEAVE_AFTER`] windows with under 0.1%.
fn want_join(joined: bool, calm: u32, datagrams: u64, late: u64) -> (bool, u32) {
    if datagrams >= JUDGE_MIN && late * 100 > datagrams {
        return (true, 0);
    }
    if !joined {
        return (false, 0);
    }
    if datagrams >= JUDGE_MIN && late * 1000 >= datagrams {
        return (true, 0);
    }
    let calm = calm + 1;
    if calm >= LEAVE_AFTER {
        (false, 0)
    } else {
        (true, calm)
    }
}

/// `SO_ATTACH_REUSEPORT_CBPF` on `sock`'s group: a one-instruction program that gives every
/// datagram to the socket at `index` in the group; an index past the last makes the kernel fall
/// back to its flow hash.
fn steer(sock: &UdpSocket, index: u32) -> nix::Result<()> {
    let mut prog = [nix::libc::sock_filter {
        code: super::shield::RET_K,
        jt: 0,
        jf: 0,
        k: index,
    }];
    let fprog = nix::libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // The kernel copies the program during the call; `prog` outlives it.
    setsockopt(sock, sockopt::AttachReusePortCbpf, &fprog)
}

/// Where the kernel sends a group's datagrams. Each thread wakes for its own socket's flows, and on
/// a host where a wake-up is dear (a shared VM: 3–4 µs of the woken thread's CPU, most of the
/// edge's kernel time) two threads each woken for part of the traffic cost ~20% more CPU per
/// call than one woken for all of it, with no shorter wait. So while one socket's threads keep up,
/// every flow goes to the first socket; past `spread_at` of a core, or when the first socket is
/// stuck, the kernel's flow hash spreads them over all.
struct Steering {
    spread_at: f64,
    spread: AtomicBool,
    /// Held while a program is attached, so two changes do not cross.
    change: Mutex<()>,
    /// `udp.hold_target_us` in ns; 0: the second socket's threads never join the first.
    late_ns: u64,
    /// Whether the second socket's threads wait on the first socket too (only while not spread):
    /// one thread woken for every flow wakes least, but a datagram that arrives while it is busy,
    /// or woken and waiting for a core, waits for it. Joined, the kernel wakes a waiting sibling
    /// for such a datagram instead, at the cost of more wake-ups, so they join only while
    /// datagrams are held past `udp.hold_target_us` (see [`want_join`]).
    joined: AtomicBool,
    /// Calm windows in a row while joined.
    calm: AtomicU32,
}

/// The receive threads of one listener. `SO_REUSEPORT` gives each flow to one socket, so when
/// every thread of a socket loses its core (to the PBX on a shared host, say), the messages of
/// its flows wait until one runs again; a thread of another socket that sees it stalled takes what
/// waits there, as any Kamailio worker takes any datagram.
pub struct Group {
    socks: Vec<Arc<UdpSocket>>,
    /// Threads blocking on each socket: thread `n` serves socket `n / per_socket`.
    per_socket: usize,
    /// Per thread: when its `recvmmsg` last returned (microseconds since `epoch`).
    last_took: Vec<AtomicU64>,
    epoch: Instant,
    /// µs the threads spent handling batches since `window_start`.
    busy: AtomicU64,
    /// Datagrams handled since `window_start`, and of them those held past the hold target.
    datagrams: AtomicU64,
    late: AtomicU64,
    window_start: AtomicU64,
    /// `None` with one socket, or when flows always spread.
    steering: Option<Steering>,
}

impl Group {
    /// The group of `socks`, each served by `per_socket` threads (at least one). With several
    /// sockets and `spread_at` above 0, flows start concentrated on the first socket (see
    /// [`Steering`]); where the kernel refuses the program they spread by its hash, as without.
    /// While they are, the second socket's threads join the first when datagrams wait past
    /// `hold_target` (zero: never).
    /// A group of several sockets that starts spread counts in `metrics.udp_spread`.
    pub fn new(
        socks: Vec<Arc<UdpSocket>>,
        per_socket: usize,
        spread_at: f64,
        hold_target: Duration,
        metrics: &crate::metrics::Metrics,
    ) -> Arc<Group> {
        let per_socket = per_socket.max(1);
        let steering = if socks.len() > 1 && spread_at > 0.0 {
            match steer(&socks[0], 0) {
                Ok(()) => Some(Steering {
                    spread_at,
                    spread: AtomicBool::new(false),
                    change: Mutex::new(()),
                    late_ns: hold_target.as_nanos().min(u64::MAX as u128) as u64,
                    joined: AtomicBool::new(false),
                    calm: AtomicU32::new(0),
                }),
                Err(e) => {
                    tracing::warn!(error = %e, "UDP flows cannot be steered to one socket; they spread by the kernel's hash");
                    None
                }
            }
        } else {
            None
        };
        if socks.len() > 1 && steering.is_none() {
            metrics.udp_spread.inc();
        }
        Arc::new(Group {
            last_took: (0..socks.len() * per_socket)
                .map(|_| AtomicU64::new(0))
                .collect(),
            socks,
            per_socket,
            epoch: Instant::now(),
            busy: AtomicU64::new(0),
            datagrams: AtomicU64::new(0),
            late: AtomicU64::new(0),
            window_start: AtomicU64::new(0),
            steering,
        })
    }

    /// Whether the kernel spreads the group's flows over all its sockets (always, with one
    /// socket or without steering).
    pub fn spread(&self) -> bool {
        self.steering
            .as_ref()
            .is_none_or(|s| s.spread.load(Ordering::Relaxed))
    }

    /// Whether the second socket's threads wait on the first socket too.
    fn joined(&self) -> bool {
        self.steering
            .as_ref()
            .is_some_and(|s| s.joined.load(Ordering::Relaxed) && !s.spread.load(Ordering::Relaxed))
    }

    /// Hold in ns past which a datagram counts as late; `u64::MAX` when no thread ever joins.
    fn late_ns(&self) -> u64 {
        match &self.steering {
            Some(s) if s.late_ns > 0 => s.late_ns,
            _ => u64::MAX,
        }
    }

    /// Counts `t`'s handling at `now`; at the end of a window, the thread that closes it counts
    /// the window's load and, with steering, moves the flows or the threads if the load or the
    /// hold calls for it.
    fn handled(&self, t: Handled, now: u64, metrics: &crate::metrics::Metrics) {
        if t.busy_us > 0 {
            self.busy.fetch_add(t.busy_us, Ordering::Relaxed);
        }
        if t.datagrams > 0 {
            self.datagrams.fetch_add(t.datagrams, Ordering::Relaxed);
        }
        if t.late > 0 {
            self.late.fetch_add(t.late, Ordering::Relaxed);
        }
        let start = self.window_start.load(Ordering::Relaxed);
        if now < start + WINDOW.as_micros() as u64
            || self
                .window_start
                .compare_exchange(start, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let busy = self.busy.swap(0, Ordering::Relaxed);
        let datagrams = self.datagrams.swap(0, Ordering::Relaxed);
        let late = self.late.swap(0, Ordering::Relaxed);
        metrics.udp_busy.inc_by(busy as f64 / 1e6);
        let Some(st) = &self.steering else {
            return;
        };
        let spread = st.spread.load(Ordering::Relaxed);
        let want = want_spread(spread, busy, now - start, st.spread_at);
        if want != spread {
            self.set_spread(want, metrics);
        }
        // Spread, each socket has flows of its own; joined threads would leave them waiting.
        let (join, calm) = if want || st.late_ns == 0 {
            (false, 0)
        } else {
            want_join(
                st.joined.load(Ordering::Relaxed),
                st.calm.load(Ordering::Relaxed),
                datagrams,
                late,
            )
        };
        st.calm.store(calm, Ordering::Relaxed);
        if st.joined.swap(join, Ordering::Relaxed) != join {
            if join {
                metrics.udp_joined.inc();
            } else {
                metrics.udp_joined.dec();
            }
            tracing::debug!(join, datagrams, late, "UDP receive threads moved");
        }
    }

    /// Moves the flows: over every socket by the kernel's hash, or all to the first socket.
    fn set_spread(&self, spread: bool, metrics: &crate::metrics::Metrics) {
        let Some(st) = &self.steering else {
            return;
        };
        let _held = st.change.lock().unwrap_or_else(|e| e.into_inner());
        if st.spread.load(Ordering::Relaxed) == spread {
            return;
        }
        match steer(&self.socks[0], if spread { u32::MAX } else { 0 }) {
            Ok(()) => {
                st.spread.store(spread, Ordering::Relaxed);
                metrics.udp_steering.inc();
                if spread {
                    metrics.udp_spread.inc();
                } else {
                    metrics.udp_spread.dec();
                }
                tracing::debug!(spread, sockets = self.socks.len(), "UDP flows moved");
            }
            Err(e) => tracing::warn!(error = %e, "UDP flows could not be moved"),
        }
    }

    /// Receive threads in the group.
    pub fn len(&self) -> usize {
        self.last_took.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last_took.is_empty()
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// When any thread of socket `s` last took datagrams.
    fn socket_took(&self, s: usize) -> u64 {
        let threads = s * self.per_socket..(s + 1) * self.per_socket;
        self.last_took[threads]
            .iter()
            .map(|t| t.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
    }
}

/// What a receive thread takes and when it sends.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longer datagrams are dropped (and counted).
    pub max_datagram: usize,
    /// What the batch has produced is sent once this many datagrams wait, not only at the end
    /// of the batch (`udp.flush_every`).
    pub flush_every: usize,
}

/// A receive thread's buffers and what it hands the dispatcher.
struct Receiver {
    listener: usize,
    limits: Limits,
    bufs: Vec<Vec<u8>>,
    rx: MultiHeaders<SockaddrStorage>,
    reply: ReplyPath,
    tally: super::shield::DropTally,
    sending: Sending,
    /// Handling not yet counted in the group's load.
    handled: Handled,
}

/// A thread's handling not yet counted in its group's window.
#[derive(Default)]
struct Handled {
    /// µs spent handling batches.
    busy_us: u64,
    datagrams: u64,
    /// Datagrams held past the group's hold target.
    late: u64,
}

/// What a batch has produced and not yet sent, and when the datagrams behind it arrived.
struct Sending {
    tx: MultiHeaders<SockaddrStorage>,
    /// Where each datagram of a `sendmmsg` goes (kept between sends).
    addrs: Vec<Option<SockaddrStorage>>,
    out: Outbox,
    /// Kernel receive times (ns since the Unix epoch) of the datagrams handled since the last
    /// send.
    received_at: Vec<u64>,
    delays: crate::metrics::DelayTally,
    /// Hold in ns past which a datagram counts as late ([`Group::late_ns`]).
    late_ns: u64,
}

impl Sending {
    /// Sends what is queued through `own` (streams to their connections), then counts the delay
    /// of each datagram handled since the last send, and those past the hold target in `handled`.
    /// Returns the longest, in ns.
    fn send(&mut self, own: i32, d: &Dispatcher, handled: &mut Handled) -> u64 {
        flush(own, &mut self.tx, &mut self.addrs, &mut self.out, d);
        self.out.flush_streams(d);
        let mut longest = 0;
        if !self.received_at.is_empty() {
            let now = crate::clock::unix_ns();
            handled.datagrams += self.received_at.len() as u64;
            for at in self.received_at.drain(..) {
                // A wall clock stepped back counts as no delay.
                let delay = now.saturating_sub(at);
                longest = longest.max(delay);
                handled.late += u64::from(delay > self.late_ns);
                self.delays.record(delay);
            }
            d.metrics.udp_delay.add(&mut self.delays);
        }
        longest
    }
}

impl Receiver {
    /// One `recvmmsg` on `fd` with `flags`, each datagram through the dispatcher, then what the
    /// batch produced sent through `own`. Returns the longest delay of its datagrams (kernel
    /// receipt to send, ns; 0 when it took none).
    fn batch(&mut self, fd: i32, own: i32, flags: MsgFlags, d: &Arc<Dispatcher>) -> u64 {
        let hold;
        let mut longest = 0;
        {
            // On the stack: a heap list of slices per batch was one allocation per wake-up.
            let mut bufs = self.bufs.iter_mut();
            let mut slices: [[IoSliceMut<'_>; 1]; BATCH] = std::array::from_fn(|_| {
                [IoSliceMut::new(
                    bufs.next().expect("a receive thread has BATCH buffers"),
                )]
            });
            let received = match recvmmsg(fd, &mut self.rx, slices.iter_mut(), flags, None) {
                Ok(r) => r,
                // Timeout (to look at `stop`), nothing waiting, a signal, or an ICMP error that
                // concerns an earlier send rather than this socket.
                Err(_) => return 0,
            };
            // Every message of the batch timed as of now (see `Hold`).
            hold = crate::clock::Hold::now();
            for msg in received {
                if let Ok(mut cmsgs) = msg.cmsgs() {
                    if let Some(ControlMessageOwned::ScmTimestampns(ts)) = cmsgs.next() {
                        self.sending.received_at.push(unix_ns(&ts));
                    }
                }
                let Some(source) = msg.address.as_ref().and_then(socket_addr) else {
                    continue;
                };
                let n = msg.bytes;
                let Some(data) = msg.iovs().next() else {
                    continue;
                };
                let data = &data[..n.min(data.len())];
                if keepalive(data) {
                    continue;
                }
                if n > self.limits.max_datagram {
                    d.oversize(Transport::Udp, source);
                    continue;
                }
                let inb = Inbound {
                    bytes: data,
                    source,
                    transport: Transport::Udp,
                    listener: self.listener,
                };
                if d.dispatch(inb, &self.reply, Some(&mut self.sending.out)) && d.shield.pps > 0 {
                    let now = d.service.firewall.clock.now_ms();
                    self.tally.count(&d.shield, source.ip(), now);
                }
                // A large batch sends as it goes: the first datagrams' forwards do not wait for
                // the last to be handled, nor leave with them as one burst.
                if self.sending.out.queue.len() >= self.limits.flush_every {
                    longest = longest.max(self.sending.send(own, d, &mut self.handled));
                }
            }
        }
        let longest = longest.max(self.sending.send(own, d, &mut self.handled));
        self.handled.busy_us += hold.instant().elapsed().as_micros() as u64;
        longest
    }
}

fn unix_ns(ts: &TimeSpec) -> u64 {
    (ts.tv_sec().max(0) as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec().max(0) as u64)
}

/// Whether a thread of socket `mine` looks at socket `s` after a batch, and why.
#[derive(Debug, PartialEq, Eq)]
enum Look {
    No,
    /// Its own socket, while the thread waits on the first: no flows reach it then, but what
    /// arrived before they moved waits there. Looked at once per [`POLL`].
    Leftovers,
    /// Another socket none of whose threads has taken datagrams for [`STALLED`]: what waits
    /// there is taken, and having waited [`STUCK`] spreads the flows. Looked at once per
    /// [`STALLED`] while its threads stay away.
    Stalled,
}

/// What a thread of socket `mine`, `joined` or not, does with socket `s`, idle for `idle_us`
/// (since any of its threads last took datagrams). The socket a thread waits on needs no look:
/// the kernel wakes any thread waiting on it.
fn look(s: usize, mine: usize, joined: bool, idle_us: u64) -> Look {
    if s == mine {
        return if joined { Look::Leftovers } else { Look::No };
    }
    if joined && s == 0 {
        return Look::No;
    }
    if idle_us > STALLED.as_micros() as u64 {
        Look::Stalled
    } else {
        Look::No
    }
}

/// As thread `me` of `group`, receives datagrams on its socket until `stop`, each handed to the
/// dispatcher; what a batch produces for this listener leaves through this socket by `sendmmsg`,
/// every `limits.flush_every` datagrams and at the batch's end. Then takes what waits on another
/// socket none of whose threads has taken any lately. Datagrams longer than `limits.max_datagram`
/// and keep-alives are dropped here. Runs on its own thread; `rt` is the runtime that rare
/// asynchronous work is spawned onto.
pub fn recv_thread(
    group: Arc<Group>,
    me: usize,
    listener: usize,
    limits: Limits,
    dispatcher: Arc<Dispatcher>,
    stop: CancellationToken,
    rt: tokio::runtime::Handle,
) {
    let _rt = rt.enter();
    let mine = me / group.per_socket;
    let sock = group.socks[mine].clone();
    let fd = sock.as_raw_fd();
    let mut r = Receiver {
        listener,
        limits,
        bufs: (0..BATCH)
            .map(|_| vec![0u8; limits.max_datagram + 1])
            .collect(),
        rx: MultiHeaders::<SockaddrStorage>::preallocate(BATCH, Some(nix::cmsg_space!(TimeSpec))),
        reply: ReplyPath::Udp(sock),
        tally: super::shield::DropTally::default(),
        sending: Sending {
            tx: MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None),
            addrs: Vec::with_capacity(BATCH),
            out: Outbox::new(listener),
            received_at: Vec::with_capacity(BATCH),
            delays: Default::default(),
            late_ns: group.late_ns(),
        },
        handled: Handled::default(),
    };
    let first = group.socks[0].as_raw_fd();
    let limit = STALLED.as_micros() as u64;
    // Per socket: not looked at again before this time.
    let mut next_look = vec![0u64; group.socks.len()];
    while !stop.is_cancelled() {
        // Blocks until at least one datagram, or the poll timeout: an idle thread still looks
        // at its siblings then, so a stalled one's flows wait at most one poll period even when
        // no traffic of its own wakes this one.
        // Joined, a thread of the second socket waits on the first, which has every flow. Only
        // the second's: each joined thread adds wake-ups, and one more socket's threads are
        // what a burst needs while the first's are busy or waiting for a core.
        let joined = mine == 1 && group.joined();
        r.batch(
            if joined { first } else { fd },
            fd,
            MsgFlags::MSG_WAITFORONE,
            &dispatcher,
        );
        let now = group.now_us();
        group.last_took[me].store(now, Ordering::Relaxed);
        // Joined while this thread waited on its own socket, it waits on the first from its next
        // batch: what waits there now is not stuck.
        let joined = joined || (mine == 1 && group.joined());
        for (s, next) in next_look.iter_mut().enumerate() {
            if now < *next {
                continue;
            }
            match look(s, mine, joined, now.saturating_sub(group.socket_took(s))) {
                Look::No => {}
                Look::Leftovers => {
                    *next = now + POLL.as_micros() as u64;
                    r.batch(fd, fd, MsgFlags::MSG_DONTWAIT, &dispatcher);
                }
                Look::Stalled => {
                    *next = now + limit;
                    let theirs = group.socks[s].as_raw_fd();
                    let waited = r.batch(theirs, fd, MsgFlags::MSG_DONTWAIT, &dispatcher);
                    if waited > STUCK.as_nanos() as u64 {
                        group.set_spread(true, &dispatcher.metrics);
                    }
                }
            }
        }
        group.handled(std::mem::take(&mut r.handled), now, &dispatcher.metrics);
    }
}

/// Sends everything queued in `out` through `fd`, [`BATCH`] datagrams per `sendmmsg`. A datagram
/// the kernel refuses is counted and skipped; the rest still go.
fn flush(
    fd: i32,
    headers: &mut MultiHeaders<SockaddrStorage>,
    addrs: &mut Vec<Option<SockaddrStorage>>,
    out: &mut Outbox,
    dispatcher: &Dispatcher,
) {
    let mut at = 0;
    while at < out.queue.len() {
        let chunk = &out.queue[at..(at + BATCH).min(out.queue.len())];
        // The slices on the stack and the addresses in the thread's own buffer: a batch at a few
        // thousand datagrams a second is a handful of them, and allocating both per send cost
        // a tenth of it.
        let slices: SmallVec<[[IoSlice<'_>; 1]; BATCH]> =
            chunk.iter().map(|(_, b)| [IoSlice::new(b)]).collect();
        addrs.clear();
        addrs.extend(chunk.iter().map(|(a, _)| Some(SockaddrStorage::from(*a))));
        match sendmmsg(fd, headers, slices.iter(), &*addrs, [], MsgFlags::empty()) {
            Ok(sent) => {
                let n = sent.count();
                if n == 0 {
                    dispatcher.send_error(Transport::Udp);
                    at += 1;
                } else {
                    at += n;
                }
            }
            Err(Errno::EINTR) => {}
            Err(_) => {
                // The first datagram of the chunk failed (unreachable, no buffer): skip it.
                dispatcher.send_error(Transport::Udp);
                at += 1;
            }
        }
    }
    out.queue.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOLD: Duration = Duration::from_millis(1);

    /// A group of `sockets` fresh loopback sockets, one thread each.
    fn group_of(
        sockets: usize,
        spread_at: f64,
        hold: Duration,
        metrics: &crate::metrics::Metrics,
    ) -> Arc<Group> {
        let socks = bind("127.0.0.1:0".parse().unwrap(), sockets).unwrap();
        Group::new(socks, 1, spread_at, hold, metrics)
    }

    fn busy(busy_us: u64) -> Handled {
        Handled {
            busy_us,
            ..Default::default()
        }
    }

    #[test]
    fn threads_join_past_one_percent_late_and_leave_after_calm_windows() {
        // Apart: more than 1% late joins; 1% or less, or too few datagrams to judge, does not.
        assert_eq!(want_join(false, 0, 1000, 11), (true, 0));
        assert_eq!(want_join(false, 0, 1000, 10), (false, 0));
        assert_eq!(want_join(false, 0, 99, 99), (false, 0));
        assert_eq!(want_join(false, 0, 0, 0), (false, 0));
        // Joined: 0.1% to 1% late holds them and restarts the count of calm windows.
        assert_eq!(want_join(true, 5, 1000, 1), (true, 0));
        assert_eq!(want_join(true, 5, 1000, 10), (true, 0));
        assert_eq!(want_join(true, 5, 1000, 11), (true, 0));
        // Under 0.1%, or an idle window, is calm; the tenth calm window in a row parts them.
        assert_eq!(want_join(true, 0, 10_000, 9), (true, 1));
        assert_eq!(want_join(true, 3, 0, 0), (true, 4));
        assert_eq!(
            want_join(true, LEAVE_AFTER - 2, 10_000, 0),
            (true, LEAVE_AFTER - 1)
        );
        assert_eq!(want_join(true, LEAVE_AFTER - 1, 10_000, 0), (false, 0));
    }

    #[test]
    fn a_late_window_joins_the_threads_until_the_flows_spread_or_calm_returns() {
        let metrics = crate::metrics::Metrics::default();
        let group = group_of(2, 0.35, HOLD, &metrics);
        assert_eq!(group.late_ns(), 1_000_000);
        let w = WINDOW.as_micros() as u64;
        let window = |datagrams, late| Handled {
            busy_us: w / 10,
            datagrams,
            late,
        };
        let mut at = w;
        let mut close = |h: Handled| {
            group.handled(h, at, &metrics);
            at += w;
        };
        close(window(1000, 20));
        assert!(group.joined());
        assert_eq!(metrics.udp_joined.get(), 1);
        // A busy window spreads the flows: each socket has its own then, and nobody stays joined.
        close(Handled {
            busy_us: w / 2,
            ..window(1000, 20)
        });
        assert!(group.spread() && !group.joined());
        assert_eq!(metrics.udp_joined.get(), 0);
        // Back on one socket and late again: joined; then calm windows part them.
        close(window(1000, 0));
        assert!(!group.spread() && !group.joined());
        close(window(1000, 20));
        assert!(group.joined());
        for _ in 0..LEAVE_AFTER - 1 {
            close(window(1000, 0));
            assert!(group.joined());
        }
        close(window(1000, 0));
        assert!(!group.joined());
        assert_eq!(metrics.udp_joined.get(), 0);
        // A target of 0: never joined, whatever the hold.
        let off = group_of(2, 0.35, Duration::ZERO, &metrics);
        assert_eq!(off.late_ns(), u64::MAX);
        off.handled(window(1000, 1000), w, &metrics);
        assert!(!off.joined());
    }

    #[test]
    fn a_joined_thread_looks_at_its_own_socket_and_any_thread_at_a_stalled_one() {
        let stalled = STALLED.as_micros() as u64 + 1;
        // Apart, a thread waits on its own socket (no look) and looks at a stalled sibling only.
        assert_eq!(look(1, 1, false, stalled), Look::No);
        assert_eq!(look(0, 1, false, stalled), Look::Stalled);
        assert_eq!(look(0, 1, false, stalled - 1), Look::No);
        assert_eq!(look(1, 0, false, stalled), Look::Stalled);
        // Joined, a second-socket thread waits on the first (no look there, however long its own
        // threads have been away) and looks at its own for leftovers, busy or not.
        assert_eq!(look(0, 1, true, stalled), Look::No);
        assert_eq!(look(1, 1, true, 0), Look::Leftovers);
        assert_eq!(look(1, 1, true, stalled), Look::Leftovers);
        // A third socket stalls as it would apart.
        assert_eq!(look(2, 1, true, stalled), Look::Stalled);
        assert_eq!(look(2, 1, true, 0), Look::No);
    }

    #[test]
    fn flows_spread_above_the_mark_and_come_back_well_below_it() {
        let w = 1_000_000;
        // Concentrated: spreads only past the mark.
        assert!(!want_spread(false, 0, w, 0.35));
        assert!(!want_spread(false, 350_000, w, 0.35));
        assert!(want_spread(false, 350_001, w, 0.35));
        // Spread: stays down to 0.7 of the mark, then comes back.
        assert!(want_spread(true, 300_000, w, 0.35));
        assert!(want_spread(true, 245_000, w, 0.35));
        assert!(!want_spread(true, 244_000, w, 0.35));
        // 0: always spread, whatever the load.
        assert!(want_spread(false, 0, w, 0.0));
        assert!(want_spread(true, 0, w, 0.0));
        // An empty window counts as idle, not as a division by zero.
        assert!(!want_spread(false, 0, 0, 0.35));
        assert!(want_spread(false, 10, 0, 0.35));
    }

    /// Sends one datagram from each of `n` fresh source ports to `to` and returns how many each of
    /// `socks` received.
    fn arrivals(socks: &[Arc<UdpSocket>], n: usize) -> Vec<usize> {
        let to = socks[0].local_addr().unwrap();
        for s in socks {
            s.set_nonblocking(true).unwrap();
        }
        let mut got = vec![0; socks.len()];
        let mut buf = [0u8; 64];
        for _ in 0..n {
            let from = UdpSocket::bind("127.0.0.1:0").unwrap();
            from.send_to(b"x", to).unwrap();
        }
        // Loopback delivers during the send; a few rounds collect everything.
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.iter().sum::<usize>() < n && Instant::now() < deadline {
            for (i, s) in socks.iter().enumerate() {
                while s.recv(&mut buf).is_ok() {
                    got[i] += 1;
                }
            }
        }
        got
    }

    #[test]
    fn a_group_sends_every_flow_to_its_first_socket_until_told_to_spread() {
        let metrics = crate::metrics::Metrics::default();
        let socks = bind("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let group = Group::new(socks.clone(), 1, 0.35, HOLD, &metrics);
        assert!(!group.spread());
        assert_eq!(arrivals(&socks, 64), vec![64, 0]);
        group.set_spread(true, &metrics);
        assert!(group.spread());
        // 64 flows hashed over two sockets: all on one has odds of 2^-63.
        let got = arrivals(&socks, 64);
        assert_eq!(got.iter().sum::<usize>(), 64);
        assert!(got.iter().all(|&n| n > 0), "spread by hash: {got:?}");
        assert_eq!(metrics.udp_steering.get(), 1);
        group.set_spread(false, &metrics);
        assert_eq!(arrivals(&socks, 64), vec![64, 0]);
        assert_eq!(metrics.udp_steering.get(), 2);
    }

    #[test]
    fn the_load_of_a_window_moves_the_flows() {
        let metrics = crate::metrics::Metrics::default();
        let group = group_of(2, 0.35, HOLD, &metrics);
        let w = WINDOW.as_micros() as u64;
        // A window 40% busy spreads; the next, 10% busy, concentrates again.
        group.handled(busy(0), w / 2, &metrics);
        group.handled(busy(w * 4 / 10), w, &metrics);
        assert!(group.spread());
        group.handled(busy(w / 10), 2 * w, &metrics);
        assert!(!group.spread());
        assert!((metrics.udp_busy.get() - (w / 2) as f64 / 1e6).abs() < 1e-9);
        // One socket, or a mark of 0: nothing to steer, always spread.
        let one = group_of(1, 0.35, HOLD, &metrics);
        assert!(one.spread());
        assert_eq!(
            metrics.udp_spread.get(),
            0,
            "one socket has nothing to spread"
        );
        let off = group_of(2, 0.0, HOLD, &metrics);
        assert!(off.spread());
        assert_eq!(metrics.udp_spread.get(), 1);
    }

    #[test]
    fn keepalives_are_recognised() {
        assert!(keepalive(b"\r\n\r\n"));
        assert!(keepalive(b"\0"));
        assert!(!keepalive(b"OPTIONS sip:a SIP/2.0\r\n"));
    }

    #[test]
    fn addresses_convert_both_families() {
        for a in ["127.0.0.1:5060", "[::1]:5070"] {
            let a: SocketAddr = a.parse().unwrap();
            assert_eq!(socket_addr(&SockaddrStorage::from(a)), Some(a));
        }
    }
}
