//! Call records as OTLP spans on the real kernel: the agent exports to a real OTLP/HTTP
//! receiver on loopback (this test), a real python client makes TLS model calls to the TLS
//! mock provider, and the receiver must get exactly one span per call, under the GenAI
//! semantic conventions, agreeing with the call's record.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpListener,
    sync::mpsc,
    time::{Duration, Instant},
};

use aegis_tests::{
    Agent, MockProvider, Plan, Request, TempCert, expect::OUTPUT_TOKENS, expected_input_tokens, require_root,
    run_python, scaled, serial,
};
use serde_json::{Value, json};

/// A real OTLP/HTTP receiver on a free loopback port: 200 to every POST, bodies handed over.
fn receiver() -> (String, mpsc::Receiver<Value>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut len = 0;
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':')
                            && k.eq_ignore_ascii_case("content-length")
                        {
                            len = v.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; len];
                    reader.read_exact(&mut body).unwrap();
                    assert!(line.starts_with("POST /v1/traces ") || line.starts_with("POST /v1/metrics "), "{line}");
                    let mut value: Value = serde_json::from_slice(&body).expect("an OTLP JSON body");
                    value["_path"] = json!(line.split_whitespace().nth(1).unwrap_or_default());
                    let _ = tx.send(value);
                    let _ = write!(
                        stream,
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{{}}"
                    );
                }
            });
        }
    });
    (url, rx)
}

