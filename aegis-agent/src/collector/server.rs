//! The collector's HTTPS server: TLS accept, one hyper HTTP/1.1 connection per client, and
//! the three routes. See the module docs of [`super`] for what is checked, in which order.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::CertificateDer;
use serde_json::json;
use sha2::{Digest as _, Sha256};
use tokio::net::TcpListener;

use super::{
    Agent, CollectorConfig,
    index::{Claim, Index, Query},
    store::Store,
};
use crate::evidence::{
    bundle_meta::{BundleMeta, Severity, parse_rfc3339_ms},
    dsse, hex,
};

/// Longest a TLS handshake, or a request head, may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Rows a list returns when `limit` is not given, and at most.
const DEFAULT_LIST_LIMIT: u32 = 1000;
const MAX_LIST_LIMIT: u32 = 10_000;
const BUNDLE_PATH: &str = "/v1/bundles/sha256/";

pub(super) type Body = Full<Bytes>;

/// What the request handlers share.
pub(super) struct State {
    pub(super) agents: std::collections::HashMap<String, Agent>,
    store: Store,
    index: Arc<Mutex<Index>>,
    max_body_bytes: u64,
    request_timeout: Duration,
    /// The fleet policy feed, with a `[fleet]` section.
    pub(super) feed: Option<super::policy_routes::Feed>,
}

/// Serve on `listener` until `shutdown` completes; `on_ready` once the TLS files, the store
/// and the index are open.
pub async fn serve(
    config: CollectorConfig,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
    on_ready: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let s = &config.section;
    let tls = super::tls::server_config(&s.ca, &s.cert, &s.key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let store = Store::open(&s.store)?;
    let index = Index::open(&s.index)?;
    let slots = Arc::new(tokio::sync::Semaphore::new(s.max_connections));
    tracing::info!(
        listen = %listener.local_addr()?, store = %store.location, index = %s.index.display(),
        agents = config.agents.len(), "collector listening"
    );
    let feed = match config.fleet {
        Some((trust, wait)) => Some(super::policy_routes::Feed::open(trust, wait, &index)?),
        None => None,
    };
    let state = Arc::new(State {
        max_body_bytes: s.max_body_bytes,
        request_timeout: Duration::from_secs(s.request_timeout_secs),
        agents: config.agents,
        store,
        index: Arc::new(Mutex::new(index)),
        feed,
    });
    on_ready()?;
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = slots.clone().acquire_owned() => permit.expect("never closed"),
        };
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: wait instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (acceptor, state) = (acceptor.clone(), state.clone());
        tokio::spawn(async move {
            let _permit = permit;
            connection(acceptor, state, tcp, peer).await;
        });
    }
    tracing::info!("collector stopping");
    Ok(())
}

async fn connection(
    acceptor: tokio_rustls::TlsAcceptor,
    state: Arc<State>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
) {
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::warn!(%peer, "TLS handshake refused: {e} (a client certificate must chain to [collector] ca)");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, "TLS handshake timed out after {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    let client_cert: Option<CertificateDer<'static>> =
        tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.clone().into_owned());
    let client_cert = Arc::new(client_cert);
    let service = hyper::service::service_fn(move |req| {
        let (state, client_cert) = (state.clone(), client_cert.clone());
        async move {
            let timeout = state.request_timeout;
            let response =
                match tokio::time::timeout(timeout, handle(&state, client_cert.as_ref().as_ref(), peer, req)).await {
                    Ok(r) => r,
                    Err(_) => refuse(
                        peer,
                        StatusCode::REQUEST_TIMEOUT,
                        "timeout",
                        format!("the request took more than {timeout:?}"),
                        "retry; on a slow link raise [collector] request_timeout_secs",
                    ),
                };
            Ok::<_, Infallible>(response)
        }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(tls), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(%peer, "connection ended: {e}");
    }
}

/// A JSON answer.
pub(super) fn answer(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid response")
}

/// A refusal: logged, and answered with what went wrong and what to do.
pub(super) fn refuse(
    peer: SocketAddr,
    status: StatusCode,
    error: &str,
    message: String,
    action: &str,
) -> Response<Body> {
    tracing::warn!(%peer, status = status.as_u16(), error, "refused: {message}");
    answer(status, &json!({"error": error, "message": message, "action": action}))
}

pub(super) fn internal(peer: SocketAddr, e: &anyhow::Error) -> Response<Body> {
    tracing::error!(%peer, "{e:#}");
    answer(
        StatusCode::SERVICE_UNAVAILABLE,
        &json!({"error": "unavailable", "message": format!("{e:#}"), "action": "retry later; the collector's log says more"}),
    )
}

