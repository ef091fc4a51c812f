//! The HTTP listener of `/metrics` and `/healthz`: plain HTTP/1.1 (hyper), on a thread and
//! runtime of its own so that a slow scraper never holds up capture. Bounded: at most
//! [`MAX_CONNECTIONS`] at once, [`READ_TIMEOUT`] to send a request head, GET only.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, thread::JoinHandle, time::Duration};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header};
use hyper_util::rt::{TokioIo, TokioTimer};

use super::Metrics;

/// Scrapers served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 16;
/// Time a client has to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The OpenMetrics text format, which Prometheus scrapes.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A running listener; stops on drop.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Listen on `addr` and serve `metrics`. The error says what to change when the address
    /// cannot be taken.
    pub fn start(addr: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind(addr).with_context(|| {
            format!(
                "cannot listen on metrics.listen = \"{addr}\": choose a free address and port, or set listen = \"\" \
                 to turn the endpoint off"
            )
        })?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("aegis-metrics")
            .build()
            .context("cannot start the metrics server runtime")?;
        let listener = {
            let _enter = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let (stop, stop_rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("aegis-metrics".into())
            .spawn(move || {
                runtime.block_on(serve(listener, metrics, stop_rx));
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .context("cannot start the metrics server thread")?;
        tracing::info!(listen = %addr, "metrics on http://{addr}/metrics, health on http://{addr}/healthz");
        Ok(Self { addr, stop: Some(stop), thread: Some(thread) })
    }

    /// Where it listens (the port chosen when `metrics.listen` asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("the metrics server thread panicked");
        }
    }
}

async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>, mut stop: tokio::sync::oneshot::Receiver<()>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = &mut stop => break,
            permit = slots.clone().acquire_owned() => permit.expect("never closed"),
        };
        let (tcp, peer) = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("metrics listener: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(handle(&metrics, &req)) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(READ_TIMEOUT)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(tcp), service);
            // A client that keeps its connection open without asking is let go.
            match tokio::time::timeout(Duration::from_secs(60), served).await {
                Ok(Err(e)) => tracing::debug!(%peer, "metrics connection ended: {e}"),
                Err(_) => tracing::debug!(%peer, "metrics connection closed after 60 s"),
                Ok(Ok(())) => {}
            }
        });
    }
}

fn handle(metrics: &Metrics, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here\n");
    }
    match req.uri().path() {
        "/metrics" => reply(StatusCode::OK, OPENMETRICS, metrics.encode()),
        "/healthz" => {
            let health = metrics.sources().map(|s| s.health());
            let (status, body) = match &health {
                Some(h) => {
                    let status = if h.healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
                    let body = serde_json::json!({
                        "status": if h.healthy { "ok" } else { "unhealthy" },
                        "capture": h,
                    });
                    (status, body)
                }
                None => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({"status": "starting", "reasons": ["the capture pipeline has not started yet"]}),
                ),
            };
            reply(status, "application/json", format!("{body}\n"))
        }
        _ => text(StatusCode::NOT_FOUND, "not found: this listener serves /metrics and /healthz\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    reply(status, "text/plain; charset=utf-8", body.to_owned())
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}
