//! The edge's link to the controller cluster: one task holds a `Watch` stream on one controller,
//! says which revision it has, and applies what arrives to the ban set — a snapshot replaces every
//! cluster ban, deltas add and remove one. When the stream breaks it tries the next controller with
//! backoff, resuming from its revision. Fail-static: with every controller down the last bans stay
//! in force (and in the ban file, so a restart keeps them too). A second task proposes the edge's
//! auto-bans to the cluster, queued (bounded) while no controller answers. Only this module talks
//! gRPC.

use crate::bans::{Ban, BanOrigin, BanStore, NEVER};
use crate::config::Controller;
use crate::metrics::Metrics;
use sipwarden_proto::v1 as pb;
use sipwarden_proto::v1::edge_control_client::EdgeControlClient;
use sipwarden_proto::v1::watch_event::Kind;
use sipwarden_shared::ban::BanTarget;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The edge's ban for a cluster ban, when it is one the gate enforces (an address or network).
pub fn edge_ban(b: &pb::Ban) -> Option<Ban> {
    let target = BanTarget::try_from(b.target.as_ref()?).ok()?;
    let network = target.network()?;
    let expires = u64::try_from(b.expires_unix_ms).unwrap_or(0);
    Some(Ban {
        network,
        origin: BanOrigin::Cluster,
        rule: format!("cluster:{}", b.id),
        reason: b.reason.clone(),
        created_unix_ms: u64::try_from(b.created_unix_ms).unwrap_or(0),
        expires_unix_ms: if expires == 0 { NEVER } else { expires },
    })
}

/// Applies one watch event; returns the revision the edge now has.
pub fn apply(bans: &BanStore, e: &pb::WatchEvent) -> u64 {
    match &e.kind {
        Some(Kind::Snapshot(s)) => {
            let list: Vec<Ban> = s.bans.iter().filter_map(edge_ban).collect();
            info!(bans = list.len(), revision = e.revision, "cluster snapshot");
            bans.replace(BanOrigin::Cluster, list);
        }
        Some(Kind::BanPut(b)) => {
            if let Some(b) = edge_ban(b) {
                bans.ban(b);
            }
        }
        Some(Kind::BanRemoved(b)) => {
            if let Some(b) = edge_ban(b) {
                bans.unban_from(b.network, BanOrigin::Cluster);
            }
        }
        // Bindings and policies are used by later parts of the cluster link.
        Some(_) | None => {}
    }
    e.revision
}

/// Most auto-bans queued while no controller takes them; past this the oldest are dropped.
pub const QUEUE_CAP: usize = 10_000;
/// Most bans per `ProposeBans` call.
const BATCH: usize = 500;

/// The proto spec of an auto-ban.
pub fn ban_spec(b: &Ban) -> pb::BanSpec {
    use pb::ban_target::Target;
    let host = (b.network.prefix_len() == b.network.max_prefix_len()).then(|| b.network.addr());
    let target = match host {
        Some(ip) => Target::Ip(ip.to_string()),
        None => Target::Cidr(b.network.to_string()),
    };
    pb::BanSpec {
        target: Some(pb::BanTarget {
            target: Some(target),
        }),
        reason: b.reason.chars().take(512).collect(),
        ttl_s: 0,
        expires_unix_ms: if b.expires_unix_ms == NEVER {
            0
        } else {
            b.expires_unix_ms
        },
        site: String::new(),
        source: format!("auto:{}", b.rule),
    }
}

/// Proposes the edge's auto-bans to the cluster: batches what `rx` delivers, queues it (bounded,
/// oldest dropped and counted) while no controller answers, retries on the next endpoint.
pub async fn uplink(
    cfg: Controller,
    edge_id: String,
    mut rx: tokio::sync::mpsc::Receiver<Ban>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let Ok(bearer) = format!("Bearer {}", cfg.secret).parse::<tonic::metadata::MetadataValue<_>>()
    else {
        return;
    };
    let mut queue: std::collections::VecDeque<Ban> = std::collections::VecDeque::new();
    let mut endpoints = cfg.endpoints.iter().cycle();
    let mut endpoint = endpoints.next().cloned().unwrap_or_default();
    let mut client: Option<EdgeControlClient<tonic::transport::Channel>> = None;
    let mut backoff = Duration::from_millis(50);
    let max = Duration::from_millis(cfg.reconnect_max_ms.max(50));
    loop {
        if queue.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => return,
                b = rx.recv() => match b {
                    Some(b) => queue.push_back(b),
                    None => return,
                },
            }
        }
        while let Ok(b) = rx.try_recv() {
            queue.push_back(b);
        }
        while queue.len() > QUEUE_CAP {
            queue.pop_front();
            metrics.reports_dropped.inc();
        }
        metrics.reports_queued.set(queue.len() as i64);
        if client.is_none() {
            client = match channel_to(&endpoint) {
                Ok(e) => e.connect().await.ok().map(EdgeControlClient::new),
                Err(_) => None,
            };
        }
        let batch: Vec<pb::BanSpec> = queue.iter().take(BATCH).map(ban_spec).collect();
        let sent = match &mut client {
            Some(c) => {
                let mut req = tonic::Request::new(pb::ProposeBansRequest {
                    edge_id: edge_id.clone(),
                    bans: batch.clone(),
                });
                req.metadata_mut().insert("authorization", bearer.clone());
                match c.propose_bans(req).await {
                    Ok(_) => true,
                    Err(s) if s.code() == tonic::Code::InvalidArgument => {
                        // Not retryable: drop the batch rather than block the queue.
                        warn!(error = %s, "controller refused auto-bans");
                        true
                    }
                    Err(s) => {
                        debug!(error = %s, %endpoint, "proposing auto-bans failed; retrying");
                        false
                    }
                }
            }
            None => false,
        };
        if sent {
            queue.drain(..batch.len());
            metrics.reports_queued.set(queue.len() as i64);
            backoff = Duration::from_millis(50);
            continue;
        }
        client = None;
        endpoint = endpoints.next().cloned().unwrap_or_default();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(max);
    }
}

