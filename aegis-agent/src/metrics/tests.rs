use std::{
    io::{Read as _, Write as _},
    sync::atomic::Ordering,
};

use super::*;
use crate::{
    capture::Counters,
    kernel::capability::{Capabilities, Capability, CapabilityStatus},
    llm::{
        detect::ApiKind,
        exchange::Side,
        record::{Endpoint, TlsSource},
    },
    policy::{
        decision::Decision,
        ruling::{Enforcement, Outcome},
    },
    rules::pack::Action,
};

fn config(max_label_values: usize) -> MetricsConfig {
    let mut pricing = BTreeMap::new();
    pricing.insert("openai/gpt-4o-mini".to_owned(), Price { input_per_mtok: 0.15, output_per_mtok: 0.60 });
    MetricsConfig { listen: String::new(), max_label_values, max_series: 1000, pricing }
}

fn call(model: &str, cgroup: &str, status: Option<u16>, tokens: (u64, u64)) -> CallRecord {
    CallRecord {
        call_id: "0".into(),
        time: "2026-12-06T12:00:00.000Z".into(),
        start_unix_ns: 1_796_558_400_000_000_000,
        provider: "openai",
        api: ApiKind::ChatCompletions,
        host: Some("api.openai.com".into()),
        method: Some("POST".into()),
        path: Some("/v1/chat/completions".into()),
        http_version: "1.1",
        stream_id: None,
        model: Some(model.into()),
        response_model: None,
        stream: false,
        status,
        ttfb_ms: Some(120.0),
        latency_ms: Some(800.0),
        request_bytes: 100,
        response_bytes: 200,
        input_tokens: Some(tokens.0),
        output_tokens: Some(tokens.1),
        finish_reason: None,
        error: None,
        process: Endpoint {
            pid: 1,
            tid: 1,
            comm: "python3".into(),
            exe: None,
            uid: 0,
            cgroup: cgroup.into(),
            tls: TlsSource { library: "libssl.so.3".into(), stack: None, hooks: vec![] },
        },
        side: Side::Client,
        server: None,
        complete: true,
        notes: vec![],
        decision: None,
        enforcement: None,
        drill: None,
        payload: None,
    }
}

fn decision(action: Action, rules: &[&str]) -> Decision {
    Decision {
        action,
        severity: None,
        rules: rules.iter().map(|r| (*r).to_owned()).collect(),
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
    }
}

