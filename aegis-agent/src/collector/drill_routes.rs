//! The collector's fleet drill routes: take an agent's signed drill result, and list the
//! results of one drill with the enrolled agents that have not sent one (see
//! [`crate::fleet::drill`]).

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use hyper::{Request, StatusCode, body::Incoming};
use rustls::pki_types::CertificateDer;
use serde_json::json;

use super::{
    policy_routes::{no_feed, read_body},
    server::{Body, State, answer, internal, refuse, with_index},
};
use crate::{
    clock::{now_unix_ms, rfc3339_ms},
    fleet::drill::{DrillResult, MAX_RESULT_BYTES, valid_id},
};

/// `POST /v1/fleet/drills`.
pub async fn take_result(
    state: &Arc<State>,
    cert: &CertificateDer<'static>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> hyper::Response<Body> {
    let Some(feed) = &state.feed else { return no_feed(peer) };
    let body = match read_body(peer, req, MAX_RESULT_BYTES, "a drill result").await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let (agent, result) =
        match super::server::agent_document(state, cert, peer, &body, "drill result", DrillResult::verify) {
            Ok(a) => a,
            Err(refused) => return refused,
        };
    if !valid_id(&result.drill) {
        return refuse(
            peer,
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad_drill_id",
            format!("drill id {:?} is not a fleet drill's", result.drill),
            "send results of drills a fleet policy carried",
        );
    }
    feed.touch(&agent.name);
    let now = now_unix_ms();
    let text = serde_json::to_string(&result).expect("a drill result serialises");
    let (name, drill) = (agent.name.clone(), result.drill.clone());
    if let Err(e) = with_index(state, move |index| index.put_drill_result(&drill, &name, &text, now)).await {
        return internal(peer, &e);
    }
    tracing::info!(%peer, agent = agent.name, drill = result.drill, status = ?result.status, "fleet drill result");
    answer(StatusCode::CREATED, &json!({"status": "recorded"}))
}

/// `GET /v1/fleet/drills?id=ID`: `{"drill", "results": [{"agent", "received_at", "result"}],
/// "not_reported": [agent...]}`.
pub async fn results(state: &Arc<State>, peer: SocketAddr, query: &str) -> hyper::Response<Body> {
    if state.feed.is_none() {
        return no_feed(peer);
    }
    let id = url::form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "id").map(|(_, v)| v.into_owned());
    let Some(id) = id.filter(|i| valid_id(i)) else {
        return refuse(
            peer,
            StatusCode::BAD_REQUEST,
            "bad_query",
            format!("query {query:?} names no fleet drill"),
            "ask with id=fleet-drill-...",
        );
    };
    let rows = match with_index(state, {
        let id = id.clone();
        move |index| index.drill_results(&id)
    })
    .await
    {
        Ok(r) => r,
        Err(e) => return internal(peer, &e),
    };
    let mut by_agent: HashMap<String, (serde_json::Value, u64)> = HashMap::new();
    for (agent, text, at) in rows {
        if let Ok(v) = serde_json::from_str(&text) {
            by_agent.insert(agent, (v, at));
        }
    }
    let mut names: Vec<&String> = state.agents.values().map(|a| &a.name).collect();
    names.sort();
    let mut results = Vec::new();
    let mut missing = Vec::new();
    for name in names {
        match by_agent.remove(name) {
            Some((result, at)) => {
                results.push(json!({"agent": name, "received_at": rfc3339_ms(at), "result": result}));
            }
            None => missing.push(name.clone()),
        }
    }
    answer(StatusCode::OK, &json!({"drill": id, "results": results, "not_reported": missing}))
}
