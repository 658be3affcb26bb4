//! sipwarden edge: a stateless SIP proxy and firewall that stands between the Internet and a PBX.
//!
//! - [`config`]: the edge's TOML/environment configuration and its validation.
//! - [`sip`]: a byte-range index of a message over rsip's tokenizer, splicing edits, local replies.
//! - [`proxy`]: the RFC 3261 §16.11 stateless proxy core (pure: message in, [`proxy::Action`] out).
//! - [`pipeline`], [`filters`], [`policy`]: the threat pipeline — one phase trait, twelve filters,
//!   the `[policy]` they run — and [`bans`] / [`netset`], the ban set checked before parsing.
//! - [`service`]: one message through gate, parse, filters, proxy and observers.
//! - [`reload`]: policy reload on SIGHUP and config-file change. [`clock`]: injected time.
//! - [`cluster`]: the watch stream from the controller cluster into the ban set.
//! - [`flow`]: signed flow tokens in Path / Record-Route URIs.
//! - [`backend`]: PBX backends, their OPTIONS health checks and the per-call choice among them.
//! - [`transport`]: UDP and TCP listeners, framing, the dispatcher that runs the service.
//! - [`http`], [`metrics`]: `/healthz`, `/readyz`, `/metrics`.
//!
//! [`Edge::start`] binds everything and returns the bound addresses; [`Edge::run_until`] serves
//! until a cancellation token fires and then drains within the configured grace period.

/// How long a connected edge stays unready waiting for its first cluster snapshot.
pub const SYNC_GRACE: Duration = Duration::from_secs(5);

pub mod backend;
pub mod bans;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod filters;
pub mod flow;
pub mod http;
pub mod metrics;
pub mod netset;
pub mod pipeline;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod service;
pub mod sip;
pub mod transport;

use backend::Backends;
use bans::BanStore;
use clock::Clock;
use config::EdgeConfig;
use flow::FlowKeys;
use metrics::Metrics;
use pipeline::Firewall;
use proxy::Proxy;
use service::Service;
use sip::Transport;
use sipwarden_shared::config::ProcessEnv;
use std::net::SocketAddr;
use std::path::Path;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};
use transport::{tcp, udp, Dispatcher};

