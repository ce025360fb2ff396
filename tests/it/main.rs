//! Integration tests: one binary, one shared harness (`harness`), a real PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod audit_integrity;
mod audit_proxy;
mod audit_report;
mod crypto;
mod dev_mode;
mod edges;
mod encryption;
mod harness;
mod keys_cli;
mod policy;
mod policy_proxy;
mod protocol;
mod tools;
mod vault;
