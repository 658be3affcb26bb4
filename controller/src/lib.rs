//! sipwarden controller: the Raft cluster that holds what all sites share (bans, registrations,
//! policies, rate counters) and the central ban-list management API.
//!
//! This crate is deliberately empty for now: the standalone edge needs no controller. The Raft node,
//! state machine, gRPC services and REST admin API arrive with their own issue; see ARCHITECTURE.md.