/// Why the edge could not start.
#[derive(Debug, Error)]
pub enum StartError {
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("flow key in {path}: {source}")]
    FlowKey {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot start the {what} thread: {source}")]
    Thread {
        what: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Bans(#[from] bans::BanFileError),
    #[error("policy: {0}")]
    Policy(#[from] pipeline::BuildError),
}

/// A started edge: sockets bound, tasks running.
pub struct Edge {
    /// Each listener's bound address, in config order.
    pub sip_addrs: Vec<SocketAddr>,
    pub http_addr: SocketAddr,
    stop: CancellationToken,
    tracker: TaskTracker,
    accepting: Arc<AtomicBool>,
    /// Stops the HTTP server after the SIP drain.
    http_stop: CancellationToken,
    grace: Duration,
    reloader: Arc<reload::Reloader>,
    pub firewall: Arc<pipeline::Firewall>,
}

impl Edge {
    /// Binds every listener and starts serving `cfg`, which came from the process environment
    /// alone (no file: reloads re-read the environment).
    pub async fn start(cfg: EdgeConfig) -> Result<Edge, StartError> {
        Edge::start_from(cfg, None).await
    }

    /// Starts serving `cfg`, loaded from `file` and the process environment; reloads read both
    /// again.
    pub async fn start_from(cfg: EdgeConfig, file: Option<PathBuf>) -> Result<Edge, StartError> {
        let keys = load_flow_keys(&cfg)?;
        let metrics = Arc::new(Metrics::default());
        let backends = Arc::new(Backends::new(&cfg.backends));
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();

        let mut udp_socks = Vec::new();
        let mut tcp_listeners = Vec::new();
        let mut bound = Vec::new();
        for l in &cfg.listeners {
            let bind_err = |what, source| StartError::Bind {
                what,
                addr: l.address,
                source,
            };
            match l.transport {
                Transport::Udp => {
                    let socks =
                        udp::bind(l.address, cfg.udp.sockets).map_err(|e| bind_err("UDP", e))?;
                    bound.push(socks[0].local_addr().map_err(|e| bind_err("UDP", e))?);
                    udp_socks.push(socks);
                    tcp_listeners.push(None);
                }
                Transport::Tcp | Transport::Tls => {
                    let sock = tcp_listener(l.address, &cfg.tcp.congestion_control)
                        .map_err(|e| bind_err("TCP", e))?;
                    bound.push(sock.local_addr().map_err(|e| bind_err("TCP", e))?);
                    udp_socks.push(Vec::new());
                    tcp_listeners.push(Some(sock));
                }
            }
        }
        let proxy = Arc::new(Proxy::new(&cfg, &bound, keys, backends.clone()));
        let clock = Clock::system();
        let ban_file = cfg.edge.data_dir.join(&cfg.policy.bans.file);
        let bans = Arc::new(BanStore::open(
            ban_file,
            cfg.policy.bans.max_entries,
            clock.now_ms(),
        )?);
        let (service, build_env) = Service::build(
            &cfg,
            proxy.clone(),
            bans.clone(),
            clock.clone(),
            metrics.clone(),
        )?;
        let firewall = service.firewall.clone();
        let link = if cfg.controller.endpoints.is_empty() {
            None
        } else {
            let relay = proxy
                .relay_address(&cfg.controller.relay)
                .map(|a| a.to_string())
                .unwrap_or_default();
            cluster::Link::new(
                cfg.controller.clone(),
                cfg.edge.id.clone(),
                cfg.edge.site.clone(),
                relay,
                proxy.peers.clone(),
                metrics.clone(),
            )
            .map(Arc::new)
        };
        if let Some(link) = &link {
            // Fail-static: with no controller answering within the grace, serve on what the ban
            // file holds.
            let (synced, grace, done) = (link.synced.clone(), SYNC_GRACE, stop.clone());
            tracker.spawn(async move {
                tokio::select! {
                    _ = done.cancelled() => return,
                    _ = tokio::time::sleep(grace) => {}
                }
                if !synced.swap(true, std::sync::atomic::Ordering::AcqRel) {
                    warn!(
                        grace_ms = grace.as_millis() as u64,
                        "no controller answered: ready on the local ban file"
                    );
                }
            });
            let (tx, rx) = tokio::sync::mpsc::channel(4096);
            firewall
                .state
                .set_uplink(tx, metrics.reports_dropped.clone());
            tracker.spawn(cluster::uplink(link.clone(), rx, stop.clone()));
            cluster::spawn_watch(
                link.clone(),
                firewall.state.clone(),
                clock.clone(),
                stop.clone(),
                tracker.token(),
            )
            .map_err(|source| StartError::Thread {
                what: "cluster watch",
                source,
            })?;
            tracker.spawn(cluster::push_counters(
                link.clone(),
                firewall.state.clone(),
                clock.clone(),
                stop.clone(),
            ));
        }
        bans.apply(clock.now_ms());
        bans.clone()
            .spawn_writer(clock.clone(), stop.clone(), tracker.token())
            .map_err(|source| StartError::Thread {
                what: "ban writer",
                source,
            })?;
        tracker.spawn(housekeeping(
            firewall.clone(),
            metrics.clone(),
            stop.clone(),
        ));
        let reloader = Arc::new(reload::Reloader::new(
            file,
            Box::new(ProcessEnv),
            build_env,
            firewall.clone(),
            metrics.clone(),
            cfg.clone(),
        ));
        tracker.spawn(
            reloader
                .clone()
                .watch(Duration::from_millis(cfg.reload.watch_ms), stop.clone()),
        );
        let service = Arc::new(service);
        let registry = Arc::new(tcp::Registry::new(
            cfg.tcp.clone(),
            metrics.clone(),
            tracker.clone(),
            stop.clone(),
        ));
        let dispatcher = Arc::new(Dispatcher::new(
            service,
            metrics.clone(),
            udp_socks.clone(),
            registry,
            cfg.udp.shield_pps,
        ));
        if cfg.udp.shield_pps > 0 {
            // Sources leave the kernel shield when their ban ends or they become allowed.
            let (d, m, stop) = (dispatcher.clone(), metrics.clone(), stop.clone());
            tracker.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    let n = d.shield.prune(|a| !d.service.admits(a));
                    m.shielded_sources.set(n as i64);
                }
            });
        }

        for (idx, socks) in udp_socks.iter().enumerate() {
            let group = udp::Group::new(
                socks.clone(),
                cfg.udp.threads_per_socket,
                cfg.udp.spread_at,
                Duration::from_micros(cfg.udp.hold_target_us),
                &metrics,
            );
            for n in 0..group.len() {
                let (group, d, stop, rt) = (
                    group.clone(),
                    dispatcher.clone(),
                    stop.clone(),
                    tokio::runtime::Handle::current(),
                );
                let limits = udp::Limits {
                    max_datagram: cfg.udp.max_datagram,
                    flush_every: cfg.udp.flush_every,
                };
                // The drain waits for the thread: it holds a tracker token until it returns.
                let token = tracker.token();
                std::thread::Builder::new()
                    .name(format!("udp-{idx}-{n}"))
                    .spawn(move || {
                        udp::recv_thread(group, n, idx, limits, d, stop, rt);
                        drop(token);
                    })
                    .map_err(|e| StartError::Bind {
                        what: "UDP thread",
                        addr: bound[idx],
                        source: e,
                    })?;
            }
        }
        for (idx, l) in tcp_listeners.into_iter().enumerate() {
            if let Some(l) = l {
                tracker.spawn(tcp::accept_loop(l, idx, dispatcher.clone(), stop.clone()));
            }
        }
        // Probes leave from the address of a PBX-facing listener where there is one.
        let probe_ip = proxy.listeners[proxy.listener_toward(proxy::Side::Pbx, Transport::Udp)]
            .bind
            .ip();
        for i in 0..backends.list().len() {
            tracker.spawn(backend::probe_loop(
                backends.clone(),
                i,
                cfg.health.clone(),
                cfg.edge.id.clone(),
                probe_ip,
                metrics.clone(),
                stop.clone(),
            ));
        }

        let accepting = Arc::new(AtomicBool::new(true));
        let http_listener = tokio::net::TcpListener::bind(cfg.http.listen)
            .await
            .map_err(|e| StartError::Bind {
                what: "HTTP",
                addr: cfg.http.listen,
                source: e,
            })?;
        let http_addr = http_listener.local_addr().map_err(|e| StartError::Bind {
            what: "HTTP",
            addr: cfg.http.listen,
            source: e,
        })?;
        let state = http::HttpState {
            metrics,
            backends,
            accepting: accepting.clone(),
            synced: match &link {
                Some(l) => l.synced.clone(),
                None => Arc::new(AtomicBool::new(true)),
            },
        };
        // The HTTP server outlives the SIP drain so /readyz can say "draining"; it stops last.
        let http_stop = CancellationToken::new();
        tokio::spawn(http::serve(http_listener, state, http_stop.clone()));

        for (l, a) in cfg.listeners.iter().zip(&bound) {
            info!(transport = %l.transport, addr = %a, side = ?l.side, "SIP listener bound");
            if a.ip().is_unspecified() && l.advertise.is_none() {
                warn!(addr = %a, "listener on an unspecified address without `advertise`: Via, Record-Route and Path will say 127.0.0.1, right only when phones and PBX share this host");
            }
        }
        let mode = if cfg.controller.endpoints.is_empty() {
            "standalone"
        } else {
            "connected"
        };
        info!(addr = %http_addr, edge = %cfg.edge.id, mode, "edge started");
        Ok(Edge {
            sip_addrs: bound,
            http_addr,
            stop,
            tracker,
            accepting,
            http_stop,
            grace: Duration::from_millis(cfg.shutdown.grace_ms),
            reloader,
            firewall,
        })
    }

    /// Reloads the policy (what SIGHUP does).
    pub fn reloader(&self) -> Arc<reload::Reloader> {
        self.reloader.clone()
    }

    /// Serves until `shutdown` fires, then stops reading, lets TCP connections flush their queues
    /// and waits for every task — at most the grace period, warning if it runs out.
    pub async fn run_until(self, shutdown: CancellationToken) {
        shutdown.cancelled().await;
        info!("shutting down: draining");
        self.accepting.store(false, Ordering::Relaxed);
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(self.grace, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                grace_ms = self.grace.as_millis() as u64,
                "drain did not finish within the grace period"
            );
        }
        self.http_stop.cancel();
        info!("stopped");
    }
}

