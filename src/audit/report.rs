//! `pgward audit report`: one self-contained HTML page (inline CSS and SVG, no scripts, no
//! external assets) summarising a time range of the log.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use super::report_sections::{esc, table};
use super::search::{scan, Filter, RecordView, SearchArgs};
use super::AuditError;

/// Arguments of `pgward audit report`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReportArgs {
    /// Segment files and/or directories.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// RFC 3339 time or a duration back from now (`24h`).
    #[arg(long)]
    pub since: Option<String>,
    #[arg(long)]
    pub until: Option<String>,
    /// Only this service.
    #[arg(long)]
    pub service: Option<String>,
    #[arg(long, default_value = "audit-report.html")]
    pub out: PathBuf,
    /// Verify the log with this public key and show the result (integrity section).
    #[arg(long)]
    pub public_key: Option<PathBuf>,
    /// Also check the log against these anchors (see `audit verify --anchor`).
    #[arg(long)]
    pub anchor: Vec<String>,
    /// The log is still being written (see `audit verify --live`).
    #[arg(long)]
    pub live: bool,
}

#[derive(Default)]
struct FpStat {
    count: u64,
    refused: u64,
    services: BTreeSet<String>,
}

/// Everything the page shows, gathered in one streaming pass.
#[derive(Default)]
pub struct Aggregates {
    records: u64,
    statements: u64,
    by_decision: BTreeMap<String, u64>,
    connections: u64,
    /// (second "YYYY-MM-DDTHH:MM:SS", service) -> statements.
    per_second: BTreeMap<(String, String), u64>,
    sections: super::report_sections::Sections,
    integrity: Option<(super::verify::VerifyReport, String)>,
    refusals_by_service: BTreeMap<String, u64>,
    refusals_by_rule: BTreeMap<(String, String, String), u64>,
    recent_refusals: Vec<(String, String, String, String)>,
    encrypted: BTreeMap<(String, String), u64>,
    errors_by_sqlstate: BTreeMap<String, u64>,
    fingerprints: HashMap<String, FpStat>,
    first_ts: Option<String>,
    last_ts: Option<String>,
}

impl Aggregates {
    fn add(&mut self, r: RecordView) {
        self.records += 1;
        if self.first_ts.is_none() {
            self.first_ts = Some(r.ts.clone());
        }
        self.last_ts = Some(r.ts.clone());
        let service = r.service().unwrap_or("-").to_string();
        self.sections.add(&r, &service);
        match r.kind.as_str() {
            "statement" => self.add_statement(r, service),
            "connection_opened" => self.connections += 1,
            "statement_completed" => {
                if let Some(s) = r.sqlstate {
                    *self.errors_by_sqlstate.entry(s).or_default() += 1;
                }
            }
            _ => {}
        }
    }

    fn add_statement(&mut self, r: RecordView, service: String) {
        self.statements += 1;
        let decision = r.decision.clone().unwrap_or_default();
        *self.by_decision.entry(decision.clone()).or_default() += 1;
        if let Some(second) = r.ts.get(..19) {
            *self
                .per_second
                .entry((second.to_string(), service.clone()))
                .or_default() += 1;
        }
        for c in &r.encrypted_columns {
            *self
                .encrypted
                .entry((service.clone(), c.clone()))
                .or_default() += 1;
        }
        let refused = decision == "refused";
        if refused {
            *self.refusals_by_service.entry(service.clone()).or_default() += 1;
            let key = (
                service.clone(),
                r.rule.clone().unwrap_or_default(),
                r.reason.clone().unwrap_or_default(),
            );
            *self.refusals_by_rule.entry(key).or_default() += 1;
            if self.recent_refusals.len() >= 50 {
                self.recent_refusals.remove(0);
            }
            self.recent_refusals.push((
                r.ts.clone(),
                service.clone(),
                r.fingerprint.clone().unwrap_or_default(),
                r.rule.clone().unwrap_or_default(),
            ));
        }
        if let Some(fp) = r.fingerprint {
            let st = self.fingerprints.entry(fp).or_default();
            st.count += 1;
            st.refused += u64::from(refused);
            if st.services.len() < 8 {
                st.services.insert(service);
            }
        }
    }
}

const PALETTE: [&str; 8] = [
    "#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#64748b",
];