fn attrs(span: &Value) -> BTreeMap<String, Value> {
    span["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["key"].as_str().unwrap().to_owned(), a["value"].clone()))
        .collect()
}

#[test]
fn every_call_is_one_genai_span_at_the_otlp_receiver() {
    let _serial = serial();
    require_root();
    let cert = TempCert::generate();
    let (url, bodies) = receiver();
    let mut agent = Agent::start_with_config(&format!(
        "[otlp]\nendpoint = \"{url}\"\nservice_name = \"aegis-it\"\nflush_ms = 200\nmetrics_interval_secs = 1\n"
    ));
    let mock = MockProvider::start(&cert);
    let chat = |model: &str, user: &str| {
        Request::post("/v1/chat/completions", json!({"model": model, "messages": [{"role": "user", "content": user}]}))
    };
    let requests = vec![chat("otlp-model-a", "What is the capital of France?"), chat("otlp-model-b", "Two plus two?")];
    let plan = Plan::single(requests.clone());
    let run = run_python(mock.port, &plan);
    run.assert_responses(&plan);
    let pid = u64::from(run.pid());
    // OTLP JSON carries integers as strings.
    let pid_text = pid.to_string();
    let of_client = |s: &Value| attrs(s)["process.pid"]["intValue"].as_str() == Some(pid_text.as_str());
    let records = agent.wait_for_records(|r| r["pid"].as_u64() == Some(pid), 2, Duration::from_secs(30));

    // Spans of this client's calls, until both came (other TLS processes may call too).
    let mut spans: Vec<Value> = Vec::new();
    let mut metric_bodies: Vec<Value> = Vec::new();
    let deadline = Instant::now() + scaled(Duration::from_secs(30));
    while spans.len() < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        let body = bodies.recv_timeout(left).unwrap_or_else(|_| panic!("no spans within 30 s{}", agent.logs()));
        if body["_path"] == "/v1/metrics" {
            metric_bodies.push(body);
            continue;
        }
        let rs = &body["resourceSpans"][0];
        let resource = attrs(&rs["resource"]);
        assert_eq!(resource["service.name"]["stringValue"], "aegis-it", "{body:#}");
        for s in rs["scopeSpans"][0]["spans"].as_array().unwrap() {
            if of_client(s) {
                spans.push(s.clone());
            }
        }
    }
    agent.stop();
    // Nothing more for these calls at shutdown: one span per call.
    let rest: Vec<Value> = bodies.try_iter().collect();
    let late: usize = rest
        .iter()
        .filter(|b| b["_path"] == "/v1/traces")
        .flat_map(|b| b["resourceSpans"][0]["scopeSpans"][0]["spans"].as_array().cloned().unwrap_or_default())
        .filter(|s| of_client(s))
        .count();
    metric_bodies.extend(rest.into_iter().filter(|b| b["_path"] == "/v1/metrics"));
    assert_eq!((spans.len(), late), (2, 0), "{spans:#?}");

    for (request, model) in requests.iter().zip(["otlp-model-a", "otlp-model-b"]) {
        let span = spans
            .iter()
            .find(|s| s["name"] == format!("chat {model}"))
            .unwrap_or_else(|| panic!("no span named chat {model}: {spans:#?}"));
        let record = records.iter().find(|r| r["model"] == model).unwrap();
        let a = attrs(span);
        assert_eq!(span["kind"], 3, "CLIENT: {span:#}");
        assert_eq!(span["spanId"], record["call_id"], "{span:#}");
        assert_eq!(a["gen_ai.operation.name"]["stringValue"], "chat");
        let provider = aegis_agent::sinks::otlp::provider_name(record["provider"].as_str().unwrap());
        assert_eq!(a["gen_ai.provider.name"]["stringValue"], provider);
        assert_eq!(a["aegis.provider"]["stringValue"], record["provider"], "the record's own name is kept too");
        assert_eq!(a["gen_ai.request.model"]["stringValue"], model);
        let input = expected_input_tokens(request.body.as_ref().unwrap());
        assert_eq!(a["gen_ai.usage.input_tokens"]["intValue"], input.to_string(), "{span:#}");
        assert_eq!(a["gen_ai.usage.output_tokens"]["intValue"], OUTPUT_TOKENS.to_string());
        assert_eq!(a["http.response.status_code"]["intValue"], "200");
        assert_eq!(a["server.port"]["intValue"], mock.port.to_string());
        assert_eq!(a["aegis.decision.action"]["stringValue"], "allow");
        let start: u128 = span["startTimeUnixNano"].as_str().unwrap().parse().unwrap();
        let end: u128 = span["endTimeUnixNano"].as_str().unwrap().parse().unwrap();
        let latency_ns = (record["latency_ms"].as_f64().unwrap() * 1e6) as u128;
        assert!(end >= start && end - start == latency_ns, "{start}..{end}, latency {latency_ns} ns");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        assert!(now - start < 300_000_000_000, "the span starts when the call did: {start} vs now {now}");
    }

    // The metrics: the last export (cumulative, sent at shutdown at the latest) counts each
    // model's call once, with its tokens.
    let last = metric_bodies.last().unwrap_or_else(|| panic!("no metrics export{}", agent.logs()));
    let metrics = &last["resourceMetrics"][0]["scopeMetrics"][0]["metrics"];
    let usage = metrics.as_array().unwrap().iter().find(|m| m["name"] == "gen_ai.client.token.usage").unwrap();
    for (request, model) in requests.iter().zip(["otlp-model-a", "otlp-model-b"]) {
        let point = |kind: &str| {
            usage["histogram"]["dataPoints"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| {
                    let a = attrs(p);
                    a["gen_ai.request.model"]["stringValue"] == model && a["gen_ai.token.type"]["stringValue"] == kind
                })
                .cloned()
                .unwrap_or_else(|| panic!("no {kind} token point for {model}: {usage:#}"))
        };
        let input = expected_input_tokens(request.body.as_ref().unwrap());
        let p = point("input");
        assert_eq!((p["count"].as_str(), p["sum"].as_f64()), (Some("1"), Some(input as f64)), "{p:#}");
        let p = point("output");
        assert_eq!((p["count"].as_str(), p["sum"].as_f64()), (Some("1"), Some(OUTPUT_TOKENS as f64)), "{p:#}");
    }
    let duration = metrics.as_array().unwrap().iter().find(|m| m["name"] == "gen_ai.client.operation.duration");
    assert!(duration.is_some(), "{last:#}");
}
