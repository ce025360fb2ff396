//! A small Vault/OpenBao HTTP client: token or AppRole auth, renewal, re-login, CA file.
//!
//! Written on `reqwest` instead of `vaultrs` because pgward needs things vaultrs makes
//! awkward: swapping the token of a shared client after re-login (vaultrs' token lives
//! in `&mut` settings), telling "unreachable/sealed" from "refused" in errors (which
//! decides whether cached keys keep serving), tolerant response parsing (vaultrs 0.8's
//! `sys::health` fails on OpenBao, and its `ReadKeyResponse` has no `latest_version`).
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::metrics::{KeyMetrics, VaultOutcome};
use std::time::{Duration, Instant};

use serde_json::Value;
use thiserror::Error;
use zeroize::Zeroizing;

/// How pgward authenticates to Vault.
#[derive(Clone)]
pub enum VaultAuth {
    /// A fixed token (renewed if renewable).
    Token(Zeroizing<String>),
    /// AppRole login at `auth/<mount>/login`.
    AppRole {
        mount: String,
        role_id: String,
        secret_id: Zeroizing<String>,
    },
}

impl std::fmt::Debug for VaultAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VaultAuth::Token(_) => f.write_str("Token(<redacted>)"),
            VaultAuth::AppRole { mount, role_id, .. } => f
                .debug_struct("AppRole")
                .field("mount", mount)
                .field("role_id", role_id)
                .field("secret_id", &"<redacted>")
                .finish(),
        }
    }
}

/// Connection settings.
#[derive(Clone, Debug)]
pub struct VaultClientConfig {
    pub address: String,
    pub auth: VaultAuth,
    pub ca_file: Option<PathBuf>,
    pub request_timeout: Duration,
}

/// A failed Vault call.
#[derive(Debug, Error)]
pub enum VaultError {
    #[error("cannot reach Vault at {address}: {reason}")]
    Unreachable { address: String, reason: String },
    #[error("Vault unavailable (HTTP {status}: standby or overloaded) on {path}")]
    Unavailable { status: u16, path: String },
    /// HTTP 503: Vault is sealed (or deliberately refusing all service). Treated as a
    /// refusal, not an outage: keys stop serving instead of being served from cache.
    #[error("Vault is sealed (HTTP 503) on {path}")]
    Sealed { path: String },
    #[error("permission denied on {path} (token revoked, expired, or policy): {errors}")]
    PermissionDenied { path: String, errors: String },
    #[error("not found: {path}")]
    NotFound { path: String },
    #[error("Vault error HTTP {status} on {path}: {errors}")]
    Api {
        status: u16,
        path: String,
        errors: String,
    },
    #[error("unexpected Vault response on {path}: {reason}")]
    Response { path: String, reason: String },
    #[error("Vault client setup: {0}")]
    Setup(String),
}

impl VaultError {
    /// Vault could not be asked (as opposed to Vault answering "no").
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            VaultError::Unreachable { .. } | VaultError::Unavailable { .. }
        )
    }

    /// Vault answered that pgward may not have the key now: permission denied (revoked or
    /// expired token, policy change) or sealed. Keys under it stop serving at once.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            VaultError::PermissionDenied { .. } | VaultError::Sealed { .. }
        )
    }
}

/// Refuse `http://` to anything but a loopback host unless explicitly allowed: the data
/// keys and the Vault token would cross the network in clear.
pub fn check_address(address: &str, allow_insecure_http: bool) -> Result<(), String> {
    let Some(rest) = address.strip_prefix("http://") else {
        return if address.starts_with("https://") {
            Ok(())
        } else {
            Err(format!(
                "vault.address {address:?} must start with https:// (or http:// to a loopback address)"
            ))
        };
    };
    if allow_insecure_http || is_loopback_authority(rest) {
        return Ok(());
    }
    Err(format!(
        "vault.address {address:?} is plain http:// to a non-loopback host: data keys and the \
         Vault token would cross the network in clear; use https:// (or set \
         vault.allow_insecure_http = true)"
    ))
}

/// Whether the host of `host[:port][/path]` is `localhost`, 127.0.0.0/8 or `[::1]`.
fn is_loopback_authority(rest: &str) -> bool {
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return false;
    }
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// `GET /v1/sys/health` outcome, from the status code (works on Vault and OpenBao alike).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Active,
    Standby,
    PerformanceStandby,
    DrSecondary,
    Uninitialized,
    Sealed,
}

struct TokenState {
    token: Zeroizing<String>,
    renewable: bool,
    /// Lease duration when last issued or renewed; zero = never expires.
    ttl: Duration,
    obtained: Instant,
}

