//! A client of the collector: the agent's shipper and `aegis-agent evidence list|fetch`.
//! reqwest on the same rustls as the server, trusting only the given CA.

use std::{path::Path, time::Duration};

use bytes::Bytes;

use super::index::BundleRow;

/// Longest an upload or a read may take (a 64 MiB bundle over a slow link fits).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the collector said to an upload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Uploaded {
    /// 201: stored now.
    Stored,
    /// 200: stored before (a retry).
    AlreadyStored,
}

/// Why a request did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The collector refused the request for good (4xx but 408 and 429): retrying the same
    /// request gets the same answer.
    #[error("the collector refused it ({status}): {message}")]
    Refused { status: u16, error: String, message: String },
    /// The collector could not be reached, timed out, or failed (5xx, 408, 429): try again.
    #[error("{0}")]
    Transient(String),
}

pub struct CollectorClient {
    base: url::Url,
    http: reqwest::Client,
}

impl CollectorClient {
    /// A client of the collector at `url` (`https://host:port`), trusting `ca`, with the
    /// client certificate `identity` (certificate, key) when given.
    pub fn new(url: &str, ca: &Path, identity: Option<(&Path, &Path)>) -> anyhow::Result<Self> {
        let base = url::Url::parse(url).map_err(|e| anyhow::anyhow!("collector URL {url:?}: {e}"))?;
        anyhow::ensure!(
            base.scheme() == "https" && base.host().is_some(),
            "collector URL {url:?}: must be https://host:port (the collector speaks only TLS)"
        );
        let tls = super::tls::client_config(ca, identity)?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| anyhow::anyhow!("cannot set up the HTTPS client: {e}"))?;
        Ok(Self { base, http })
    }

    /// The collector's URL, as configured.
    pub fn base_url(&self) -> String {
        self.base.to_string()
    }

    fn url(&self, path: &str) -> url::Url {
        let mut url = self.base.clone();
        let prefix = url.path().trim_end_matches('/').to_owned();
        url.set_path(&format!("{prefix}{path}"));
        url
    }

    /// PUT the bundle `bytes` under its digest.
    pub async fn put(&self, digest: &str, bytes: Bytes) -> Result<Uploaded, ClientError> {
        let response = self
            .http
            .put(self.url(&format!("/v1/bundles/sha256/{digest}")))
            .header("content-type", "application/json")
            .body(bytes)
            .send()
            .await
            .map_err(|e| ClientError::Transient(describe(&e)))?;
        match response.status().as_u16() {
            201 => Ok(Uploaded::Stored),
            200 => Ok(Uploaded::AlreadyStored),
            _ => Err(error_of(response).await),
        }
    }

    /// The bundle named `digest`.
    pub async fn get(&self, digest: &str) -> Result<Bytes, ClientError> {
        let response = self
            .http
            .get(self.url(&format!("/v1/bundles/sha256/{digest}")))
            .send()
            .await
            .map_err(|e| ClientError::Transient(describe(&e)))?;
        if response.status().as_u16() != 200 {
            return Err(error_of(response).await);
        }
        response.bytes().await.map_err(|e| ClientError::Transient(describe(&e)))
    }

    /// The stored bundles matching `query` (`host`, `incident`, `severity`, `since`,
    /// `until`, `limit`).
    pub async fn list(&self, query: &[(&str, &str)]) -> Result<Vec<BundleRow>, ClientError> {
        let mut url = self.url("/v1/bundles");
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let response = self.http.get(url).send().await.map_err(|e| ClientError::Transient(describe(&e)))?;
        if response.status().as_u16() != 200 {
            return Err(error_of(response).await);
        }
        #[derive(serde::Deserialize)]
        struct List {
            bundles: Vec<BundleRow>,
        }
        let body = response.bytes().await.map_err(|e| ClientError::Transient(describe(&e)))?;
        serde_json::from_slice::<List>(&body)
            .map(|l| l.bundles)
            .map_err(|e| ClientError::Transient(format!("the collector's list is not JSON: {e}")))
    }
}

/// What the collector said to a publication.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct PublishAnswer {
    /// "published", or "already_published" (the same bytes again).
    pub status: String,
    pub version: u64,
    pub digest: String,
    pub published_ms: u64,
}