/// At start and every second: limiter and window upkeep, and the ban and registration gauges.
async fn housekeeping(firewall: Arc<Firewall>, metrics: Arc<Metrics>, stop: CancellationToken) {
    loop {
        let registered = firewall.housekeep();
        metrics.registrations_active.set(registered as i64);
        for (origin, n) in firewall.state.bans.count_by_origin() {
            metrics
                .bans_active
                .get_or_create(&metrics::OriginLabels {
                    origin: origin.as_str(),
                })
                .set(n as i64);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Runs the task `make` returns on a thread `name` of its own, with a runtime of its own (I/O and
/// time), so that what it does at length holds up none of the runtime's workers; `done` is dropped
/// when the task ends.
pub(crate) fn spawn_on_own_thread<F, T>(
    name: &str,
    make: impl FnOnce() -> F + Send + 'static,
    done: T,
) -> std::io::Result<()>
where
    F: std::future::Future<Output = ()>,
    T: Send + 'static,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            rt.block_on(make());
            drop(done);
        })?;
    Ok(())
}

/// A TCP listener on `addr`; with `congestion` (`tcp.congestion_control`) not empty, what it
/// accepts uses that congestion control (a name the kernel does not know, or one it does not
/// allow this process, fails here, at start).
fn tcp_listener(addr: SocketAddr, congestion: &str) -> std::io::Result<tokio::net::TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    tcp::set_congestion(socket2::SockRef::from(&s), congestion)?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    tokio::net::TcpListener::from_std(s.into())
}