/// The value of the sample `line_start` (name and labels, as encoded) in `text`.
fn sample(text: &str, line_start: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(line_start)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn calls_tokens_cost_status_latency_and_decisions_are_counted_from_records() {
    let m = Metrics::new(&config(100));
    let mut blocked = call("gpt-4o-mini", "/team-a", Some(200), (1000, 500));
    blocked.decision = Some(decision(Action::Block, &["secret.openai_key", "injection.ignore"]));
    blocked.enforcement = Some(Enforcement {
        by: "rule:secret.openai_key".into(),
        half: crate::policy::decision::Half::Request,
        mode: crate::control::EnforceMode::Observe,
        outcome: Outcome::Observed,
        detail: None,
        connections_killed: 0,
        verdict_to_kill_us: None,
        bytes_out_after_verdict: 0,
        bytes_in_after_verdict: 0,
    });
    m.count(&Record::LlmCall(blocked));
    let mut allowed = call("gpt-4o-mini", "/team-a", Some(429), (10, 0));
    allowed.decision = Some(decision(Action::Allow, &[]));
    m.count(&Record::LlmCall(allowed));
    m.count(&Record::LlmCall(call("unpriced-model", "/team-b", None, (7, 3))));
    let text = m.encode();
    let l = r#"{provider="openai",model="gpt-4o-mini",tenant="/team-a"}"#;
    assert_eq!(sample(&text, &format!("aegis_llm_calls_total{l}")), Some(2.0), "{text}");
    let tok = |dir: &str| {
        sample(
            &text,
            &format!(
                r#"aegis_llm_tokens_total{{provider="openai",model="gpt-4o-mini",tenant="/team-a",direction="{dir}"}}"#
            ),
        )
    };
    assert_eq!((tok("input"), tok("output")), (Some(1010.0), Some(500.0)));
    let cost = sample(&text, &format!("aegis_llm_cost_usd_total{l}")).unwrap();
    assert!((cost - (1010.0 * 0.15 + 500.0 * 0.60) / 1e6).abs() < 1e-12, "{cost}");
    assert_eq!(sample(&text, r#"aegis_llm_unpriced_calls_total{provider="openai",model="unpriced-model"}"#), Some(1.0));
    let status = |model: &str, class: &str| {
        sample(
            &text,
            &format!(r#"aegis_llm_responses_total{{provider="openai",model="{model}",status_class="{class}"}}"#),
        )
    };
    assert_eq!(
        (status("gpt-4o-mini", "2xx"), status("gpt-4o-mini", "4xx"), status("unpriced-model", "none")),
        (Some(1.0), Some(1.0), Some(1.0))
    );
    let by_model = r#"provider="openai",model="gpt-4o-mini""#;
    assert_eq!(sample(&text, &format!("aegis_llm_request_duration_seconds_count{{{by_model}}}")), Some(2.0));
    assert_eq!(
        sample(&text, &format!("aegis_llm_request_duration_seconds_bucket{{le=\"0.5\",{by_model}}}")),
        Some(0.0),
        "800 ms is over 0.5 s: {text}"
    );
    assert_eq!(
        sample(&text, &format!("aegis_llm_request_duration_seconds_bucket{{le=\"1.0\",{by_model}}}")),
        Some(2.0)
    );
    assert_eq!(sample(&text, r#"aegis_decisions_total{rule="secret.openai_key",action="block"}"#), Some(1.0));
    assert_eq!(sample(&text, r#"aegis_decisions_total{rule="none",action="allow"}"#), Some(1.0));
    assert_eq!(sample(&text, r#"aegis_enforcements_total{by="rule",outcome="observed"}"#), Some(1.0));
    assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with EOF");
}

#[test]
fn hostile_label_values_are_capped_cut_and_counted() {
    let m = Metrics::new(&config(2));
    for i in 0..5 {
        m.count(&Record::LlmCall(call(&format!("model-{i}"), "/t", Some(200), (1, 1))));
    }
    let long = "x".repeat(1000) + "é";
    let cap = Metrics::new(&config(10));
    cap.count(&Record::LlmCall(call(&long, "/t\"\n", Some(200), (1, 1))));
    let text = m.encode();
    let calls = |model: &str| {
        sample(&text, &format!(r#"aegis_llm_calls_total{{provider="openai",model="{model}",tenant="/t"}}"#))
    };
    assert_eq!((calls("model-0"), calls("model-1"), calls("other")), (Some(1.0), Some(1.0), Some(3.0)), "{text}");
    assert_eq!(calls("model-2"), None);
    assert_eq!(sample(&text, r#"aegis_metrics_label_overflow_total{label="model"}"#), Some(3.0));
    // Every model and tenant within the caps, but their combinations past max_series.
    let mut crossed = config(10);
    crossed.max_series = 3;
    let crossed = Metrics::new(&crossed);
    for (model, tenant) in [("a", "/1"), ("a", "/2"), ("b", "/1"), ("b", "/2"), ("a", "/1")] {
        crossed.count(&Record::LlmCall(call(model, tenant, Some(200), (1, 1))));
    }
    let text = crossed.encode();
    let calls = |model: &str, tenant: &str| {
        sample(&text, &format!(r#"aegis_llm_calls_total{{provider="openai",model="{model}",tenant="{tenant}"}}"#))
    };
    assert_eq!(
        (calls("a", "/1"), calls("a", "/2"), calls("b", "/1"), calls("b", "/2"), calls("other", "other")),
        (Some(2.0), Some(1.0), Some(1.0), None, Some(1.0)),
        "{text}"
    );
    assert_eq!(sample(&text, r#"aegis_metrics_label_overflow_total{label="series"}"#), Some(1.0));
    let text = cap.encode();
    let cut = "x".repeat(MAX_LABEL_BYTES);
    // Cut to the bound, and quotes and newlines escaped: one line per sample still.
    assert_eq!(
        sample(&text, &format!(r#"aegis_llm_calls_total{{provider="openai",model="{cut}",tenant="/t\"\n"}}"#)),
        Some(1.0),
        "{text}"
    );
}

#[test]
fn scrape_time_values_follow_the_daemon() {
    let m = Metrics::new(&config(10));
    let counters = Arc::new(Counters::default());
    let caps = Capabilities::default();
    caps.set(CapabilityStatus::active(Capability::Capture, "probes on 1 TLS target"));
    caps.set(CapabilityStatus::unavailable(Capability::ContentGate, "no sk_msg"));
    let drops = Arc::new(Mutex::new([aegis_common::DropCounter::default(); aegis_common::DROP_CAUSES]));
    m.attach(Sources {
        counters: counters.clone(),
        drops: drops.clone(),
        caps,
        inspector: None,
        mode: None,
        blind_spots: None,
        scoped: None,
    });
    counters.events.store(42, Ordering::Relaxed);
    counters.reader_beat_ns.store(crate::clock::monotonic_ns(), Ordering::Relaxed);
    drops.lock().unwrap()[0] = aegis_common::DropCounter { events: 5, bytes: 4096 };
    let text = m.encode();
    assert_eq!(sample(&text, "aegis_capture_events_total"), Some(42.0), "{text}");
    assert_eq!(sample(&text, r#"aegis_capture_dropped_events_total{cause="ring_full"}"#), Some(5.0));
    assert_eq!(sample(&text, r#"aegis_capture_dropped_bytes_total{cause="ring_full"}"#), Some(4096.0));
    assert_eq!(sample(&text, r#"aegis_capture_dropped_events_total{cause="read_failed"}"#), Some(0.0));
    assert_eq!(sample(&text, r#"aegis_capability_state{capability="capture",state="active"}"#), Some(1.0));
    assert_eq!(sample(&text, r#"aegis_capability_state{capability="capture",state="degraded"}"#), Some(0.0));
    assert_eq!(sample(&text, r#"aegis_capability_state{capability="content_gate",state="unavailable"}"#), Some(1.0));
    assert_eq!(sample(&text, r#"aegis_enforcement_mode{mode="off"}"#), Some(1.0));
    assert_eq!(sample(&text, "aegis_capture_healthy"), Some(1.0));
    counters.events.store(50, Ordering::Relaxed);
    counters.records_pending.store(2, Ordering::Relaxed);
    let text = m.encode();
    assert_eq!(sample(&text, "aegis_capture_events_total"), Some(50.0));
    assert_eq!(sample(&text, "aegis_records_pending"), Some(2.0));
    assert_eq!(sample(&text, "aegis_capture_healthy"), Some(0.0), "output.file failing");
}

#[test]
fn pricing_keys_and_values_are_checked() {
    let mut c = config(10);
    c.validate().unwrap();
    c.pricing.insert("gpt-4o".into(), Price { input_per_mtok: 2.5, output_per_mtok: 10.0 });
    let err = format!("{:#}", c.validate().unwrap_err());
    assert!(err.contains("name prices \"provider/model\""), "{err}");
    let mut c = config(10);
    c.pricing.insert("openai/x".into(), Price { input_per_mtok: -1.0, output_per_mtok: 1.0 });
    assert!(format!("{:#}", c.validate().unwrap_err()).contains("input_per_mtok = -1"));
    let mut c = config(0);
    assert!(format!("{:#}", c.validate().unwrap_err()).contains("max_label_values = 0"));
    c.max_label_values = 5;
    c.max_series = 0;
    assert!(format!("{:#}", c.validate().unwrap_err()).contains("max_series = 0"));
    c.max_series = 10;
    c.max_label_values = 5;
    c.listen = "localhost".into();
    assert!(format!("{:#}", c.validate().unwrap_err()).starts_with("metrics.listen = \"localhost\""));
}

/// One HTTP/1.1 GET over a real socket: status line and body.
fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

#[test]
fn the_listener_serves_metrics_and_health() {
    let m = Arc::new(Metrics::new(&config(10)));
    let server = server::MetricsServer::start("127.0.0.1:0".parse().unwrap(), m.clone()).unwrap();
    let (status, body) = get(server.addr(), "/healthz");
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
    assert!(body.contains("\"status\":\"starting\""), "{body}");

    let counters = Arc::new(Counters::default());
    let caps = Capabilities::default();
    caps.set(CapabilityStatus::active(Capability::Capture, "probes on 1 TLS target"));
    let drops = Arc::new(Mutex::new([aegis_common::DropCounter::default(); aegis_common::DROP_CAUSES]));
    m.attach(Sources { counters, drops, caps, inspector: None, mode: None, blind_spots: None, scoped: None });
    m.count(&Record::LlmCall(call("gpt-4o-mini", "/a", Some(200), (3, 4))));
    let (status, body) = get(server.addr(), "/healthz");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((v["status"].as_str(), v["capture"]["state"].as_str()), (Some("ok"), Some("active")), "{v}");
    let (status, body) = get(server.addr(), "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(
        sample(&body, r#"aegis_llm_calls_total{provider="openai",model="gpt-4o-mini",tenant="/a"}"#),
        Some(1.0),
        "{body}"
    );
    assert_eq!(get(server.addr(), "/").0, "HTTP/1.1 404 Not Found");
    let taken = server::MetricsServer::start(server.addr(), m.clone()).err().expect("the port is taken");
    assert!(format!("{taken:#}").starts_with(&format!("cannot listen on metrics.listen = \"{}\"", server.addr())));
    drop(server);
}

#[test]
fn a_drill_is_counted_apart_and_never_as_real_traffic() {
    let m = Metrics::new(&config(100));
    let mut stopped = call("gpt-4o-mini", "/aegis/aegis-drill-1", Some(200), (10, 5));
    stopped.drill = Some("drill-1".into());
    stopped.decision = Some(decision(Action::Block, &["injection.ignore"]));
    stopped.enforcement = Some(Enforcement {
        by: "emergency:injection.ignore".into(),
        half: crate::policy::decision::Half::Request,
        mode: crate::control::EnforceMode::Observe,
        outcome: Outcome::ConnectionKilled,
        detail: None,
        connections_killed: 1,
        verdict_to_kill_us: Some(200),
        bytes_out_after_verdict: 0,
        bytes_in_after_verdict: 0,
    });
    m.count(&Record::LlmCall(stopped));
    let mut allowed = call("gpt-4o-mini", "/aegis/aegis-drill-1", Some(200), (10, 5));
    allowed.drill = Some("drill-1".into());
    m.count(&Record::LlmCall(allowed));
    let text = m.encode();
    assert_eq!(sample(&text, r#"aegis_drill_calls_total{outcome="stopped"}"#), Some(1.0), "{text}");
    assert_eq!(sample(&text, r#"aegis_drill_calls_total{outcome="allowed"}"#), Some(1.0), "{text}");
    for family in
        ["aegis_llm_calls_total{", "aegis_llm_tokens_total{", "aegis_decisions_total{", "aegis_enforcements_total{"]
    {
        assert!(!text.lines().any(|l| l.starts_with(family)), "a drill call counted in {family}: {text}");
    }
}
