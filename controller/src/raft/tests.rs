//! Cluster behaviour on an in-memory network that drops and partitions, with real `raft-engine`
//! storage in temporary directories: elections, replication, no acknowledged write lost across a
//! leader partition, snapshots for a lagging node, membership changes, restart from disk.

use super::node::{Handle, MemberChange, Node, NodeConfig};
use super::storage::LogStore;
use super::transport::MemNetwork;
use crate::state::{Applied, BanSelector, Command, NewBan, Op};
use sipwarden_shared::ban::{BanSource, BanTarget};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

struct Member {
    handle: Handle,
    stop: CancellationToken,
    /// Each node runs on its own thread, as it would in its own process: raft-engine keeps a
    /// thread-local block cache keyed by file position, which two engines on one thread share.
    thread: std::thread::JoinHandle<()>,
}

struct Cluster {
    net: MemNetwork,
    dir: tempfile::TempDir,
    members: HashMap<u64, Member>,
    snapshot_every: u64,
}

impl Cluster {
    async fn new(ids: &[u64], snapshot_every: u64) -> Cluster {
        let mut c = Cluster {
            net: MemNetwork::default(),
            dir: tempfile::tempdir().unwrap(),
            members: HashMap::new(),
            snapshot_every,
        };
        for &id in ids {
            c.start(id, ids.to_vec());
        }
        c
    }

