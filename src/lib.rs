//! pgward — a zero-trust data-protection proxy for PostgreSQL.
//!
//! See ARCHITECTURE.md for the flow of one query through these modules.
#![warn(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::todo,
    clippy::unimplemented
)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod audit;
pub mod auth;
pub mod blocking;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod error;
pub mod keys;
pub mod metrics;
pub mod net;
pub mod pgserver;
pub mod policy;
pub mod pool;
pub mod protocol;
pub mod proxy;
pub mod sql;
pub mod tls;
pub mod upstream;
