//! Integration tests: one binary, one shared harness (`harness`), a real PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod audit_integrity;
mod audit_proxy;
mod audit_report;
mod check;
mod crypto;
mod dev_mode;
mod edges;
mod encryption;
mod examples;
mod harness;
mod key_usage;
mod keys_cli;
mod ops;
mod pipeline;
mod policy;
mod policy_proxy;
mod protocol;
mod reload;
mod tenant_keys;
mod tools;
mod vault;
mod vault_failures;