/// The configured keys, or the one kept in `data_dir/flow.key` (generated on first start).
fn load_flow_keys(cfg: &EdgeConfig) -> Result<FlowKeys, StartError> {
    if let Some(k) = FlowKeys::new(cfg.flow.keys.iter().map(|s| s.as_bytes())) {
        return Ok(k);
    }
    let path = cfg.edge.data_dir.join("flow.key");
    let err = |source| StartError::FlowKey {
        path: path.display().to_string(),
        source,
    };
    let secret = match std::fs::read_to_string(&path) {
        Ok(s) => s.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = data_encoding::HEXLOWER.encode(&rand::random::<[u8; 32]>());
            write_private(&path, &secret).map_err(err)?;
            info!(path = %path.display(), "generated a flow-token key");
            secret
        }
        Err(e) => return Err(err(e)),
    };
    FlowKeys::new([secret.as_bytes()])
        .ok_or_else(|| err(std::io::Error::other("key shorter than 16 characters")))
}

fn write_private(path: &Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(secret.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::tcp_listener;

    /// What a listener accepts uses `tcp.congestion_control` (`reno` is built into every kernel
    /// and allowed to unprivileged processes); a name the kernel does not know fails at start,
    /// naming the key.
    #[tokio::test]
    async fn tcp_listeners_give_their_connections_the_configured_congestion_control() {
        let listener = tcp_listener("127.0.0.1:0".parse().unwrap(), "reno").unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let name = socket2::SockRef::from(&accepted).tcp_congestion().unwrap();
        let name: Vec<u8> = name.into_iter().take_while(|&b| b != 0).collect();
        assert_eq!(name, b"reno");

        let err = tcp_listener("127.0.0.1:0".parse().unwrap(), "nosuchcc").unwrap_err();
        assert!(err.to_string().contains("tcp.congestion_control"), "{err}");
        // Empty keeps the system's.
        tcp_listener("127.0.0.1:0".parse().unwrap(), "").unwrap();
    }
}
