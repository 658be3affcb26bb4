//! Cluster-wide rate limits: three controllers, two edges at two sites, one limit of N OPTIONS per
//! minute per source. The same source sends through both edges in turn; the cluster admits N plus
//! at most about one push interval of traffic. With Redis as the counter store the count survives
//! the leader being killed half way.

use sipwarden_tests::controller::*;
use sipwarden_tests::redis::RedisProc;
use sipwarden_tests::*;
use std::net::UdpSocket;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const PBX_IP: &str = "127.0.0.71";
const SOURCE_IP: &str = "127.0.0.72";
/// The limit: OPTIONS per source per minute, cluster-wide.
const N: u32 = 40;
/// Messages per second the test sends (both edges together).
const RATE: u32 = 40;
/// Edges push every 250 ms: one push interval of traffic is RATE / 4.
const BATCH: u32 = RATE / 4;

fn limits(redis_url: &str) -> String {
    format!(
        "[counters]\nredis_url = \"{redis_url}\"\n\n[[counters.limits]]\nname = \"options-per-source\"\n\
key = \"source\"\nmethods = [\"OPTIONS\"]\nmax = {N}\nwindow_s = 60\naction = \"reject\"\n"
    )
}

struct Rig {
    ctls: Vec<ControllerProc>,
    edges: Vec<EdgeProc>,
    _pbx: SippServer,
    _root: tempfile::TempDir,
}

impl Rig {
    fn start(root: tempfile::TempDir, redis_url: &str) -> Rig {
        let (seats, ctls) = cluster(root.path(), 3, &limits(redis_url));
        let pbx_port = free_port(PBX_IP);
        let pbx = SippServer::start(root.path(), "pbx.xml", PBX_IP, pbx_port, "udp");
        let extra = format!(
            "[[backends]]\naddress = \"{PBX_IP}:{pbx_port}\"\n\n{}",
            edge_link(&seats)
        );
        let edges: Vec<EdgeProc> = [("127.0.0.2", "a"), ("127.0.0.3", "b")]
            .iter()
            .map(|(ip, site)| {
                let e = EdgeProc::start_with_env(
                    ip,
                    &extra,
                    &[("SIPWARDEN_EDGE__ID", site), ("SIPWARDEN_EDGE__SITE", site)],
                );
                assert!(
                    wait_until(Duration::from_secs(10), || metric(
                        &e.metrics(),
                        "sipwarden_edge_cluster_limits"
                    ) == Some(1.0)),
                    "edge {site} learned the cluster limit"
                );
                e
            })
            .collect();
        Rig {
            ctls,
            edges,
            _pbx: pbx,
            _root: root,
        }
    }

    /// Sends `count` OPTIONS from `sock`, alternating between the edges at about `RATE` per
    /// second; returns how many the PBX answered (admitted) and how many the edges refused with
    /// 503, per edge.
    fn drive(&self, sock: &UdpSocket, count: u32, n: &mut u32) -> ([u32; 2], [u32; 2]) {
        let (mut admitted, mut refused) = ([0; 2], [0; 2]);
        for i in 0..count as usize {
            *n += 1;
            let e = &self.edges[i % 2];
            match sip_status(sock, &e.addr(), "OPTIONS", "probe", "lim", *n) {
                Some(200) => admitted[i % 2] += 1,
                Some(503) => refused[i % 2] += 1,
                other => panic!("OPTIONS {n} through edge {}: {other:?}", e.ip),
            }
            std::thread::sleep(Duration::from_millis(1000 / RATE as u64));
        }
        (admitted, refused)
    }
}

/// Waits, if needed, until at least `need` seconds of the current minute remain, so one run of
/// the test stays inside one counting window.
fn inside_one_window(need: u64) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let left = 60 - now % 60;
    if left < need {
        std::thread::sleep(Duration::from_secs(left + 1));
    }
}

fn window_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 60
}

