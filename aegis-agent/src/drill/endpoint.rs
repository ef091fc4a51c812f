//! The drill endpoint: a local TLS server speaking the OpenAI chat completions and
//! Anthropic messages shapes, so that a drill never sends a byte to a real provider.
//!
//! It listens on two loopback ports: the *primary*, whose answer the drill sets
//! ([`Reply`]: ok, unsafe output, unavailable), and the *fallback*, which always answers
//! and says so (`"system_fingerprint": "aegis-drill-fallback"`, `x-aegis-drill-served-by`),
//! so that a redirect to it is visible to the drill client. Its certificate is made at
//! start for `localhost` and 127.0.0.1 and lives in memory only; the drill client is told
//! to trust it (`--cacert`, written to the drill's private directory).
//!
//! Every input is bounded: request bodies of at most [`MAX_BODY_BYTES`], 10 s to send one.

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, StatusCode, body::Incoming, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};

use super::scenario::Reply;

/// Largest request body read.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// The unsafe answer: a private key, which the default pack's `output.private_key` blocks.
pub const UNSAFE_TEXT: &str = "Here is the file you asked for:\n-----BEGIN RSA PRIVATE KEY-----\n\
                               MIIEowIBAAKCAQEAdrillDRILLdrillDRILLdrillDRILLdrill\n-----END RSA PRIVATE KEY-----\n";
/// How long a stream pauses between its chunks (so that a kill can land mid-stream).
const CHUNK_PAUSE: Duration = Duration::from_millis(20);
/// How long the endpoint thinks before its first byte, like a model: a kill of the call at
/// its request (which takes well under this, see README "Containment benchmark") lands
/// before any answer, so the drill sees the call refused, not a race.
const FIRST_BYTE_DELAY: Duration = Duration::from_millis(300);

