//! Metrics and health: a Prometheus (OpenMetrics text) `/metrics` and a `/healthz` on one
//! HTTP listener (`[metrics] listen`, off by default), and the capture health that `status`
//! and systemd's watchdog report.
//!
//! Call metrics are counted from the records as they are written (the agent's records are
//! the one source of truth: a call is counted once, with the record's own provider, model,
//! usage, status and decision). The rest (kernel drops, capture counters, capability states,
//! the rulepacks and the enforcement mode in force) is read when scraped.
//!
//! Label values come from hostile inputs (a model name is whatever a process sent): each
//! of `model`, `tenant` and `rule` keeps at most `max_label_values` distinct values, and the
//! (provider, model, tenant) combinations at most `max_series`; the rest are counted under
//! `other` and in `aegis_metrics_label_overflow_total`, and every value is cut to
//! [`MAX_LABEL_BYTES`].

pub mod health;
pub mod server;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};
use serde::Deserialize;

pub use self::health::Sources;
use crate::{
    kernel::capability::State,
    llm::CallRecord,
    sinks::{RecordObserver, record::Record},
};

/// Longest label value kept, in bytes (cut at a character boundary).
pub const MAX_LABEL_BYTES: usize = 128;
/// The label value that stands for every value past the cap.
pub const OTHER: &str = "other";
/// Bounds of `metrics.max_label_values` and `metrics.max_series`.
pub const MAX_LABEL_VALUES: usize = 10_000;
pub const MAX_SERIES: usize = 100_000;

/// `[metrics]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `host:port` of the HTTP listener for `/metrics` and `/healthz`; empty: off.
    pub listen: String,
    /// Distinct values kept per label (`model`, `tenant`, `rule`); the rest count as
    /// `other`.
    pub max_label_values: usize,
    /// Distinct (provider, model, tenant) combinations kept; a call of a new combination
    /// past it counts as (provider, `other`, `other`).
    pub max_series: usize,
    /// Price per million tokens by `"provider/model"`, for `aegis_llm_cost_usd_total`.
    #[serde(default)]
    pub pricing: BTreeMap<String, Price>,
}

/// What a million tokens cost, in USD.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
}

