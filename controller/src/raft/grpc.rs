//! Raft between controller processes over gRPC (`sipwarden.v1.Peer`): each peer gets a queue and a
//! task holding one client stream to it, reconnecting with backoff; messages are raft-rs protobuf
//! bytes, cut into chunks so a snapshot never has to fit one gRPC message. The server side checks
//! the cluster's peer secret, reassembles chunks and steps the messages into the local node.

use super::node::Handle;
use super::transport::Transport;
use protobuf::Message as _;
use raft::eraftpb::Message;
use sipwarden_proto::v1::peer_client::PeerClient;
use sipwarden_proto::v1::peer_server::Peer;
use sipwarden_proto::v1::{RaftAck, RaftChunk};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Largest chunk of one Raft message on the wire.
pub const CHUNK: usize = 1 << 20;
/// Messages queued per peer before new ones are dropped (Raft resends what matters).
const QUEUE: usize = 4096;

/// Sends to peers by id; addresses can change at run time (membership changes).
pub struct GrpcTransport {
    secret: Arc<str>,
    /// `grpc.tls`: peers are reached over TLS with this node's certificate when set.
    tls: Arc<sipwarden_shared::tls::TlsFiles>,
    peers: Mutex<HashMap<u64, (String, mpsc::Sender<Message>)>>,
    stop: CancellationToken,
}

impl GrpcTransport {
    pub fn new(
        secret: &str,
        tls: sipwarden_shared::tls::TlsFiles,
        stop: CancellationToken,
    ) -> Arc<GrpcTransport> {
        Arc::new(GrpcTransport {
            secret: secret.into(),
            tls: Arc::new(tls),
            peers: Mutex::new(HashMap::new()),
            stop,
        })
    }

    /// Sets the address of peer `id` (starting its sender task, or restarting it on a new
    /// address).
    pub fn set_peer(&self, id: u64, address: &str) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if peers.get(&id).is_some_and(|(a, _)| a == address) {
            return;
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        peers.insert(id, (address.to_string(), tx));
        tokio::spawn(sender(
            id,
            address.to_string(),
            self.secret.clone(),
            self.tls.clone(),
            rx,
            self.stop.clone(),
        ));
    }

    /// Forgets peer `id` (its sender task ends).
    pub fn remove_peer(&self, id: u64) {
        self.peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }
}

impl Transport for GrpcTransport {
    fn send(&self, msgs: Vec<Message>) {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        for m in msgs {
            match peers.get(&m.to) {
                Some((_, tx)) => {
                    let _ = tx.try_send(m);
                }
                None => debug!(to = m.to, "no address for peer; message dropped"),
            }
        }
    }
}

/// Splits one message into chunks.
pub fn chunks(m: &Message) -> Vec<RaftChunk> {
    let bytes = m.write_to_bytes().unwrap_or_default();
    let n = bytes.len().div_ceil(CHUNK).max(1);
    (0..n)
        .map(|i| RaftChunk {
            data: bytes[i * CHUNK..((i + 1) * CHUNK).min(bytes.len())].to_vec(),
            last: i + 1 == n,
        })
        .collect()
}

