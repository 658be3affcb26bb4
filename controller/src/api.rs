//! The central ban-list management API: [`core`] (the operations, once), [`auth`] (bearer tokens,
//! roles), [`error`] (one error type mapped to HTTP and gRPC), [`rest`] (`/api/v1` over axum),
//! [`grpc`] (`sipwarden.v1.Admin`).

pub mod auth;
pub mod core;
pub mod error;
pub mod grpc;
pub mod rest;
