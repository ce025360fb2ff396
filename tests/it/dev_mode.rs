//! `pgward dev` as a newcomer uses it: run the binary, paste a printed psql command, Ctrl-C.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    pgward::pgserver::free_port().unwrap()
}

#[test]
fn dev_mode_prints_working_psql_commands_and_cleans_up_on_interrupt() {
    let workdir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    // Run from an empty directory: the demo migrations and policies come from the binary.
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgward"))
        // The database client's debug events print statements with their parameters: asked
        // for, they must still never show (the roles' passwords below).
        .args([
            "--log",
            "info,tokio_postgres=debug",
            "dev",
            "--listen",
            &listen,
            "--admin",
            &admin,
        ])
        .current_dir(workdir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut commands = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(command) = line.trim().strip_prefix("psql ") {
            commands.push(command.trim_matches('"').to_string());
        }
        if line.contains("Press Ctrl-C") || Instant::now() > deadline {
            break;
        }
    }
    if commands.len() != 3 {
        let _ = child.kill();
        let mut log = String::new();
        let _ = std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut log);
        panic!("one command per demo service, got {commands:?}; pgward dev said:\n{log}");
    }
    assert!(commands
        .iter()
        .all(|c| c.contains("sslmode=require") && c.contains(&listen)));
    let billing = commands
        .iter()
        .find(|c| c.starts_with("postgresql://billing:"))
        .unwrap();
    let out = Command::new("psql")
        .args([
            billing.as_str(),
            "-X",
            "-A",
            "-t",
            "-c",
            "select count(*), min(tenant_id), max(tenant_id) from customers",
        ])
        .output()
        .unwrap();
    if !out.status.success() {
        // Show what pgward dev said about it before failing.
        // SAFETY: sending SIGINT to our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let mut log = String::new();
        let _ = std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut log);
        panic!(
            "psql failed: {}\npgward dev said:\n{log}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().next(),
        Some("5|1|1"),
        "billing of tenant 1 sees its five customers only"
    );

    // The demo's personal data is encrypted upstream; billing reads and searches it as text.
    let out = Command::new("psql")
        .args([
            billing.as_str(),
            "-X",
            "-A",
            "-t",
            "-c",
            "select email, ssn from customers where email = 'customer3@tenant1.example'",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().next(),
        Some("customer3@tenant1.example|101-03-1003"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The working files live under ./.pgward and a token can be minted there.
    assert!(workdir.path().join(".pgward/pgward.toml").is_file());
    let minted = Command::new(env!("CARGO_BIN_EXE_pgward"))
        .args([
            "token",
            "mint",
            "--service",
            "billing",
            "--claim",
            "tenant_id=2",
        ])
        .current_dir(workdir.path())
        .output()
        .unwrap();
    assert!(minted.status.success());
    let token = String::from_utf8_lossy(&minted.stdout).trim().to_string();
    assert!(workdir
        .path()
        .join(".pgward/policies/billing.toml")
        .is_file());
    // Longer than the dev configuration accepts (24h): minted, with a warning.
    let long = Command::new(env!("CARGO_BIN_EXE_pgward"))
        .args(["token", "mint", "--service", "billing", "--ttl", "48h"])
        .current_dir(workdir.path())
        .output()
        .unwrap();
    assert!(long.status.success());
    let warning = String::from_utf8_lossy(&long.stderr);
    assert!(
        warning.contains("exceeds auth.max_token_lifetime (1day)"),
        "{warning}"
    );
    let out = Command::new("psql")
        .args([
            "-X",
            "-A",
            "-t",
            "-h",
            "127.0.0.1",
            "-p",
            listen.rsplit(':').next().unwrap(),
            "-U",
            "billing",
            "-d",
            "pgward_demo",
            "-c",
            "select count(*) from customers where tenant_id = 1",
        ])
        .env("PGPASSWORD", &token)
        .env("PGSSLMODE", "require")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "minted token works: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "a tenant-2 token sees no tenant-1 rows"
    );

    // Each demo service logs in upstream as its own role: no superuser, and nothing beyond
    // what its policy needs, checked directly against the server (not through pgward).
    let config: toml::Value = toml::from_str(
        &std::fs::read_to_string(workdir.path().join(".pgward/pgward.toml")).unwrap(),
    )
    .unwrap();
    let upstream_port = config["upstream"]["port"].as_integer().unwrap().to_string();
    let direct = |service: &str, sql: &str| {
        let svc = &config["services"][service];
        assert_eq!(svc["upstream_user"].as_str(), Some(service));
        let password_file = svc["upstream_password"]["file"].as_str().unwrap();
        let password = std::fs::read_to_string(password_file).unwrap();
        let out = Command::new("psql")
            .args(["-X", "-A", "-t", "-h", "127.0.0.1", "-p", &upstream_port])
            .args(["-U", service, "-d", "pgward_demo", "-c", sql])
            .env("PGPASSWORD", password.trim())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    for service in ["billing", "support", "analytics"] {
        let (ok, out, err) = direct(
            service,
            "select rolsuper, rolcreaterole, rolbypassrls from pg_roles where rolname = current_user",
        );
        assert!(ok && out == "f|f|f", "{service}: {out} {err}");
    }
    for (service, sql) in [
        ("billing", "select count(*) from tenants"),
        ("support", "select ssn from customers"),
        ("support", "update customers set name = 'x'"),
        ("analytics", "select email from customers"),
        ("billing", "select * from pgward.data_keys"),
        ("billing", "delete from invoices"),
    ] {
        let (ok, _, err) = direct(service, sql);
        assert!(
            !ok && err.contains("permission denied"),
            "{service}: {sql}: {err}"
        );
    }
    let (ok, out, err) = direct("billing", "select count(*) from customers");
    assert!(
        ok && out == "15",
        "billing reads its table upstream: {out} {err}"
    );

    // Ctrl-C stops everything and removes the throwaway server.
    // SAFETY: sending SIGINT to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("throwaway PostgreSQL removed"), "{stderr}");
    let pgward_dir = workdir.path().join(".pgward");
    for entry in std::fs::read_dir(&pgward_dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("upstream-password") {
            let password = std::fs::read_to_string(entry.path()).unwrap();
            let password = password.trim();
            assert!(
                password.len() >= 16 && !stderr.contains(password),
                "{name} reached pgward's log: {}",
                stderr
                    .lines()
                    .filter(|l| l.contains(password))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
    // With OpenBao installed the demo keys live in its transit engine, else in a local file.
    let config = std::fs::read_to_string(workdir.path().join(".pgward/pgward.toml")).unwrap();
    let bao_installed = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|p| p.join("bao").is_file()));
    if bao_installed {
        assert!(config.contains("provider = \"transit\""), "{config}");
        assert!(
            stderr.contains("bao write -f transit/keys/demo-pii/rotate"),
            "{stderr}"
        );
    } else {
        assert!(config.contains("provider = \"local\""), "{config}");
    }
    let server_line = stderr
        .lines()
        .find(|l| l.contains("PostgreSQL on 127.0.0.1:"))
        .expect("server line");
    let files = server_line
        .split("files in ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .expect("files dir");
    assert!(!std::path::Path::new(files).exists(), "{files} removed");
}

#[test]
fn token_mint_creates_a_key_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let mint = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_pgward"))
            .args(["token", "mint", "--service", "billing", "--dir"])
            .arg(&keys)
            .args(extra)
            .output()
            .unwrap()
    };
    let refused = mint(&[]);
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains("no dev signing key") && message.contains("--create-key"),
        "{message}"
    );
    assert!(!keys.exists(), "nothing created");
    let created = mint(&["--create-key"]);
    assert!(created.status.success());
    assert!(keys.join("jwks.json").is_file());
    // Default maximum without a configuration beside the key: 1h.
    let again = mint(&["--ttl", "2h"]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exceeds auth.max_token_lifetime (1h)"));
    // Checked against the configuration the token is for, when given one.
    let config = dir.path().join("other.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\naddress = \"127.0.0.1:6432\"\nallow_plaintext_loopback = true\n[upstream]\nhost = \"127.0.0.1\"\n[auth]\njwks_file = {:?}\nmax_token_lifetime = \"3h\"\n",
            keys.join("jwks.json")
        ),
    )
    .unwrap();
    let fits = mint(&["--ttl", "2h", "--config", config.to_str().unwrap()]);
    assert!(fits.status.success());
    assert!(
        !String::from_utf8_lossy(&fits.stderr).contains("exceeds"),
        "{fits:?}"
    );
    let missing = mint(&["--config", "/nonexistent/pgward.toml"]);
    assert!(
        !missing.status.success(),
        "a configuration that does not load is an error"
    );
}

/// `pgward dev --rls`: the policies are also PostgreSQL row-level security on the throwaway
/// server, and pgward passes the token's claims as `app.<claim>`; both lines answer alike.
#[test]
fn dev_mode_with_rls_filters_in_the_server_too() {
    let workdir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgward"))
        .args([
            "dev",
            "--rls",
            "--local-keys",
            "--listen",
            &listen,
            "--admin",
            &admin,
        ])
        .current_dir(workdir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut billing = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(command) = line.trim().strip_prefix("psql ") {
            let command = command.trim_matches('"').to_string();
            if command.starts_with("postgresql://billing:") {
                billing = Some(command);
            }
        }
        if line.contains("Press Ctrl-C") || Instant::now() > deadline {
            break;
        }
    }
    let stop = |child: &mut std::process::Child| {
        // SAFETY: sending SIGINT to our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let mut log = String::new();
        let _ = std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut log);
        let _ = child.wait();
        log
    };
    let Some(billing) = billing else {
        panic!("no billing command; pgward dev said:\n{}", stop(&mut child));
    };
    let psql = |args: &[&str], password: Option<&str>| {
        let mut cmd = Command::new("psql");
        cmd.args(["-X", "-A", "-t"]).args(args);
        if let Some(p) = password {
            cmd.env("PGPASSWORD", p);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let through = psql(
        &[
            billing.as_str(),
            "-c",
            "select count(*), min(tenant_id), max(tenant_id) from customers",
        ],
        None,
    );
    let config: toml::Value = toml::from_str(
        &std::fs::read_to_string(workdir.path().join(".pgward/pgward.toml")).unwrap(),
    )
    .unwrap();
    let port = config["upstream"]["port"].as_integer().unwrap().to_string();
    let password = std::fs::read_to_string(
        config["services"]["billing"]["upstream_password"]["file"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let direct = |sql: &str| {
        psql(
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "billing",
                "-d",
                "pgward_demo",
                "-c",
                sql,
            ],
            Some(password.trim()),
        )
    };
    let without_claim = direct("select count(*) from customers");
    let other_tenant = direct(
        "set app.tenant_id = '2'; select count(*), min(tenant_id), max(tenant_id) from customers",
    );
    let log = stop(&mut child);
    assert!(through.0 && through.1 == "5|1|1", "{through:?}\n{log}");
    assert!(
        config["policy"]["claims_as_settings"].as_bool() == Some(true),
        "{config}"
    );
    // The role alone, without the claim pgward passes, sees nothing (or fails).
    assert!(
        !without_claim.0 || without_claim.1 == "0",
        "{without_claim:?}"
    );
    assert!(
        other_tenant.0 && other_tenant.1.lines().last() == Some("5|2|2"),
        "{other_tenant:?}"
    );
    assert!(log.contains("row-level security installed"), "{log}");
}
