//! `sipwarden-edge`: flags, config, logging, signals; then [`sipwarden_edge::Edge`] does the work.

use anyhow::Context;
use clap::Parser;
use sipwarden_edge::config::EdgeConfig;
use sipwarden_edge::reload::Reloader;
use sipwarden_edge::Edge;
use sipwarden_shared::config::{self, ProcessEnv};
use sipwarden_shared::telemetry::{self, Identity, LogFormat};
use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// A stateless SIP proxy and firewall in front of a PBX. With no arguments it protects a PBX at
/// 127.0.0.1:5080, listening on UDP and TCP 0.0.0.0:5060.
#[derive(Debug, Parser)]
#[command(name = "sipwarden-edge", version)]
struct Args {
    /// TOML configuration file; every key can also be set as SIPWARDEN_SECTION__KEY.
    #[arg(long, env = "SIPWARDEN_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration, print a summary and exit (status 0 when valid).
    #[arg(long)]
    check_config: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let loaded = config::read_file(args.config.as_deref()).and_then(|f| {
        EdgeConfig::load(
            f.as_ref().map(|(p, t)| (p.as_str(), t.as_str())),
            &ProcessEnv,
        )
    });
    let cfg = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sipwarden-edge: {e}");
            std::process::exit(2);
        }
    };
    if args.check_config {
        println!(
            "configuration is valid: edge {} ({} listeners, {} backends)",
            cfg.edge.id,
            cfg.listeners.len(),
            cfg.backends.len()
        );
        return Ok(());
    }
    let identity = Identity {
        service: "sipwarden-edge",
        attributes: vec![
            ("service.instance.id", cfg.edge.id.clone()),
            ("sipwarden.edge.id", cfg.edge.id.clone()),
            ("sipwarden.site", cfg.edge.site.clone()),
        ],
    };
    let format = LogFormat::from_config(&cfg.log.format);
    telemetry::run(format, "info", &identity, async move {
        let edge = Edge::start_from(cfg, args.config.clone())
            .await
            .context("starting the edge")?;
        let shutdown = CancellationToken::new();
        tokio::spawn(signals(shutdown.clone(), edge.reloader()));
        edge.run_until(shutdown).await;
        Ok(())
    })?
}

/// The one place signals are read: SIGTERM or SIGINT starts the drain, SIGHUP reloads the policy.
async fn signals(shutdown: CancellationToken, reloader: Arc<Reloader>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                // The reload logs its own result; the policy in force stays on error.
                let r = reloader.clone();
                let _ = tokio::task::spawn_blocking(move || r.reload()).await;
            }
        }
    }
    shutdown.cancel();
}
