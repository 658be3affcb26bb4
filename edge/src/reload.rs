//! [`Reloader`]: puts a changed `[policy]` in force without a restart, on SIGHUP or when the config
//! file changes (polled every `reload.watch_ms`). The file and the environment are read again as at
//! start; a config that does not load, validate or build (an unreadable GeoIP database) is refused
//! with a log line and the policy in force stays. Sections other than `[policy]` need a restart: a
//! reload that changes them says so.

use crate::config::EdgeConfig;
use crate::metrics::{Metrics, ReasonLabels};
use crate::pipeline::{BuildEnv, Firewall, Pipeline};
use sipwarden_shared::config::EnvSource;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Reloads the policy from where the config came from.
pub struct Reloader {
    file: Option<PathBuf>,
    env: Box<dyn EnvSource + Send + Sync>,
    build_env: BuildEnv,
    firewall: Arc<Firewall>,
    metrics: Arc<Metrics>,
    /// The config in force, to tell which sections a reload changed.
    current: Mutex<EdgeConfig>,
}

/// The file's modification time and length: what the watcher compares.
type Stamp = Option<(SystemTime, u64)>;

impl Reloader {
    pub fn new(
        file: Option<PathBuf>,
        env: Box<dyn EnvSource + Send + Sync>,
        build_env: BuildEnv,
        firewall: Arc<Firewall>,
        metrics: Arc<Metrics>,
        current: EdgeConfig,
    ) -> Reloader {
        Reloader {
            file,
            env,
            build_env,
            firewall,
            metrics,
            current: Mutex::new(current),
        }
    }

    /// Reads the config again and installs its policy. The error says why nothing changed.
    pub fn reload(&self) -> Result<(), String> {
        let result = self.try_reload();
        match &result {
            Ok(()) => info!("policy reloaded"),
            Err(e) => warn!(error = %e, "policy reload refused; the policy in force stays"),
        }
        let reason = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .policy_reloads
            .get_or_create(&ReasonLabels { reason })
            .inc();
        result
    }

    fn try_reload(&self) -> Result<(), String> {
        let file =
            sipwarden_shared::config::read_file(self.file.as_deref()).map_err(|e| e.to_string())?;
        let cfg = EdgeConfig::load(
            file.as_ref().map(|(p, t)| (p.as_str(), t.as_str())),
            self.env.as_ref(),
        )
        .map_err(|e| e.to_string())?;
        let pipeline = Pipeline::build(
            &cfg.policy,
            &self.build_env,
            &self.firewall.state,
            &self.firewall.clock,
        )
        .map_err(|e| e.to_string())?;
        self.firewall.install(pipeline);
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let mut without_policy = cfg.clone();
        without_policy.policy = cur.policy.clone();
        if without_policy != *cur {
            warn!("configuration sections other than [policy] changed; they take effect at the next restart");
        }
        cur.policy = cfg.policy;
        Ok(())
    }

    fn stamp(&self) -> Stamp {
        let meta = std::fs::metadata(self.file.as_ref()?).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    }

    /// Polls the config file every `every` and reloads when it changes.
    pub async fn watch(self: Arc<Self>, every: Duration, stop: CancellationToken) {
        if self.file.is_none() || every.is_zero() {
            return;
        }
        let mut last = self.stamp();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let now = self.stamp();
            if now != last && now.is_some() {
                last = now;
                info!("config file changed");
                let _ = self.reload();
            }
        }
    }
}
