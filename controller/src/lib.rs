//! sipwarden controller: the Raft cluster that holds what all sites share (bans, registrations,
//! policies, rate counters) and the central ban-list management API.
//!
//! - [`state`]: the deterministic replicated state machine (commands carry their time).
//! - [`raft`]: the Raft node (one task owns raft-rs's `RawNode`), its `raft-engine` storage and its
//!   transport seam.
//!
//! The gRPC peer transport, the admin APIs and `sipwardenctl` are being built (issue 4); see
//! ARCHITECTURE.md for what exists.

pub mod api;
pub mod config;
pub mod raft;
pub mod server;
pub mod state;