impl CollectorClient {
    /// The fleet policy newer than `after`, waiting up to `wait` for one to be published
    /// (None: none came). With its publication time (Unix ms).
    pub async fn policy(&self, after: u64, wait: Duration) -> Result<Option<(Bytes, u64)>, ClientError> {
        let mut url = self.url("/v1/policy");
        url.query_pairs_mut().append_pair("after", &after.to_string()).append_pair("wait", &wait.as_secs().to_string());
        let response = self
            .http
            .get(url)
            .timeout(wait + CONNECT_TIMEOUT + Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| ClientError::Transient(describe(&e)))?;
        match response.status().as_u16() {
            204 => Ok(None),
            200 => {
                let published = response
                    .headers()
                    .get("x-aegis-published-ms")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let body = response.bytes().await.map_err(|e| ClientError::Transient(describe(&e)))?;
                Ok(Some((body, published)))
            }
            _ => Err(error_of(response).await),
        }
    }

    /// Publish a signed fleet policy.
    pub async fn publish(&self, bytes: Bytes) -> Result<PublishAnswer, ClientError> {
        let response = self
            .http
            .put(self.url("/v1/policy"))
            .header("content-type", "application/json")
            .body(bytes)
            .send()
            .await
            .map_err(|e| ClientError::Transient(describe(&e)))?;
        if !matches!(response.status().as_u16(), 200 | 201) {
            return Err(error_of(response).await);
        }
        let body = response.bytes().await.map_err(|e| ClientError::Transient(describe(&e)))?;
        serde_json::from_slice(&body)
            .map_err(|e| ClientError::Transient(format!("the collector's answer is not JSON: {e}")))
    }

    /// Send a signed acknowledgement.
    pub async fn ack(&self, bytes: Bytes) -> Result<(), ClientError> {
        let response = self
            .http
            .post(self.url("/v1/policy/acks"))
            .header("content-type", "application/json")
            .body(bytes)
            .send()
            .await
            .map_err(|e| ClientError::Transient(describe(&e)))?;
        if response.status().as_u16() != 201 {
            return Err(error_of(response).await);
        }
        Ok(())
    }

    /// Send a signed fleet drill result.
    pub async fn drill_result(&self, bytes: Bytes) -> Result<(), ClientError> {
        let response = self
            .http
            .post(self.url("/v1/fleet/drills"))
            .header("content-type", "application/json")
            .body(bytes)
            .send()
            .await
            .map_err(|e| ClientError::Transient(describe(&e)))?;
        if response.status().as_u16() != 201 {
            return Err(error_of(response).await);
        }
        Ok(())
    }

    /// The enrolled agents' results of fleet drill `id` (`GET /v1/fleet/drills?id=`).
    pub async fn drill_results(&self, id: &str) -> Result<serde_json::Value, ClientError> {
        let mut url = self.url("/v1/fleet/drills");
        url.query_pairs_mut().append_pair("id", id);
        self.get_json(url).await
    }

    async fn get_json(&self, url: url::Url) -> Result<serde_json::Value, ClientError> {
        let response = self.http.get(url).send().await.map_err(|e| ClientError::Transient(describe(&e)))?;
        if response.status().as_u16() != 200 {
            return Err(error_of(response).await);
        }
        let body = response.bytes().await.map_err(|e| ClientError::Transient(describe(&e)))?;
        serde_json::from_slice(&body)
            .map_err(|e| ClientError::Transient(format!("the collector's answer is not JSON: {e}")))
    }

    /// The fleet's state as the collector sees it (`GET /v1/fleet/status`).
    pub async fn fleet_status(&self) -> Result<serde_json::Value, ClientError> {
        self.get_json(self.url("/v1/fleet/status")).await
    }
}

/// reqwest's error with its causes (the TLS alert is in the source chain).
fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

async fn error_of(response: reqwest::Response) -> ClientError {
    let status = response.status().as_u16();
    let body = response.bytes().await.unwrap_or_default();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let field = |name: &str| json[name].as_str().unwrap_or_default().to_owned();
    let message = match (field("message"), field("action")) {
        (m, a) if !m.is_empty() && !a.is_empty() => format!("{m}. What to do: {a}"),
        (m, _) if !m.is_empty() => m,
        _ => String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
    };
    if (400..500).contains(&status) && status != 408 && status != 429 {
        ClientError::Refused { status, error: field("error"), message }
    } else {
        ClientError::Transient(format!("the collector answered {status}: {message}"))
    }
}