async fn handle(
    state: &Arc<State>,
    client_cert: Option<&CertificateDer<'static>>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    let Some(client_cert) = client_cert else {
        return refuse(
            peer,
            StatusCode::UNAUTHORIZED,
            "client_certificate_required",
            "the connection has no client certificate".into(),
            "connect with a client certificate issued by the collector's CA (--cert/--key, or [collector] cert/key \
             in the agent's config)",
        );
    };
    let path = req.uri().path().to_owned();
    match (req.method(), path.strip_prefix(BUNDLE_PATH)) {
        (&Method::PUT, Some(digest)) => match hex::decode_hash(digest) {
            Some(_) => put_bundle(state, client_cert, peer, digest, req).await,
            None => bad_digest(peer, digest),
        },
        (&Method::GET, Some(digest)) => match hex::decode_hash(digest) {
            Some(_) => get_bundle(state, peer, digest).await,
            None => bad_digest(peer, digest),
        },
        (&Method::GET, None) if path == "/v1/bundles" => {
            list_bundles(state, peer, req.uri().query().unwrap_or("")).await
        }
        (&Method::PUT, None) if path == "/v1/policy" => super::policy_routes::publish(state, peer, req).await,
        (&Method::GET, None) if path == "/v1/policy" => {
            let query = req.uri().query().unwrap_or("").to_owned();
            super::policy_routes::serve_policy(state, client_cert, peer, &query).await
        }
        (&Method::POST, None) if path == "/v1/policy/acks" => {
            super::policy_routes::take_ack(state, client_cert, peer, req).await
        }
        (&Method::GET, None) if path == "/v1/fleet/status" => super::policy_routes::fleet_status(state, peer).await,
        (&Method::POST, None) if path == "/v1/fleet/drills" => {
            super::drill_routes::take_result(state, client_cert, peer, req).await
        }
        (&Method::GET, None) if path == "/v1/fleet/drills" => {
            let query = req.uri().query().unwrap_or("").to_owned();
            super::drill_routes::results(state, peer, &query).await
        }
        _ => refuse(
            peer,
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no route {} {path}", req.method()),
            "use PUT or GET /v1/bundles/sha256/<hex>, GET /v1/bundles, PUT or GET /v1/policy, POST \
             /v1/policy/acks, GET /v1/fleet/status, POST or GET /v1/fleet/drills",
        ),
    }
}

fn bad_digest(peer: SocketAddr, digest: &str) -> Response<Body> {
    refuse(
        peer,
        StatusCode::BAD_REQUEST,
        "bad_digest",
        format!("{digest:?} is not a SHA-256 digest"),
        "name the bundle by the 64 lower-case hex digits of its bytes' SHA-256",
    )
}

/// The enrolled agent whose key signed `envelope` (a `what`: bundle, acknowledgement), when
/// the client certificate names that agent's identity: a document is taken only from the
/// host that signed it. Else the refusal to answer.
pub(super) fn signing_agent<'a>(
    state: &'a State,
    envelope: &dsse::Envelope,
    client_cert: &CertificateDer<'static>,
    peer: SocketAddr,
    what: &str,
) -> Result<&'a Agent, Response<Body>> {
    let Some(agent) = envelope.signatures.iter().find_map(|s| state.agents.get(&s.keyid)) else {
        let keyids: Vec<&str> = envelope.signatures.iter().map(|s| s.keyid.as_str()).collect();
        return Err(refuse(
            peer,
            StatusCode::FORBIDDEN,
            "unknown_agent",
            format!("no enrolled agent has the signing key id {}", keyids.join(", ")),
            "enroll the agent: add its `aegis-agent key show` verifier line to [[agents]] in the collector config",
        ));
    };
    if !super::tls::cert_names(client_cert, &agent.client_identity) {
        return Err(refuse(
            peer,
            StatusCode::FORBIDDEN,
            "wrong_client",
            format!(
                "the {what} is signed by agent {:?}, but the client certificate does not name its identity {:?}: \
                 a {what} is accepted only from the host that signed it",
                agent.name, agent.client_identity
            ),
            &format!(
                "send each {what} from the agent that signed it, with its own client certificate; if that is so, \
                 fix [[agents]] client_identity or the certificate's subjectAltName"
            ),
        ));
    }
    Ok(agent)
}

