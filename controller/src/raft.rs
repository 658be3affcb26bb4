//! Raft for the controller cluster (tikv's raft-rs), behind three seams:
//!
//! - [`node`]: the one task that owns the `RawNode` and the [`crate::state::StateMachine`] it
//!   applies to;
//! - [`storage`]: the log, hard state, conf state and snapshots in `raft-engine`, fsynced;
//! - [`grpc`]: the gRPC transport and `Peer` service between controller processes;
//! - [`transport`]: how messages reach peers (gRPC between processes; an in-memory network that
//!   drops and partitions in tests).

pub mod grpc;
pub mod node;
pub mod storage;
pub mod transport;

#[cfg(test)]
mod tests;
