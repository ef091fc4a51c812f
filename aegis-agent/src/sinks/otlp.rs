//! Call records as OpenTelemetry spans, and the GenAI client metrics
//! (`gen_ai.client.token.usage`, `gen_ai.client.operation.duration`: cumulative histograms
//! every `metrics_interval_secs`), sent over OTLP/HTTP (JSON encoding) to an OpenTelemetry
//! Collector or any OTLP receiver (`[otlp] endpoint`, off by default). Provider names map
//! to the conventions' well-known values ([`provider_name`]) in the export only.
//!
//! Each model call becomes one `CLIENT` span named `{gen_ai.operation.name} {model}` under
//! the OpenTelemetry GenAI semantic conventions (`gen_ai.*`), with the HTTP, server and
//! process attributes the record has, and the agent's own (`aegis.*`: the call id, the
//! decision and its rules, the enforcement). Times are the call's own: its first request
//! byte to its last response byte. The trace id is derived from the call id, so a span sent
//! twice (a retry) is the same span.
//!
//! Bounded and never in the way of capture: records are turned into spans on the output
//! thread and handed to the exporter's thread through a queue of `max_queue_spans`; a span
//! that does not fit is dropped and counted. Batches of up to `batch_spans` go out at least
//! every `flush_ms`; a batch the receiver does not take (unreachable, 5xx, 429) is tried
//! once more after a second, then dropped and counted, each failure logged once when it
//! starts and once when it ends.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use super::{RecordObserver, record::Record};
use crate::llm::{CallRecord, detect::ApiKind};

/// `[otlp]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpConfig {
    /// The OTLP/HTTP traces URL (`http://127.0.0.1:4318/v1/traces`); empty: off.
    pub endpoint: String,
    /// `service.name` of the spans' resource.
    pub service_name: String,
    pub max_queue_spans: usize,
    pub batch_spans: usize,
    pub flush_ms: u64,
    pub timeout_secs: u64,
    /// Seconds between two exports of the GenAI metrics (token usage, operation duration:
    /// cumulative histograms) to the receiver's metrics URL; 0: no metrics.
    pub metrics_interval_secs: u64,
    /// The OTLP/HTTP metrics URL; empty: the traces URL with `/v1/metrics` for `/v1/traces`.
    pub metrics_endpoint: String,
}

impl OtlpConfig {
    pub fn enabled(&self) -> bool {
        !self.endpoint.trim().is_empty()
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if !self.enabled() {
            return Ok(());
        }
        let url = url::Url::parse(self.endpoint.trim()).map_err(|e| {
            anyhow::anyhow!(
                "otlp.endpoint = {:?}: {e}; write the receiver's traces URL, such as \
                 \"http://127.0.0.1:4318/v1/traces\", or \"\" to turn the export off",
                self.endpoint
            )
        })?;
        anyhow::ensure!(
            matches!(url.scheme(), "http" | "https") && url.host().is_some(),
            "otlp.endpoint = {:?}: must be an http:// or https:// URL (OTLP/HTTP; gRPC is not spoken)",
            self.endpoint
        );
        anyhow::ensure!(
            (1..=1_000_000).contains(&self.max_queue_spans) && (1..=self.max_queue_spans).contains(&self.batch_spans),
            "otlp.batch_spans ({}) must be 1 to otlp.max_queue_spans ({}), itself 1 to 1000000",
            self.batch_spans,
            self.max_queue_spans
        );
        if self.metrics_interval_secs > 0 {
            self.metrics_url()?;
        }
        anyhow::ensure!(
            self.flush_ms >= 10 && self.timeout_secs >= 1,
            "otlp.flush_ms must be at least 10 and otlp.timeout_secs at least 1"
        );
        Ok(())
    }
}

impl OtlpConfig {
    /// Where the metrics go.
    pub fn metrics_url(&self) -> anyhow::Result<String> {
        let explicit = self.metrics_endpoint.trim();
        if !explicit.is_empty() {
            let url =
                url::Url::parse(explicit).map_err(|e| anyhow::anyhow!("otlp.metrics_endpoint = {explicit:?}: {e}"))?;
            anyhow::ensure!(
                matches!(url.scheme(), "http" | "https"),
                "otlp.metrics_endpoint = {explicit:?}: must be an http:// or https:// URL"
            );
            return Ok(explicit.to_owned());
        }
        match self.endpoint.trim().strip_suffix("/v1/traces") {
            Some(base) => Ok(format!("{base}/v1/metrics")),
            None => anyhow::bail!(
                "otlp.endpoint = {:?} does not end in /v1/traces, so the metrics URL cannot be derived: set \
                 otlp.metrics_endpoint, or otlp.metrics_interval_secs = 0",
                self.endpoint
            ),
        }
    }
}

