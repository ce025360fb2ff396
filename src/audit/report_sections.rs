//! Sections of `pgward audit report` an auditor asks for beyond activity: the integrity
//! status (verified against the key and the anchors), the audit log's own history (starts,
//! stops, outages, truncations), a per-table and per-column view, and failed logins by
//! source address and reason.
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use super::search::RecordView;
use super::verify::VerifyReport;

/// What the report gathers for these sections, in the same streaming pass.
#[derive(Default)]
pub(crate) struct Sections {
    /// (kind, ts, details) of the log's own records.
    lifecycle: Vec<(String, String, String)>,
    /// table -> (reads, writes, services)
    tables: BTreeMap<String, (u64, u64, BTreeSet<String>)>,
    /// column -> (reads, writes)
    columns: BTreeMap<String, (u64, u64)>,
    /// (source address without port, claimed service, reason) -> attempts
    auth_failures: BTreeMap<(String, String, String), u64>,
}

/// Most lifecycle rows shown.
const MAX_LIFECYCLE: usize = 200;

/// `1.2.3.4:5678` → `1.2.3.4`, `[::1]:5678` → `::1`.
fn source_address(addr: &str) -> String {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest).to_string();
    }
    match addr.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host.to_string(),
        _ => addr.to_string(),
    }
}

impl Sections {
    pub(crate) fn add(&mut self, r: &RecordView, service: &str) {
        match r.kind.as_str() {
            "statement" => self.add_statement(r, service),
            "auth_failed" => {
                let key = (
                    source_address(r.client_addr.as_deref().unwrap_or("-")),
                    r.user.clone().unwrap_or_else(|| "-".into()),
                    r.reason.clone().unwrap_or_default(),
                );
                *self.auth_failures.entry(key).or_default() += 1;
            }
            "audit_started"
            | "audit_stopped"
            | "audit_outage"
            | "recovery"
            | "truncation_detected"
                if self.lifecycle.len() < MAX_LIFECYCLE =>
            {
                self.lifecycle
                    .push((r.kind.clone(), r.ts.clone(), lifecycle_details(r)));
            }
            _ => {}
        }
    }

    fn add_statement(&mut self, r: &RecordView, service: &str) {
        for (tables, write) in [(&r.tables_read, false), (&r.tables_written, true)] {
            for t in tables {
                let e = self.tables.entry(t.clone()).or_default();
                if write {
                    e.1 += 1;
                } else {
                    e.0 += 1;
                }
                if e.2.len() < 8 {
                    e.2.insert(service.to_string());
                }
            }
        }
        for (columns, write) in [(&r.columns_read, false), (&r.columns_written, true)] {
            for c in columns {
                let e = self.columns.entry(c.clone()).or_default();
                if write {
                    e.1 += 1;
                } else {
                    e.0 += 1;
                }
            }
        }
    }

    pub(crate) fn auth_failure_count(&self) -> u64 {
        self.auth_failures.values().sum()
    }

    /// The sections' HTML, in page order after the summary.
    pub(crate) fn render_integrity(integrity: Option<&VerifyReport>, checked: &str) -> String {
        let Some(r) = integrity else {
            return "<section id=\"integrity\"><h2>Integrity</h2><p class=\"empty\">Not verified (pass --public-key, and --anchor, to include the verification).</p></section>".into();
        };
        let status = if r.is_intact() { "INTACT" } else { "BROKEN" };
        let color = if r.is_intact() { "#15803d" } else { "#b91c1c" };
        let mut s = format!(
            "<section id=\"integrity\"><h2>Integrity</h2><p><b style=\"color:{color}\">{status}</b> — {} files, {} records, {} checkpoints ({} signatures valid, {} unchecked), {} checkpoints matching their anchor. Checked: {}.</p>",
            r.files, r.records, r.checkpoints, r.signatures_valid, r.signatures_unchecked,
            r.anchors_matched, esc(checked)
        );
        if let Some((seq, hash)) = &r.head {
            let _ = write!(
                s,
                "<p class=\"meta\">Head: seq {seq}, sha256 <code>{hash}</code></p>"
            );
        }
        let breaks = r.breaks.iter().take(20).map(|b| vec![b.to_string()]);
        if !r.breaks.is_empty() {
            s.push_str(&table(&["break"], breaks));
        }
        let warnings = r.warnings.iter().take(20).map(|w| vec![w.clone()]);
        if !r.warnings.is_empty() {
            s.push_str(&table(&["warning"], warnings));
        }
        s.push_str("</section>");
        s
    }

