//! The collector's fleet routes: publish a policy, serve it to agents (long poll), take
//! their acknowledgements, and report who has what. See the module docs of [`super`].

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, header};
use rustls::pki_types::CertificateDer;
use serde_json::json;
use tokio::sync::watch;

use super::{
    Agent,
    index::Index,
    server::{Body, State, answer, internal, refuse, with_index},
};
use crate::{
    clock::{now_unix_ms, rfc3339_ms},
    fleet::{
        ack::{Ack, MAX_ACK_BYTES},
        policy::{self, Accepted, MAX_POLICY_BYTES, Refusal, Trust},
    },
};

/// The policy served now.
#[derive(Debug)]
pub struct Published {
    pub version: u64,
    pub digest: String,
    pub published_ms: u64,
    pub body: Bytes,
}

/// The feed's state: the trust to check publications with, the policy served (agents'
/// long polls wait on its changes), and each agent's last contact.
pub struct Feed {
    trust: Trust,
    max_wait: Duration,
    current: watch::Sender<Option<Arc<Published>>>,
    contacts: Mutex<HashMap<String, u64>>,
    /// One publication at a time (check, store, serve).
    publishing: tokio::sync::Mutex<()>,
}

impl Feed {
    /// The feed, serving the latest policy the index holds.
    pub fn open(trust: Trust, max_wait: Duration, index: &Index) -> anyhow::Result<Self> {
        let latest = index.latest_policy()?.map(|p| {
            Arc::new(Published {
                version: p.version,
                digest: p.digest,
                published_ms: p.published_ms,
                body: Bytes::from(p.body),
            })
        });
        if let Some(p) = &latest {
            tracing::info!(version = p.version, digest = %p.digest, "serving the fleet policy");
        }
        Ok(Self {
            trust,
            max_wait,
            current: watch::Sender::new(latest),
            contacts: Mutex::new(HashMap::new()),
            publishing: tokio::sync::Mutex::new(()),
        })
    }

    pub(super) fn touch(&self, agent: &str) {
        self.contacts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(agent.to_owned(), now_unix_ms());
    }
}

pub(super) fn no_feed(peer: SocketAddr) -> Response<Body> {
    refuse(
        peer,
        StatusCode::NOT_FOUND,
        "no_fleet",
        "this collector serves no fleet policy".into(),
        "add a [fleet] section (name, keys, threshold) to the collector's config and restart it",
    )
}

/// The enrolled agent whose identity the client certificate names.
fn agent_of<'a>(state: &'a State, cert: &CertificateDer<'static>) -> Option<&'a Agent> {
    state.agents.values().find(|a| super::tls::cert_names(cert, &a.client_identity))
}

/// The body, at most `max` bytes, or the refusal to answer.
pub(super) async fn read_body(
    peer: SocketAddr,
    req: Request<Incoming>,
    max: u64,
    what: &str,
) -> Result<Bytes, Response<Body>> {
    match super::server::read_capped(req.into_body(), max).await {
        Ok(b) => Ok(b),
        Err(None) => Err(refuse(
            peer,
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("{what} is over {max} bytes"),
            "send a smaller document",
        )),
        Err(Some(e)) => Err(refuse(
            peer,
            StatusCode::BAD_REQUEST,
            "incomplete_body",
            format!("the body could not be read: {e}"),
            "retry",
        )),
    }
}

fn policy_response(p: &Published) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-aegis-policy-version", p.version)
        .header("x-aegis-published-ms", p.published_ms)
        .body(Full::new(p.body.clone()))
        .expect("a valid response")
}

/// `PUT /v1/policy`.
pub async fn publish(state: &Arc<State>, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let Some(feed) = &state.feed else { return no_feed(peer) };
    let body = match read_body(peer, req, MAX_POLICY_BYTES, "a policy").await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let _one = feed.publishing.lock().await;
    let served = feed.current.borrow().clone();
    let held = served.as_ref().map(|p| Accepted {
        fleet: feed.trust.fleet.clone(),
        version: p.version,
        digest: p.digest.clone(),
        issued_at: String::new(),
        expires: String::new(),
        accepted_at: String::new(),
        emergency: false,
        rulepacks: Vec::new(),
    });
    let now = now_unix_ms();
    let verified = match policy::verify(&body, &feed.trust, held.as_ref(), now) {
        Ok(Some(v)) => v,
        Ok(None) => {
            let p = served.expect("a repeat of the policy served");
            return answer(
                StatusCode::OK,
                &json!({"status": "already_published", "version": p.version, "digest": p.digest, "published_ms": p.published_ms}),
            );
        }
        Err(refusal) => {
            let status = match &refusal {
                Refusal::Rollback { .. } | Refusal::Fork(_) => StatusCode::CONFLICT,
                Refusal::Malformed(_) | Refusal::Expired(_) | Refusal::WrongFleet { .. } => {
                    StatusCode::UNPROCESSABLE_ENTITY
                }
                _ => StatusCode::FORBIDDEN,
            };
            return refuse(peer, status, refusal.kind(), refusal.to_string(), "the policy is not published");
        }
    };
    let (version, digest) = (verified.doc.version, verified.digest.clone());
    let stored = with_index(state, {
        let (digest, body) = (digest.clone(), body.clone());
        move |index| index.put_policy(version, &digest, now, &body)
    })
    .await;
    if let Err(e) = stored {
        return internal(peer, &e);
    }
    feed.current.send_replace(Some(Arc::new(Published { version, digest: digest.clone(), published_ms: now, body })));
    tracing::warn!(%peer, version, %digest, signers = verified.signers.len(), note = %verified.doc.note, "fleet policy published");
    answer(
        StatusCode::CREATED,
        &json!({"status": "published", "version": version, "digest": digest, "published_ms": now}),
    )
}