/// The convention's well-known `gen_ai.provider.name` of the agent's provider names; the
/// others (openrouter, together, ollama, openai_compatible, ...) as they are. Records keep
/// the agent's names; only the export maps them.
pub fn provider_name(provider: &str) -> &str {
    match provider {
        "gemini" => "gcp.gemini",
        "vertex_ai" => "gcp.vertex_ai",
        "azure_openai" => "azure.ai.openai",
        "mistral" => "mistral_ai",
        "xai" => "x_ai",
        other => other,
    }
}

/// Bucket bounds the conventions advise: token counts, and durations in seconds.
const TOKEN_BOUNDS: [f64; 13] =
    [1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0];
const DURATION_BOUNDS: [f64; 14] =
    [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92];
/// Distinct attribute sets kept per metric; past it, calls count under model "other".
const MAX_SERIES: usize = 2000;

/// One cumulative histogram.
#[derive(Clone, Debug, Default)]
struct Hist {
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    buckets: Vec<u64>,
}

impl Hist {
    fn add(&mut self, v: f64, bounds: &[f64]) {
        if self.buckets.is_empty() {
            self.buckets = vec![0; bounds.len() + 1];
            (self.min, self.max) = (v, v);
        }
        self.buckets[bounds.iter().position(|b| v <= *b).unwrap_or(bounds.len())] += 1;
        self.count += 1;
        self.sum += v;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }
}

/// `gen_ai.client.token.usage` and `gen_ai.client.operation.duration` of the calls seen
/// since start, by (provider, operation, model[, token type]).
#[derive(Default)]
struct GenAiMetrics {
    start_ns: u128,
    tokens: std::collections::BTreeMap<(String, String, String, &'static str), Hist>,
    duration: std::collections::BTreeMap<(String, String, String), Hist>,
}

impl GenAiMetrics {
    /// Count the call of `span` (its attributes carry what the metrics need).
    fn add(&mut self, span: &Value) {
        let attr = |key: &str| {
            span["attributes"].as_array().into_iter().flatten().find(|a| a["key"] == key).map(|a| &a["value"])
        };
        let text = |key: &str| attr(key).and_then(|v| v["stringValue"].as_str()).unwrap_or("").to_owned();
        let number = |key: &str| attr(key).and_then(|v| v["intValue"].as_str()).and_then(|n| n.parse::<f64>().ok());
        let (provider, op) = (text("gen_ai.provider.name"), text("gen_ai.operation.name"));
        let mut model = text("gen_ai.request.model");
        if self.duration.len() >= MAX_SERIES
            && !self.duration.contains_key(&(provider.clone(), op.clone(), model.clone()))
        {
            model = "other".into();
        }
        for (kind, key) in [("input", "gen_ai.usage.input_tokens"), ("output", "gen_ai.usage.output_tokens")] {
            if let Some(n) = number(key) {
                self.tokens
                    .entry((provider.clone(), op.clone(), model.clone(), kind))
                    .or_default()
                    .add(n, &TOKEN_BOUNDS);
            }
        }
        let ns = |key: &str| span[key].as_str().and_then(|t| t.parse::<u128>().ok());
        if let (Some(start), Some(end)) = (ns("startTimeUnixNano"), ns("endTimeUnixNano"))
            && end >= start
        {
            let secs = (end - start) as f64 / 1e9;
            self.duration.entry((provider, op, model)).or_default().add(secs, &DURATION_BOUNDS);
        }
    }