/// Keeps one stream open to `address` and feeds it from `rx`.
async fn sender(
    id: u64,
    address: String,
    secret: Arc<str>,
    tls: Arc<sipwarden_shared::tls::TlsFiles>,
    mut rx: mpsc::Receiver<Message>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(50);
    let bearer: tonic::metadata::MetadataValue<_> = match format!("Bearer {secret}").parse() {
        Ok(v) => v,
        Err(_) => {
            warn!("peer secret is not a valid header value");
            return;
        }
    };
    loop {
        let endpoint = match sipwarden_shared::tls::endpoint(&address, &tls, "grpc.tls") {
            Ok(e) => e.connect_timeout(Duration::from_secs(1)).tcp_nodelay(true),
            Err(e) => {
                warn!(peer = id, %address, error = %e, "bad peer address");
                return;
            }
        };
        let channel = tokio::select! {
            _ = stop.cancelled() => return,
            c = endpoint.connect() => c,
        };
        let channel = match channel {
            Ok(c) => c,
            Err(e) => {
                debug!(peer = id, %address, error = %e, "peer unreachable; retrying");
                // Drain what queued meanwhile: Raft will resend what still matters.
                while rx.try_recv().is_ok() {}
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        let (ctx, crx) = mpsc::channel::<RaftChunk>(64);
        let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(crx));
        req.metadata_mut().insert("authorization", bearer.clone());
        let mut client = PeerClient::new(channel)
            .max_decoding_message_size(CHUNK * 2)
            .max_encoding_message_size(CHUNK * 2);
        let call = tokio::spawn(async move { client.raft(req).await });
        // Pump messages until the stream breaks.
        loop {
            let m = tokio::select! {
                _ = stop.cancelled() => return,
                m = rx.recv() => m,
            };
            let Some(m) = m else { return };
            let mut broken = false;
            for c in chunks(&m) {
                if ctx.send(c).await.is_err() {
                    broken = true;
                    break;
                }
            }
            if broken || call.is_finished() {
                break;
            }
        }
        drop(ctx);
        if let Ok(Err(status)) = call.await {
            debug!(peer = id, %status, "peer stream ended");
        }
    }
}

/// The `Peer` service: Raft messages from other controllers into the local node.
pub struct PeerService {
    pub handle: Handle,
    pub secret: Arc<str>,
}

/// Checks `authorization: Bearer <secret>` in constant time.
pub fn authorized(meta: &tonic::metadata::MetadataMap, secret: &str) -> bool {
    let Some(v) = meta.get("authorization").and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some(token) = v.strip_prefix("Bearer ") else {
        return false;
    };
    token.as_bytes().ct_eq(secret.as_bytes()).into()
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn raft(
        &self,
        req: tonic::Request<tonic::Streaming<RaftChunk>>,
    ) -> Result<tonic::Response<RaftAck>, tonic::Status> {
        if !authorized(req.metadata(), &self.secret) {
            return Err(tonic::Status::unauthenticated(
                "peer secret missing or wrong",
            ));
        }
        let mut stream = req.into_inner();
        let mut buf: Vec<u8> = Vec::new();
        let mut messages = 0u64;
        while let Some(chunk) = stream.message().await? {
            buf.extend_from_slice(&chunk.data);
            if buf.len() > 512 * CHUNK {
                return Err(tonic::Status::resource_exhausted("raft message too large"));
            }
            if chunk.last {
                let m = Message::parse_from_bytes(&buf)
                    .map_err(|e| tonic::Status::invalid_argument(format!("raft message: {e}")))?;
                buf.clear();
                messages += 1;
                self.handle.step(m);
            }
        }
        Ok(tonic::Response::new(RaftAck { messages }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_messages_are_chunked_and_reassemble() {
        let mut m = Message {
            to: 2,
            ..Default::default()
        };
        let mut snap = raft::eraftpb::Snapshot::default();
        snap.set_data(vec![7u8; CHUNK * 2 + 10].into());
        m.set_snapshot(snap);
        let parts = chunks(&m);
        assert_eq!(parts.len(), 3);
        assert!(parts[2].last && !parts[0].last);
        let joined: Vec<u8> = parts.iter().flat_map(|c| c.data.clone()).collect();
        assert_eq!(Message::parse_from_bytes(&joined).unwrap(), m);
    }

    #[test]
    fn the_peer_secret_is_checked() {
        let mut meta = tonic::metadata::MetadataMap::new();
        assert!(!authorized(&meta, "s3cret-peer-key"));
        meta.insert("authorization", "Bearer wrong".parse().unwrap());
        assert!(!authorized(&meta, "s3cret-peer-key"));
        meta.insert("authorization", "Bearer s3cret-peer-key".parse().unwrap());
        assert!(authorized(&meta, "s3cret-peer-key"));
    }
}
