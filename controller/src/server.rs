//! [`Controller`]: opens the Raft log, starts the node, the gRPC server (peers) and the HTTP server
//! (REST admin API and probes), and stops them on shutdown.

use crate::api::auth::{Role, Tokens};
use crate::api::core::{Api, MemberHook};
use crate::api::grpc::AdminService;
use crate::api::rest;
use crate::config::ControllerConfig;
use crate::raft::grpc::{GrpcTransport, PeerService, CHUNK};
use crate::raft::node::{Node, NodeConfig};
use crate::raft::storage::LogStore;
use crate::watch::EdgeService;
use sipwarden_proto::v1::admin_server::AdminServer;
use sipwarden_proto::v1::edge_control_server::EdgeControlServer;
use sipwarden_proto::v1::peer_server::PeerServer;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// Why the controller could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] crate::raft::storage::StoreError),
    #[error("raft: {0}")]
    Raft(#[from] crate::raft::node::RaftError),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("counter store: {0}")]
    Counters(#[from] crate::counters::StoreError),
    #[error("admin token in {path}: {source}")]
    Token {
        path: String,
        source: std::io::Error,
    },
}

/// A running controller.
pub struct Controller {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub handle: crate::raft::node::Handle,
    stop: CancellationToken,
    tracker: TaskTracker,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The admin token kept in `data_dir/admin.token` (0600), generated on first start.
fn admin_token(dir: &Path) -> Result<String, StartError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("admin.token");
    let err = |source| StartError::Token {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let token = data_encoding::BASE64URL_NOPAD.encode(&rand::random::<[u8; 32]>());
    std::fs::create_dir_all(dir).map_err(err)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(err)?;
    f.write_all(token.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    info!(path = %path.display(), "generated an admin token (no auth.tokens configured)");
    Ok(token)
}

impl Controller {
    pub async fn start(cfg: ControllerConfig) -> Result<Controller, StartError> {
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let members = cfg.members();
        let voters: Vec<u64> = if cfg.cluster.join {
            Vec::new()
        } else if members.is_empty() {
            vec![cfg.node.id]
        } else {
            members.iter().map(|(id, _)| *id).collect()
        };
        let store = LogStore::open(&cfg.node.data_dir.join("raft"))?;
        let transport =
            GrpcTransport::new(&cfg.cluster.peer_secret, cfg.grpc.tls.clone(), stop.clone());
        for (id, addr) in &members {
            if *id != cfg.node.id {
                transport.set_peer(*id, addr);
            }
        }
        let mut ncfg = NodeConfig::new(cfg.node.id, voters);
        ncfg.tick = Duration::from_millis(cfg.cluster.tick_ms);
        ncfg.election_ticks = cfg.cluster.election_ticks;
        ncfg.heartbeat_ticks = cfg.cluster.heartbeat_ticks;
        ncfg.snapshot_every = cfg.cluster.snapshot_every;
        ncfg.addresses = members.clone();
        let (node, handle, rx) = Node::start(ncfg, store, transport.clone())?;
        tracker.spawn(node.run(rx, stop.clone()));

        // Peers learned from membership changes.
        {
            let mut status = handle.status.clone();
            let transport = transport.clone();
            let me = cfg.node.id;
            let stop = stop.clone();
            tracker.spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        r = status.changed() => if r.is_err() { return },
                    }
                    let st = status.borrow().clone();
                    for (id, addr) in &st.addresses {
                        if *id != me {
                            transport.set_peer(*id, addr);
                        }
                    }
                }
            });
        }

        let mut tokens = Tokens::new(&cfg.auth.tokens);
        if cfg.auth.tokens.is_empty() {
            tokens.push(&admin_token(&cfg.node.data_dir)?, "admin", Role::Admin);
        }
        let on_member: MemberHook = {
            let transport = transport.clone();
            Arc::new(move |id, addr| match addr {
                Some(a) => transport.set_peer(id, a),
                None => transport.remove_peer(id),
            })
        };
        let api = Api {
            handle: handle.clone(),
            tokens: Arc::new(tokens),
            clock: unix_ms,
            on_member,
            metrics: Arc::new(crate::metrics::Metrics::default()),
        };

        let grpc = tokio::net::TcpListener::bind(cfg.grpc.listen)
            .await
            .map_err(|source| StartError::Bind {
                what: "gRPC",
                addr: cfg.grpc.listen,
                source,
            })?;
        let grpc_addr = grpc.local_addr().map_err(|source| StartError::Bind {
            what: "gRPC",
            addr: cfg.grpc.listen,
            source,
        })?;
        let peer = PeerServer::new(PeerService {
            handle: handle.clone(),
            secret: cfg.cluster.peer_secret.as_str().into(),
        })
        .max_decoding_message_size(CHUNK * 2);
        let admin =
            AdminServer::new(AdminService { api: api.clone() }).max_decoding_message_size(64 << 20);
        let store = crate::counters::Store::open(&cfg.counters).await?;
        info!(
            store = store.kind(),
            limits = cfg.counters.limits.len(),
            "cluster rate counters"
        );
        let counters = Arc::new(crate::counters::Counters::new(
            cfg.counters.limits.clone(),
            store,
        ));
        let edges = EdgeControlServer::new(EdgeService {
            handle: handle.clone(),
            secret: cfg.edges.secret.as_str().into(),
            api: api.clone(),
            counters,
        })
        .max_encoding_message_size(256 << 20);
        let mut builder = tonic::transport::Server::builder();
        if let Some(t) = cfg
            .grpc
            .tls
            .server("grpc.tls")
            .map_err(|e| StartError::Tls(e.to_string()))?
        {
            builder = builder
                .tls_config(t)
                .map_err(|e| StartError::Tls(format!("grpc.tls: {e}")))?;
        }
        let grpc_stop = stop.clone();
        tracker.spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc);
            if let Err(e) = builder
                .trace_fn(sipwarden_shared::telemetry::grpc_span)
                .add_service(peer)
                .add_service(admin)
                .add_service(edges)
                .serve_with_incoming_shutdown(incoming, grpc_stop.cancelled_owned())
                .await
            {
                warn!(error = %e, "gRPC server failed");
            }
        });

        let http = tokio::net::TcpListener::bind(cfg.http.listen)
            .await
            .map_err(|source| StartError::Bind {
                what: "HTTP",
                addr: cfg.http.listen,
                source,
            })?;
        let http_addr = http.local_addr().map_err(|source| StartError::Bind {
            what: "HTTP",
            addr: cfg.http.listen,
            source,
        })?;
        let http_stop = stop.clone();
        tracker.spawn(async move {
            if let Err(e) = axum::serve(http, rest::router(api))
                .with_graceful_shutdown(http_stop.cancelled_owned())
                .await
            {
                warn!(error = %e, "HTTP server failed");
            }
        });
        info!(id = cfg.node.id, %grpc_addr, %http_addr, members = members.len().max(1), "controller started");
        Ok(Controller {
            grpc_addr,
            http_addr,
            handle,
            stop,
            tracker,
        })
    }

    /// Serves until `shutdown`, then stops every task (bounded).
    pub async fn run_until(self, shutdown: CancellationToken) {
        shutdown.cancelled().await;
        info!("shutting down");
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(Duration::from_secs(5), self.tracker.wait())
            .await
            .is_err()
        {
            warn!("shutdown did not finish within 5 s");
        }
    }
}