    /// The OTLP JSON body of every series, cumulative since start; None when empty.
    fn body(&self, resource: &Value) -> Option<String> {
        if self.tokens.is_empty() && self.duration.is_empty() {
            return None;
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let point = |attributes: Vec<Value>, h: &Hist, bounds: &[f64]| {
            json!({
                "attributes": attributes,
                "startTimeUnixNano": self.start_ns.to_string(),
                "timeUnixNano": now.to_string(),
                "count": h.count.to_string(),
                "sum": h.sum,
                "min": h.min,
                "max": h.max,
                "bucketCounts": h.buckets.iter().map(u64::to_string).collect::<Vec<_>>(),
                "explicitBounds": bounds,
            })
        };
        let base = |p: &str, o: &str, m: &str| {
            vec![
                string("gen_ai.provider.name", p),
                string("gen_ai.operation.name", o),
                string("gen_ai.request.model", m),
            ]
        };
        let tokens: Vec<Value> = self
            .tokens
            .iter()
            .map(|((p, o, m, kind), h)| {
                let mut a = base(p, o, m);
                a.push(string("gen_ai.token.type", kind));
                point(a, h, &TOKEN_BOUNDS)
            })
            .collect();
        let durations: Vec<Value> =
            self.duration.iter().map(|((p, o, m), h)| point(base(p, o, m), h, &DURATION_BOUNDS)).collect();
        // AGGREGATION_TEMPORALITY_CUMULATIVE = 2.
        let histogram = |name: &str, unit: &str, description: &str, points: Vec<Value>| {
            json!({"name": name, "unit": unit, "description": description,
                   "histogram": {"aggregationTemporality": 2, "dataPoints": points}})
        };
        Some(
            json!({
                "resourceMetrics": [{
                    "resource": resource,
                    "scopeMetrics": [{
                        "scope": {"name": "aegis-agent", "version": env!("CARGO_PKG_VERSION")},
                        "metrics": [
                            histogram("gen_ai.client.token.usage", "{token}", "Tokens used by model calls", tokens),
                            histogram("gen_ai.client.operation.duration", "s", "Duration of model calls", durations),
                        ],
                    }],
                }],
            })
            .to_string(),
        )
    }
}

/// What the exporter did.
#[derive(Debug, Default)]
pub struct OtlpCounters {
    /// Spans the receiver took.
    pub exported: AtomicU64,
    /// Spans dropped because the queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Spans dropped because the receiver did not take their batch twice.
    pub dropped_failed: AtomicU64,
    /// Metric exports the receiver did not take (the next one is cumulative: it carries
    /// the counts again).
    pub metric_exports_failed: AtomicU64,
}

/// The record observer that queues spans; the exporter thread ends once every clone of it
/// is gone (the sinks are closed).
pub struct SpanQueue {
    tx: SyncSender<Value>,
    counters: Arc<OtlpCounters>,
}

impl RecordObserver for SpanQueue {
    fn observe(&self, record: &Record) {
        let Record::LlmCall(call) = record else { return };
        match self.tx.try_send(span(call)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.counters.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// The exporter's thread; [`Exporter::finish`] waits for it to send what is queued.
pub struct Exporter {
    thread: Option<JoinHandle<()>>,
    pub counters: Arc<OtlpCounters>,
}

impl Exporter {
    /// Start exporting to `config.endpoint`; the returned queue is the sinks' observer.
    pub fn start(config: &OtlpConfig) -> anyhow::Result<(Self, Arc<SpanQueue>)> {
        config.validate()?;
        let (tx, rx) = sync_channel(config.max_queue_spans);
        let counters = Arc::new(OtlpCounters::default());
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(config.timeout_secs))
            .timeout(Duration::from_secs(config.timeout_secs))
            .build()
            .map_err(|e| anyhow::anyhow!("cannot set up the OTLP HTTP client: {e}"))?;
        let sender = Sender {
            http,
            url: config.endpoint.trim().to_owned(),
            resource: resource(&config.service_name),
            counters: counters.clone(),
            failing: None,
        };
        let (batch, flush) = (config.batch_spans, Duration::from_millis(config.flush_ms));
        let metrics = match config.metrics_interval_secs {
            0 => None,
            secs => Some((config.metrics_url()?, Duration::from_secs(secs))),
        };
        let thread = std::thread::Builder::new().name("aegis-otlp".into()).spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the OTLP exporter's runtime: no spans are exported");
                    return;
                }
            };
            runtime.block_on(export_loop(rx, sender, batch, flush, metrics));
        })?;
        tracing::info!(endpoint = %config.endpoint, "call records are exported as OTLP spans");
        Ok((Self { thread: Some(thread), counters: counters.clone() }, Arc::new(SpanQueue { tx, counters })))
    }