#[test]
fn a_limit_holds_when_the_load_is_split_across_two_edges() {
    let rig = Rig::start(tempfile::tempdir().unwrap(), "");
    let sock = UdpSocket::bind(format!("{SOURCE_IP}:0")).unwrap();
    let mut n = 0;
    inside_one_window(20);
    let (admitted, refused) = rig.drive(&sock, 2 * N + 20, &mut n);
    let total: u32 = admitted.iter().sum();
    println!(
        "limit {N}/min, split across 2 edges: admitted {total} ({} + {}), refused {} + {} \
         (bound N + one push interval = {})",
        admitted[0],
        admitted[1],
        refused[0],
        refused[1],
        N + BATCH
    );
    assert!(total >= N, "the limit refused early: {total} < {N}");
    assert!(
        total <= N + BATCH,
        "the limit leaked: {total} > {}",
        N + BATCH
    );
    assert!(
        refused[0] > 0 && refused[1] > 0,
        "both edges enforce it: {refused:?}"
    );
    assert!(
        rig.edges.iter().all(|e| e.events("limit", "reject") >= 1.0),
        "each edge reports its refusals as security events"
    );
    // A different source is not limited.
    let other = UdpSocket::bind("127.0.0.73:0").unwrap();
    n += 1;
    assert_eq!(
        sip_status(&other, &rig.edges[0].addr(), "OPTIONS", "probe", "lim", n),
        Some(200)
    );
}

#[test]
fn with_redis_the_count_survives_the_leader_being_killed() {
    let root = tempfile::tempdir().unwrap();
    let redis = RedisProc::start(root.path());
    let mut rig = Rig::start(root, &redis.url());
    let sock = UdpSocket::bind(format!("{SOURCE_IP}:0")).unwrap();
    let mut n = 0;
    inside_one_window(25);
    let window = window_now();
    let first = N * 3 / 4;
    let (a1, r1) = rig.drive(&sock, first, &mut n);
    assert_eq!(a1.iter().sum::<u32>(), first, "under the limit: {r1:?}");
    // The counts are in Redis (not only in the leader's memory).
    let key = format!("sipwarden:ctr:options-per-source:{window}:{SOURCE_IP}");
    assert!(
        wait_until(Duration::from_secs(5), || redis
            .command(&format!("GET {key}"))
            .is_some_and(|v| v.ends_with(&first.to_string()))),
        "redis holds the count: {:?}",
        redis.command(&format!("GET {key}"))
    );

    // Kill the leader.
    let refs: Vec<&ControllerProc> = rig.ctls.iter().collect();
    let leader = agreed_leader(&refs, Duration::from_secs(5)).unwrap();
    let li = rig.ctls.iter().position(|c| c.id == leader).unwrap();
    rig.ctls[li].kill();
    let survivors: Vec<&ControllerProc> = rig.ctls.iter().filter(|c| c.id != leader).collect();
    agreed_leader(&survivors, Duration::from_secs(15)).expect("a new leader");

    let (a2, r2) = rig.drive(&sock, 2 * N, &mut n);
    let total = a1.iter().sum::<u32>() + a2.iter().sum::<u32>();
    // While no leader answers, each edge holds the limit alone on the total it last heard plus
    // its own counts since: the overshoot is at most one push interval per edge. Had the counts
    // died with the leader, the cluster would have admitted `first + N` (70).
    let bound = N + 2 * BATCH;
    println!(
        "redis store, leader {leader} killed after {first}: admitted {total} in all \
         (limit {N}, bound {bound}, counts lost would admit {}), refused {:?}",
        first + N,
        r2
    );
    assert!(total >= N, "refused early: {total}");
    assert!(
        total <= bound,
        "counts were lost in the failover: {total} admitted > {bound}"
    );
    // The edges found the new leader (a follower's answer names it).
    assert!(rig.edges.iter().all(|e| {
        metric(
            &e.metrics(),
            "sipwarden_edge_limit_pushes_total{reason=\"ok\"}",
        )
        .is_some_and(|v| v > 0.0)
    }));
}
