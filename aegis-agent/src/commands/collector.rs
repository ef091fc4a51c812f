//! `aegis-agent collector` (the server), and the agent's side of it: `evidence ship`,
//! `evidence spool`, `evidence shipper`, `evidence list` and `evidence fetch`.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicBool},
};

use anyhow::Context as _;
use sha2::{Digest as _, Sha256};

use super::evidence::{EXIT_INVALID, EXIT_VALID};
use crate::{
    collector::{CollectorConfig, client::CollectorClient},
    evidence::{
        hex,
        spool::{Queued, ShipperConfig},
    },
};

/// How `evidence list|fetch` reach a collector.
#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct CollectorArgs {
    /// The collector, https://host:port.
    #[arg(long, value_name = "URL")]
    pub collector: String,
    /// The CA of the collector's certificate (PEM).
    #[arg(long, value_name = "PEM")]
    pub ca: PathBuf,
    /// A client certificate from the collector's CA (PEM), with --key.
    #[arg(long, value_name = "PEM", requires = "key")]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "PEM", requires = "cert")]
    pub key: Option<PathBuf>,
}

impl CollectorArgs {
    fn client(&self) -> anyhow::Result<CollectorClient> {
        let identity = self.cert.as_deref().zip(self.key.as_deref());
        CollectorClient::new(&self.collector, &self.ca, identity)
    }
}

/// `aegis-agent collector --config FILE`: serve until SIGTERM or SIGINT.
pub fn run(config: &Path, ready_file: Option<&Path>) -> anyhow::Result<()> {
    let config = CollectorConfig::load(config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("aegis-collector")
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listen = config.section.listen;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}: change [collector] listen, or stop what uses it"))?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let bound = listener.local_addr()?;
        let ready = ready_file.map(Path::to_owned);
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        // The ready file names the address (port 0 in the config: the one the kernel chose),
        // written once the server has opened its store and index.
        let serve = crate::collector::server::serve(config, listener, shutdown, move || {
            if let Some(path) = &ready {
                std::fs::write(path, format!("{bound}\n"))
                    .with_context(|| format!("cannot write the ready file {}", path.display()))?;
            }
            Ok(())
        });
        serve.await
    })
}

/// `evidence ship BUNDLE`.
pub fn ship(bundle: &Path, config: &anyhow::Result<ShipperConfig>) -> anyhow::Result<u8> {
    let config = config.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let bytes =
        crate::files::read_capped(bundle, crate::evidence::dsse::MAX_ENVELOPE_BYTES, "a bundle is at most 16 MiB")
            .map_err(|e| anyhow::anyhow!("{}: {e}", bundle.display()))?;
    let spool = config.spool()?;
    match spool.push(&bytes).with_context(|| format!("{}", bundle.display()))? {
        Queued::Queued { digest } => println!("queued {digest} in {}", spool.dir().display()),
        Queued::AlreadyQueued { digest } => println!("already queued {digest} in {}", spool.dir().display()),
    }
    if !config.enabled() {
        eprintln!(
            "aegis-agent evidence ship: [collector] url is empty: the bundle waits in the spool until a collector is \
             configured"
        );
    }
    Ok(EXIT_VALID)
}

/// `evidence spool`.
pub fn spool_status(config: &anyhow::Result<ShipperConfig>) -> anyhow::Result<u8> {
    let config = config.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let status = config.spool()?.status()?;
    println!("{}", serde_json::to_string_pretty(&status)?);
    Ok(EXIT_VALID)
}

/// `evidence shipper`: the daemon's shipper, in the foreground.
pub fn shipper(config: &anyhow::Result<ShipperConfig>) -> anyhow::Result<u8> {
    let config = config.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [nix::sys::signal::SIGTERM, nix::sys::signal::SIGINT] {
        signal_hook_flag(signal, &stop)?;
    }
    let handle = crate::evidence::spool::start_shipper(config, stop)?;
    handle.join().map_err(|_| anyhow::anyhow!("the shipper thread panicked"))?;
    Ok(EXIT_VALID)
}

/// Set `flag` when `signal` arrives.
fn signal_hook_flag(signal: nix::sys::signal::Signal, flag: &Arc<AtomicBool>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let flag = flag.clone();
    let mut stream = runtime
        .block_on(async { tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(signal as i32)) })?;
    std::thread::Builder::new().name("aegis-signal".into()).spawn(move || {
        runtime.block_on(stream.recv());
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
    })?;
    Ok(())
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> anyhow::Result<T> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(f))
}

/// `evidence list`.
pub fn list(args: &CollectorArgs, query: &[(&str, &str)], json: bool) -> anyhow::Result<u8> {
    let client = args.client()?;
    let rows = block_on(client.list(query))?.map_err(|e| anyhow::anyhow!("{}: {e}", args.collector))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"bundles": rows}))?);
        return Ok(EXIT_VALID);
    }
    println!(
        "{:<64}  {:<16} {:>8}  {:<27}  {:<12} {:<6} {:>10}",
        "digest", "host", "seq", "created", "incident", "sev", "bytes"
    );
    for r in &rows {
        println!(
            "{:<64}  {:<16} {:>8}  {:<27}  {:<12} {:<6} {:>10}",
            r.digest,
            r.host,
            r.sequence,
            r.created,
            r.incident.as_deref().unwrap_or("-"),
            r.severity.as_deref().unwrap_or("-"),
            r.size
        );
    }
    eprintln!("{} bundles", rows.len());
    Ok(EXIT_VALID)
}

/// `evidence fetch`: exit 1 when the collector's bytes do not have the digest asked for.
pub fn fetch(args: &CollectorArgs, digest: &str, out: Option<&Path>) -> anyhow::Result<u8> {
    anyhow::ensure!(hex::decode_hash(digest).is_some(), "{digest:?} is not a SHA-256 digest (64 lower-case hex)");
    let client = args.client()?;
    let bytes = block_on(client.get(digest))?.map_err(|e| anyhow::anyhow!("{}: {e}", args.collector))?;
    let actual = hex::encode(&Sha256::digest(&bytes));
    if actual != digest {
        println!("invalid: the collector sent bytes whose SHA-256 is {actual}, not {digest}");
        return Ok(EXIT_INVALID);
    }
    match out {
        Some(path) => std::fs::write(path, &bytes).with_context(|| format!("cannot write {}", path.display()))?,
        None => std::io::stdout().write_all(&bytes)?,
    }
    Ok(EXIT_VALID)
}
