//! `sipwarden-controller`: flags, config, logging, signals; [`sipwarden_controller::server`] does
//! the work. With no arguments: a single-node cluster, data in `./data`, gRPC on 127.0.0.1:7400,
//! REST on 127.0.0.1:7480, an admin token generated in `./data/admin.token`.

use anyhow::Context;
use clap::Parser;
use sipwarden_controller::config::ControllerConfig;
use sipwarden_controller::server::Controller;
use sipwarden_shared::config::{self, ProcessEnv};
use sipwarden_shared::telemetry::{self, Identity, LogFormat};
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// The sipwarden controller: a Raft cluster holding bans, registrations and policies for every
/// edge, and the ban-list management API.
#[derive(Debug, Parser)]
#[command(name = "sipwarden-controller", version)]
struct Args {
    /// TOML configuration file; every key can also be set as SIPWARDEN_SECTION__KEY.
    #[arg(long, env = "SIPWARDEN_CONFIG")]
    config: Option<PathBuf>,
    /// This node's Raft id (overrides node.id).
    #[arg(long)]
    id: Option<u64>,
    /// Initial members, `id=host:port,...` (overrides cluster.peers).
    #[arg(long, value_delimiter = ',')]
    peers: Option<Vec<String>>,
    /// Join a running cluster instead of creating one.
    #[arg(long)]
    join: bool,
    /// Data directory (overrides node.data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// gRPC listen address (overrides grpc.listen).
    #[arg(long)]
    grpc_listen: Option<SocketAddr>,
    /// REST listen address (overrides http.listen).
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// Validate the configuration and exit (status 2 when invalid).
    #[arg(long)]
    check_config: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let loaded = config::read_file(args.config.as_deref()).and_then(|f| {
        ControllerConfig::load(
            f.as_ref().map(|(p, t)| (p.as_str(), t.as_str())),
            &ProcessEnv,
        )
    });
    let mut cfg = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sipwarden-controller: {e}");
            std::process::exit(2);
        }
    };
    if let Some(id) = args.id {
        cfg.node.id = id;
    }
    if let Some(p) = args.peers {
        cfg.cluster.peers = p;
    }
    cfg.cluster.join |= args.join;
    if let Some(d) = args.data_dir {
        cfg.node.data_dir = d;
    }
    if let Some(a) = args.grpc_listen {
        cfg.grpc.listen = a;
    }
    if let Some(a) = args.http_listen {
        cfg.http.listen = a;
    }
    if let Err(e) = cfg.validate() {
        eprintln!("sipwarden-controller: {e}");
        std::process::exit(2);
    }
    if args.check_config {
        println!(
            "configuration is valid: node {} ({} initial members)",
            cfg.node.id,
            cfg.members().len().max(1)
        );
        return Ok(());
    }
    let format = if cfg.log.format == "json" {
        LogFormat::Json
    } else {
        LogFormat::Text
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let telemetry = {
        let _rt = rt.enter();
        telemetry::init(
            format,
            "info",
            &Identity {
                service: "sipwarden-controller",
                attributes: vec![
                    ("service.instance.id", format!("node-{}", cfg.node.id)),
                    ("sipwarden.node.id", cfg.node.id.to_string()),
                ],
            },
        )
    };
    let result = rt.block_on(async move {
        let c = Controller::start(cfg)
            .await
            .context("starting the controller")?;
        let shutdown = CancellationToken::new();
        tokio::spawn(signals(shutdown.clone()));
        c.run_until(shutdown).await;
        Ok(())
    });
    {
        let _rt = rt.enter();
        telemetry.shutdown();
    }
    result
}

/// SIGTERM or SIGINT stops the controller.
async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    shutdown.cancel();
}
