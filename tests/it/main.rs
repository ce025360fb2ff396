//! Integration tests: one binary, one shared harness (`harness`), a real PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod crypto;
mod harness;
mod smoke;
mod vault;