    fn start(&mut self, id: u64, voters: Vec<u64>) {
        let store = LogStore::open(&self.dir.path().join(format!("n{id}"))).unwrap();
        let mut cfg = NodeConfig::new(id, voters);
        cfg.tick = Duration::from_millis(10);
        cfg.election_ticks = 10;
        cfg.heartbeat_ticks = 2;
        cfg.snapshot_every = self.snapshot_every;
        let (node, handle, rx) = Node::start(cfg, store, self.net.transport(id)).unwrap();
        self.net.join(id, handle.tx.clone());
        let stop = CancellationToken::new();
        let token = stop.clone();
        let thread = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(node.run(rx, token));
        });
        self.members.insert(
            id,
            Member {
                handle,
                stop,
                thread,
            },
        );
    }

    /// Stops node `id` (its disk stays).
    async fn stop(&mut self, id: u64) {
        self.net.leave(id);
        if let Some(m) = self.members.remove(&id) {
            m.stop.cancel();
            let _ = tokio::task::spawn_blocking(move || m.thread.join()).await;
        }
    }

    fn handle(&self, id: u64) -> &Handle {
        &self.members[&id].handle
    }

    /// The leader all of `ids` agree on, within 5 s.
    async fn leader_among(&self, ids: &[u64]) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let leaders: Vec<u64> = ids
                .iter()
                .map(|id| self.handle(*id).status.borrow().leader)
                .collect();
            if leaders[0] != 0
                && leaders.iter().all(|l| *l == leaders[0])
                && ids.contains(&leaders[0])
            {
                return leaders[0];
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader among {ids:?}: {leaders:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn leader(&self) -> u64 {
        let ids: Vec<u64> = self.members.keys().copied().collect();
        self.leader_among(&ids).await
    }

    /// Waits until every node in `ids` holds exactly `bans` bans.
    async fn converge(&self, ids: &[u64], bans: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let counts: Vec<usize> = ids
                .iter()
                .map(|id| self.handle(*id).read(|s| s.bans().count()))
                .collect();
            if counts.iter().all(|c| *c == bans) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no convergence to {bans}: {counts:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn ban(i: u32) -> Command {
    Command {
        at_unix_ms: 1_800_000_000_000,
        who: "test".into(),
        op: Op::AddBans(vec![NewBan {
            target: BanTarget::Ip(std::net::IpAddr::V4(std::net::Ipv4Addr::from(
                0x0A00_0000 + i,
            ))),
            reason: format!("ban {i}"),
            source: BanSource::Manual,
            expires_unix_ms: None,
            site: None,
        }]),
    }
}

/// Proposes `ban(i)` through `h`, retrying while there is no leader; `true` when acknowledged.
async fn propose(h: &Handle, i: u32) -> bool {
    for _ in 0..50 {
        match h.propose(ban(i)).await {
            Ok(Applied::Bans(_)) => return true,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_elect_replicate_and_answer_followers() {
    let c = Cluster::new(&[1, 2, 3], 10_000).await;
    let leader = c.leader().await;
    let follower = [1, 2, 3].into_iter().find(|i| *i != leader).unwrap();
    assert!(propose(c.handle(leader), 1).await);
    // A proposal on a follower is forwarded to the leader and answered when applied here.
    assert!(propose(c.handle(follower), 2).await);
    c.converge(&[1, 2, 3], 2).await;
    // A linearizable read on a follower sees both.
    let applied = c.handle(follower).read_barrier().await.unwrap();
    assert!(applied >= 3);
    assert_eq!(c.handle(follower).read(|s| s.bans().count()), 2);
    let st = c.handle(leader).status.borrow().clone();
    assert_eq!(st.voters, vec![1, 2, 3]);
    assert_eq!(st.role, "Leader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitioned_leader_loses_no_acknowledged_write() {
    let c = Cluster::new(&[1, 2, 3], 10_000).await;
    let old = c.leader().await;
    let mut acked = 0;
    for i in 0..30 {
        acked += propose(c.handle(old), i).await as usize;
    }
    c.net.partition(&[old]);
    let rest: Vec<u64> = [1, 2, 3].into_iter().filter(|i| *i != old).collect();
    let new = c.leader_among(&rest).await;
    assert_ne!(new, old);
    // The old leader cannot commit alone.
    let lone =
        tokio::time::timeout(Duration::from_millis(500), c.handle(old).propose(ban(999))).await;
    assert!(
        !matches!(lone, Ok(Ok(_))),
        "a minority must not acknowledge"
    );
    for i in 30..60 {
        acked += propose(c.handle(new), i).await as usize;
    }
    assert_eq!(acked, 60);
    c.net.heal();
    c.converge(&[1, 2, 3], 60).await;
    for id in [1, 2, 3] {
        let missing: Vec<u32> = (0..60)
            .filter(|i| {
                let t = BanTarget::Ip(std::net::IpAddr::V4(std::net::Ipv4Addr::from(
                    0x0A00_0000 + i,
                )));
                !c.handle(id).read(|s| s.bans().any(|b| b.target == t))
            })
            .collect();
        assert!(missing.is_empty(), "node {id} lost {missing:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lossy_links_still_replicate_everything() {
    let c = Cluster::new(&[1, 2, 3], 10_000).await;
    let leader = c.leader().await;
    c.net.drop_every(4);
    let mut acked = 0;
    for i in 0..100 {
        acked += propose(c.handle(leader), i).await as usize;
    }
    c.net.drop_every(0);
    assert_eq!(acked, 100);
    c.converge(&[1, 2, 3], 100).await;
    let revs: Vec<u64> = [1, 2, 3]
        .iter()
        .map(|i| c.handle(*i).read(|s| s.revision()))
        .collect();
    assert!(revs.iter().all(|r| *r == revs[0]), "{revs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lagging_node_catches_up_from_a_snapshot_after_compaction() {
    let mut c = Cluster::new(&[1, 2, 3], 20).await;
    let leader = c.leader().await;
    let lagging = [1, 2, 3].into_iter().find(|i| *i != leader).unwrap();
    c.stop(lagging).await;
    for i in 0..120 {
        assert!(propose(c.handle(leader), i).await);
    }
    let snap = c.handle(leader).status.borrow().snapshot_index;
    assert!(
        snap >= 100,
        "the leader compacted its log (snapshot at {snap})"
    );
    c.start(lagging, vec![1, 2, 3]);
    c.converge(&[1, 2, 3], 120).await;
    // Removing by id still works after the snapshot (the target index came back).
    let applied = c
        .handle(leader)
        .propose(Command {
            at_unix_ms: 1,
            who: "t".into(),
            op: Op::RemoveBans(vec![BanSelector::Target(BanTarget::Ip(
                "10.0.0.5".parse().unwrap(),
            ))]),
        })
        .await
        .unwrap();
    assert!(matches!(applied, Applied::Removed(r) if r.len() == 1));
    c.converge(&[1, 2, 3], 119).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_are_added_and_removed_at_run_time() {
    let mut c = Cluster::new(&[1, 2, 3], 10_000).await;
    let leader = c.leader().await;
    for i in 0..10 {
        assert!(propose(c.handle(leader), i).await);
    }
    c.start(4, vec![]);
    let cs = c
        .handle(leader)
        .change_member(MemberChange {
            id: 4,
            add: true,
            address: "127.0.0.1:7404".into(),
            who: "admin".into(),
            at_unix_ms: 5,
        })
        .await
        .unwrap();
    assert_eq!(cs.voters.len(), 4);
    c.converge(&[1, 2, 3, 4], 10).await;
    assert!(c
        .handle(leader)
        .status
        .borrow()
        .addresses
        .contains(&(4, "127.0.0.1:7404".into())));
    let cs = c
        .handle(leader)
        .change_member(MemberChange {
            id: 4,
            add: false,
            address: String::new(),
            who: "admin".into(),
            at_unix_ms: 6,
        })
        .await
        .unwrap();
    assert_eq!(cs.voters.len(), 3);
    c.stop(4).await;
    assert!(
        propose(c.handle(leader), 50).await,
        "three voters still commit"
    );
    let audit: Vec<String> = c
        .handle(leader)
        .read(|s| s.audit().map(|a| a.action.clone()).collect());
    assert!(
        audit.contains(&"member.add".to_string()) && audit.contains(&"member.remove".to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_restarted_from_disk_keeps_its_state() {
    let mut c = Cluster::new(&[1, 2, 3], 25).await;
    let leader = c.leader().await;
    for i in 0..60 {
        assert!(propose(c.handle(leader), i).await);
    }
    c.converge(&[1, 2, 3], 60).await;
    let rev = c.handle(leader).read(|s| s.revision());
    for id in [1, 2, 3] {
        c.stop(id).await;
    }
    for id in [1, 2, 3] {
        c.start(id, vec![1, 2, 3]);
    }
    let leader = c.leader().await;
    c.converge(&[1, 2, 3], 60).await;
    assert_eq!(c.handle(leader).read(|s| s.revision()), rev);
    assert!(propose(c.handle(leader), 100).await);
    c.converge(&[1, 2, 3], 61).await;
}
