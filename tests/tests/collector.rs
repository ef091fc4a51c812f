//! `aegis-agent collector` as a fleet runs it: the real collector process on 127.0.0.1 with
//! mutual TLS (a CA, server and client certificates made here), agents shipping through the
//! real spool and shipper processes, and `evidence list|fetch|verify` reading back.
//!
//! Exactly once is checked on both sides of the collector: the index (what `evidence list`
//! returns) and the objects in the store directory. Needs neither root nor a kernel.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use aegis_agent::{
    collector::client::{ClientError, CollectorClient, Uploaded},
    evidence::{bundle_meta::Severity, key::HostKey},
};
use aegis_tests::{
    TempDir,
    collector::{
        Enrolled, Pki, SUBJECT_NAME, agent, agent_toml, bundle, collector_toml, describe, free_port, sha256_hex,
        spool_status, start_collector, start_shipper, stored_objects, subject_bytes, wait_spool_empty,
    },
    serial,
};
use nix::sys::signal::Signal;

fn key(n: u8, name: &str) -> HostKey {
    HostKey::from_seed([n; 32], name).unwrap()
}

fn enrolled<'a>(key: &HostKey, name: &'a str) -> Enrolled<'a> {
    Enrolled { name, verifier: key.verifier().to_string(), client_identity: name }
}

