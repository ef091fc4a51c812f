//! [`CallRecord`]: the one JSON line written per model API call.
//!
//! Secrets never enter a record: it carries no header values and no body content, only
//! what the exchange *is* (API, model, sizes, usage) and who made it.

use serde::Serialize;

use super::{
    detect::ApiKind,
    exchange::{Observation, Side},
};
use crate::policy::decision::Decision;

/// A process at one end of a call.
#[derive(Clone, Debug, Serialize)]
pub struct Endpoint {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub exe: Option<String>,
    pub uid: u32,
    pub cgroup: String,
    pub tls: TlsSource,
}

/// Which probe saw the bytes.
#[derive(Clone, Debug, Serialize)]
pub struct TlsSource {
    /// The probed file: a libssl or libgnutls, or an executable with OpenSSL linked in.
    pub library: String,
    /// The TLS implementation probed: `openssl` (also BoringSSL) or `gnutls`; absent when the
    /// event's source is unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stack: Option<&'static str>,
    /// The library functions the connection's bytes were seen in.
    pub hooks: Vec<&'static str>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CallRecord {
    pub call_id: String,
    /// Wall-clock time of the request's first byte, RFC 3339 UTC.
    pub time: String,
    /// The same, in ns since the Unix epoch (for exporters that want numbers).
    #[serde(skip)]
    pub start_unix_ns: i128,
    pub provider: &'static str,
    pub api: ApiKind,
    pub host: Option<String>,
    /// Null when the request was not captured (see `notes`).
    pub method: Option<String>,
    pub path: Option<String>,
    /// `"1.1"` or `"2"`: the HTTP version the call was carried by.
    pub http_version: &'static str,
    /// The HTTP/2 stream that carried the call (absent on HTTP/1.x).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_id: Option<u32>,
    pub model: Option<String>,
    pub response_model: Option<String>,
    pub stream: bool,
    pub status: Option<u16>,
    pub ttfb_ms: Option<f64>,
    pub latency_ms: Option<f64>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub finish_reason: Option<String>,
    pub error: Option<String>,
    /// The calling process (or the serving one, when only that end was seen: see `side`).
    #[serde(flatten)]
    pub process: Endpoint,
    /// Which end `process` is.
    pub side: Side,
    /// The serving process, when it runs on this host and its end was seen too.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<Endpoint>,
    pub complete: bool,
    pub notes: Vec<String>,
    /// What the rules decided (absent when no rules are in force).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    /// The call was stopped on the wire (its connection destroyed), by whom, how fast, and
    /// what still passed after the verdict.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<crate::policy::ruling::Enforcement>,
    /// The drill (`aegis-agent drill`) this call is part of: synthetic traffic, never
    /// counted as real (set by the records sink, see `control::drills`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drill: Option<String>,
    /// The decoded request body, kept for the look-back only when `[lookback] payloads`
    /// allows it; never written to a record.
    #[serde(skip)]
    pub payload: Option<std::sync::Arc<str>>,
}

impl CallRecord {
    /// Build from the primary observation (client end if seen) and the other end's, if
    /// any. `wall_offset_ns` turns monotonic timestamps into Unix time.
    pub fn new(primary: (Observation, Endpoint), server: Option<Endpoint>, wall_offset_ns: i128) -> Self {
        let (o, process) = primary;
        let ms = |from: u64, to: Option<u64>| to.map(|t| t.saturating_sub(from) as f64 / 1e6);
        let unix_ns = o.request_start_ns as i128 + wall_offset_ns;
        let path = o.target.as_deref().map(|t| t.split('?').next().unwrap_or_default().to_owned());
        Self {
            call_id: call_id(process.pid, o.request_start_ns, o.fingerprint.unwrap_or(0)),
            time: crate::clock::rfc3339(unix_ns),
            start_unix_ns: unix_ns,
            provider: o.call.provider,
            api: o.call.api,
            host: o.host,
            method: o.method,
            path,
            http_version: if o.http2_stream.is_some() { "2" } else { "1.1" },
            stream_id: o.http2_stream,
            model: o.call.model,
            response_model: o.summary.model,
            stream: o.call.stream,
            status: o.status,
            ttfb_ms: ms(o.request_start_ns, o.response_first_ns),
            latency_ms: ms(o.request_start_ns, o.response_end_ns),
            request_bytes: o.request_bytes,
            response_bytes: o.response_bytes,
            input_tokens: o.summary.input_tokens,
            output_tokens: o.summary.output_tokens,
            finish_reason: o.summary.finish_reason,
            error: o.summary.error,
            process,
            side: o.side,
            server,
            complete: o.complete,
            notes: o.notes,
            decision: o.decision,
            enforcement: o.enforcement,
            drill: None,
            payload: o.payload,
        }
    }
}

/// 16 hex digits naming the call: the caller's pid, the request's first-byte time in ns
/// (unique per boot for one process) and the request fingerprint.
fn call_id(pid: u32, start_ns: u64, fingerprint: u64) -> String {
    use std::hash::{DefaultHasher, Hasher as _};
    let mut h = DefaultHasher::new();
    h.write_u32(pid);
    h.write_u64(start_ns);
    h.write_u64(fingerprint);
    format!("{:016x}", h.finish())
}
