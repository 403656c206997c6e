//! The configured implementations of [`KeySource`]: a JWKS file read once at startup, and a
//! JWKS URL fetched with a bounded, redirect-free HTTPS client (docs/security.md K-05, K-07,
//! K-11, K-14). The refresh rules that drive them live in `keys`, and apply to any source.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use jsonwebtoken::Algorithm;
use reqwest::header::{ACCEPT, CACHE_CONTROL, CONTENT_LENGTH};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use super::JwksSource;
use super::error::IdentityConfigError;
use super::jwks::{self, KeySet, MAX_JWKS_BYTES};
use super::keys::{FetchError, Fetched, KeySource, RefreshPolicy};

/// Default and largest bound on one JWKS fetch, connection and TLS handshake included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// The source an issuer's `jwks` setting names; a file is read now.
pub fn from_config(
    issuer: &str,
    algorithms: &[Algorithm],
    jwks: &JwksSource,
) -> Result<Arc<dyn KeySource>, IdentityConfigError> {
    Ok(match jwks {
        JwksSource::File(path) => Arc::new(FileSource::load(issuer, algorithms, path)?),
        JwksSource::Url {
            url,
            refresh,
            min_refetch_interval,
            max_staleness,
            fetch_timeout,
            ca_file,
        } => {
            let policy = RefreshPolicy {
                refresh: *refresh,
                min_refetch_interval: *min_refetch_interval,
                max_staleness: *max_staleness,
                fetch_timeout: *fetch_timeout,
            };
            Arc::new(UrlSource::new(
                issuer,
                algorithms,
                url,
                policy,
                ca_file.as_deref(),
            )?)
        }
    })
}

/// A JWKS file, read once when the source is built: its keys change with a restart, never
/// under a running verifier, and never go stale.
#[derive(Debug)]
pub struct FileSource {
    shown_path: String,
    set: KeySet,
}

impl FileSource {
    pub fn load(
        issuer: &str,
        algorithms: &[Algorithm],
        path: &Path,
    ) -> Result<Self, IdentityConfigError> {
        let bytes = std::fs::read(path).map_err(|source| IdentityConfigError::JwksFileRead {
            issuer: issuer.to_owned(),
            path: path.to_owned(),
            source,
        })?;
        let set = jwks::parse(&bytes, algorithms, issuer).map_err(|e| {
            IdentityConfigError::JwksFileInvalid {
                issuer: issuer.to_owned(),
                path: path.to_owned(),
                message: e.to_string(),
            }
        })?;
        Ok(Self {
            shown_path: path.display().to_string(),
            set,
        })
    }
}

#[async_trait]
impl KeySource for FileSource {
    fn location(&self) -> &str {
        &self.shown_path
    }

    fn refresh_policy(&self) -> Option<RefreshPolicy> {
        None
    }

    fn loaded(&self) -> Option<KeySet> {
        Some(self.set.clone())
    }

    async fn fetch(&self) -> Result<Fetched, FetchError> {
        Ok(Fetched {
            set: self.set.clone(),
            max_age: None,
        })
    }
}

/// Why one fetch from a JWKS URL failed.
#[derive(Debug, thiserror::Error)]
pub enum UrlFetchError {
    /// No response: connection, TLS, or the fetch timeout (the cause chain, without the URL).
    #[error("request failed: {0}")]
    Request(String),
    /// Any status but 200; redirects are not followed (K-11), so a 3xx lands here too.
    #[error("status {0}")]
    Status(reqwest::StatusCode),
    #[error("reading body: {0}")]
    Body(String),
    #[error("body is larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
}

impl From<UrlFetchError> for FetchError {
    fn from(e: UrlFetchError) -> Self {
        Self::Source(Box::new(e))
    }
}

/// A JWKS URL: https (plain http only on a loopback host), no redirects, bounded in time and
/// size, trusted through the configured CA file or the system's roots.
#[derive(Debug)]
pub struct UrlSource {
    issuer: String,
    algorithms: Vec<Algorithm>,
    url: reqwest::Url,
    /// `url` without userinfo, for logs and errors.
    shown_url: String,
    policy: RefreshPolicy,
    client: reqwest::Client,
}

fn loopback_host(url: &reqwest::Url) -> bool {
    matches!(url.host_str(), Some("127.0.0.1" | "[::1]" | "localhost"))
}

