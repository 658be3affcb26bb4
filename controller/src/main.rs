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
    #[arg(long, conflicts_with = "id_from_hostname")]
    id: Option<u64>,
    /// Take the Raft id from the host name's trailing ordinal plus one (`sipwarden-controller-0`
    /// is node 1), as in a Kubernetes StatefulSet.
    #[arg(long)]
    id_from_hostname: bool,
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
    if args.id_from_hostname {
        let host = hostname();
        match id_from_hostname(&host) {
            Some(id) => cfg.node.id = id,
            None => {
                eprintln!(
                    "sipwarden-controller: --id-from-hostname: host name {host:?} does not end in -<ordinal>"
                );
                std::process::exit(2);
            }
        }
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
    let identity = Identity {
        service: "sipwarden-controller",
        attributes: vec![
            ("service.instance.id", format!("node-{}", cfg.node.id)),
            ("sipwarden.node.id", cfg.node.id.to_string()),
        ],
    };
    let format = LogFormat::from_config(&cfg.log.format);
    telemetry::run(format, "info", &identity, async move {
        let c = Controller::start(cfg)
            .await
            .context("starting the controller")?;
        let shutdown = CancellationToken::new();
        tokio::spawn(signals(shutdown.clone()));
        c.run_until(shutdown).await;
        Ok(())
    })?
}

/// The host name (`HOSTNAME`, else the kernel's).
fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// `name-<n>` → `n + 1`.
fn id_from_hostname(host: &str) -> Option<u64> {
    let (_, ordinal) = host.rsplit_once('-')?;
    ordinal.parse::<u64>().ok()?.checked_add(1)
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

#[cfg(test)]
mod tests {
    #[test]
    fn statefulset_ordinals_become_ids_from_one() {
        assert_eq!(super::id_from_hostname("sipwarden-controller-0"), Some(1));
        assert_eq!(super::id_from_hostname("sw-controller-12"), Some(13));
        assert_eq!(super::id_from_hostname("controller"), None);
        assert_eq!(super::id_from_hostname("controller-x"), None);
    }
}