/// Counters for tests and `keys status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VaultStats {
    pub logins: u64,
    pub renewals: u64,
}

/// A shareable Vault client (wrap in `Arc`).
pub struct VaultClient {
    http: reqwest::Client,
    address: String,
    /// Replaceable: a token file rewritten by a Vault Agent sink is picked up at run time.
    auth: parking_lot::RwLock<VaultAuth>,
    state: parking_lot::RwLock<Option<TokenState>>,
    /// Serialises login/renewal so a burst of requests triggers one login.
    refresh_lock: tokio::sync::Mutex<()>,
    logins: AtomicU64,
    renewals: AtomicU64,
    metrics: Arc<KeyMetrics>,
}

impl std::fmt::Debug for VaultClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultClient")
            .field("address", &self.address)
            .field("auth", &*self.auth.read())
            .finish()
    }
}

#[derive(Clone, Copy)]
enum Method {
    Get,
    Post,
    Delete,
}

impl VaultClient {
    pub fn new(config: VaultClientConfig) -> Result<Self, VaultError> {
        let mut builder = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .connect_timeout(Duration::from_secs(3));
        if let Some(ca) = &config.ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| VaultError::Setup(format!("reading CA file {}: {e}", ca.display())))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| VaultError::Setup(format!("CA file {}: {e}", ca.display())))?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder
            .build()
            .map_err(|e| VaultError::Setup(e.to_string()))?;
        Ok(VaultClient {
            http,
            address: config.address.trim_end_matches('/').to_string(),
            auth: parking_lot::RwLock::new(config.auth),
            state: parking_lot::RwLock::new(None),
            refresh_lock: tokio::sync::Mutex::new(()),
            logins: AtomicU64::new(0),
            renewals: AtomicU64::new(0),
            metrics: Arc::new(KeyMetrics::default()),
        })
    }

    /// Request counters and latency (shared with the key manager's series).
    pub fn metrics(&self) -> Arc<KeyMetrics> {
        self.metrics.clone()
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// Use `token` from now on (a rotated token file). Returns `false` when it is the token
    /// already in use or the client authenticates with AppRole (nothing changes then).
    pub fn replace_token(&self, token: Zeroizing<String>) -> bool {
        {
            let mut auth = self.auth.write();
            match &*auth {
                VaultAuth::Token(old) if old.as_str() == token.as_str() => return false,
                VaultAuth::Token(_) => *auth = VaultAuth::Token(token),
                VaultAuth::AppRole { .. } => return false,
            }
        }
        // The next call looks the new token up (TTL, renewability) before using it.
        *self.state.write() = None;
        tracing::info!("Vault token replaced");
        true
    }

    fn is_approle(&self) -> bool {
        matches!(&*self.auth.read(), VaultAuth::AppRole { .. })
    }

    pub fn stats(&self) -> VaultStats {
        VaultStats {
            logins: self.logins.load(Ordering::Relaxed),
            renewals: self.renewals.load(Ordering::Relaxed),
        }
    }

    /// Health from status codes: 200 active, 429 standby, 472 DR secondary, 473 performance standby,
    /// 501 uninitialised, 503 sealed.
    pub async fn health(&self) -> Result<Health, VaultError> {
        let url = format!("{}/v1/sys/health", self.address);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        match resp.status().as_u16() {
            200 => Ok(Health::Active),
            429 => Ok(Health::Standby),
            472 => Ok(Health::DrSecondary),
            473 => Ok(Health::PerformanceStandby),
            501 => Ok(Health::Uninitialized),
            503 => Ok(Health::Sealed),
            status => Err(VaultError::Api {
                status,
                path: "sys/health".into(),
                errors: String::new(),
            }),
        }
    }

    pub async fn get(&self, path: &str) -> Result<Value, VaultError> {
        self.call(Method::Get, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Result<Value, VaultError> {
        self.call(Method::Post, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Result<Value, VaultError> {
        self.call(Method::Delete, path, None).await
    }

    /// Renew or re-login if the token is past two thirds of its lease. Called on every
    /// request and periodically by the key manager's poller.
    pub async fn maintain_token(&self) -> Result<(), VaultError> {
        if self.needs_refresh() {
            let _guard = self.refresh_lock.lock().await;
            if self.needs_refresh() {
                self.refresh().await?;
            }
        }
        Ok(())
    }

    fn needs_refresh(&self) -> bool {
        match &*self.state.read() {
            None => true,
            Some(s) => !s.ttl.is_zero() && s.obtained.elapsed() >= s.ttl * 2 / 3,
        }
    }

    async fn refresh(&self) -> Result<(), VaultError> {
        let (renewable, had_token, old_ttl) = match &*self.state.read() {
            Some(s) => (s.renewable, true, s.ttl),
            None => (false, false, Duration::ZERO),
        };
        if had_token && renewable {
            match self.renew_self().await {
                // Renewal that no longer extends the lease much means token_max_ttl is near: log in again.
                Ok(ttl) if ttl >= old_ttl / 2 || !self.is_approle() => return Ok(()),
                Ok(_) => tracing::info!("Vault token near its max TTL; logging in again"),
                Err(e) if e.is_unavailable() => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "Vault token renewal failed; logging in again")
                }
            }
        }
        self.login().await
    }

    async fn renew_self(&self) -> Result<Duration, VaultError> {
        let resp = self
            .raw(
                Method::Post,
                "auth/token/renew-self",
                Some(serde_json::json!({})),
            )
            .await?;
        let auth = resp
            .get("auth")
            .ok_or_else(|| response_err("auth/token/renew-self", "no auth block"))?;
        let ttl = Duration::from_secs(
            auth.get("lease_duration")
                .and_then(Value::as_u64)
                .unwrap_or(0),
        );
        if let Some(s) = self.state.write().as_mut() {
            s.ttl = ttl;
            s.obtained = Instant::now();
            s.renewable = auth
                .get("renewable")
                .and_then(Value::as_bool)
                .unwrap_or(false);
        }
        self.renewals.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(ttl_secs = ttl.as_secs(), "renewed Vault token");
        Ok(ttl)
    }

    async fn login(&self) -> Result<(), VaultError> {
        let auth = self.auth.read().clone();
        match &auth {
            VaultAuth::Token(token) => {
                // Learn TTL/renewability; a token we cannot look up is still tried as-is.
                *self.state.write() = Some(TokenState {
                    token: token.clone(),
                    renewable: false,
                    ttl: Duration::ZERO,
                    obtained: Instant::now(),
                });
                match self.raw(Method::Get, "auth/token/lookup-self", None).await {
                    Ok(v) => {
                        let data = v.get("data").cloned().unwrap_or(Value::Null);
                        let ttl = Duration::from_secs(
                            data.get("ttl").and_then(Value::as_u64).unwrap_or(0),
                        );
                        let renewable = data
                            .get("renewable")
                            .and_then(Value::as_bool)
                            .unwrap_or(false);
                        if let Some(s) = self.state.write().as_mut() {
                            s.ttl = ttl;
                            s.renewable = renewable;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "Vault token lookup-self failed"),
                }
                self.logins.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            VaultAuth::AppRole {
                mount,
                role_id,
                secret_id,
            } => {
                let path = format!("auth/{mount}/login");
                let body =
                    serde_json::json!({ "role_id": role_id, "secret_id": secret_id.as_str() });
                let resp = self.send(Method::Post, &path, Some(&body), None).await?;
                let auth = resp
                    .get("auth")
                    .ok_or_else(|| response_err(&path, "no auth block"))?;
                let token = auth
                    .get("client_token")
                    .and_then(Value::as_str)
                    .ok_or_else(|| response_err(&path, "no client_token"))?;
                let ttl = Duration::from_secs(
                    auth.get("lease_duration")
                        .and_then(Value::as_u64)
                        .unwrap_or(0),
                );
                let renewable = auth
                    .get("renewable")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                *self.state.write() = Some(TokenState {
                    token: Zeroizing::new(token.to_string()),
                    renewable,
                    ttl,
                    obtained: Instant::now(),
                });
                self.logins.fetch_add(1, Ordering::Relaxed);
                tracing::info!(ttl_secs = ttl.as_secs(), "logged in to Vault with AppRole");
                Ok(())
            }
        }
    }

    /// An authenticated call; on 403 with AppRole, logs in again once and retries.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, VaultError> {
        if let Err(e) = self.maintain_token().await {
            // A failed refresh of a still-valid token should not block the call itself.
            if self.state.read().is_none() {
                return Err(e);
            }
            tracing::warn!(error = %e, "Vault token refresh failed; trying the current token");
        }
        match self.raw(method, path, body.clone()).await {
            Err(VaultError::PermissionDenied { .. }) if self.is_approle() => {
                tracing::warn!(path, "Vault denied the current token; logging in again");
                {
                    let _guard = self.refresh_lock.lock().await;
                    self.login().await?;
                }
                self.raw(method, path, body).await
            }
            other => other,
        }
    }

    async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, VaultError> {
        let token = self.state.read().as_ref().map(|s| s.token.clone());
        self.send(
            method,
            path,
            body.as_ref(),
            token.as_ref().map(|t| t.as_str()),
        )
        .await
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        token: Option<&str>,
    ) -> Result<Value, VaultError> {
        let started = Instant::now();
        let result = self.send_once(method, path, body, token).await;
        let outcome = match &result {
            Ok(_) => VaultOutcome::Ok,
            Err(e) if e.is_unavailable() => VaultOutcome::Unreachable,
            Err(VaultError::Sealed { .. }) => VaultOutcome::Sealed,
            Err(VaultError::PermissionDenied { .. }) => VaultOutcome::Refused,
            Err(_) => VaultOutcome::Error,
        };
        self.metrics.vault_request(outcome, started.elapsed());
        result
    }

    async fn send_once(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        token: Option<&str>,
    ) -> Result<Value, VaultError> {
        let url = format!("{}/v1/{path}", self.address);
        let mut req = match method {
            Method::Get => self.http.get(&url),
            Method::Post => self.http.post(&url),
            Method::Delete => self.http.delete(&url),
        };
        if let Some(t) = token {
            req = req.header("X-Vault-Token", t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| self.unreachable(e))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| self.unreachable(e))?;
        let json: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::Null)
        };
        let errors = || {
            json.get("errors")
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        match status {
            200..=299 => Ok(json),
            403 => Err(VaultError::PermissionDenied {
                path: path.to_string(),
                errors: errors(),
            }),
            404 => Err(VaultError::NotFound {
                path: path.to_string(),
            }),
            503 => Err(VaultError::Sealed {
                path: path.to_string(),
            }),
            429 | 500..=599 => Err(VaultError::Unavailable {
                status,
                path: path.to_string(),
            }),
            _ => Err(VaultError::Api {
                status,
                path: path.to_string(),
                errors: errors(),
            }),
        }
    }

    fn unreachable(&self, e: reqwest::Error) -> VaultError {
        VaultError::Unreachable {
            address: self.address.clone(),
            reason: e.to_string(),
        }
    }
}

pub(crate) fn response_err(path: &str, reason: &str) -> VaultError {
    VaultError::Response {
        path: path.to_string(),
        reason: reason.to_string(),
    }
}

/// `data.<field>` of a Vault response as a string.
pub(crate) fn data_str<'a>(v: &'a Value, path: &str, field: &str) -> Result<&'a str, VaultError> {
    v.get("data")
        .and_then(|d| d.get(field))
        .and_then(Value::as_str)
        .ok_or_else(|| response_err(path, &format!("missing data.{field}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_credentials() {
        let approle = VaultAuth::AppRole {
            mount: "approle".into(),
            role_id: "role".into(),
            secret_id: Zeroizing::new("s3cr3t-id".into()),
        };
        let token = VaultAuth::Token(Zeroizing::new("hvs.t0ken".into()));
        let shown = format!("{approle:?} {token:?}");
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("t0ken"),
            "{shown}"
        );
    }

    #[test]
    fn plain_http_only_to_loopback_unless_allowed() {
        for ok in [
            "https://vault.example:8200",
            "http://127.0.0.1:8200",
            "http://127.9.9.9",
            "http://localhost:8200/",
            "http://[::1]:8200",
        ] {
            assert!(check_address(ok, false).is_ok(), "{ok}");
        }
        for bad in [
            "http://vault.example:8200",
            "http://10.0.0.1:8200",
            "http://127.0.0.1.evil.example",
            "http://127.0.0.1@vault.example",
            "http://[::2]:8200",
            "ftp://127.0.0.1",
        ] {
            assert!(check_address(bad, false).is_err(), "{bad}");
        }
        assert!(check_address("http://vault.example:8200", true).is_ok());
    }

    #[test]
    fn replacing_the_token_forgets_the_old_one() {
        let client = VaultClient::new(VaultClientConfig {
            address: "http://127.0.0.1:9".into(),
            auth: VaultAuth::Token(Zeroizing::new("old".into())),
            ca_file: None,
            request_timeout: Duration::from_secs(1),
        })
        .unwrap();
        assert!(!client.replace_token(Zeroizing::new("old".into())));
        assert!(client.replace_token(Zeroizing::new("new".into())));
        assert!(
            matches!(&*client.auth.read(), VaultAuth::Token(t) if t.as_str() == "new"),
            "new token in use"
        );
    }

    #[tokio::test]
    async fn unreachable_is_unavailable() {
        let client = VaultClient::new(VaultClientConfig {
            address: "http://127.0.0.1:9".into(),
            auth: VaultAuth::Token(Zeroizing::new("x".into())),
            ca_file: None,
            request_timeout: Duration::from_secs(2),
        })
        .unwrap();
        let err = client.get("transit/keys/k").await.unwrap_err();
        assert!(err.is_unavailable(), "{err:?}");
    }
}