    pub(crate) fn render(&self) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "<section id=\"audit-log\"><h2>Audit log starts, stops and outages</h2>{}</section>",
            table(
                &["kind", "time", "details"],
                self.lifecycle
                    .iter()
                    .map(|(k, t, d)| vec![k.clone(), t.clone(), d.clone()])
            )
        );
        let _ = write!(
            s,
            "<section id=\"tables\"><h2>Tables</h2>{}<h3>Columns</h3>{}</section>",
            table(
                &["table", "reads", "writes", "services"],
                self.tables.iter().map(|(t, (r, w, sv))| {
                    let services: Vec<&str> = sv.iter().map(String::as_str).collect();
                    vec![t.clone(), r.to_string(), w.to_string(), services.join(", ")]
                })
            ),
            table(
                &["column", "reads", "writes"],
                self.columns.iter().map(|(c, (r, w))| vec![
                    c.clone(),
                    r.to_string(),
                    w.to_string()
                ])
            )
        );
        let mut failures: Vec<_> = self.auth_failures.iter().collect();
        failures.sort_by_key(|(_, n)| std::cmp::Reverse(**n));
        let _ = write!(
            s,
            "<section id=\"auth-failures\"><h2>Failed authentication by source address and reason</h2>{}</section>",
            table(
                &["source address", "claimed service", "reason", "attempts"],
                failures.into_iter().map(|((a, u, r), n)| {
                    vec![a.clone(), u.clone(), r.clone(), n.to_string()]
                })
            )
        );
        s
    }
}

fn lifecycle_details(r: &RecordView) -> String {
    match r.kind.as_str() {
        "audit_outage" => format!(
            "from {} to {}: {} failed writes, {} statements refused or run unaudited, {} records lost",
            r.started.as_deref().unwrap_or("?"),
            r.ended.as_deref().unwrap_or("?"),
            r.failed_writes.unwrap_or(0),
            r.statements_refused_or_unaudited.unwrap_or(0),
            r.records_lost.unwrap_or(0)
        ),
        "truncation_detected" => format!(
            "log behind its anchor ({}): anchored seq {}",
            r.reason.as_deref().unwrap_or("?"),
            r.anchor_seq.map_or("?".into(), |s| s.to_string())
        ),
        "audit_started" | "audit_stopped" => r
            .settings
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default(),
        _ => r.reason.clone().unwrap_or_default(),
    }
}

/// Text escaped for HTML.
pub(crate) fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            _ => o.push(c),
        }
    }
    o
}

/// An HTML table of `rows` under `headers` ("None." when there are none).
pub(crate) fn table(headers: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let mut s = String::from("<table><thead><tr>");
    for h in headers {
        let _ = write!(s, "<th>{}</th>", esc(h));
    }
    s.push_str("</tr></thead><tbody>");
    let mut any = false;
    for r in rows {
        any = true;
        s.push_str("<tr>");
        for c in r {
            let _ = write!(s, "<td>{}</td>", esc(&c));
        }
        s.push_str("</tr>");
    }
    if !any {
        let _ = write!(
            s,
            "<tr><td colspan=\"{}\" class=\"empty\">None.</td></tr>",
            headers.len()
        );
    }
    s.push_str("</tbody></table>");
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn source_address_drops_the_port() {
        assert_eq!(super::source_address("10.0.0.1:5432"), "10.0.0.1");
        assert_eq!(super::source_address("[::1]:5432"), "::1");
        assert_eq!(super::source_address("unix"), "unix");
    }
}