fn second_epoch(second: &str) -> Option<u64> {
    let t = humantime::parse_rfc3339_weak(&format!("{second}Z")).ok()?;
    Some(t.duration_since(UNIX_EPOCH).ok()?.as_secs())
}

/// Bucket width (seconds) giving at most 60 buckets over `span` seconds, rounded up to a
/// readable step so the chart reads at any span, from one second to years.
fn bucket_width(span: u64) -> u64 {
    const STEPS: [u64; 14] = [
        1,
        5,
        10,
        30,
        60,
        300,
        600,
        1800,
        3600,
        3 * 3600,
        6 * 3600,
        86_400,
        7 * 86_400,
        30 * 86_400,
    ];
    let need = span / 60 + 1;
    STEPS
        .iter()
        .copied()
        .find(|&s| s >= need)
        .unwrap_or(need.div_ceil(30 * 86_400) * 30 * 86_400)
}

/// Line chart of statements per service over time, at most ~60 buckets, with a marker at
/// every point so a single bucket still shows.
fn activity_svg(a: &Aggregates) -> String {
    let mut per_service: BTreeMap<&str, BTreeMap<u64, u64>> = BTreeMap::new();
    for ((second, service), n) in &a.per_second {
        if let Some(t) = second_epoch(second) {
            *per_service
                .entry(service)
                .or_default()
                .entry(t)
                .or_default() += n;
        }
    }
    let all: Vec<u64> = per_service
        .values()
        .flat_map(|m| m.keys().copied())
        .collect();
    let (Some(&lo), Some(&hi)) = (all.iter().min(), all.iter().max()) else {
        return "<p class=\"empty\">No statements in range.</p>".into();
    };
    let width = bucket_width(hi - lo);
    let lo = lo - lo % width;
    // At least two buckets, so the axis has a length.
    let buckets = (((hi - lo) / width + 1) as usize).max(2);
    let mut series: Vec<(&str, Vec<u64>)> = per_service
        .iter()
        .map(|(s, m)| {
            let mut v = vec![0u64; buckets];
            for (t, n) in m {
                v[((t - lo) / width) as usize] += n;
            }
            (*s, v)
        })
        .collect();
    series.sort_by_key(|(_, v)| std::cmp::Reverse(v.iter().sum::<u64>()));
    series.truncate(PALETTE.len());
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .max()
        .unwrap_or(1)
        .max(1);
    let hi = lo + width * (buckets as u64 - 1);
    let (w, h, pad) = (900.0_f64, 260.0_f64, 40.0_f64);
    let x = |i: usize| pad + (w - 2.0 * pad) * (i as f64) / ((buckets.max(2) - 1) as f64);
    let y = |n: u64| h - pad - (h - 2.0 * pad) * (n as f64) / (max as f64);
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\" role=\"img\" aria-label=\"statements per service over time\">");
    let _ = write!(
        s,
        "<line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#999\"/>",
        h - pad,
        w - pad,
        h - pad
    );
    let _ = write!(
        s,
        "<line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{}\" stroke=\"#999\"/>",
        h - pad
    );
    let _ = write!(s, "<text x=\"4\" y=\"{}\" font-size=\"11\">{max}</text><text x=\"4\" y=\"{}\" font-size=\"11\">0</text>", pad + 4.0, h - pad);
    let label = |t: u64| {
        humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_secs(t))
            .to_string()
            .get(..19)
            .unwrap_or_default()
            .replace('T', " ")
    };
    let _ = write!(
        s,
        "<text x=\"{pad}\" y=\"{}\" font-size=\"11\">{}</text>",
        h - 12.0,
        label(lo)
    );
    let _ = write!(
        s,
        "<text x=\"{}\" y=\"{}\" font-size=\"11\" text-anchor=\"end\">{} ({} s/bucket)</text>",
        w - pad,
        h - 12.0,
        label(hi),
        width
    );
    for (i, (name, v)) in series.iter().enumerate() {
        let pts: Vec<String> = v
            .iter()
            .enumerate()
            .map(|(j, n)| format!("{:.1},{:.1}", x(j), y(*n)))
            .collect();
        let _ = write!(
            s,
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"/>",
            PALETTE[i],
            pts.join(" ")
        );
        for (j, n) in v.iter().enumerate().filter(|(_, n)| **n > 0) {
            let _ = write!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{}\"/>",
                x(j),
                y(*n),
                PALETTE[i]
            );
        }
        let _ = write!(s, "<rect x=\"{}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{}\" y=\"{}\" font-size=\"12\">{}</text>",
            w - 180.0, 10.0 + 16.0 * i as f64, PALETTE[i], w - 165.0, 19.0 + 16.0 * i as f64, esc(name));
    }
    s.push_str("</svg>");
    s
}