impl MetricsConfig {
    /// The listener's address; None when metrics are off.
    pub fn listen_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        if self.listen.trim().is_empty() {
            return Ok(None);
        }
        let addr: SocketAddr = self.listen.trim().parse().map_err(|e| {
            anyhow::anyhow!(
                "metrics.listen = {:?}: {e}; write an address and port such as \"127.0.0.1:9464\", or \"\" to turn \
                 the endpoint off",
                self.listen
            )
        })?;
        Ok(Some(addr))
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        self.listen_addr()?;
        anyhow::ensure!(
            (1..=MAX_LABEL_VALUES).contains(&self.max_label_values),
            "metrics.max_label_values = {}: must be 1 to {MAX_LABEL_VALUES} (each distinct value is a time series \
             for every scrape to carry)",
            self.max_label_values
        );
        anyhow::ensure!(
            (1..=MAX_SERIES).contains(&self.max_series),
            "metrics.max_series = {}: must be 1 to {MAX_SERIES} (each combination is several time series)",
            self.max_series
        );
        for (key, price) in &self.pricing {
            anyhow::ensure!(
                key.split_once('/').is_some_and(|(p, m)| !p.is_empty() && !m.is_empty()),
                "metrics.pricing.{key:?}: name prices \"provider/model\", as the records name them (e.g. \
                 \"openai/gpt-4o-mini\")"
            );
            for (what, v) in [("input_per_mtok", price.input_per_mtok), ("output_per_mtok", price.output_per_mtok)] {
                anyhow::ensure!(
                    v.is_finite() && v >= 0.0,
                    "metrics.pricing.{key:?}.{what} = {v}: a price in USD per million tokens, 0 or more"
                );
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    provider: String,
    model: String,
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    provider: String,
    model: String,
    tenant: String,
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    provider: String,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    provider: String,
    model: String,
    status_class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    rule: String,
    action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EnforcementLabels {
    by: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DrillLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CapabilityLabels {
    capability: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PackLabels {
    pack: String,
    version: String,
    digest: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LabelName {
    label: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latency buckets, seconds: model calls take from tens of ms to minutes.
fn latency_histogram() -> Histogram {
    Histogram::new([0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0])
}

/// Distinct values admitted per label, and distinct call series, with an overflow counter.
struct LabelCap {
    max: usize,
    seen: Mutex<HashMap<&'static str, HashSet<String>>>,
    max_series: usize,
    series: Mutex<HashSet<CallLabels>>,
    overflow: Family<LabelName, Counter>,
}

impl LabelCap {
    /// `labels` when that combination was seen before or there is room; the provider with
    /// [`OTHER`] model and tenant (counted as the `series` label) otherwise.
    fn admit_series(&self, labels: CallLabels) -> CallLabels {
        let mut series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        if series.contains(&labels) {
            return labels;
        }
        if series.len() < self.max_series {
            series.insert(labels.clone());
            return labels;
        }
        drop(series);
        self.overflow.get_or_create(&LabelName { label: "series".into() }).inc();
        CallLabels { provider: labels.provider, model: OTHER.into(), tenant: OTHER.into() }
    }

    /// `value` (cut to [`MAX_LABEL_BYTES`]) when it was seen before or there is room;
    /// [`OTHER`] (counted) otherwise.
    fn admit(&self, label: &'static str, value: &str) -> String {
        let value = bounded(value);
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let set = seen.entry(label).or_default();
        if set.contains(value) {
            return value.to_owned();
        }
        if set.len() < self.max {
            set.insert(value.to_owned());
            return value.to_owned();
        }
        drop(seen);
        self.overflow.get_or_create(&LabelName { label: label.into() }).inc();
        OTHER.to_owned()
    }
}

/// `s` cut to at most [`MAX_LABEL_BYTES`] bytes, at a character boundary.
fn bounded(s: &str) -> &str {
    if s.len() <= MAX_LABEL_BYTES {
        return s;
    }
    let mut end = MAX_LABEL_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The HTTP status class of a response: `2xx` ... `5xx`, or `none` when no response was
/// seen (the call was cut short, or its response lost).
fn status_class(status: Option<u16>) -> String {
    match status {
        Some(s @ 100..=599) => format!("{}xx", s / 100),
        Some(_) => "invalid".into(),
        None => "none".into(),
    }
}

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    cap: Arc<LabelCap>,
    pricing: BTreeMap<String, Price>,
    calls: Family<CallLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    cost: Family<CallLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    unpriced: Family<ModelLabels, Counter>,
    responses: Family<StatusLabels, Counter>,
    latency: Histograms<ModelLabels>,
    ttfb: Histograms<ModelLabels>,
    decisions: Family<DecisionLabels, Counter>,
    enforcements: Family<EnforcementLabels, Counter>,
    drill_calls: Family<DrillLabels, Counter>,
    // Read when scraped (see `refresh`).
    events: Counter,
    records: Counter,
    records_lost: Counter,
    records_pending: Gauge,
    bad_events: Counter,
    gap_bytes: Counter,
    parse_errors: Counter,
    evicted_connections: Counter,
    dropped_events: Family<CauseLabels, Counter>,
    dropped_bytes: Family<CauseLabels, Counter>,
    capability: Family<CapabilityLabels, Gauge>,
    packs: Family<PackLabels, Gauge>,
    mode: Family<ModeLabels, Gauge>,
    healthy: Gauge,
    sources: OnceLock<Sources>,
}

impl Metrics {
    pub fn new(config: &MetricsConfig) -> Self {
        let mut registry = Registry::default();
        let cap = Arc::new(LabelCap {
            max: config.max_label_values,
            seen: Mutex::new(HashMap::new()),
            max_series: config.max_series,
            series: Mutex::new(HashSet::new()),
            overflow: Family::default(),
        });
        let m = Self {
            registry: Registry::default(),
            cap: cap.clone(),
            pricing: config.pricing.clone(),
            calls: Family::default(),
            tokens: Family::default(),
            cost: Family::default(),
            unpriced: Family::default(),
            responses: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            ttfb: Family::new_with_constructor(latency_histogram),
            decisions: Family::default(),
            enforcements: Family::default(),
            drill_calls: Family::default(),
            events: Counter::default(),
            records: Counter::default(),
            records_lost: Counter::default(),
            records_pending: Gauge::default(),
            bad_events: Counter::default(),
            gap_bytes: Counter::default(),
            parse_errors: Counter::default(),
            evicted_connections: Counter::default(),
            dropped_events: Family::default(),
            dropped_bytes: Family::default(),
            capability: Family::default(),
            packs: Family::default(),
            mode: Family::default(),
            healthy: Gauge::default(),
            sources: OnceLock::new(),
        };
        let r = &mut registry;
        r.register(
            "aegis_llm_calls",
            "Model API calls recorded, by provider, model and tenant (the caller's cgroup)",
            m.calls.clone(),
        );
        r.register(
            "aegis_llm_tokens",
            "Tokens of recorded calls as their responses' usage reports them, by direction (input, output)",
            m.tokens.clone(),
        );
        r.register(
            "aegis_llm_cost_usd",
            "Estimated cost of recorded calls in USD, from [metrics.pricing] (calls of unpriced models add nothing)",
            m.cost.clone(),
        );
        r.register(
            "aegis_llm_unpriced_calls",
            "Calls with usage whose provider/model has no [metrics.pricing] entry (not in aegis_llm_cost_usd)",
            m.unpriced.clone(),
        );
        r.register(
            "aegis_llm_responses",
            "Calls by the HTTP status class of their response (none: no response seen)",
            m.responses.clone(),
        );
        r.register_with_unit(
            "aegis_llm_request_duration",
            "From a call's first request byte to its last response byte",
            Unit::Seconds,
            m.latency.clone(),
        );
        r.register_with_unit(
            "aegis_llm_time_to_first_byte",
            "From a call's first request byte to its first response byte",
            Unit::Seconds,
            m.ttfb.clone(),
        );
        r.register(
            "aegis_decisions",
            "Calls by the action the rules decided (allow, warn, block) and the deciding rule (none: no rule matched)",
            m.decisions.clone(),
        );
        r.register(
            "aegis_enforcements",
            "What was done to stop calls and connections: by (rule, operator, emergency, content_gate, \
             destination_block) and outcome",
            m.enforcements.clone(),
        );
        r.register(
            "aegis_drill_calls",
            "Calls and refused connects of drills (`aegis-agent drill`) by outcome (allowed, flagged, stopped, \
             connect_deny, connect_redirect); counted here only, never in the real traffic's families",
            m.drill_calls.clone(),
        );
        r.register("aegis_capture_events", "TLS reads and writes the probes delivered (probe hits)", m.events.clone());
        r.register("aegis_capture_bad_events", "Ring buffer records that could not be decoded", m.bad_events.clone());
        r.register("aegis_records", "Call records written", m.records.clone());
        r.register("aegis_records_lost", "Records output.file never got (its queue was full)", m.records_lost.clone());
        r.register(
            "aegis_records_pending",
            "Records waiting in memory while output.file cannot be written",
            m.records_pending.clone(),
        );
        r.register_with_unit(
            "aegis_capture_gap",
            "Bytes missing from captured streams (any drop cause)",
            Unit::Bytes,
            m.gap_bytes.clone(),
        );
        r.register("aegis_capture_parse_errors", "HTTP messages that could not be parsed", m.parse_errors.clone());
        r.register(
            "aegis_capture_evicted_connections",
            "Connections forgotten because capture.max_connections was reached",
            m.evicted_connections.clone(),
        );
        r.register(
            "aegis_capture_dropped_events",
            "Events the kernel could not deliver, by cause (ring_full, over_call_cap, read_failed, args_map_full)",
            m.dropped_events.clone(),
        );
        r.register_with_unit(
            "aegis_capture_dropped",
            "Plaintext bytes the kernel could not deliver, by cause",
            Unit::Bytes,
            m.dropped_bytes.clone(),
        );
        r.register(
            "aegis_capability_state",
            "1 for each kernel capability's current state (active, degraded, standby, unavailable, off), 0 for the others",
            m.capability.clone(),
        );
        r.register("aegis_rulepack_info", "The rulepacks in force (1 per pack)", m.packs.clone());
        r.register(
            "aegis_enforcement_mode",
            "1 for the enforcement mode in force (observe, enforce; off: containment not loaded), 0 for the others",
            m.mode.clone(),
        );
        r.register(
            "aegis_capture_healthy",
            "1 while capture is healthy (see /healthz for the reasons when it is not)",
            m.healthy.clone(),
        );
        r.register(
            "aegis_metrics_label_overflow",
            "Label values counted as \"other\" because metrics.max_label_values distinct values were taken, by label",
            cap.overflow.clone(),
        );
        Self { registry, ..m }
    }

    /// Read the scrape-time values from `sources` from now on.
    pub fn attach(&self, sources: Sources) {
        let _ = self.sources.set(sources);
    }

    pub fn sources(&self) -> Option<&Sources> {
        self.sources.get()
    }

    /// Count one record.
    pub fn count(&self, record: &Record) {
        match record {
            // A drill's records are synthetic traffic: counted apart, never as real calls.
            Record::LlmCall(call) if call.drill.is_some() => {
                let outcome = match (&call.enforcement, &call.decision) {
                    (Some(e), _) if e.outcome.stopped() => "stopped",
                    (_, Some(d)) if d.action != crate::rules::pack::Action::Allow => "flagged",
                    _ => "allowed",
                };
                self.drill_calls.get_or_create(&DrillLabels { outcome: outcome.into() }).inc();
            }
            Record::ConnectDenied(d) if d.drill.is_some() => {
                self.drill_calls.get_or_create(&DrillLabels { outcome: format!("connect_{}", d.action) }).inc();
            }
            Record::LlmCall(call) => self.count_call(call),
            Record::GateRefused(_) => {
                self.enforcement("content_gate", "refused_in_kernel");
            }
            Record::ConnectDenied(d) => {
                self.enforcement("destination_block", &format!("connect_{}", d.action));
            }
            Record::RecordsLost(_) | Record::BlindSpot(_) => {}
        }
    }

    fn enforcement(&self, by: &str, outcome: &str) {
        self.enforcements.get_or_create(&EnforcementLabels { by: by.into(), outcome: outcome.into() }).inc();
    }

    fn count_call(&self, call: &CallRecord) {
        let provider = call.provider.to_owned();
        let raw_model = call.model.as_deref().or(call.response_model.as_deref()).unwrap_or("unknown");
        let model = self.cap.admit("model", raw_model);
        let tenant = self.cap.admit("tenant", &call.process.cgroup);
        let labels = self.cap.admit_series(CallLabels { provider: provider.clone(), model, tenant });
        let (model, tenant) = (labels.model.clone(), labels.tenant.clone());
        self.calls.get_or_create(&labels).inc();
        for (direction, n) in [("input", call.input_tokens), ("output", call.output_tokens)] {
            if let Some(n) = n {
                let l = TokenLabels {
                    provider: provider.clone(),
                    model: model.clone(),
                    tenant: tenant.clone(),
                    direction: direction.into(),
                };
                self.tokens.get_or_create(&l).inc_by(n);
            }
        }
        let by_model = ModelLabels { provider: provider.clone(), model: model.clone() };
        if call.input_tokens.is_some() || call.output_tokens.is_some() {
            match self.price(call.provider, call) {
                Some(p) => {
                    let usd = call.input_tokens.unwrap_or(0) as f64 * p.input_per_mtok / 1e6
                        + call.output_tokens.unwrap_or(0) as f64 * p.output_per_mtok / 1e6;
                    self.cost.get_or_create(&labels).inc_by(usd);
                }
                None => {
                    self.unpriced.get_or_create(&by_model).inc();
                }
            }
        }
        let status = StatusLabels { provider, model, status_class: status_class(call.status) };
        self.responses.get_or_create(&status).inc();
        if let Some(ms) = call.latency_ms {
            self.latency.get_or_create(&by_model).observe(ms / 1e3);
        }
        if let Some(ms) = call.ttfb_ms {
            self.ttfb.get_or_create(&by_model).observe(ms / 1e3);
        }
        if let Some(d) = &call.decision {
            let rule = d.rules.first().map_or_else(|| "none".to_owned(), |r| self.cap.admit("rule", r));
            let action = serde_json::to_value(d.action).ok().and_then(|v| v.as_str().map(str::to_owned));
            let action = action.unwrap_or_else(|| format!("{:?}", d.action).to_lowercase());
            self.decisions.get_or_create(&DecisionLabels { rule, action }).inc();
        }
        if let Some(e) = &call.enforcement {
            let by = e.by.split_once(':').map_or(e.by.as_str(), |(kind, _)| kind);
            let outcome = serde_json::to_value(e.outcome).ok().and_then(|v| v.as_str().map(str::to_owned));
            self.enforcement(bounded(by), &outcome.unwrap_or_else(|| "unknown".into()));
        }
    }

    /// The price of `call`'s model: the requested model's, else the answering model's.
    fn price(&self, provider: &str, call: &CallRecord) -> Option<Price> {
        [call.model.as_deref(), call.response_model.as_deref()]
            .into_iter()
            .flatten()
            .find_map(|m| self.pricing.get(&format!("{provider}/{m}")).copied())
    }

    /// Bring the scrape-time values up to date.
    pub fn refresh(&self) {
        let Some(s) = self.sources.get() else { return };
        let c = &s.counters;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        raise(&self.events, load(&c.events));
        raise(&self.bad_events, load(&c.bad_records));
        raise(&self.records, load(&c.records));
        raise(&self.records_lost, load(&c.records_lost));
        self.records_pending.set(i64::try_from(load(&c.records_pending)).unwrap_or(i64::MAX));
        let stats = c.worker_stats.lock().map(|s| s.clone()).unwrap_or_default();
        raise(&self.gap_bytes, stats.iter().map(|s| s.gap_bytes).sum());
        raise(&self.parse_errors, stats.iter().map(|s| s.exchange.parse_errors).sum());
        raise(&self.evicted_connections, stats.iter().map(|s| s.evicted).sum());
        let drops = *s.drops.lock().unwrap_or_else(|e| e.into_inner());
        for (cause, d) in health::DROP_CAUSE_NAMES.iter().zip(drops.iter()) {
            let l = CauseLabels { cause: (*cause).into() };
            raise(&self.dropped_events.get_or_create(&l), d.events);
            raise(&self.dropped_bytes.get_or_create(&l), d.bytes);
        }
        for c in s.caps.list() {
            for state in [State::Active, State::Degraded, State::Standby, State::Unavailable, State::Off] {
                let l = CapabilityLabels { capability: c.name.name().into(), state: state.name().into() };
                self.capability.get_or_create(&l).set(i64::from(c.state == state));
            }
        }
        // Packs change with a reload: the family says exactly the ones in force now.
        self.packs.clear();
        if let Some(inspector) = &s.inspector {
            for p in inspector.engine().packs() {
                let l = PackLabels { pack: p.name.clone(), version: p.version.clone(), digest: p.digest.clone() };
                self.packs.get_or_create(&l).set(1);
            }
        }
        let mode = s.mode.as_ref().map_or("off", |v| match v.mode() {
            crate::control::EnforceMode::Observe => "observe",
            crate::control::EnforceMode::Enforce => "enforce",
        });
        for m in ["off", "observe", "enforce"] {
            self.mode.get_or_create(&ModeLabels { mode: m.into() }).set(i64::from(m == mode));
        }
        self.healthy.set(i64::from(s.health().healthy));
    }

    /// The OpenMetrics text of every metric, refreshed.
    pub fn encode(&self) -> String {
        self.refresh();
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

/// Counters read from the agent's own monotonic counters.
fn raise(c: &Counter, to: u64) {
    let now = c.get();
    if to > now {
        c.inc_by(to - now);
    }
}

impl RecordObserver for Metrics {
    fn observe(&self, record: &Record) {
        self.count(record);
    }
}

#[cfg(test)]
mod tests;
