//! sipwarden controller: the Raft cluster that holds what all sites share (bans, registrations,
//! policies, rate counters) and the central ban-list management API.
//!
//! - [`state`]: the deterministic replicated state machine (commands carry their time).
//!
//! The Raft node, its storage and transport, the gRPC and REST admin APIs and `sipwardenctl` are
//! being built (issue 4); see ARCHITECTURE.md for what exists.

pub mod state;
