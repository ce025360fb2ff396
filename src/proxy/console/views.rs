//! What the console's SHOW commands list, read from the registry of live sessions, the pools
//! and the per-service series — the same sources `/metrics` renders, so both agree.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use super::super::registry::{ClientActivity, ClientMode};
use super::super::Shared;
use super::command::Command;
use crate::protocol::build;

/// Type OIDs of the console's columns.
const TEXT: u32 = 25;
const INT8: u32 = 20;

/// A result set: column names and types, rows of text values (`None`: NULL).
#[derive(Debug, Default)]
pub struct Table {
    pub columns: Vec<(&'static str, u32)>,
    pub rows: Vec<Vec<Option<String>>>,
}

impl Table {
    fn new(columns: &[(&'static str, u32)]) -> Self {
        Table {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    /// The RowDescription, with `binary[i]` the format of column `i`.
    pub fn row_description(&self, binary: &[bool]) -> bytes::Bytes {
        let columns: Vec<(&str, u32, i16)> = self
            .columns
            .iter()
            .zip(binary.iter().chain(std::iter::repeat(&false)))
            .map(|((name, oid), binary)| (*name, *oid, i16::from(*binary)))
            .collect();
        build::row_description(&columns)
    }

    /// The DataRows and the CommandComplete, each column in its format (binary: `int8` as 8
    /// bytes big-endian, `text` as its bytes).
    pub fn write_rows(&self, binary: &[bool], out: &mut bytes::BytesMut) {
        for row in &self.rows {
            let values: Vec<Option<Vec<u8>>> = row
                .iter()
                .zip(&self.columns)
                .enumerate()
                .map(|(i, (value, (_, oid)))| {
                    let value = value.as_deref()?;
                    Some(match binary.get(i) {
                        Some(true) if *oid == INT8 => value
                            .parse::<i64>()
                            .unwrap_or_default()
                            .to_be_bytes()
                            .to_vec(),
                        _ => value.as_bytes().to_vec(),
                    })
                })
                .collect();
            out.extend_from_slice(&build::data_row(&values));
        }
        out.extend_from_slice(&build::command_complete("SHOW"));
    }
}

/// The table a command shows; `me` is the asking console session.
pub fn show(shared: &Shared, command: Command, me: u64) -> Table {
    match command {
        Command::Pools => pools_table(shared),
        Command::Clients => clients_table(shared, me),
        Command::Servers => servers_table(shared),
        Command::Stats => stats_table(shared),
        Command::Help => help_table(),
    }
}

fn text(value: impl ToString) -> Option<String> {
    Some(value.to_string())
}

fn time(at: SystemTime) -> Option<String> {
    text(humantime::format_rfc3339_seconds(at))
}

/// One row of `SHOW POOLS`: a (upstream role, database, pool mode).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PoolRow {
    pub services: BTreeSet<String>,
    /// Clients logged in and not waiting (PgBouncer's meaning: running or idle).
    pub cl_active: u64,
    pub cl_waiting: u64,
    /// Server connections linked to a client, and open but linked to none.
    pub sv_active: u64,
    pub sv_idle: u64,
    /// How long the longest-waiting client has waited.
    pub maxwait: Duration,
    /// `pool_size` (transaction mode).
    pub pool_size: Option<usize>,
}

type PoolKey = (String, String, ClientMode);

/// Every pool's figures: the transaction-mode pools and the session-mode sessions grouped the
/// same way.
pub fn pool_rows(shared: &Shared) -> BTreeMap<PoolKey, PoolRow> {
    let mut rows: BTreeMap<PoolKey, PoolRow> = BTreeMap::new();
    for pool in shared.pools.all() {
        let key = (
            pool.role.clone(),
            pool.database.clone(),
            ClientMode::Transaction,
        );
        let row = rows.entry(key).or_default();
        row.pool_size = Some(pool.size());
        for server in pool.servers() {
            if server.client().is_some() {
                row.sv_active += 1;
            } else {
                row.sv_idle += 1;
            }
        }
    }
    let now = SystemTime::now();
    for client in shared.registry.clients() {
        let facts = &client.facts;
        let Some(role) = &facts.upstream_role else {
            continue;
        };
        let key = (role.clone(), facts.database.clone(), facts.mode);
        let row = rows.entry(key).or_default();
        row.services.insert(facts.service.clone());
        match client.waiting_for(now) {
            Some(waited) => {
                row.cl_waiting += 1;
                row.maxwait = row.maxwait.max(waited);
            }
            None => row.cl_active += 1,
        }
        if facts.mode == ClientMode::Session && client.own_server().is_some() {
            row.sv_active += 1;
        }
    }
    rows
}

fn pools_table(shared: &Shared) -> Table {
    let mut table = Table::new(&[
        ("database", TEXT),
        ("user", TEXT),
        ("services", TEXT),
        ("cl_active", INT8),
        ("cl_waiting", INT8),
        ("sv_active", INT8),
        ("sv_idle", INT8),
        ("sv_total", INT8),
        ("maxwait", INT8),
        ("maxwait_us", INT8),
        ("pool_mode", TEXT),
        ("pool_size", INT8),
    ]);
    for ((role, database, mode), row) in pool_rows(shared) {
        let services: Vec<&str> = row.services.iter().map(String::as_str).collect();
        table.rows.push(vec![
            text(database),
            text(role),
            text(services.join(",")),
            text(row.cl_active),
            text(row.cl_waiting),
            text(row.sv_active),
            text(row.sv_idle),
            text(row.sv_active + row.sv_idle),
            text(row.maxwait.as_secs()),
            text(row.maxwait.subsec_micros()),
            text(mode.label()),
            row.pool_size.map(|size| size.to_string()),
        ]);
    }
    table
}

fn clients_table(shared: &Shared, me: u64) -> Table {
    let mut table = Table::new(&[
        ("type", TEXT),
        ("user", TEXT),
        ("database", TEXT),
        ("state", TEXT),
        ("addr", TEXT),
        ("port", INT8),
        ("tls", TEXT),
        ("connect_time", TEXT),
        ("wait", INT8),
        ("wait_us", INT8),
        ("pool_mode", TEXT),
        ("application_name", TEXT),
        ("token_id", TEXT),
        ("id", INT8),
        ("server_pid", INT8),
    ]);
    let now = SystemTime::now();
    for client in shared.registry.clients() {
        let facts = &client.facts;
        let state = if facts.id == me {
            ClientActivity::Active
        } else {
            client.activity()
        };
        let waited = client.waiting_for(now).unwrap_or_default();
        table.rows.push(vec![
            text("C"),
            text(&facts.service),
            text(&facts.database),
            text(state.label()),
            text(facts.addr.ip()),
            text(facts.addr.port()),
            text(if facts.tls { "on" } else { "off" }),
            time(client.connected_at),
            text(waited.as_secs()),
            text(waited.subsec_micros()),
            text(facts.mode.label()),
            facts.application_name.clone(),
            facts.token_id.clone(),
            text(facts.id),
            client.linked_process_id().map(|pid| pid.to_string()),
        ]);
    }
    table
}

fn servers_table(shared: &Shared) -> Table {
    let mut table = Table::new(&[
        ("type", TEXT),
        ("user", TEXT),
        ("database", TEXT),
        ("state", TEXT),
        ("addr", TEXT),
        ("port", INT8),
        ("connect_time", TEXT),
        ("remote_pid", INT8),
        ("link", INT8),
        ("pool_mode", TEXT),
    ]);
    let upstream = &shared.config.upstream;
    let mut row =
        |role: &str, database: &str, link: Option<u64>, pid: u32, at, mode: ClientMode| {
            table.rows.push(vec![
                text("S"),
                text(role),
                text(database),
                text(if link.is_some() { "active" } else { "idle" }),
                text(&upstream.host),
                text(upstream.port),
                time(at),
                text(pid),
                link.map(|id| id.to_string()),
                text(mode.label()),
            ]);
        };
    let mut pools = shared.pools.all();
    pools.sort_by(|a, b| (&a.role, &a.database).cmp(&(&b.role, &b.database)));
    for pool in pools {
        for server in pool.servers() {
            row(
                &pool.role,
                &pool.database,
                server.client(),
                server.process_id,
                server.connected_at,
                ClientMode::Transaction,
            );
        }
    }
    for client in shared.registry.clients() {
        let facts = &client.facts;
        if let (Some(role), Some(server)) = (&facts.upstream_role, client.own_server()) {
            row(
                role,
                &facts.database,
                Some(facts.id),
                server.process_id,
                server.connected_at,
                ClientMode::Session,
            );
        }
    }
    table
}

fn stats_table(shared: &Shared) -> Table {
    let mut table = Table::new(&[
        ("user", TEXT),
        ("total_xact_count", INT8),
        ("total_query_count", INT8),
        ("total_received", INT8),
        ("total_sent", INT8),
        ("total_request_count", INT8),
        ("total_request_time", INT8),
        ("total_wait_count", INT8),
        ("total_wait_time", INT8),
        ("avg_request_time", INT8),
        ("avg_wait_time", INT8),
        ("statements_forwarded", INT8),
        ("statements_rewritten", INT8),
        ("statements_refused", INT8),
    ]);
    let average = |sum: u64, count: u64| sum.checked_div(count).unwrap_or(0);
    for (service, t) in shared.metrics.service_totals() {
        let forwarded = t
            .statement_texts
            .saturating_sub(t.rewritten)
            .saturating_sub(t.refused);
        table.rows.push(vec![
            text(service),
            text(t.transactions),
            text(t.queries),
            text(t.received),
            text(t.sent),
            text(t.requests),
            text(t.request_micros),
            text(t.waits),
            text(t.wait_micros),
            text(average(t.request_micros, t.requests)),
            text(average(t.wait_micros, t.waits)),
            text(forwarded),
            text(t.rewritten),
            text(t.refused),
        ]);
    }
    table
}

fn help_table() -> Table {
    let mut table = Table::new(&[("command", TEXT), ("description", TEXT)]);
    for (_, command, description) in Command::ALL {
        table.rows.push(vec![text(command), text(description)]);
    }
    table
}

/// The console's figures that `/metrics` lacks otherwise: clients per transaction pool
/// (active, longest wait) and clients per service, pool mode and state.
pub fn render_metrics(shared: &Shared, out: &mut String) {
    let rows = pool_rows(shared);
    let pooled: Vec<_> = rows
        .iter()
        .filter(|((_, _, mode), _)| *mode == ClientMode::Transaction)
        .collect();
    type Read = fn(&PoolRow) -> String;
    let series: [(&str, &str, Read); 2] = [
        (
            "pgward_pool_clients_active",
            "Clients of a pool logged in and not waiting (running or idle) now.",
            |r| r.cl_active.to_string(),
        ),
        (
            "pgward_pool_max_wait_seconds",
            "How long the longest-waiting client of a pool has waited, now.",
            |r| r.maxwait.as_secs_f64().to_string(),
        ),
    ];
    for (name, help, read) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for ((role, database, _), row) in &pooled {
            let _ = writeln!(
                out,
                "{name}{{role=\"{}\",database=\"{}\"}} {}",
                crate::metrics::label_value(role),
                crate::metrics::label_value(database),
                read(row)
            );
        }
    }
    let mut clients: BTreeMap<(String, &'static str, &'static str), u64> = BTreeMap::new();
    for client in shared.registry.clients() {
        let key = (
            client.facts.service.clone(),
            client.facts.mode.label(),
            client.activity().label(),
        );
        *clients.entry(key).or_default() += 1;
    }
    let _ = writeln!(
        out,
        "# HELP pgward_clients Client sessions now, by service, pool mode and state.\n# TYPE pgward_clients gauge"
    );
    for ((service, mode, state), count) in clients {
        let _ = writeln!(
            out,
            "pgward_clients{{service=\"{}\",pool_mode=\"{mode}\",state=\"{state}\"}} {count}",
            crate::metrics::label_value(&service)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{view, Message};

    #[test]
    fn rows_are_sent_in_the_format_each_column_was_bound_with() {
        let mut table = Table::new(&[("user", TEXT), ("port", INT8), ("pool_size", INT8)]);
        table.rows.push(vec![text("ops"), text(5432), None]);
        let mut out = bytes::BytesMut::new();
        table.write_rows(&[false, true, true], &mut out);
        let row = Message::from_raw(out.split_to(out.len() - 10).freeze()).unwrap();
        let values = view::data_row(row.body()).unwrap();
        assert_eq!(values[0], Some(&b"ops"[..]));
        assert_eq!(values[1], Some(&5432i64.to_be_bytes()[..]));
        assert_eq!(values[2], None);
        let description = Message::from_raw(table.row_description(&[false, true])).unwrap();
        let fields = view::row_description(description.body()).unwrap();
        let formats: Vec<i16> = fields.iter().map(|f| f.format).collect();
        assert_eq!(formats, [0, 1, 0]);
    }
}