/// The signed document (`what`: acknowledgement, drill result) in `body`: a DSSE envelope
/// signed by an enrolled agent ([`signing_agent`]: over that agent's own client certificate)
/// whose signature and content `verify` accepts. The agent and the document, or the refusal.
pub(super) fn agent_document<'a, T>(
    state: &'a State,
    client_cert: &CertificateDer<'static>,
    peer: SocketAddr,
    body: &[u8],
    what: &str,
    verify: impl FnOnce(&dsse::Envelope, &crate::evidence::key::VerifierKey) -> Result<T, String>,
) -> Result<(&'a Agent, T), Response<Body>> {
    let envelope: dsse::Envelope = serde_json::from_slice(body).map_err(|e| {
        refuse(
            peer,
            StatusCode::BAD_REQUEST,
            "not_an_envelope",
            format!("not a DSSE envelope: {e}"),
            &format!("send the {what} as the agent signed it"),
        )
    })?;
    let agent = signing_agent(state, &envelope, client_cert, peer, what)?;
    let document = verify(&envelope, &agent.key).map_err(|e| {
        refuse(
            peer,
            StatusCode::FORBIDDEN,
            "bad_signature",
            format!("agent {:?}: {e}", agent.name),
            "check the agent host",
        )
    })?;
    Ok((agent, document))
}

/// Most bytes of a refused body read and thrown away before the answer: a client still
/// sending when the server answers and closes gets a broken pipe instead of the answer,
/// so a body moderately over the limit is read to its end first.
const DRAIN_MAX: u64 = 16 << 20;

/// Read and discard `body`, up to [`DRAIN_MAX`] bytes or 10 s.
pub(super) async fn drain(mut body: Incoming) {
    let mut seen = 0u64;
    let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        while seen < DRAIN_MAX {
            match body.frame().await {
                Some(Ok(frame)) => seen += frame.data_ref().map_or(0, |d| d.len() as u64),
                _ => break,
            }
        }
    })
    .await;
}

/// The body when it is at most `max` bytes; `Err(None)` when it is larger (what follows is
/// drained, see [`drain`]), `Err(Some(e))` when it could not be read.
pub(super) async fn read_capped(mut body: Incoming, max: u64) -> Result<Bytes, Option<hyper::Error>> {
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(Some)?;
        if let Some(data) = frame.data_ref() {
            if out.len() as u64 + data.len() as u64 > max {
                drain(body).await;
                return Err(None);
            }
            out.extend_from_slice(data);
        }
    }
    Ok(out.freeze())
}

/// Run `f` on the index off the async threads.
pub(super) async fn with_index<T: Send + 'static>(
    state: &Arc<State>,
    f: impl FnOnce(&mut Index) -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let index = state.index.clone();
    tokio::task::spawn_blocking(move || f(&mut index.lock().unwrap_or_else(std::sync::PoisonError::into_inner)))
        .await
        .map_err(|e| anyhow::anyhow!("index task failed: {e}"))?
}