/// A gRPC endpoint for the controller at `addr` (`host:port`).
fn channel_to(addr: &str) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true),
    )
}

/// Keeps a watch stream open to one of `cfg.endpoints` until `stop`.
pub async fn run(
    cfg: Controller,
    edge_id: String,
    site: String,
    bans: Arc<BanStore>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut revision = 0u64;
    let mut backoff = Duration::from_millis(50);
    let max = Duration::from_millis(cfg.reconnect_max_ms.max(50));
    let bearer: tonic::metadata::MetadataValue<_> = match format!("Bearer {}", cfg.secret).parse() {
        Ok(v) => v,
        Err(_) => {
            warn!("controller.secret is not a valid header value; staying standalone");
            return;
        }
    };
    for endpoint in cfg.endpoints.iter().cycle() {
        if stop.is_cancelled() {
            return;
        }
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = watch_once(endpoint, &bearer, &edge_id, &site, &bans, &metrics, &mut revision) => r,
        };
        metrics.controller_connected.set(0);
        match result {
            Ok(()) => debug!(%endpoint, "watch stream ended"),
            Err(e) => debug!(%endpoint, error = %e, "controller unreachable"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(max);
        if revision > 0 {
            // Once a stream has carried data, reconnect quickly.
            backoff = backoff.min(Duration::from_millis(200));
        }
    }
}

async fn watch_once(
    endpoint: &str,
    bearer: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    edge_id: &str,
    site: &str,
    bans: &BanStore,
    metrics: &Metrics,
    revision: &mut u64,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let channel = channel_to(endpoint)?
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    let mut client = EdgeControlClient::new(channel).max_decoding_message_size(256 << 20);
    let mut req = tonic::Request::new(pb::EdgeHello {
        edge_id: edge_id.to_string(),
        site: site.to_string(),
        revision: *revision,
    });
    req.metadata_mut().insert("authorization", bearer.clone());
    let mut stream = client.watch(req).await?.into_inner();
    info!(%endpoint, revision = *revision, "watching the controller cluster");
    metrics.controller_connected.set(1);
    while let Some(e) = stream.message().await? {
        *revision = apply(bans, &e);
        metrics.watch_revision.set(*revision as i64);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pb_ban(id: &str, target: pb::ban_target::Target, expires: i64) -> pb::Ban {
        pb::Ban {
            id: id.into(),
            target: Some(pb::BanTarget {
                target: Some(target),
            }),
            reason: "r".into(),
            expires_unix_ms: expires,
            ..Default::default()
        }
    }

    #[test]
    fn auto_bans_become_specs() {
        let b = Ban {
            network: "192.0.2.7/32".parse().unwrap(),
            origin: BanOrigin::Auto,
            rule: "scanner".into(),
            reason: "UA friendly-scanner".into(),
            created_unix_ms: 1,
            expires_unix_ms: 5_000,
        };
        let s = ban_spec(&b);
        assert_eq!(s.source, "auto:scanner");
        assert_eq!(s.expires_unix_ms, 5_000);
        assert!(
            matches!(s.target.unwrap().target, Some(pb::ban_target::Target::Ip(ip)) if ip == "192.0.2.7")
        );
        let net = Ban {
            network: "2001:db8::/48".parse().unwrap(),
            expires_unix_ms: NEVER,
            ..b
        };
        let s = ban_spec(&net);
        assert_eq!(s.expires_unix_ms, 0);
        assert!(
            matches!(s.target.unwrap().target, Some(pb::ban_target::Target::Cidr(n)) if n == "2001:db8::/48")
        );
    }

    #[test]
    fn snapshot_then_deltas_reach_the_ban_set() {
        use pb::ban_target::Target;
        let bans = BanStore::new(None, 100);
        let snap = pb::WatchEvent {
            revision: 5,
            kind: Some(Kind::Snapshot(pb::StateSnapshot {
                bans: vec![
                    pb_ban("b1", Target::Ip("192.0.2.1".into()), 0),
                    pb_ban("b2", Target::Cidr("198.51.100.0/24".into()), 10_000),
                    pb_ban("b3", Target::Aor("sip:1001@pbx".into()), 0),
                ],
                ..Default::default()
            })),
        };
        assert_eq!(apply(&bans, &snap), 5);
        bans.apply(0);
        assert_eq!(bans.snapshot().len(), 2, "AOR bans are not address bans");
        assert!(bans
            .lookup("198.51.100.7".parse().unwrap(), 9_999)
            .is_some());
        assert!(
            bans.lookup("198.51.100.7".parse().unwrap(), 10_000)
                .is_none(),
            "expiry kept"
        );
        let put = pb::WatchEvent {
            revision: 6,
            kind: Some(Kind::BanPut(pb_ban(
                "b4",
                Target::Ip("203.0.113.9".into()),
                0,
            ))),
        };
        let removed = pb::WatchEvent {
            revision: 7,
            kind: Some(Kind::BanRemoved(pb_ban(
                "b1",
                Target::Ip("192.0.2.1".into()),
                0,
            ))),
        };
        apply(&bans, &put);
        assert_eq!(apply(&bans, &removed), 7);
        bans.apply(0);
        assert!(bans.lookup("203.0.113.9".parse().unwrap(), 0).is_some());
        assert!(bans.lookup("192.0.2.1".parse().unwrap(), 0).is_none());
    }
}