    /// Wait for the queue to be sent (the sinks must be closed first, or this waits for
    /// them). Logs what was exported and dropped.
    pub fn finish(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let c = &self.counters;
        tracing::info!(
            exported = c.exported.load(Ordering::Relaxed),
            dropped_queue_full = c.dropped_queue_full.load(Ordering::Relaxed),
            dropped_failed = c.dropped_failed.load(Ordering::Relaxed),
            "OTLP export finished"
        );
    }
}

struct Sender {
    http: reqwest::Client,
    url: String,
    resource: Value,
    counters: Arc<OtlpCounters>,
    /// Since when sends fail, and the last error.
    failing: Option<(Instant, String)>,
}

impl Sender {
    /// Send `spans`, once more after a second if the receiver does not take them.
    async fn send(&mut self, spans: Vec<Value>) {
        let n = spans.len() as u64;
        let body = json!({
            "resourceSpans": [{
                "resource": self.resource,
                "scopeSpans": [{
                    "scope": {"name": "aegis-agent", "version": env!("CARGO_PKG_VERSION")},
                    "spans": spans,
                }],
            }],
        })
        .to_string();
        for attempt in 0..2 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let sent =
                self.http.post(&self.url).header("content-type", "application/json").body(body.clone()).send().await;
            let error = match sent {
                Ok(r) if r.status().is_success() => {
                    self.counters.exported.fetch_add(n, Ordering::Relaxed);
                    if let Some((since, error)) = self.failing.take() {
                        tracing::warn!(
                            endpoint = %self.url, failing_for_s = since.elapsed().as_secs(), error,
                            "the OTLP receiver takes spans again"
                        );
                    }
                    return;
                }
                Ok(r) => {
                    let status = r.status();
                    let text = r.text().await.unwrap_or_default();
                    let text: String = text.chars().take(300).collect();
                    let error = format!("the receiver answered {status}: {text}");
                    // A refusal that a retry does not cure (bad request, wrong path).
                    if status.is_client_error() && status.as_u16() != 408 && status.as_u16() != 429 {
                        self.fail(error, n);
                        return;
                    }
                    error
                }
                Err(e) => format!("{e}"),
            };
            if attempt == 1 {
                self.fail(error, n);
            }
        }
    }

    /// One metrics export (not retried: the next one is cumulative and carries it all).
    async fn send_metrics(&mut self, url: &str, body: String) {
        let sent = self.http.post(url).header("content-type", "application/json").body(body).send().await;
        let error = match sent {
            Ok(r) if r.status().is_success() => return,
            Ok(r) => format!("the receiver answered {}", r.status()),
            Err(e) => e.to_string(),
        };
        if self.counters.metric_exports_failed.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(url, %error, "the OTLP receiver does not take metrics (counted; the next export carries them again)");
        }
    }

    fn fail(&mut self, error: String, spans: u64) {
        self.counters.dropped_failed.fetch_add(spans, Ordering::Relaxed);
        if self.failing.is_none() {
            tracing::error!(
                endpoint = %self.url, %error, spans,
                "the OTLP receiver does not take spans: they are dropped (counted) until it does"
            );
        }
        self.failing = Some((self.failing.take().map_or_else(Instant::now, |(since, _)| since), error));
    }
}

async fn export_loop(
    rx: Receiver<Value>,
    mut sender: Sender,
    batch: usize,
    flush: Duration,
    metrics: Option<(String, Duration)>,
) {
    let mut spans = Vec::with_capacity(batch);
    let mut oldest: Option<Instant> = None;
    let mut open = true;
    let mut genai = GenAiMetrics {
        start_ns: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos(),
        ..GenAiMetrics::default()
    };
    let mut last_metrics = Instant::now();
    while open {
        // A blocking wait is fine here: this runtime runs nothing but the sends, and it is
        // the exporter's own thread.
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(span) => {
                spans.push(span);
                oldest.get_or_insert_with(Instant::now);
                while spans.len() < batch
                    && let Ok(span) = rx.try_recv()
                {
                    spans.push(span);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => open = false,
        }
        let due = oldest.is_some_and(|t| t.elapsed() >= flush);
        if !spans.is_empty() && (spans.len() >= batch || due || !open) {
            if metrics.is_some() {
                spans.iter().for_each(|s| genai.add(s));
            }
            sender.send(std::mem::replace(&mut spans, Vec::with_capacity(batch))).await;
            oldest = None;
        }
        if let Some((url, every)) = &metrics
            && (last_metrics.elapsed() >= *every || !open)
        {
            last_metrics = Instant::now();
            if let Some(body) = genai.body(&sender.resource) {
                sender.send_metrics(url, body).await;
            }
        }
    }
}

/// `host[:port]` of a `Host` header: the address and the port, if any.
fn split_host(host: &str) -> (&str, Option<u16>) {
    if let Some(rest) = host.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((addr, tail)) => (addr, tail.strip_prefix(':').and_then(|p| p.parse().ok())),
            None => (host, None),
        };
    }
    match host.split_once(':') {
        Some((addr, port)) if !port.contains(':') => (addr, port.parse().ok()),
        _ => (host, None),
    }
}

