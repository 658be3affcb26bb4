//! Plumbing and types that both sides of sipwarden speak.
//!
//! - [`ban`]: bans, their targets and sources, registration bindings — validated, with proto
//!   conversions.
//! - [`event`]: the security event every non-allow verdict produces.
//! - [`config`]: TOML loading with `SIPWARDEN_*` environment overrides, fed through a trait so tests
//!   can supply a map.
//! - [`telemetry`]: `tracing` subscriber set-up (plain or JSON logs).

pub mod ban;
pub mod config;
pub mod event;
pub mod promtext;
pub mod telemetry;
pub mod tls;

pub use sipwarden_proto as proto;
