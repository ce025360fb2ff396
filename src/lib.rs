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
pub mod pgserver;