fn resource(service_name: &str) -> Value {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    json!({
        "attributes": [
            string("service.name", service_name),
            string("service.version", env!("CARGO_PKG_VERSION")),
            string("host.name", host.trim()),
        ],
    })
}

fn string(key: &str, value: &str) -> Value {
    json!({"key": key, "value": {"stringValue": value}})
}

fn int(key: &str, value: i64) -> Value {
    // OTLP JSON carries 64-bit integers as strings.
    json!({"key": key, "value": {"intValue": value.to_string()}})
}

fn boolean(key: &str, value: bool) -> Value {
    json!({"key": key, "value": {"boolValue": value}})
}

fn strings(key: &str, values: &[String]) -> Value {
    let values: Vec<Value> = values.iter().map(|v| json!({"stringValue": v})).collect();
    json!({"key": key, "value": {"arrayValue": {"values": values}}})
}

/// `gen_ai.operation.name` of an API.
pub fn operation(api: ApiKind) -> &'static str {
    match api {
        ApiKind::ChatCompletions | ApiKind::Responses | ApiKind::AnthropicMessages | ApiKind::OllamaChat => "chat",
        ApiKind::Completions | ApiKind::OllamaGenerate => "text_completion",
        ApiKind::Embeddings => "embeddings",
        ApiKind::GeminiGenerateContent => "generate_content",
        ApiKind::Unknown => "unknown",
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One call as an OTLP span (JSON encoding).
pub fn span(call: &CallRecord) -> Value {
    let op = operation(call.api);
    let model = call.model.as_deref().or(call.response_model.as_deref());
    let name = match model {
        Some(m) => format!("{op} {m}"),
        None => op.to_owned(),
    };
    let digest = Sha256::digest(call.call_id.as_bytes());
    let trace_id = hex(&digest[..16]);
    // The call id is 16 hex digits: 8 bytes, a span id's size.
    let span_id = if call.call_id.len() == 16 { call.call_id.clone() } else { hex(&digest[16..24]) };
    let start = call.start_unix_ns.max(0);
    let end = start + call.latency_ms.map_or(0, |ms| (ms * 1e6) as i128);
    let mut a = vec![
        string("gen_ai.operation.name", op),
        string("gen_ai.provider.name", provider_name(call.provider)),
        string("gen_ai.system", provider_name(call.provider)),
        string("aegis.provider", call.provider),
        string("aegis.call_id", &call.call_id),
        string("aegis.api", &format!("{:?}", call.api)),
        boolean("aegis.stream", call.stream),
        boolean("aegis.complete", call.complete),
        int("process.pid", i64::from(call.process.pid)),
        string("process.command", &call.process.comm),
        int("process.owner.uid", i64::from(call.process.uid)),
        string("aegis.cgroup", &call.process.cgroup),
        int("http.request.body.size", call.request_bytes as i64),
        int("http.response.body.size", call.response_bytes as i64),
    ];
    let mut opt = |key: &str, v: Option<&str>| {
        if let Some(v) = v {
            a.push(string(key, v));
        }
    };
    opt("gen_ai.request.model", call.model.as_deref());
    opt("gen_ai.response.model", call.response_model.as_deref());
    opt("process.executable.path", call.process.exe.as_deref());
    opt("http.request.method", call.method.as_deref());
    opt("url.path", call.path.as_deref());
    if let Some(host) = &call.host {
        let (address, port) = split_host(host);
        a.push(string("server.address", address));
        if let Some(p) = port {
            a.push(int("server.port", i64::from(p)));
        }
    }
    if let Some(n) = call.input_tokens {
        a.push(int("gen_ai.usage.input_tokens", n as i64));
    }
    if let Some(n) = call.output_tokens {
        a.push(int("gen_ai.usage.output_tokens", n as i64));
    }
    if let Some(f) = &call.finish_reason {
        a.push(strings("gen_ai.response.finish_reasons", std::slice::from_ref(f)));
    }
    if let Some(s) = call.status {
        a.push(int("http.response.status_code", i64::from(s)));
    }
    if let Some(ms) = call.ttfb_ms {
        a.push(json!({"key": "aegis.ttfb_ms", "value": {"doubleValue": ms}}));
    }
    let error_type = match (call.status, &call.error) {
        (Some(s), _) if s >= 400 => Some(s.to_string()),
        (_, Some(e)) => Some(e.chars().take(128).collect()),
        _ => None,
    };
    if let Some(e) = &error_type {
        a.push(string("error.type", e));
    }
    if let Some(d) = &call.decision {
        let action = serde_json::to_value(d.action).ok().and_then(|v| v.as_str().map(str::to_owned));
        a.push(string("aegis.decision.action", action.as_deref().unwrap_or("unknown")));
        if !d.rules.is_empty() {
            a.push(strings("aegis.decision.rules", &d.rules));
        }
    }
    if let Some(e) = &call.enforcement {
        a.push(string("aegis.enforcement.by", &e.by));
        let outcome = serde_json::to_value(e.outcome).ok().and_then(|v| v.as_str().map(str::to_owned));
        a.push(string("aegis.enforcement.outcome", outcome.as_deref().unwrap_or("unknown")));
    }
    // STATUS_CODE_ERROR (2) for a failed call, else UNSET (0).
    let status = match &error_type {
        Some(e) => json!({"code": 2, "message": e}),
        None => json!({"code": 0}),
    };
    json!({
        "traceId": trace_id,
        "spanId": span_id,
        "name": name,
        "kind": 3,
        "startTimeUnixNano": start.to_string(),
        "endTimeUnixNano": end.to_string(),
        "attributes": a,
        "status": status,
    })
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead as _, BufReader, Read as _, Write as _},
        net::TcpListener,
    };

    use super::*;
    use crate::{
        llm::{
            exchange::Side,
            record::{Endpoint, TlsSource},
        },
        policy::decision::Decision,
        rules::pack::Action,
    };

    fn call(call_id: &str, status: u16) -> CallRecord {
        CallRecord {
            call_id: call_id.into(),
            time: "2026-12-06T12:00:00.000Z".into(),
            start_unix_ns: 1_796_558_400_000_000_000,
            provider: "openai",
            api: ApiKind::ChatCompletions,
            host: Some("api.openai.com:443".into()),
            method: Some("POST".into()),
            path: Some("/v1/chat/completions".into()),
            http_version: "1.1",
            stream_id: None,
            model: Some("gpt-4o-mini".into()),
            response_model: Some("gpt-4o-mini-2024-07-18".into()),
            stream: true,
            status: Some(status),
            ttfb_ms: Some(120.0),
            latency_ms: Some(800.5),
            request_bytes: 100,
            response_bytes: 200,
            input_tokens: Some(12),
            output_tokens: Some(34),
            finish_reason: Some("stop".into()),
            error: None,
            process: Endpoint {
                pid: 4242,
                tid: 4242,
                comm: "python3".into(),
                exe: Some("/usr/bin/python3.13".into()),
                uid: 1000,
                cgroup: "/team-a".into(),
                tls: TlsSource { library: "libssl.so.3".into(), stack: None, hooks: vec![] },
            },
            side: Side::Client,
            server: None,
            complete: true,
            notes: vec![],
            decision: Some(Decision {
                action: Action::Warn,
                severity: None,
                rules: vec!["injection.ignore".into()],
                rationale: None,
                decided_by: None,
                stage: None,
                model: None,
                packs: vec![],
                matches: vec![],
                scan_complete: true,
                not_scanned: vec![],
                response_decided_at_ms: None,
                escalated_by_emergency: false,
            }),
            enforcement: None,
            drill: None,
            payload: None,
        }
    }

    fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
        let found = span["attributes"].as_array().unwrap().iter().find(|a| a["key"] == key);
        &found.unwrap_or_else(|| panic!("no attribute {key} in {span:#}"))["value"]
    }

    #[test]
    fn a_call_is_a_client_span_under_the_genai_conventions() {
        let s = span(&call("00112233445566ff", 200));
        assert_eq!(s["name"], "chat gpt-4o-mini");
        assert_eq!(s["kind"], 3);
        assert_eq!(s["spanId"], "00112233445566ff");
        assert_eq!(s["traceId"].as_str().unwrap().len(), 32);
        assert_eq!(s["traceId"], span(&call("00112233445566ff", 200))["traceId"], "the same call, the same trace");
        assert_eq!(s["startTimeUnixNano"], "1796558400000000000");
        assert_eq!(s["endTimeUnixNano"], "1796558400800500000");
        assert_eq!(attr(&s, "gen_ai.operation.name")["stringValue"], "chat");
        assert_eq!(attr(&s, "gen_ai.provider.name")["stringValue"], "openai");
        assert_eq!(attr(&s, "gen_ai.request.model")["stringValue"], "gpt-4o-mini");
        assert_eq!(attr(&s, "gen_ai.response.model")["stringValue"], "gpt-4o-mini-2024-07-18");
        assert_eq!(attr(&s, "gen_ai.usage.input_tokens")["intValue"], "12");
        assert_eq!(attr(&s, "gen_ai.usage.output_tokens")["intValue"], "34");
        assert_eq!(attr(&s, "gen_ai.response.finish_reasons")["arrayValue"]["values"][0]["stringValue"], "stop");
        assert_eq!(attr(&s, "server.address")["stringValue"], "api.openai.com");
        assert_eq!(attr(&s, "server.port")["intValue"], "443");
        assert_eq!(attr(&s, "http.response.status_code")["intValue"], "200");
        assert_eq!(attr(&s, "process.pid")["intValue"], "4242");
        assert_eq!(attr(&s, "aegis.decision.action")["stringValue"], "warn");
        assert_eq!(attr(&s, "aegis.decision.rules")["arrayValue"]["values"][0]["stringValue"], "injection.ignore");
        assert_eq!(s["status"]["code"], 0);
        let failed = span(&call("00112233445566ff", 429));
        assert_eq!(attr(&failed, "error.type")["stringValue"], "429");
        assert_eq!(failed["status"]["code"], 2);
        assert_eq!(split_host("[::1]:8443"), ("::1", Some(8443)));
        assert_eq!(split_host("localhost"), ("localhost", None));
        assert_eq!(split_host("::1"), ("::1", None));
    }

    /// A real OTLP/HTTP receiver on loopback: answers each POST with the next status of
    /// `statuses` (200 after them), and hands over the bodies.
    fn receiver(statuses: Vec<u16>) -> (String, std::sync::mpsc::Receiver<Value>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut statuses = statuses.into_iter();
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                loop {
                    let mut len = None;
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':')
                            && k.eq_ignore_ascii_case("content-length")
                        {
                            len = v.trim().parse::<usize>().ok();
                        }
                    }
                    let mut body = vec![0; len.unwrap_or(0)];
                    reader.read_exact(&mut body).unwrap();
                    let status = statuses.next().unwrap_or(200);
                    let _ = tx.send(serde_json::from_slice(&body).unwrap());
                    let _ = write!(stream, "HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
                }
            }
        });
        (url, rx)
    }

    fn config(endpoint: &str) -> OtlpConfig {
        OtlpConfig {
            endpoint: endpoint.into(),
            service_name: "aegis-test".into(),
            max_queue_spans: 100,
            batch_spans: 2,
            flush_ms: 50,
            timeout_secs: 5,
            metrics_interval_secs: 0,
            metrics_endpoint: String::new(),
        }
    }

    #[test]
    fn genai_metrics_are_cumulative_histograms_by_provider_operation_model_and_token_type() {
        let mut m = GenAiMetrics::default();
        let mut c = call("00000000000000a1", 200);
        c.provider = "gemini";
        m.add(&span(&c));
        m.add(&span(&c));
        let body: Value = serde_json::from_str(&m.body(&resource("t")).unwrap()).unwrap();
        let metrics = &body["resourceMetrics"][0]["scopeMetrics"][0]["metrics"];
        let tokens = &metrics[0];
        assert_eq!(tokens["name"], "gen_ai.client.token.usage");
        assert_eq!(tokens["histogram"]["aggregationTemporality"], 2);
        let points = tokens["histogram"]["dataPoints"].as_array().unwrap();
        assert_eq!(points.len(), 2, "input and output: {points:#?}");
        for p in points {
            assert_eq!(p["count"], "2", "{p:#}");
            let attrs: Vec<&Value> = p["attributes"].as_array().unwrap().iter().collect();
            assert!(
                attrs.iter().any(|a| a["key"] == "gen_ai.provider.name" && a["value"]["stringValue"] == "gcp.gemini")
            );
            let buckets: u64 =
                p["bucketCounts"].as_array().unwrap().iter().map(|b| b.as_str().unwrap().parse::<u64>().unwrap()).sum();
            assert_eq!(buckets, 2);
        }
        assert_eq!(metrics[1]["name"], "gen_ai.client.operation.duration");
        assert_eq!(provider_name("azure_openai"), "azure.ai.openai");
        assert_eq!(provider_name("openai_compatible"), "openai_compatible");
        let mut cfg = config("http://127.0.0.1:4318/v1/traces");
        assert_eq!(cfg.metrics_url().unwrap(), "http://127.0.0.1:4318/v1/metrics");
        cfg.endpoint = "http://127.0.0.1:4318/traces".into();
        cfg.metrics_interval_secs = 60;
        assert!(format!("{:#}", cfg.validate().unwrap_err()).contains("metrics_endpoint"));
    }

    #[test]
    fn spans_are_posted_in_batches_and_a_refused_batch_is_tried_again_once() {
        // The first batch is refused twice (dropped), the second once (sent on its retry).
        let (url, bodies) = receiver(vec![503, 503, 500]);
        // Batches go out when full (or at the end), never on time: the same batches on a
        // loaded machine.
        let mut c = config(&url);
        c.flush_ms = 600_000;
        let (exporter, queue) = Exporter::start(&c).unwrap();
        for i in 0..5 {
            queue.observe(&Record::LlmCall(call(&format!("{i:016x}"), 200)));
        }
        drop(queue);
        let counters = exporter.counters.clone();
        exporter.finish();
        let got: Vec<Value> = bodies.try_iter().collect();
        let spans = |b: &Value| b["resourceSpans"][0]["scopeSpans"][0]["spans"].as_array().unwrap().len();
        assert_eq!(
            got.iter().map(spans).collect::<Vec<_>>(),
            [2, 2, 2, 2, 1],
            "two tries of two batches, then 2 and 1"
        );
        let resource = &got[0]["resourceSpans"][0]["resource"]["attributes"];
        assert_eq!(resource[0], json!({"key": "service.name", "value": {"stringValue": "aegis-test"}}));
        assert_eq!(
            (counters.exported.load(Ordering::Relaxed), counters.dropped_failed.load(Ordering::Relaxed)),
            (3, 2)
        );
    }

    #[test]
    fn a_full_queue_drops_and_counts_and_bad_endpoints_are_refused() {
        // Nobody listens: the exporter is busy retrying while the queue fills.
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut c = config(&format!("http://127.0.0.1:{port}/v1/traces"));
        c.max_queue_spans = 2;
        c.batch_spans = 1;
        c.timeout_secs = 1;
        let (exporter, queue) = Exporter::start(&c).unwrap();
        for i in 0..50 {
            queue.observe(&Record::LlmCall(call(&format!("{i:016x}"), 200)));
        }
        drop(queue);
        let counters = exporter.counters.clone();
        exporter.finish();
        let (full, failed) =
            (counters.dropped_queue_full.load(Ordering::Relaxed), counters.dropped_failed.load(Ordering::Relaxed));
        assert_eq!(full + failed, 50, "every span sent or counted: {full} + {failed}");
        assert!(full > 0, "{full}");
        for (endpoint, says) in [
            ("127.0.0.1:4318", "relative URL without a base; write the receiver's traces URL"),
            ("localhost:4318", "must be an http:// or https:// URL"),
            ("grpc://127.0.0.1:4317", "must be an http:// or https:// URL"),
            ("http://", "empty host"),
        ] {
            let err = format!("{:#}", config(endpoint).validate().unwrap_err());
            assert!(err.contains(says), "{endpoint}: {err}");
        }
        config("").validate().unwrap();
    }
}