/// Horizontal bar chart.
fn bars_svg(items: &[(String, u64)], color: &str) -> String {
    if items.is_empty() {
        return "<p class=\"empty\">None.</p>".into();
    }
    let max = items.iter().map(|(_, n)| *n).max().unwrap_or(1).max(1);
    let h = 24 * items.len() + 10;
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 900 {h}\" width=\"900\" height=\"{h}\" role=\"img\">");
    for (i, (label, n)) in items.iter().enumerate() {
        let bw = 600.0 * (*n as f64) / (max as f64);
        let yy = 5 + 24 * i;
        let _ = write!(s, "<text x=\"190\" y=\"{}\" font-size=\"12\" text-anchor=\"end\">{}</text><rect x=\"200\" y=\"{yy}\" width=\"{bw:.1}\" height=\"18\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{}\" font-size=\"12\">{n}</text>",
            yy + 13, esc(label), 205.0 + bw, yy + 13);
    }
    s.push_str("</svg>");
    s
}

const CSS: &str = "body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem;color:#111;max-width:1000px}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.3rem}
table{border-collapse:collapse;width:100%;font-size:.85rem}th,td{border:1px solid #ddd;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#f3f4f6}td code{font-family:ui-monospace,monospace;word-break:break-all}.cards{display:flex;gap:1rem;flex-wrap:wrap}
.card{border:1px solid #ddd;border-radius:6px;padding:.6rem 1rem;min-width:120px}.card b{display:block;font-size:1.4rem}.empty{color:#666}.meta{color:#555}";

/// Renders the page.
pub fn render_html(a: &Aggregates, title: &str) -> String {
    let mut h = String::with_capacity(64 * 1024);
    let _ = write!(h, "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{CSS}</style></head><body>", esc(title));
    let _ = write!(
        h,
        "<h1>{}</h1><p class=\"meta\">Records from {} to {}. Generated {}.</p>",
        esc(title),
        esc(a.first_ts.as_deref().unwrap_or("-")),
        esc(a.last_ts.as_deref().unwrap_or("-")),
        humantime::format_rfc3339_seconds(SystemTime::now())
    );
    let refused = a.by_decision.get("refused").copied().unwrap_or(0);
    let failed = a.by_decision.get("failed").copied().unwrap_or(0);
    let auth: u64 = a.sections.auth_failure_count();
    let enc: u64 = a.encrypted.values().sum();
    h.push_str("<section id=\"summary\"><h2>Summary</h2><div class=\"cards\">");
    for (label, n) in [
        ("records", a.records),
        ("statements", a.statements),
        ("refused", refused),
        ("failed", failed),
        ("connections", a.connections),
        ("auth failures", auth),
        ("encrypted-column accesses", enc),
    ] {
        let _ = write!(h, "<div class=\"card\"><b>{n}</b>{label}</div>");
    }
    h.push_str("</div></section>");
    h.push_str(&super::report_sections::Sections::render_integrity(
        a.integrity.as_ref().map(|(r, _)| r),
        a.integrity.as_ref().map_or("", |(_, c)| c.as_str()),
    ));

    let _ = write!(
        h,
        "<section id=\"activity\"><h2>Activity per service</h2>{}</section>",
        activity_svg(a)
    );

    let by_service: Vec<(String, u64)> = a
        .refusals_by_service
        .iter()
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    let mut by_rule: Vec<_> = a.refusals_by_rule.iter().collect();
    by_rule.sort_by_key(|(_, n)| std::cmp::Reverse(**n));
    let _ = write!(
        h,
        "<section id=\"refusals\"><h2>Refusals</h2>{}{}<h3>Most recent</h3>{}</section>",
        bars_svg(&by_service, "#dc2626"),
        table(
            &["service", "rule", "reason", "count"],
            by_rule.iter().take(30).map(|((s, r, why), n)| vec![
                s.clone(),
                r.clone(),
                why.clone(),
                n.to_string()
            ])
        ),
        table(
            &["time", "service", "statement", "rule"],
            a.recent_refusals.iter().rev().map(|(t, s, f, r)| vec![
                t.clone(),
                s.clone(),
                f.clone(),
                r.clone()
            ])
        )
    );

    let mut enc_rows: Vec<_> = a.encrypted.iter().collect();
    enc_rows.sort_by_key(|(_, n)| std::cmp::Reverse(**n));
    let enc_bars: Vec<(String, u64)> = enc_rows
        .iter()
        .take(15)
        .map(|((s, c), n)| (format!("{s}: {c}"), **n))
        .collect();
    let _ = write!(
        h,
        "<section id=\"encrypted\"><h2>Access to encrypted columns</h2>{}{}</section>",
        bars_svg(&enc_bars, "#9333ea"),
        table(
            &["service", "column", "statements"],
            enc_rows
                .iter()
                .map(|((s, c), n)| vec![s.clone(), c.clone(), n.to_string()])
        )
    );

    let mut fps: Vec<_> = a.fingerprints.iter().collect();
    fps.sort_by(|x, y| y.1.count.cmp(&x.1.count).then_with(|| x.0.cmp(y.0)));
    h.push_str("<section id=\"top-statements\"><h2>Top statements by fingerprint</h2><table><thead><tr><th>count</th><th>refused</th><th>services</th><th>fingerprint</th></tr></thead><tbody>");
    for (fp, st) in fps.iter().take(25) {
        let services: Vec<&str> = st.services.iter().map(String::as_str).collect();
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            st.count,
            st.refused,
            esc(&services.join(", ")),
            esc(fp)
        );
    }
    if fps.is_empty() {
        h.push_str("<tr><td colspan=\"4\" class=\"empty\">None.</td></tr>");
    }
    h.push_str("</tbody></table></section>");

    h.push_str(&a.sections.render());
    let _ = write!(
        h,
        "<section id=\"errors\"><h2>Server errors by SQLSTATE</h2>{}</section>",
        table(
            &["sqlstate", "count"],
            a.errors_by_sqlstate
                .iter()
                .map(|(s, n)| vec![s.clone(), n.to_string()])
        )
    );
    h.push_str("</body></html>\n");
    h
}

/// Aggregates the selected records and writes the page. Returns the number of records used.
pub fn report(args: &ReportArgs) -> Result<u64, AuditError> {
    let sargs = SearchArgs {
        paths: args.paths.clone(),
        since: args.since.clone(),
        until: args.until.clone(),
        service: args.service.clone(),
        ..SearchArgs::default()
    };
    let filter = Filter::from_args(&sargs, SystemTime::now())?;
    let mut agg = Aggregates::default();
    if args.public_key.is_some() || !args.anchor.is_empty() {
        let vargs = super::verify::VerifyArgs {
            paths: args.paths.clone(),
            public_key: args.public_key.clone(),
            live: args.live,
            partial: false,
            slack: std::time::Duration::from_secs(30),
            anchor: args.anchor.clone(),
        };
        let checked = format!(
            "hash chain{}{}{}",
            if args.public_key.is_some() {
                ", checkpoint signatures"
            } else {
                ""
            },
            if args.anchor.is_empty() {
                ""
            } else {
                ", anchors outside the host"
            },
            if args.live { " (live)" } else { "" }
        );
        agg.integrity = Some((super::verify::verify(&vargs)?, checked));
    }
    scan(&args.paths, &filter, |_, r| {
        agg.add(r);
        true
    })?;
    let title = match &args.service {
        Some(s) => format!("pgward audit report — {s}"),
        None => "pgward audit report".to_string(),
    };
    let html = render_html(&agg, &title);
    std::fs::write(&args.out, html).map_err(|e| AuditError::io(&args.out, e))?;
    Ok(agg.records)
}

/// CLI entry point.
pub fn run_report(args: &ReportArgs) -> ExitCode {
    match report(args) {
        Ok(n) => {
            eprintln!("wrote {} ({n} records)", args.out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("audit report: {e}");
            ExitCode::from(2)
        }
    }
}