async fn put_bundle(
    state: &Arc<State>,
    client_cert: &CertificateDer<'static>,
    peer: SocketAddr,
    digest: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    let max = state.max_body_bytes;
    let too_large = |size: String| {
        refuse(
            peer,
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the bundle is {size} bytes, over the collector's limit of {max}"),
            "split the evidence into smaller bundles, or raise [collector] max_body_bytes",
        )
    };
    if let Some(len) =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok())
        && len > max
    {
        drain(req.into_body()).await;
        return too_large(len.to_string());
    }
    let body = match read_capped(req.into_body(), max).await {
        Ok(body) => body,
        Err(None) => return too_large("more than".into()),
        Err(Some(e)) => {
            return refuse(
                peer,
                StatusCode::BAD_REQUEST,
                "incomplete_body",
                format!("the body could not be read: {e}"),
                "retry the upload",
            );
        }
    };
    let actual = hex::encode(&Sha256::digest(&body));
    if actual != digest {
        return refuse(
            peer,
            StatusCode::BAD_REQUEST,
            "digest_mismatch",
            format!("the body's SHA-256 is {actual}, the path names {digest}"),
            "PUT a bundle to /v1/bundles/sha256/<the SHA-256 of its bytes>; a mismatch means it was altered on the way",
        );
    }
    let envelope: dsse::Envelope = match serde_json::from_slice(&body) {
        Ok(e) => e,
        Err(e) => {
            return refuse(
                peer,
                StatusCode::BAD_REQUEST,
                "not_an_envelope",
                format!("the body is not a DSSE envelope: {e}"),
                "upload the envelope as the agent signed it",
            );
        }
    };
    let agent = match signing_agent(state, &envelope, client_cert, peer, "bundle") {
        Ok(a) => a,
        Err(refused) => return refused,
    };
    let statement = match dsse::verify(&envelope, &agent.key) {
        Ok(s) => s,
        Err(e) => {
            return refuse(
                peer,
                StatusCode::FORBIDDEN,
                "bad_signature",
                format!("agent {:?}: {e}", agent.name),
                "the bundle was altered or forged and is not stored; check the agent host",
            );
        }
    };
    let meta = match BundleMeta::from_statement(&statement, &agent.key.dsse_keyid()) {
        Ok(m) => m,
        Err(e) => {
            return refuse(
                peer,
                StatusCode::UNPROCESSABLE_ENTITY,
                "not_an_evidence_bundle",
                e,
                "sign evidence bundles with the agent's bundle builder (predicate type https://aegisplane.dev/evidence-bundle/v1)",
            );
        }
    };
    let (name, owned_digest, size) = (agent.name.clone(), digest.to_owned(), body.len() as u64);
    let claimed = with_index(state, {
        let meta = meta.clone();
        move |index| index.claim(&owned_digest, &name, &meta, size)
    })
    .await;
    match claimed {
        Ok(Claim::Stored) => {
            tracing::info!(%peer, agent = agent.name, digest, sequence = meta.sequence, "already stored");
            return answer(StatusCode::OK, &json!({"status": "already_stored", "digest": digest}));
        }
        Ok(Claim::Replay { digest: other }) => {
            return refuse(
                peer,
                StatusCode::CONFLICT,
                "replay",
                format!(
                    "agent {:?} already has bundle {other} as sequence {}; this one ({digest}) reuses the sequence",
                    agent.name, meta.sequence
                ),
                "an agent numbers each bundle once: this is a replay or a reset spool; investigate the host",
            );
        }
        Ok(Claim::New | Claim::Pending) => {}
        Err(e) => return internal(peer, &e),
    }
    if let Err(e) = state.store.put(digest, body).await {
        let owned = digest.to_owned();
        if let Err(release) = with_index(state, move |index| index.release(&owned)).await {
            tracing::error!("{release:#}");
        }
        return internal(peer, &e);
    }
    let owned = digest.to_owned();
    if let Err(e) = with_index(state, move |index| index.mark_stored(&owned)).await {
        return internal(peer, &e);
    }
    tracing::info!(%peer, agent = agent.name, digest, sequence = meta.sequence, size, "stored");
    answer(StatusCode::CREATED, &json!({"status": "stored", "digest": digest}))
}

async fn get_bundle(state: &Arc<State>, peer: SocketAddr, digest: &str) -> Response<Body> {
    let owned = digest.to_owned();
    let stored = match with_index(state, move |index| index.is_stored(&owned)).await {
        Ok(s) => s,
        Err(e) => return internal(peer, &e),
    };
    let got = if stored { state.store.get(digest).await } else { Ok(None) };
    match got {
        Ok(Some(bytes)) => Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(bytes))
            .expect("a valid response"),
        Ok(None) => refuse(
            peer,
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no bundle {digest} is stored"),
            "list what is stored with GET /v1/bundles (aegis-agent evidence list)",
        ),
        Err(e) => internal(peer, &e),
    }
}

async fn list_bundles(state: &Arc<State>, peer: SocketAddr, query: &str) -> Response<Body> {
    let mut q = Query { limit: DEFAULT_LIST_LIMIT, ..Query::default() };
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        let value = value.into_owned();
        let parsed: Result<(), String> = match key.as_ref() {
            "host" => {
                q.host = Some(value);
                Ok(())
            }
            "incident" => {
                q.incident = Some(value);
                Ok(())
            }
            "severity" if Severity::parse(&value).is_some() => {
                q.severity = Some(value);
                Ok(())
            }
            "severity" => Err(format!("severity {value:?} is not SEV-1, SEV-2 or SEV-3")),
            "since" => parse_rfc3339_ms(&value).map(|t| q.since_ms = Some(t)),
            "until" => parse_rfc3339_ms(&value).map(|t| q.until_ms = Some(t)),
            "limit" => match value.parse::<u32>() {
                Ok(n) if (1..=MAX_LIST_LIMIT).contains(&n) => {
                    q.limit = n;
                    Ok(())
                }
                _ => Err(format!("limit {value:?} is not a number from 1 to {MAX_LIST_LIMIT}")),
            },
            other => Err(format!("unknown parameter {other:?}")),
        };
        if let Err(message) = parsed {
            return refuse(
                peer,
                StatusCode::BAD_REQUEST,
                "bad_query",
                message,
                "filter with host, incident, severity (SEV-1|SEV-2|SEV-3), since and until (RFC 3339), limit",
            );
        }
    }
    match with_index(state, move |index| index.list(&q)).await {
        Ok(rows) => answer(StatusCode::OK, &json!({"bundles": rows})),
        Err(e) => internal(peer, &e),
    }
}
