//! A runnable tour of what pgward does, against a running `pgward dev`:
//!
//! ```sh
//! cargo run --release -- dev                # terminal 1 (from the repository root)
//! cargo run --example tenant_isolation      # terminal 2, same directory
//! ```
//!
//! It mints tokens with the dev key in `./.pgward/` (as `pgward token mint` does), connects as
//! two tenants of the `billing` service and as `support`, and prints what each may see and do:
//! rows filtered by tenant, a hidden column refused with the rule that refused it, an encrypted
//! column searched by equality through its blind index, and a range query on it refused.

use std::path::Path;
use std::time::Duration;

use pgward::auth::DevSigningKey;
use pgward::cli::dev::{DEFAULT_DIR, DEV_AUDIENCE, DEV_ISSUER};
use serde_json::{json, Map, Value};
use tokio_postgres::{Client, NoTls};

const ADDRESS: (&str, u16) = ("127.0.0.1", 6432);
const DATABASE: &str = "pgward_demo";

async fn connect(key: &DevSigningKey, service: &str, claims: Value) -> anyhow::Result<Client> {
    let claims: Map<String, Value> = serde_json::from_value(claims)?;
    let token = key.mint(
        service,
        &claims,
        Duration::from_secs(300),
        Some(DEV_AUDIENCE),
        Some(DEV_ISSUER),
    )?;
    let mut config = tokio_postgres::Config::new();
    config
        .host(ADDRESS.0)
        .port(ADDRESS.1)
        .user(service)
        .password(token)
        .dbname(DATABASE);
    // pgward dev accepts plaintext from loopback; a real deployment requires TLS.
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Run `sql` and print its rows, or the error pgward (or the server) answered.
async fn show(client: &Client, who: &str, sql: &str) {
    println!("\n{who}> {sql}");
    match client.simple_query(sql).await {
        Ok(messages) => {
            for message in messages {
                if let tokio_postgres::SimpleQueryMessage::Row(row) = message {
                    let values: Vec<&str> = (0..row.len())
                        .map(|i| row.get(i).unwrap_or("NULL"))
                        .collect();
                    println!("  {}", values.join(" | "));
                }
            }
        }
        Err(e) => match e.as_db_error() {
            Some(db) => println!("  ERROR {}: {}", db.code().code(), db.message()),
            None => println!("  ERROR {e}"),
        },
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let key = DevSigningKey::load_or_create(Path::new(DEFAULT_DIR))?;
    let tenant1 = connect(&key, "billing", json!({ "tenant_id": 1 })).await?;
    let tenant2 = connect(&key, "billing", json!({ "tenant_id": 2 })).await?;
    let support = connect(&key, "support", json!({ "tenant_id": 1 })).await?;

    // The same statement, two tenants, two answers: the row filter comes from the token.
    let sql = "SELECT tenant_id, count(*) FROM customers GROUP BY tenant_id";
    show(&tenant1, "billing (tenant 1)", sql).await;
    show(&tenant2, "billing (tenant 2)", sql).await;
    // Trying to reach another tenant's rows changes nothing.
    show(
        &tenant1,
        "billing (tenant 1)",
        "SELECT name FROM customers WHERE tenant_id = 2 UNION ALL SELECT name FROM customers",
    )
    .await;
    // Encrypted columns: plaintext to the service, equality search through the blind index.
    show(
        &tenant1,
        "billing (tenant 1)",
        "SELECT name, email FROM customers WHERE email = 'customer2@tenant1.example'",
    )
    .await;
    show(
        &tenant1,
        "billing (tenant 1)",
        "SELECT name FROM customers WHERE email > 'a'",
    )
    .await;
    // Columns a policy hides are refused, with the rule that refused them.
    show(&support, "support", "SELECT name, ssn FROM customers").await;
    show(&support, "support", "SELECT * FROM customers LIMIT 2").await;
    println!("\nEvery statement above is in the audit log: cargo run -- audit search .pgward/audit --since 10m");
    Ok(())
}
