//! sipwarden controller: the Raft cluster that holds what all sites share (bans, registrations,
//! policies, rate counters) and the central ban-list management API.
//!
//! - [`state`]: the deterministic replicated state machine (commands carry their time).
//! - [`watch`]: the edge-facing `EdgeControl` service (watch stream of bans, bindings,
//!   policies).
//! - [`raft`]: the Raft node (one task owns raft-rs's `RawNode`), its `raft-engine` storage, the
//!   transport seam and the gRPC peer transport.
//! - [`api`]: the admin API (shared core, REST, gRPC, tokens and roles).
//! - [`config`], [`server`]: configuration and the running process; `sipwardenctl` is the CLI
//!   (`src/bin/sipwardenctl.rs`).

pub mod api;
pub mod config;
pub mod counters;
pub mod metrics;
pub mod raft;
pub mod server;
pub mod state;
pub mod watch;
