//! `pgward check --config FILE` against the real PostgreSQL (and OpenBao for `[vault]`): each
//! mistake the preflight exists for is made once and must be reported as a failure.

use std::path::{Path, PathBuf};

use crate::harness::{self, ProxyOptions};
use crate::vault::Bao;

const BILLING: &str = r#"
service = "billing"
claim_types = { tenant_id = "bigint" }
[tables.customers]
actions = ["select", "insert"]
filter = "tenant_id = claim('tenant_id')"
presets = { tenant_id = "claim('tenant_id')" }
"#;

/// A config directory: `pgward.toml` (the harness's services plus `billing`, `[policy]` on
/// `database`, and `extra`) and a `policies/` directory holding `policies`.
fn write_setup(
    database: &str,
    policies: &[(&str, &str)],
    extra: &str,
) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let policy_dir = dir.path().join("policies");
    std::fs::create_dir(&policy_dir).unwrap();
    for (name, text) in policies {
        std::fs::write(policy_dir.join(name), text).unwrap();
    }
    let options = ProxyOptions {
        extra_toml: format!(
            "{}\n[policy]\ndir = {policy_dir:?}\ndatabase = \"{database}\"\ncatalog_service = \"app\"\n{extra}",
            harness::superuser_service("billing")
        ),
        ..ProxyOptions::default()
    };
    let path = dir.path().join("pgward.toml");
    std::fs::write(&path, harness::proxy_config_text(&options)).unwrap();
    (dir, path)
}

async fn report(path: &Path) -> (usize, String) {
    let report = pgward::cli::check::check(path, None).await;
    (report.failures(), report.render())
}

fn fail_lines(text: &str) -> Vec<&str> {
    text.lines().filter(|l| l.starts_with("FAIL")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correct_setup_passes_and_the_binary_exits_zero() {
    let db = harness::fresh_database("check_ok", true).await;
    let (_dir, path) = write_setup(&db, &[("billing.toml", BILLING)], "");
    let (failures, text) = report(&path).await;
    assert_eq!(failures, 0, "{text}");
    for expected in [
        "ok    service md5svc: logged in upstream as role \"md5_user\"",
        "ok    service trustsvc:",
        "ok    migrations: function pgward.assert_row installed",
        "ok    policy billing:",
        "ok    token keys",
        "check passed",
    ] {
        assert!(text.contains(expected), "{expected:?} not in:\n{text}");
    }
    let out = harness::pgward_cli(["check", "--config", path.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("check passed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_policy_mistake_is_a_failure_with_its_rule() {
    let db = harness::fresh_database("check_policy", true).await;
    // A text claim compared with a bigint column: only the server knows `bigint = text` has no
    // operator.
    let mistyped = BILLING.replace("\"bigint\"", "\"text\"");
    // A claim used without a declared type.
    let undeclared =
        "[tables.invoices]\nactions = [\"select\"]\nfilter = \"tenant_id = claim('tenant')\"\n";
    // A file whose `service` is not its name.
    let renamed = "service = \"reporting\"\n[tables.tenants]\nactions = [\"select\"]\n";
    let (_dir, path) = write_setup(
        &db,
        &[
            ("billing.toml", &mistyped),
            ("support.toml", undeclared),
            ("analytics.toml", renamed),
        ],
        "",
    );
    let (failures, text) = report(&path).await;
    let fails = fail_lines(&text);
    assert_eq!(failures, fails.len(), "{text}");
    let has = |needle: &str| fails.iter().any(|l| l.contains(needle));
    assert!(
        has("policy billing:")
            && has("filter of public.customers")
            && has("operator does not exist: bigint = text"),
        "{text}"
    );
    assert!(has("preset public.customers.tenant_id"), "{text}");
    assert!(
        has("policy support:") && has("claim \"tenant\"") && has("not declared in claim_types"),
        "{text}"
    );
    assert!(
        has("policy reporting:") && has("the file must be named reporting.toml"),
        "{text}"
    );
    assert!(text.contains("check FAILED"), "{text}");
    // The binary says so with its exit code.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgward"))
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_migrations_and_refused_logins_are_failures_with_the_servers_reason() {
    // The demo tables without pgward's own schema.
    let db = harness::fresh_database("check_nomig", false).await;
    let (client, conn) = harness::postgres()
        .direct(&db)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(include_str!("../../migrations/0001_demo_schema.sql"))
        .await
        .unwrap();
    let wrong_password = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(wrong_password.path(), "not-the-password").unwrap();
    let extra = format!(
        "\n[services.broken]\nupstream_user = \"{}\"\nupstream_password = {{ file = {:?} }}\nunrestricted = true\n",
        harness::MD5_ROLE,
        wrong_password.path()
    );
    let (_dir, path) = write_setup(&db, &[("billing.toml", BILLING)], &extra);
    let (failures, text) = report(&path).await;
    let fails = fail_lines(&text);
    assert_eq!(failures, 2, "{text}");
    assert!(
        fails.iter().any(|l| l.starts_with("FAIL  service broken:")
            && l.contains("password authentication failed for user \"md5_user\"")
            && l.contains("28P01")),
        "{text}"
    );
    assert!(
        fails
            .iter()
            .any(|l| l.contains("function pgward.assert_row is missing")),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_is_reached_with_the_configured_token() {
    let bao = Bao::start().await;
    let db = harness::fresh_database("check_vault", true).await;
    let token_file = tempfile::NamedTempFile::new().unwrap();
    let vault = |token: &str| {
        std::fs::write(token_file.path(), token).unwrap();
        format!(
            "\n[vault]\naddress = \"{}\"\ntoken_file = {:?}\n",
            bao.addr,
            token_file.path()
        )
    };
    let section = vault(&bao.token);
    let (_dir, path) = write_setup(&db, &[("billing.toml", BILLING)], &section);
    let (failures, text) = report(&path).await;
    assert_eq!(failures, 0, "{text}");
    assert!(text.contains("ok    vault:"), "{text}");

    vault("s.not-a-valid-token");
    let (failures, text) = report(&path).await;
    assert_eq!(failures, 1, "{text}");
    assert!(
        fail_lines(&text)
            .iter()
            .any(|l| l.starts_with("FAIL  vault:")),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_is_one_failure_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgward.toml");
    std::fs::write(&path, "[listen]\nprot = 1\n").unwrap();
    let (failures, text) = report(&path).await;
    assert_eq!(failures, 1, "{text}");
    assert!(
        text.contains("FAIL  configuration:") && text.contains("prot"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_tools_read_the_configuration() {
    let db = harness::fresh_database("check_policy_cli", true).await;
    let (_dir, path) = write_setup(&db, &[("billing.toml", BILLING)], "");
    let config = path.to_str().unwrap();
    let out = harness::pgward_cli(["policy", "check", "--config", config]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ok: 1 service(s): billing"
    );
    let out = harness::pgward_cli([
        "policy",
        "explain",
        "--config",
        config,
        "--service",
        "billing",
        "--claim",
        "tenant_id=7",
        "select name from customers",
    ]);
    let rewrite = String::from_utf8_lossy(&out.stdout);
    assert!(rewrite.contains("\"tenant_id\") = (7)"), "{rewrite}");
}