/// `GET /v1/policy?after=N&wait=S`.
pub async fn serve_policy(
    state: &Arc<State>,
    cert: &CertificateDer<'static>,
    peer: SocketAddr,
    query: &str,
) -> Response<Body> {
    let Some(feed) = &state.feed else { return no_feed(peer) };
    let (mut after, mut wait) = (0u64, Duration::ZERO);
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        let ok = match key.as_ref() {
            "after" => value.parse().map(|v| after = v).is_ok(),
            "wait" => value.parse::<u64>().map(|s| wait = Duration::from_secs(s).min(feed.max_wait)).is_ok(),
            _ => false,
        };
        if !ok {
            return refuse(
                peer,
                StatusCode::BAD_REQUEST,
                "bad_query",
                format!("parameter {key}={value:?} is not understood"),
                "ask with after=<version held> and wait=<seconds>",
            );
        }
    }
    let agent = agent_of(state, cert).map(|a| a.name.clone());
    if let Some(name) = &agent {
        feed.touch(name);
    }
    let mut rx = feed.current.subscribe();
    let deadline = tokio::time::Instant::now() + wait;
    let answer = loop {
        if let Some(p) = rx.borrow_and_update().clone()
            && p.version > after
        {
            break policy_response(&p);
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            _ => {
                break Response::builder().status(StatusCode::NO_CONTENT).body(Full::new(Bytes::new())).expect("valid");
            }
        }
    };
    if let Some(name) = &agent {
        feed.touch(name);
    }
    answer
}

/// `POST /v1/policy/acks`.
pub async fn take_ack(
    state: &Arc<State>,
    cert: &CertificateDer<'static>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    let Some(feed) = &state.feed else { return no_feed(peer) };
    let body = match read_body(peer, req, MAX_ACK_BYTES, "an acknowledgement").await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let (agent, ack) = match super::server::agent_document(state, cert, peer, &body, "acknowledgement", Ack::verify) {
        Ok(a) => a,
        Err(refused) => return refused,
    };
    feed.touch(&agent.name);
    let now = now_unix_ms();
    let text = serde_json::to_string(&ack).expect("an ack serialises");
    let name = agent.name.clone();
    if let Err(e) = with_index(state, move |index| index.put_ack(&name, &text, now)).await {
        return internal(peer, &e);
    }
    tracing::info!(%peer, agent = agent.name, version = ack.version, status = ?ack.status, apply_ms = ack.apply_ms, "fleet acknowledgement");
    answer(StatusCode::CREATED, &json!({"status": "recorded"}))
}

/// `GET /v1/fleet/status`.
pub async fn fleet_status(state: &Arc<State>, peer: SocketAddr) -> Response<Body> {
    let Some(feed) = &state.feed else { return no_feed(peer) };
    let served = feed.current.borrow().clone();
    let acks = match with_index(state, |index| index.acks()).await {
        Ok(a) => a,
        Err(e) => return internal(peer, &e),
    };
    let acks: HashMap<String, (Ack, u64)> = acks
        .into_iter()
        .filter_map(|(agent, text, at)| serde_json::from_str::<Ack>(&text).ok().map(|a| (agent, (a, at))))
        .collect();
    let contacts = feed.contacts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let mut agents: Vec<&Agent> = state.agents.values().collect();
    agents.sort_by(|a, b| a.name.cmp(&b.name));
    let current = served.as_ref().map_or(0, |p| p.version);
    let mut rows = Vec::new();
    let mut missing = Vec::new();
    for a in agents {
        let ack = acks.get(&a.name);
        let in_force = ack.map_or(0, |(ack, _)| ack.version);
        if current > 0 && in_force < current {
            missing.push(a.name.clone());
        }
        let converge_ms = match (ack, &served) {
            (Some((ack, _)), Some(p)) if ack.version == p.version => {
                ack.applied_unix_ms.map(|t| t as i64 - p.published_ms as i64)
            }
            _ => None,
        };
        rows.push(json!({
            "agent": a.name,
            "host": ack.map(|(ack, _)| ack.host.clone()),
            "version": in_force,
            "status": ack.map(|(ack, _)| ack.status),
            "applied_at": ack.and_then(|(ack, _)| ack.applied_unix_ms).map(rfc3339_ms),
            "apply_ms": ack.map(|(ack, _)| ack.apply_ms),
            "since_publish_ms": converge_ms,
            "delivery_ms": match (ack, &served) {
                (Some((ack, _)), Some(p)) if ack.offered_version == p.version => {
                    Some(ack.received_unix_ms as i64 - p.published_ms as i64)
                }
                _ => None,
            },
            "enforcement": ack.map(|(ack, _)| ack.enforcement.clone()),
            "failures": ack.map(|(ack, _)| ack.failures.clone()).unwrap_or_default(),
            "last_contact": contacts.get(&a.name).copied().map(rfc3339_ms),
            "acked_at": ack.map(|(_, at)| rfc3339_ms(*at)),
        }));
    }
    answer(
        StatusCode::OK,
        &json!({
            "fleet": feed.trust.fleet,
            "policy": served.as_ref().map(|p| json!({
                "version": p.version, "digest": p.digest, "published_ms": p.published_ms,
                "published_at": rfc3339_ms(p.published_ms),
            })),
            "agents": rows,
            "not_acknowledged": missing,
        }),
    )
}