impl UrlSource {
    pub fn new(
        issuer: &str,
        algorithms: &[Algorithm],
        raw: &str,
        policy: RefreshPolicy,
        ca_file: Option<&Path>,
    ) -> Result<Self, IdentityConfigError> {
        let invalid = |field, msg: String| IdentityConfigError::invalid(issuer, field, msg);
        let parsed = reqwest::Url::parse(raw)
            .map_err(|e| invalid("jwks.url", format!("`{raw}` is not a URL: {e}")))?;
        let loopback = loopback_host(&parsed);
        // Plain HTTP would let anyone on the path swap the keys; only a loopback test server
        // is exempt.
        if !(parsed.scheme() == "https" || (parsed.scheme() == "http" && loopback)) {
            return Err(invalid(
                "jwks.url",
                format!("`{raw}` must be https (http only on a loopback host)"),
            ));
        }
        let fetch_timeout = policy.fetch_timeout;
        if fetch_timeout.is_zero() || fetch_timeout > FETCH_TIMEOUT {
            return Err(invalid(
                "jwks_fetch_timeout",
                format!(
                    "must be above 0 and at most {}",
                    humantime::format_duration(FETCH_TIMEOUT)
                ),
            ));
        }
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(fetch_timeout)
            .connect_timeout(fetch_timeout);
        if loopback {
            builder = builder.no_proxy();
        }
        if let Some(path) = ca_file {
            if parsed.scheme() != "https" {
                return Err(invalid(
                    "jwks_ca_file",
                    format!("set, but `{raw}` is not https"),
                ));
            }
            // Only these roots: a private issuer's keys are not trusted on the word of any
            // public CA.
            let certs = ca_certs(path).map_err(|m| invalid("jwks_ca_file", m))?;
            builder = builder.tls_certs_only(certs);
        }
        let client = builder
            .build()
            .map_err(|e| invalid("jwks.url", format!("http client: {e}")))?;
        let mut shown = parsed.clone();
        let _ = shown.set_password(None);
        let _ = shown.set_username("");
        Ok(Self {
            issuer: issuer.to_owned(),
            algorithms: algorithms.to_vec(),
            shown_url: shown.to_string(),
            url: parsed,
            policy,
            client,
        })
    }

    async fn get(&self) -> Result<(Vec<u8>, Option<Duration>), UrlFetchError> {
        let mut resp = self
            .client
            .get(self.url.clone())
            .header(ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| UrlFetchError::Request(error_chain(&e.without_url())))?;
        if resp.status() != reqwest::StatusCode::OK {
            return Err(UrlFetchError::Status(resp.status()));
        }
        let max_age = resp
            .headers()
            .get(CACHE_CONTROL)
            .and_then(|v| v.to_str().ok())
            .and_then(max_age);
        let declared = resp
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > MAX_JWKS_BYTES) {
            return Err(UrlFetchError::TooLarge);
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| UrlFetchError::Body(error_chain(&e.without_url())))?
        {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(UrlFetchError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        Ok((body, max_age))
    }
}

#[async_trait]
impl KeySource for UrlSource {
    fn location(&self) -> &str {
        &self.shown_url
    }

    fn refresh_policy(&self) -> Option<RefreshPolicy> {
        Some(self.policy)
    }

    async fn fetch(&self) -> Result<Fetched, FetchError> {
        let (body, max_age) = self.get().await?;
        let set = jwks::parse(&body, &self.algorithms, &self.issuer)?;
        Ok(Fetched { set, max_age })
    }
}

/// An error and its sources, `: `-joined (reqwest's own message omits the TLS cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// The CA certificates in a PEM file, each checked to be a usable trust anchor.
fn ca_certs(path: &Path) -> Result<Vec<reqwest::Certificate>, String> {
    let shown = path.display();
    let mut roots = rustls::RootCertStore::empty();
    let mut certs = Vec::new();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| format!("`{shown}`: {e}"))? {
        let cert = cert.map_err(|e| format!("`{shown}`: {e}"))?;
        roots
            .add(cert.clone())
            .map_err(|e| format!("`{shown}`: not a usable CA certificate: {e}"))?;
        certs.push(
            reqwest::Certificate::from_der(cert.as_ref())
                .map_err(|e| format!("`{shown}`: {}", error_chain(&e)))?,
        );
    }
    if certs.is_empty() {
        return Err(format!("`{shown}` holds no PEM certificate"));
    }
    Ok(certs)
}

/// `max-age` from a `Cache-Control` value, if there is one.
pub fn max_age(cache_control: &str) -> Option<Duration> {
    cache_control.split(',').find_map(|directive| {
        let (name, value) = directive.trim().split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("max-age") {
            return None;
        }
        let secs: u64 = value.trim().trim_matches('"').parse().ok()?;
        Some(Duration::from_secs(secs))
    })
}