/// `evidence list --json` over mTLS as `client`.
fn list(port: u16, pki: &Pki, client: (&Path, &Path), filters: &[&str]) -> Vec<serde_json::Value> {
    let url = format!("https://127.0.0.1:{port}");
    let mut args = vec!["evidence", "list", "--json", "--collector", &url, "--ca"];
    let ca = pki.ca();
    args.push(ca.to_str().unwrap());
    args.extend(["--cert", client.0.to_str().unwrap(), "--key", client.1.to_str().unwrap()]);
    args.extend(filters);
    let out = agent(&args);
    assert!(out.status.success(), "evidence list: {}", describe(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["bundles"].as_array().unwrap().clone()
}

/// Ship `bundles` with `evidence ship`, one process each.
fn ship_all(dir: &Path, agent_config: &Path, bundles: &[Vec<u8>]) {
    for (i, b) in bundles.iter().enumerate() {
        let path = dir.join(format!("bundle-{i}.dsse"));
        std::fs::write(&path, b).unwrap();
        let out = agent(&["evidence", "ship", path.to_str().unwrap(), "--config", agent_config.to_str().unwrap()]);
        assert!(out.status.success(), "evidence ship: {}", describe(&out));
    }
}

/// Each bundle is in the index once and in the store once, and nothing else is.
fn assert_exactly_once(dir: &Path, port: u16, pki: &Pki, client: (&Path, &Path), bundles: &[Vec<u8>]) {
    let mut want: Vec<String> = bundles.iter().map(|b| sha256_hex(b)).collect();
    want.sort();
    let rows = list(port, pki, client, &["--limit", "10000"]);
    let mut listed: Vec<String> = rows.iter().map(|r| r["digest"].as_str().unwrap().to_owned()).collect();
    listed.sort();
    assert_eq!(listed, want, "the index holds each bundle once");
    assert_eq!(stored_objects(dir), want, "the store holds each bundle once");
    for b in bundles {
        let digest = sha256_hex(b);
        assert_eq!(std::fs::read(dir.join("store/bundles/sha256").join(&digest)).unwrap(), *b, "{digest} stored whole");
    }
}

#[test]
fn a_bundle_is_shipped_listed_fetched_and_verifies() {
    let _serial = serial();
    let dir = TempDir::new("collector-e2e");
    let pki = Pki::new(&dir.join("pki"), "ca");
    let web1 = key(1, "web-1");
    let client = pki.issue("web-1", &["web-1"]);
    let port = free_port();
    let config = collector_toml(dir.path(), &pki, port, &[enrolled(&web1, "web-1")], "");
    let collector = start_collector(&config, dir.path());
    let agent_config = agent_toml(dir.path(), &pki, port, (&client.0, &client.1), 100);
    let bytes = bundle(&web1, 1, 0, Some(("INC-7", Severity::Sev2)));
    ship_all(dir.path(), &agent_config, std::slice::from_ref(&bytes));
    assert_eq!(spool_status(&agent_config)["files"], 1);
    let shipper = start_shipper(&agent_config, dir.path());
    wait_spool_empty(&agent_config, Duration::from_secs(30), &[&collector, &shipper]);

    let rows = list(port, &pki, (&client.0, &client.1), &[]);
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    let digest = sha256_hex(&bytes);
    assert_eq!(row["digest"], digest.as_str());
    assert_eq!((row["host"].as_str(), row["agent"].as_str()), (Some("web-1"), Some("web-1")));
    assert_eq!((row["sequence"].as_u64(), row["incident"].as_str()), (Some(1), Some("INC-7")));
    assert_eq!((row["severity"].as_str(), row["size"].as_u64()), (Some("SEV-2"), Some(bytes.len() as u64)));
    assert_eq!(row["key_id"], web1.verifier().dsse_keyid().as_str());
    // Filters.
    let c = (client.0.as_path(), client.1.as_path());
    assert_eq!(list(port, &pki, c, &["--incident", "INC-7", "--severity", "SEV-2"]).len(), 1);
    assert_eq!(list(port, &pki, c, &["--incident", "INC-8"]).len(), 0);
    assert_eq!(list(port, &pki, c, &["--host", "web-2"]).len(), 0);
    assert_eq!(list(port, &pki, c, &["--since", "2026-12-06T07:00:02Z"]).len(), 0, "created 07:00:01 is before");
    assert_eq!(list(port, &pki, c, &["--since", "2026-12-06T07:00:01Z", "--until", "2026-12-06T08:00:00Z"]).len(), 1);
    let out = agent(&[
        "evidence",
        "list",
        "--collector",
        &format!("https://127.0.0.1:{port}"),
        "--ca",
        pki.ca().to_str().unwrap(),
        "--cert",
        client.0.to_str().unwrap(),
        "--key",
        client.1.to_str().unwrap(),
        "--severity",
        "SEV-9",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not SEV-1, SEV-2 or SEV-3"), "{}", describe(&out));

    // Fetched, it verifies as the agent signed it, with its subject beside it.
    let fetched = dir.join("fetched");
    std::fs::create_dir(&fetched).unwrap();
    let out_file = fetched.join("bundle.dsse");
    let out = agent(&[
        "evidence",
        "fetch",
        &digest,
        "--collector",
        &format!("https://127.0.0.1:{port}"),
        "--ca",
        pki.ca().to_str().unwrap(),
        "--cert",
        client.0.to_str().unwrap(),
        "--key",
        client.1.to_str().unwrap(),
        "--out",
        out_file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "evidence fetch: {}", describe(&out));
    assert_eq!(std::fs::read(&out_file).unwrap(), bytes);
    std::fs::write(fetched.join(SUBJECT_NAME), subject_bytes(1)).unwrap();
    let verifier = web1.verifier().to_string();
    let out = agent(&["evidence", "verify", out_file.to_str().unwrap(), "--key", &verifier]);
    assert!(out.status.success(), "evidence verify: {}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("subject decisions.jsonl: digest matches") && text.contains("\nvalid\n"), "{text}");
    assert!(text.contains("https://aegisplane.dev/evidence-bundle/v1"), "{text}");
    // A digest the collector does not have.
    let out = agent(&[
        "evidence",
        "fetch",
        &"00".repeat(32),
        "--collector",
        &format!("https://127.0.0.1:{port}"),
        "--ca",
        pki.ca().to_str().unwrap(),
        "--cert",
        client.0.to_str().unwrap(),
        "--key",
        client.1.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no bundle 0000"), "{}", describe(&out));
    assert!(collector.logs().contains("stored"), "{}", collector.logs());
}

#[test]
fn a_burst_shipped_while_the_collector_is_down_arrives_exactly_once() {
    let _serial = serial();
    let dir = TempDir::new("collector-down");
    let pki = Pki::new(&dir.join("pki"), "ca");
    let web1 = key(1, "web-1");
    let client = pki.issue("web-1", &["web-1"]);
    let port = free_port();
    let config = collector_toml(dir.path(), &pki, port, &[enrolled(&web1, "web-1")], "");
    let agent_config = agent_toml(dir.path(), &pki, port, (&client.0, &client.1), 100);
    let shipper = start_shipper(&agent_config, dir.path());
    let bundles: Vec<Vec<u8>> = (1..=20).map(|seq| bundle(&web1, seq, 1024, None)).collect();
    ship_all(dir.path(), &agent_config, &bundles);
    // Nothing listens: the shipper fails, backs off, keeps every bundle.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !shipper.logs().contains("cannot ship evidence yet") {
        assert!(Instant::now() < deadline, "the shipper never tried:\n{}", shipper.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(spool_status(&agent_config)["files"], 20, "{}", shipper.logs());
    assert!(stored_objects(dir.path()).is_empty());

    let collector = start_collector(&config, dir.path());
    wait_spool_empty(&agent_config, Duration::from_secs(60), &[&collector, &shipper]);
    assert_exactly_once(dir.path(), port, &pki, (&client.0, &client.1), &bundles);
    assert_eq!(collector.logs().matches("refused").count(), 0, "{}", collector.logs());
}

#[test]
fn restarts_of_the_collector_and_of_the_shipper_mid_transfer_store_each_bundle_once() {
    let _serial = serial();
    let dir = TempDir::new("collector-restart");
    let pki = Pki::new(&dir.join("pki"), "ca");
    let web1 = key(1, "web-1");
    let client = pki.issue("web-1", &["web-1"]);
    let port = free_port();
    let config = collector_toml(dir.path(), &pki, port, &[enrolled(&web1, "web-1")], "");
    let agent_config = agent_toml(dir.path(), &pki, port, (&client.0, &client.1), 1000);
    // 1 MiB bundles, so that uploads take long enough to be cut.
    let bundles: Vec<Vec<u8>> = (1..=40).map(|seq| bundle(&web1, seq, 1 << 20, None)).collect();
    ship_all(dir.path(), &agent_config, &bundles);
    let mut collector = start_collector(&config, dir.path());
    let mut shipper = start_shipper(&agent_config, dir.path());
    let mut cut_while_pending = 0;
    for round in 0..6 {
        // Let some uploads through, then kill -9 one side while more are queued.
        let before = spool_status(&agent_config)["files"].as_u64().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while spool_status(&agent_config)["files"].as_u64().unwrap() + 3 > before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let pending = spool_status(&agent_config)["files"].as_u64().unwrap();
        if round % 2 == 0 {
            collector.stop_with(Signal::SIGKILL);
            std::thread::sleep(Duration::from_millis(300));
            collector = start_collector(&config, dir.path());
        } else {
            shipper.stop_with(Signal::SIGKILL);
            shipper = start_shipper(&agent_config, dir.path());
        }
        if pending > 0 {
            cut_while_pending += 1;
        }
    }
    assert!(cut_while_pending >= 4, "the kills came after the transfer ended: the test would prove nothing");
    wait_spool_empty(&agent_config, Duration::from_secs(120), &[&collector, &shipper]);
    assert_exactly_once(dir.path(), port, &pki, (&client.0, &client.1), &bundles);
    shipper.stop_with(Signal::SIGTERM);
    collector.stop_with(Signal::SIGTERM);
    let all_shipper_logs = std::fs::read_to_string(dir.join("shipper.log")).unwrap();
    assert!(all_shipper_logs.contains("cannot ship evidence yet"), "no upload was cut:\n{all_shipper_logs}");
}

/// An upload with the library client, as `client` (cert, key) or without a certificate.
fn put(port: u16, pki: &Pki, client: Option<(&Path, &Path)>, bytes: &[u8]) -> Result<Uploaded, ClientError> {
    let c = CollectorClient::new(&format!("https://127.0.0.1:{port}"), &pki.ca(), client).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(c.put(&sha256_hex(bytes), bytes.to_vec().into()))
}

#[track_caller]
fn assert_refused(result: Result<Uploaded, ClientError>, status: u16, error: &str, says: &str) {
    match result {
        Err(ClientError::Refused { status: s, error: e, message }) => {
            assert_eq!((s, e.as_str()), (status, error), "{message}");
            assert!(message.contains(says), "{message}");
            assert!(message.contains("What to do: "), "the answer says what to do: {message}");
        }
        other => panic!("expected a refusal {status} {error}, got {other:?}"),
    }
}

#[test]
fn forgeries_unknown_agents_replays_and_clients_without_a_certificate_are_refused_and_nothing_is_stored() {
    let _serial = serial();
    let dir = TempDir::new("collector-refuse");
    let pki = Pki::new(&dir.join("pki"), "ca");
    let (web1, web2, stranger) = (key(1, "web-1"), key(2, "web-2"), key(3, "stranger"));
    let c1 = pki.issue("web-1", &["web-1"]);
    let c2 = pki.issue("web-2", &["web-2"]);
    let rogue = Pki::new(&dir.join("rogue"), "rogue").issue("web-1", &["web-1"]);
    let port = free_port();
    let config = collector_toml(
        dir.path(),
        &pki,
        port,
        &[enrolled(&web1, "web-1"), enrolled(&web2, "web-2")],
        "max_body_bytes = 65536",
    );
    let collector = start_collector(&config, dir.path());
    let as1 = Some((c1.0.as_path(), c1.1.as_path()));

    let good = bundle(&web1, 5, 0, None);
    assert_eq!(put(port, &pki, as1, &good).unwrap(), Uploaded::Stored);
    // The identical bundle again: a retry, stored once.
    assert_eq!(put(port, &pki, as1, &good).unwrap(), Uploaded::AlreadyStored);

    // Forged: the payload changed after signing.
    let mut env: serde_json::Value = serde_json::from_slice(&bundle(&web1, 6, 0, None)).unwrap();
    let payload = env["payload"].as_str().unwrap().to_owned();
    let forged_payload = {
        use base64::Engine as _;
        let e = base64::engine::general_purpose::STANDARD;
        let text = String::from_utf8(e.decode(&payload).unwrap()).unwrap().replace("\"sequence\":6", "\"sequence\":7");
        e.encode(text)
    };
    env["payload"] = forged_payload.into();
    let forged = serde_json::to_vec(&env).unwrap();
    assert_refused(put(port, &pki, as1, &forged), 403, "bad_signature", "bad signature");
    // Signed by a key nobody enrolled.
    assert_refused(put(port, &pki, as1, &bundle(&stranger, 1, 0, None)), 403, "unknown_agent", "no enrolled agent");
    // A replay: web-1's sequence 5 again, with other content.
    let replay = bundle(&web1, 5, 10, None);
    assert_refused(put(port, &pki, as1, &replay), 409, "replay", "reuses the sequence");
    // web-1's bundle presented by web-2 (enrolled, valid certificate, another identity).
    let as2 = Some((c2.0.as_path(), c2.1.as_path()));
    assert_refused(put(port, &pki, as2, &bundle(&web1, 8, 0, None)), 403, "wrong_client", "does not name its identity");
    assert_refused(put(port, &pki, as2, &good), 403, "wrong_client", "does not name its identity");
    // No client certificate.
    assert_refused(put(port, &pki, None, &bundle(&web1, 9, 0, None)), 401, "client_certificate_required", "no client");
    // A certificate from another CA: refused in the handshake, with a log line.
    match put(port, &pki, Some((&rogue.0, &rogue.1)), &bundle(&web1, 10, 0, None)) {
        Err(ClientError::Transient(e)) => assert!(e.contains("UnknownCA"), "{e}"),
        other => panic!("a rogue certificate got {other:?}"),
    }
    // Over the body limit, and a body that is not what the path names.
    assert_refused(put(port, &pki, as1, &bundle(&web1, 11, 100_000, None)), 413, "too_large", "over the collector's");
    let c = CollectorClient::new(&format!("https://127.0.0.1:{port}"), &pki.ca(), as1).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let other = bundle(&web1, 12, 0, None);
    assert_refused(rt.block_on(c.put(&sha256_hex(&good), other.into())), 400, "digest_mismatch", "the path names");
    assert_refused(rt.block_on(c.put(&sha256_hex(b"{}"), b"{}".to_vec().into())), 400, "not_an_envelope", "DSSE");

    // Only the good bundle is stored, and every refusal is in the log.
    assert_exactly_once(dir.path(), port, &pki, (&c1.0, &c1.1), std::slice::from_ref(&good));
    let logs = collector.logs();
    for error in [
        "bad_signature",
        "unknown_agent",
        "replay",
        "wrong_client",
        "client_certificate_required",
        "too_large",
        "digest_mismatch",
    ] {
        assert!(logs.contains(&format!("error=\"{error}\"")), "no log line for {error}:\n{logs}");
    }
    assert!(logs.contains("TLS handshake refused"), "{logs}");
    // `evidence list` without a certificate says what to do.
    let out = agent(&[
        "evidence",
        "list",
        "--collector",
        &format!("https://127.0.0.1:{port}"),
        "--ca",
        pki.ca().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("client certificate"), "{}", describe(&out));
}

#[test]
fn a_bundle_presented_by_its_own_shipper_is_moved_aside_when_refused() {
    let _serial = serial();
    let dir = TempDir::new("collector-reject");
    let pki = Pki::new(&dir.join("pki"), "ca");
    let (web1, web2) = (key(1, "web-1"), key(2, "web-2"));
    // web-2's shipper holds a bundle web-1 signed: the collector refuses it for good.
    let c2 = pki.issue("web-2", &["web-2"]);
    let port = free_port();
    let config = collector_toml(dir.path(), &pki, port, &[enrolled(&web1, "web-1"), enrolled(&web2, "web-2")], "");
    let collector = start_collector(&config, dir.path());
    let agent_config = agent_toml(dir.path(), &pki, port, (&c2.0, &c2.1), 100);
    let foreign = bundle(&web1, 1, 0, None);
    let own = bundle(&web2, 1, 0, None);
    ship_all(dir.path(), &agent_config, &[foreign.clone(), own.clone()]);
    let shipper = start_shipper(&agent_config, dir.path());
    wait_spool_empty(&agent_config, Duration::from_secs(30), &[&collector, &shipper]);
    let status = spool_status(&agent_config);
    assert_eq!(status["rejected"], 1, "{status}");
    let why =
        std::fs::read_to_string(dir.join("spool/rejected").join(format!("{}.why", sha256_hex(&foreign)))).unwrap();
    assert!(why.contains("403 wrong_client"), "{why}");
    assert_exactly_once(dir.path(), port, &pki, (&c2.0, &c2.1), std::slice::from_ref(&own));
}

#[test]
fn a_full_spool_refuses_new_bundles_with_a_clear_error_and_counts_them() {
    let _serial = serial();
    let dir = TempDir::new("collector-spool");
    let pki = Pki::new(&dir.join("pki"), "ca");
    let web1 = key(1, "web-1");
    let client = pki.issue("web-1", &["web-1"]);
    // No collector, no shipper: the spool fills.
    let agent_config = agent_toml(dir.path(), &pki, free_port(), (&client.0, &client.1), 3);
    let bundles: Vec<Vec<u8>> = (1..=3).map(|seq| bundle(&web1, seq, 0, None)).collect();
    ship_all(dir.path(), &agent_config, &bundles);
    for seq in [4, 5] {
        let path = dir.join(&format!("extra-{seq}.dsse"));
        std::fs::write(&path, bundle(&web1, seq, 0, None)).unwrap();
        let out = agent(&["evidence", "ship", path.to_str().unwrap(), "--config", agent_config.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("is full (3 bundles") && err.contains("is refused, not queued"), "{err}");
        assert!(err.contains("spool_max_files"), "says what to do: {err}");
    }
    let status = spool_status(&agent_config);
    assert_eq!((status["files"].as_u64(), status["refused_full"].as_u64()), (Some(3), Some(2)), "{status}");
    // What was queued is still there, whole.
    for b in &bundles {
        assert_eq!(std::fs::read(dir.join("spool").join(format!("{}.dsse", sha256_hex(b)))).unwrap(), *b);
    }
    // The same bundle again is not a new one.
    ship_all(dir.path(), &agent_config, &bundles[..1]);
    assert_eq!(spool_status(&agent_config)["refused_full"], 2);
}