/// A running drill endpoint; dropping it stops it.
pub struct Endpoint {
    pub primary: SocketAddr,
    pub fallback: SocketAddr,
    /// The certificate clients must trust, PEM.
    pub cert_pem: String,
    reply: Arc<Mutex<Reply>>,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Endpoint {
    /// Bind both loopback ports and serve on a thread of its own.
    pub fn start() -> anyhow::Result<Self> {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
            .context("cannot make the drill endpoint's certificate")?;
        let cert_pem = cert.cert.pem();
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .context("the drill endpoint's certificate")?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("aegis-drill-endpoint")
            .build()
            .context("cannot start the drill endpoint's runtime")?;
        let (primary, fallback) = runtime.block_on(async {
            let p = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let f = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            anyhow::Ok((p, f))
        })?;
        let (primary_addr, fallback_addr) = (primary.local_addr()?, fallback.local_addr()?);
        let reply = Arc::new(Mutex::new(Reply::Ok));
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let served = reply.clone();
        let thread = std::thread::Builder::new().name("aegis-drill-endpoint".into()).spawn(move || {
            runtime.block_on(async move {
                let a = tokio::spawn(serve(primary, acceptor.clone(), Some(served), stop_rx.clone()));
                let b = tokio::spawn(serve(fallback, acceptor, None, stop_rx));
                let _ = tokio::join!(a, b);
            });
            runtime.shutdown_timeout(Duration::from_secs(1));
        })?;
        Ok(Self {
            primary: primary_addr,
            fallback: fallback_addr,
            cert_pem,
            reply,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// What the primary answers from now on.
    pub fn set_reply(&self, reply: Reply) {
        *self.reply.lock().unwrap_or_else(PoisonError::into_inner) = reply;
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Accept until stopped; `reply` None: the fallback.
async fn serve(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    reply: Option<Arc<Mutex<Reply>>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let (tcp, _) = tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(error = %e, "drill endpoint: accept failed");
                    continue;
                }
            },
        };
        let (acceptor, reply) = (acceptor.clone(), reply.clone());
        tokio::spawn(async move {
            let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await else {
                return;
            };
            let served_by = if reply.is_some() { "primary" } else { "fallback" };
            let service = hyper::service::service_fn(move |req| {
                let now = reply.as_ref().map_or(Reply::Ok, |r| *r.lock().unwrap_or_else(PoisonError::into_inner));
                answer(req, now, served_by)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

/// A response body sent a chunk at a time (a stream), from a channel.
struct Chunks(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|c| c.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

type Body = http_body_util::Either<Full<Bytes>, Chunks>;

fn json_response(status: StatusCode, served_by: &str, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-aegis-drill-served-by", served_by)
        .body(http_body_util::Either::Left(Full::new(Bytes::from(body.to_string()))))
        .expect("a valid response")
}

/// Answer one request in the shape of its path.
async fn answer(req: Request<Incoming>, reply: Reply, served_by: &'static str) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let anthropic = match (req.method() == hyper::Method::POST, path.as_str()) {
        (true, "/v1/chat/completions") => false,
        (true, "/v1/messages") => true,
        _ => {
            let body =
                json!({"error": {"message": "the drill endpoint serves POST /v1/chat/completions and /v1/messages"}});
            return Ok(json_response(StatusCode::NOT_FOUND, served_by, &body));
        }
    };
    let body = match tokio::time::timeout(
        Duration::from_secs(10),
        http_body_util::Limited::new(req.into_body(), MAX_BODY_BYTES).collect(),
    )
    .await
    {
        Ok(Ok(b)) => b.to_bytes(),
        _ => {
            let body = json!({"error": {"message": format!("a request body of at most {MAX_BODY_BYTES} bytes, sent within 10 s")}});
            return Ok(json_response(StatusCode::PAYLOAD_TOO_LARGE, served_by, &body));
        }
    };
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let model = request["model"].as_str().unwrap_or("drill-model").to_owned();
    let stream = request["stream"].as_bool().unwrap_or(false);
    let fingerprint = format!("aegis-drill-{served_by}");
    tokio::time::sleep(FIRST_BYTE_DELAY).await;
    if reply == Reply::Unavailable {
        return Ok(if anthropic {
            let body = json!({"type": "error", "error": {"type": "overloaded_error", "message": "drill: the provider is unavailable"}});
            json_response(StatusCode::from_u16(529).expect("a status"), served_by, &body)
        } else {
            let body = json!({"error": {"message": "drill: the provider is unavailable", "type": "server_error"}});
            json_response(StatusCode::SERVICE_UNAVAILABLE, served_by, &body)
        });
    }
    let text = match reply {
        Reply::Unsafe => UNSAFE_TEXT.to_owned(),
        _ => format!("This is the drill endpoint ({served_by}) answering: all is well."),
    };
    if !stream {
        let body = if anthropic {
            json!({"id": "msg_drill", "type": "message", "role": "assistant", "model": model,
                   "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                   "usage": {"input_tokens": 12, "output_tokens": 9}, "system_fingerprint": fingerprint})
        } else {
            json!({"id": "chatcmpl-drill", "object": "chat.completion", "model": model, "system_fingerprint": fingerprint,
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21}})
        };
        return Ok(json_response(StatusCode::OK, served_by, &body));
    }
    // A stream: the text in pieces of a line, each its own event and chunk.
    let pieces: Vec<String> = text.split_inclusive('\n').map(str::to_owned).collect();
    let mut events = Vec::new();
    if anthropic {
        events.push(("message_start", json!({"type": "message_start", "message": {"id": "msg_drill", "type": "message", "role": "assistant", "model": model, "content": [], "usage": {"input_tokens": 12, "output_tokens": 0}}})));
        events.push((
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ));
        for p in &pieces {
            events.push((
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}}),
            ));
        }
        events.push(("content_block_stop", json!({"type": "content_block_stop", "index": 0})));
        events.push((
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9}}),
        ));
        events.push(("message_stop", json!({"type": "message_stop"})));
    } else {
        for p in &pieces {
            events.push(("", json!({"id": "chatcmpl-drill", "object": "chat.completion.chunk", "model": model, "system_fingerprint": fingerprint,
                                    "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": null}]})));
        }
        events.push(("", json!({"id": "chatcmpl-drill", "object": "chat.completion.chunk", "model": model, "system_fingerprint": fingerprint,
                                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                                "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21}})));
    }
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        for (name, data) in events {
            let chunk =
                if name.is_empty() { format!("data: {data}\n\n") } else { format!("event: {name}\ndata: {data}\n\n") };
            if tx.send(Bytes::from(chunk)).await.is_err() {
                return;
            }
            tokio::time::sleep(CHUNK_PAUSE).await;
        }
        if !anthropic {
            let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
        }
    });
    let response = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header("x-aegis-drill-served-by", served_by)
        .body(http_body_util::Either::Right(Chunks(rx)))
        .expect("a valid response");
    Ok(response)
}
