//! The [`Transport`] seam: how a node's outgoing Raft messages reach their peers. Over gRPC between
//! processes; here also [`MemNetwork`], an in-memory network for tests that can drop messages and
//! cut links (in the spirit of raft-rs's `harness/src/network.rs`).

use super::node::Request;
use raft::eraftpb::Message;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// Sends Raft messages to peers; best effort (Raft retries what is lost).
pub trait Transport: Send + Sync + 'static {
    fn send(&self, msgs: Vec<Message>);
}

#[derive(Default)]
struct Links {
    nodes: HashMap<u64, mpsc::Sender<Request>>,
    /// Directed links that drop everything.
    cut: HashSet<(u64, u64)>,
    /// Drop every n-th message (0: none).
    drop_every: u64,
    counter: u64,
}

/// An in-memory network joining nodes of one process.
#[derive(Clone, Default)]
pub struct MemNetwork {
    links: Arc<Mutex<Links>>,
}

impl MemNetwork {
    fn links(&self) -> std::sync::MutexGuard<'_, Links> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Joins node `id`, whose requests go to `tx`.
    pub fn join(&self, id: u64, tx: mpsc::Sender<Request>) {
        self.links().nodes.insert(id, tx);
    }

    /// Removes node `id` (as if it crashed).
    pub fn leave(&self, id: u64) {
        self.links().nodes.remove(&id);
    }

    /// Cuts every link between `group` and the other nodes, both ways.
    pub fn partition(&self, group: &[u64]) {
        let mut l = self.links();
        let all: Vec<u64> = l.nodes.keys().copied().collect();
        for &a in group {
            for &b in &all {
                if !group.contains(&b) {
                    l.cut.insert((a, b));
                    l.cut.insert((b, a));
                }
            }
        }
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.links().cut.clear();
    }

    /// Drops one message in `n` (0 turns dropping off).
    pub fn drop_every(&self, n: u64) {
        self.links().drop_every = n;
    }

    /// The transport of node `from`.
    pub fn transport(&self, from: u64) -> Arc<dyn Transport> {
        Arc::new(MemTransport {
            from,
            net: self.clone(),
        })
    }
}

struct MemTransport {
    from: u64,
    net: MemNetwork,
}

impl Transport for MemTransport {
    fn send(&self, msgs: Vec<Message>) {
        let mut l = self.net.links();
        for m in msgs {
            if l.cut.contains(&(self.from, m.to)) {
                continue;
            }
            l.counter += 1;
            if l.drop_every > 0 && l.counter.is_multiple_of(l.drop_every) {
                continue;
            }
            if let Some(tx) = l.nodes.get(&m.to) {
                let _ = tx.try_send(Request::Step(Box::new(m)));
            }
        }
    }
}
