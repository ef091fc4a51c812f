//! The measuring side of `cargo xtask bench collector`: evidence bundles per second into
//! the real `aegis-agent collector` over mutual TLS, with two baselines from the same run.
//!
//! For 1 KiB and 1 MiB bundles (each a distinct signed bundle, made before the clock
//! starts), with `--concurrency` uploads in flight over one keep-alive client:
//! 1. store alone: `Store::put` of the bundles into a local directory, in this process (the
//!    floor: hashing is not included, writing is);
//! 2. trivial handler: the same PUTs over the same mutual TLS to a hyper server in this
//!    process that reads the body and answers 201 (what HTTPS and TLS cost);
//! 3. the collector: PUT to `aegis-agent collector` (a separate process): digest, DSSE
//!    verification, enrolment and replay checks, the store (a local directory) and the
//!    SQLite index (synchronous = FULL).
//!
//! Usage: collector_bench --dir DIR [--small N] [--large N] [--concurrency C].
//! Prints one JSON object on stdout.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use aegis_agent::{
    collector::{client::CollectorClient, store::Store, tls},
    evidence::key::HostKey,
};
use aegis_tests::collector::{
    Enrolled, Pki, agent_toml, bundle, collector_toml, free_port, sha256_hex, start_collector,
};
use serde_json::json;

fn usage(msg: &str) -> ! {
    eprintln!("collector_bench: {msg}");
    eprintln!("usage: collector_bench --dir DIR [--small N] [--large N] [--concurrency C]");
    std::process::exit(2);
}

/// Upload `bundles` with `concurrency` in flight; bundles per second.
async fn upload_all(client: Arc<CollectorClient>, bundles: Arc<Vec<Vec<u8>>>, concurrency: usize) -> f64 {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, bundles, next) = (client.clone(), bundles.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(b) = bundles.get(i) else { break };
                client.put(&sha256_hex(b), b.clone().into()).await.unwrap_or_else(|e| panic!("upload {i}: {e}"));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    bundles.len() as f64 / start.elapsed().as_secs_f64()
}

/// A hyper server on mutual TLS that reads each body and answers 201.
async fn trivial_server(pki: &Pki) -> u16 {
    let (cert, key) = pki.server();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(&pki.ca(), &cert, &key).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    use http_body_util::BodyExt as _;
                    let body = req.into_body().collect().await?.to_bytes();
                    std::hint::black_box(body.len());
                    let response = hyper::Response::builder()
                        .status(201)
                        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{\"status\":\"stored\"}")))
                        .unwrap();
                    Ok::<_, hyper::Error>(response)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    port
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut dir = None;
    let (mut small, mut large, mut concurrency) = (3000usize, 100usize, 4usize);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage(&format!("{a} needs a value")));
        match a.as_str() {
            "--dir" => dir = Some(std::path::PathBuf::from(value())),
            "--small" => small = value().parse().unwrap_or_else(|_| usage("--small N")),
            "--large" => large = value().parse().unwrap_or_else(|_| usage("--large N")),
            "--concurrency" => concurrency = value().parse().unwrap_or_else(|_| usage("--concurrency C")),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    let dir = dir.unwrap_or_else(|| usage("--dir is required"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let result = run(&dir, small, large, concurrency);
    let _ = std::fs::remove_dir_all(&dir);
    println!("{result}");
}

fn run(dir: &Path, small: usize, large: usize, concurrency: usize) -> serde_json::Value {
    let pki = Pki::new(&dir.join("pki"), "ca");
    let key = HostKey::from_seed([1; 32], "bench-1").unwrap();
    let client_cert = pki.issue("bench-1", &["bench-1"]);
    let port = free_port();
    let enrolled = [Enrolled { name: "bench-1", verifier: key.verifier().to_string(), client_identity: "bench-1" }];
    let config = collector_toml(dir, &pki, port, &enrolled, "");
    agent_toml(dir, &pki, port, (&client_cert.0, &client_cert.1), 1);
    let mut collector = start_collector(&config, dir);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let identity = Some((client_cert.0.as_path(), client_cert.1.as_path()));
    let mut sequence = 0u64;
    let mut rows = Vec::new();
    // Padding goes into the payload, which base64 makes 4/3 larger.
    for (label, padding, count) in [("1 KiB", 250, small), ("1 MiB", 786_000, large)] {
        let make = |sequence: &mut u64| -> Arc<Vec<Vec<u8>>> {
            Arc::new(
                (0..count)
                    .map(|_| {
                        *sequence += 1;
                        bundle(&key, *sequence, padding, None)
                    })
                    .collect(),
            )
        };
        // Store alone.
        let bundles = make(&mut sequence);
        let bytes = bundles[0].len();
        let store = Arc::new(Store::open(dir.join(format!("store-alone-{bytes}")).to_str().unwrap()).unwrap());
        let store_rate = rt.block_on({
            let (store, bundles) = (store.clone(), bundles.clone());
            async move {
                let start = Instant::now();
                let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                let mut tasks = Vec::new();
                for _ in 0..concurrency {
                    let (store, bundles, next) = (store.clone(), bundles.clone(), next.clone());
                    tasks.push(tokio::spawn(async move {
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(b) = bundles.get(i) else { break };
                            store.put(&format!("{i:064x}"), b.clone().into()).await.unwrap();
                        }
                    }));
                }
                for t in tasks {
                    t.await.unwrap();
                }
                bundles.len() as f64 / start.elapsed().as_secs_f64()
            }
        });
        // The trivial handler, then the collector, each with a fresh client (one
        // handshake, then keep-alive).
        let trivial_port = rt.block_on(trivial_server(&pki));
        let trivial =
            Arc::new(CollectorClient::new(&format!("https://127.0.0.1:{trivial_port}"), &pki.ca(), identity).unwrap());
        let trivial_rate = rt.block_on(upload_all(trivial, bundles.clone(), concurrency));
        let client = Arc::new(CollectorClient::new(&format!("https://127.0.0.1:{port}"), &pki.ca(), identity).unwrap());
        let collector_rate = rt.block_on(upload_all(client, bundles.clone(), concurrency));
        eprintln!("{label}: store {store_rate:.0}/s, trivial {trivial_rate:.0}/s, collector {collector_rate:.0}/s");
        rows.push(json!({
            "size": label,
            "bundle_bytes": bytes,
            "count": count,
            "store_per_sec": store_rate,
            "trivial_per_sec": trivial_rate,
            "collector_per_sec": collector_rate,
        }));
    }
    rt.shutdown_timeout(Duration::from_secs(1));
    collector.stop_with(nix::sys::signal::Signal::SIGTERM);
    json!({"concurrency": concurrency, "rows": rows})
}
