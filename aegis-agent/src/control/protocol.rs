//! The wire protocol: one JSON object per line (newline-delimited JSON) each way, one
//! request and one response per connection.
//!
//! Every message carries the protocol version `v` next to its body:
//!
//! ```text
//! → {"v":1,"op":"block","target":{"provider":"openai"},"scope":"host","expires":{"after_secs":900},"reason":"incident 42"}
//! ← {"v":1,"status":"ok","kind":"blocked","block":{"id":"blk-1a2b3c4d",...},"report":{"killed_connections":3}}
//! → {"v":1,"op":"unblock","id":"blk-1a2b3c4d"}
//! ← {"v":1,"status":"error","message":"no active block \"blk-1a2b3c4d\": ..."}
//! ```
//!
//! Compatibility: fields are only ever added, and both sides ignore fields they do not
//! know. A request without `v` is taken as version 1 (handy with `socat`); a request with
//! a higher version than the agent's is refused with a message saying so, because its
//! meaning may have changed.

use serde::{Deserialize, Serialize};

use super::{
    blocks::{Block, BlockSpec, Emergency},
    mode::ModeState,
};
use crate::kernel::capability::CapabilityStatus;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// An operator's request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Set a block (`block`, and `disable` for model, route and tenant blocks).
    Block(BlockSpec),
    /// Lift a block by id.
    Unblock { id: String },
    /// The active blocks and the emergency state.
    List,
    /// Turn emergency mode on or off, host-wide (`cgroup` None) or for a cgroup.
    Emergency {
        on: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cgroup: Option<String>,
    },
    /// Switch the enforcement mode: `on` enforce, off observe.
    Enforce { on: bool },
    /// The agent's version and counts, the enforcement mode, and the kernel capabilities.
    Status,
    /// Sign a checkpoint of the decision log now (a snapshot's entries must be covered by
    /// one to be proven); changes nothing else.
    Checkpoint,
    /// Start (`on`) or end drill `id`, whose calls come from `cgroup` (see
    /// `control::drills`): what they cause is marked as the drill's.
    Drill {
        on: bool,
        id: String,
        #[serde(default)]
        cgroup: String,
        /// The drill's own allowlist for its cgroup (a drill in progress: replaces it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        policy: Option<super::drills::DrillPolicy>,
    },
}

/// The agent's answer.
// One per connection, never stored: the size of the `Ok` variant costs nothing, and a box
// would only make every `match` clumsier.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Response {
    Ok(Reply),
    Error { message: String },
}

/// The body of a successful answer, one kind per request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reply {
    /// A block was set (and enforced, as `report` says).
    Blocked {
        block: Block,
        report: ApplyReport,
    },
    /// A block was lifted.
    Unblocked {
        block: Block,
        report: ApplyReport,
    },
    /// The active blocks, oldest first, the emergency state and the enforcement mode.
    Blocks {
        blocks: Vec<Block>,
        emergency: Emergency,
        /// Absent from agents older than the enforcement modes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<ModeState>,
    },
    /// The emergency state after the request; `changed` false: it was already so.
    Emergency {
        emergency: Emergency,
        changed: bool,
        report: ApplyReport,
    },
    /// The enforcement mode after the request; `changed` false: it was already so.
    Enforce {
        mode: ModeState,
        changed: bool,
        report: ApplyReport,
    },
    Status(AgentStatus),
    /// The decision log's size, all of it covered by a checkpoint signed now.
    Checkpoint {
        size: u64,
    },
    /// The drills in progress after the request.
    Drills {
        drills: Vec<super::drills::DrillMark>,
    },
}

/// What the daemon did to enforce a change (returned by
/// [`ControlHandler::apply`](super::server::ControlHandler::apply)); goes into the response
/// and the audit line.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyReport {
    /// Connections closed because the change blocks them.
    #[serde(default)]
    pub killed_connections: u64,
    /// Anything else worth telling the operator ("2 kernel map entries updated").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl std::fmt::Display for ApplyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = if self.killed_connections == 1 { "" } else { "s" };
        write!(f, "killed {} connection{s}", self.killed_connections)?;
        for note in &self.notes {
            write!(f, "; {note}")?;
        }
        Ok(())
    }
}

/// The answer to [`Request::Status`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub agent_version: String,
    pub protocol: u32,
    pub pid: u32,
    /// When the control server started, RFC 3339 UTC.
    pub started_at: String,
    pub blocks: usize,
    pub emergency: Emergency,
    /// The running kernel (`uname -r`).
    #[serde(default)]
    pub kernel: String,
    /// What each kernel capability came to on this host.
    #[serde(default)]
    pub capabilities: Vec<CapabilityStatus>,
    /// Absent from agents older than the enforcement modes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<ModeState>,
    /// The fleet policy in force; absent when the agent takes none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetStatus>,
    /// How capture is doing, whether or not containment is loaded (absent from agents older
    /// than the health report, and while the pipeline starts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<Box<CaptureHealth>>,
}

/// The fleet side of `status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetStatus {
    pub fleet: String,
    /// The version in force (0: none yet) and its digest.
    pub version: u64,
    #[serde(default)]
    pub digest: String,
    /// When it was applied, and until when it is valid (RFC 3339).
    #[serde(default)]
    pub applied_at: String,
    #[serde(default)]
    pub expires: String,
    /// Its expiry has passed: the feed is frozen (its blocks stay in force).
    #[serde(default)]
    pub stale: bool,
    /// Where policies come from: the collector's URL, the drop directory.
    #[serde(default)]
    pub sources: Vec<String>,
    /// Whether the collector's stream is up now, and the last error when it is not.
    #[serde(default)]
    pub connected: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_error: String,
    /// Policies refused, by reason (unsigned, unknown_key, bad_signature, below_threshold,
    /// wrong_fleet, rollback, fork, expired, malformed), and the last refusal.
    #[serde(default)]
    pub refused: std::collections::BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_refusal: String,
    /// Acknowledgements the collector has not confirmed yet.
    #[serde(default)]
    pub acks_pending: u64,
}

/// How capture is doing: for `status`, the metrics endpoint's `/healthz` and systemd's
/// watchdog.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureHealth {
    /// False when calls are not being seen or not being written (`reasons` says why and
    /// what to do).
    pub healthy: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
    /// The capture capability's state (see `kernel::capability`).
    pub state: crate::kernel::capability::State,
    /// Probe hits delivered to user space (TLS reads and writes seen).
    pub events: u64,
    /// Call records written.
    pub records: u64,
    /// Records waiting in memory for `output.file`, and records it never got.
    pub records_pending: u64,
    pub records_lost: u64,
    /// What the kernel could not deliver, every cause together (see README "What is lost").
    pub kernel_dropped_events: u64,
    pub kernel_dropped_bytes: u64,
    /// Connects to model endpoints, and those whose plaintext capture never saw (the
    /// blind-spot report); absent when it does not run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blind_spots: Option<Box<crate::capture::blindspot::service::Counts>>,
    /// `capture.scope = "model_processes"`: the processes probed and why; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scoped: Option<Box<crate::capture::scope::ScopedCounts>>,
}

impl Response {
    pub fn error(message: impl Into<String>) -> Self {
        Self::Error { message: message.into() }
    }
}

#[derive(Serialize)]
struct Envelope<'a, T> {
    v: u32,
    #[serde(flatten)]
    body: &'a T,
}

fn encode<T: Serialize>(body: &T) -> String {
    serde_json::to_string(&Envelope { v: PROTOCOL_VERSION, body }).expect("protocol messages serialize")
}

/// A request as one JSON line (without the newline).
pub fn encode_request(req: &Request) -> String {
    encode(req)
}

/// A response as one JSON line (without the newline).
pub fn encode_response(resp: &Response) -> String {
    encode(resp)
}

/// Parse a JSON object line and split off its version (1 when absent).
fn open_envelope(line: &[u8]) -> Result<(u32, serde_json::Value), String> {
    let mut value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| format!("malformed request: not JSON ({e})"))?;
    let obj = value.as_object_mut().ok_or("malformed request: not a JSON object")?;
    let v = match obj.remove("v") {
        None => 1,
        Some(v) => v
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .filter(|&v| v > 0)
            .ok_or("malformed request: \"v\" must be a positive integer (the protocol version)")?,
    };
    Ok((v, value))
}

/// Parse a request line (without the newline); the error is the message to send back.
pub fn decode_request(line: &[u8]) -> Result<Request, String> {
    let (v, body) = open_envelope(line)?;
    if v > PROTOCOL_VERSION {
        return Err(format!(
            "this agent speaks control protocol version {PROTOCOL_VERSION} and the client version {v}: use the \
             aegis-agent binary of the agent's version"
        ));
    }
    serde_json::from_value(body).map_err(|e| format!("invalid request: {e}"))
}

/// Parse a response line (without the newline).
pub fn decode_response(line: &[u8]) -> Result<Response, String> {
    let (v, body) = open_envelope(line).map_err(|e| e.replacen("request", "response", 1))?;
    serde_json::from_value(body).map_err(|e| {
        if v > PROTOCOL_VERSION {
            format!(
                "the agent speaks control protocol version {v} and this client version {PROTOCOL_VERSION}: use the \
                 aegis-agent binary of the agent's version ({e})"
            )
        } else {
            format!("invalid response: {e}")
        }
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::control::{
        blocks::{Actor, BlockTarget, Expiry, Scope, parse_dest},
        mode::EnforceMode,
    };

    fn block() -> Block {
        let spec = BlockSpec {
            target: BlockTarget::Dest(parse_dest("10.0.0.0/8:443").unwrap()),
            scope: Scope::Exe(PathBuf::from("/usr/bin/python3")),
            expires: Some(Expiry::AfterSecs(900)),
            fallback: None,
            reason: "incident 42".into(),
        };
        let actor = Actor { uid: 0, gid: 0, pid: 7, comm: "aegis-agent".into(), user: Some("root".into()) };
        Block::new("blk-0000002a".into(), spec, actor, 1_700_000_000_000).unwrap()
    }

    #[test]
    fn requests_round_trip() {
        let requests = [
            Request::Block(block().spec),
            Request::Block(BlockSpec {
                target: BlockTarget::Route { host: "api.openai.com".into(), path_prefix: "/v1".into() },
                scope: Scope::Cgroup("/team-a".into()),
                expires: Some(Expiry::AtUnix(1_800_000_000)),
                fallback: None,
                reason: "r".into(),
            }),
            Request::Block(BlockSpec {
                target: BlockTarget::Tenant("/t".into()),
                scope: Scope::Host,
                expires: None,
                fallback: None,
                reason: "r".into(),
            }),
            Request::Block(BlockSpec {
                target: BlockTarget::Provider("openai".into()),
                scope: Scope::Host,
                expires: None,
                fallback: Some("[2001:db8::7]:8443".parse().unwrap()),
                reason: "r".into(),
            }),
            Request::Unblock { id: "blk-0000002a".into() },
            Request::List,
            Request::Emergency { on: true, cgroup: None },
            Request::Emergency { on: false, cgroup: Some("/team-a".into()) },
            Request::Enforce { on: true },
            Request::Enforce { on: false },
            Request::Status,
            Request::Drill { on: true, id: "drill-1".into(), cgroup: "/aegis-drill-1".into(), policy: None },
        ];
        for req in requests {
            let line = encode_request(&req);
            assert!(line.starts_with("{\"v\":1,") && !line.contains('\n'), "{line}");
            assert_eq!(decode_request(line.as_bytes()), Ok(req), "{line}");
        }
    }

    #[test]
    fn responses_round_trip() {
        let report = ApplyReport { killed_connections: 3, notes: vec!["2 map entries".into()] };
        let mut emergency = Emergency::default();
        emergency.set(true, Some("/team-a"));
        let mut mode = ModeState::default();
        mode.choose(EnforceMode::Enforce, &block().created_by, 1_700_000_000_000);
        let responses = [
            Response::Ok(Reply::Blocked { block: block(), report: report.clone() }),
            Response::Ok(Reply::Unblocked { block: block(), report: ApplyReport::default() }),
            Response::Ok(Reply::Blocks {
                blocks: vec![block(), block()],
                emergency: emergency.clone(),
                mode: Some(mode.clone()),
            }),
            Response::Ok(Reply::Blocks { blocks: vec![], emergency: Emergency::default(), mode: None }),
            Response::Ok(Reply::Emergency { emergency: emergency.clone(), changed: true, report: report.clone() }),
            Response::Ok(Reply::Enforce { mode: mode.clone(), changed: true, report }),
            Response::Ok(Reply::Status(AgentStatus {
                agent_version: "0.1.0".into(),
                protocol: 1,
                pid: 9,
                started_at: "2023-11-14T22:13:20.000000Z".into(),
                blocks: 2,
                emergency,
                kernel: "6.12.118+deb12-amd64".into(),
                capabilities: vec![crate::kernel::capability::CapabilityStatus::degraded(
                    crate::kernel::capability::Capability::Capture,
                    "probes on 1 of 2 TLS targets",
                    "/usr/bin/node: no SSL_write symbol",
                )],
                mode: Some(mode),
                fleet: None,
                capture: Some(Box::new(CaptureHealth {
                    healthy: false,
                    reasons: vec!["output.file cannot be written".into()],
                    state: crate::kernel::capability::State::Degraded,
                    events: 12,
                    records: 3,
                    records_pending: 2,
                    records_lost: 1,
                    kernel_dropped_events: 4,
                    kernel_dropped_bytes: 4096,
                    blind_spots: Some(Box::new(crate::capture::blindspot::service::Counts {
                        connects: 5,
                        explained: 3,
                        blind: 2,
                        reports: 1,
                        overflow: 0,
                        events_lost: 0,
                        endpoints: 14,
                        udp_flows: 1,
                        udp_unowned: 0,
                        sni: None,
                    })),
                    scoped: Some(Box::new(crate::capture::scope::ScopedCounts {
                        at_connect: 2,
                        at_exec: 1,
                        at_fork: 1,
                        programs: 1,
                        process_events: true,
                        ..Default::default()
                    })),
                })),
            })),
            Response::error("no"),
        ];
        for resp in responses {
            let line = encode_response(&resp);
            assert_eq!(decode_response(line.as_bytes()), Ok(resp), "{line}");
        }
    }

    #[test]
    fn wire_format_is_pinned() {
        // What scripts and other clients rely on: a change here breaks them.
        let req = Request::Block(BlockSpec {
            target: BlockTarget::Provider("openai".into()),
            scope: Scope::Host,
            expires: Some(Expiry::AfterSecs(900)),
            fallback: None,
            reason: "incident 42".into(),
        });
        assert_eq!(
            encode_request(&req),
            r#"{"v":1,"op":"block","target":{"provider":"openai"},"scope":"host","expires":{"after_secs":900},"reason":"incident 42"}"#
        );
        let Request::Block(spec) = req else { unreachable!() };
        let with_fallback = Request::Block(BlockSpec { fallback: Some("127.0.0.1:8443".parse().unwrap()), ..spec });
        assert_eq!(
            encode_request(&with_fallback),
            r#"{"v":1,"op":"block","target":{"provider":"openai"},"scope":"host","expires":{"after_secs":900},"fallback":"127.0.0.1:8443","reason":"incident 42"}"#
        );
        assert_eq!(
            encode_request(&Request::Emergency { on: true, cgroup: Some("/a".into()) }),
            r#"{"v":1,"op":"emergency","on":true,"cgroup":"/a"}"#
        );
        assert_eq!(encode_request(&Request::List), r#"{"v":1,"op":"list"}"#);
        assert_eq!(encode_request(&Request::Enforce { on: true }), r#"{"v":1,"op":"enforce","on":true}"#);
        // A reply of an agent older than the enforcement modes still reads.
        assert_eq!(
            decode_response(br#"{"v":1,"status":"ok","kind":"blocks","blocks":[],"emergency":{"host":false}}"#),
            Ok(Response::Ok(Reply::Blocks { blocks: vec![], emergency: Emergency::default(), mode: None }))
        );
        assert_eq!(encode_response(&Response::error("x")), r#"{"v":1,"status":"error","message":"x"}"#);
        let ok = encode_response(&Response::Ok(Reply::Blocked { block: block(), report: ApplyReport::default() }));
        assert!(
            ok.starts_with(
                r#"{"v":1,"status":"ok","kind":"blocked","block":{"id":"blk-0000002a","spec":{"target":{"dest":{"net":"10.0.0.0","prefix":8,"port":443}},"scope":{"exe":"/usr/bin/python3"}"#
            ),
            "{ok}"
        );
        // Hand-written requests: no version, scope left out, unknown fields ignored.
        assert_eq!(
            decode_request(br#"{"op":"block","target":{"model":"gpt-4o"},"reason":"r","future":1}"#),
            Ok(Request::Block(BlockSpec {
                target: BlockTarget::Model("gpt-4o".into()),
                scope: Scope::Host,
                expires: None,
                fallback: None,
                reason: "r".into()
            }))
        );
    }

    #[test]
    fn bad_requests() {
        let err = |line: &str| decode_request(line.as_bytes()).unwrap_err();
        assert_eq!(err("{not json"), "malformed request: not JSON (key must be a string at line 1 column 2)");
        assert_eq!(err("[1]"), "malformed request: not a JSON object");
        assert_eq!(
            err(r#"{"v":0,"op":"list"}"#),
            "malformed request: \"v\" must be a positive integer (the protocol version)"
        );
        assert_eq!(
            err(r#"{"v":2,"op":"list"}"#),
            "this agent speaks control protocol version 1 and the client version 2: use the aegis-agent binary of the \
             agent's version"
        );
        assert_eq!(
            err(r#"{"v":1,"op":"explode"}"#),
            "invalid request: unknown variant `explode`, expected one of `block`, `unblock`, `list`, `emergency`, \
             `enforce`, `status`, `checkpoint`, `drill`"
        );
        assert_eq!(err(r#"{"v":1,"op":"unblock"}"#), "invalid request: missing field `id`");
        assert_eq!(
            decode_response(b"{\"v\":2,\"status\":\"ok\",\"kind\":\"new_thing\"}").unwrap_err(),
            "the agent speaks control protocol version 2 and this client version 1: use the aegis-agent binary of the \
             agent's version (unknown variant `new_thing`, expected one of `blocked`, `unblocked`, `blocks`, \
             `emergency`, `enforce`, `status`, `checkpoint`, `drills`)"
        );
        assert_eq!(
            decode_response(b"nope").unwrap_err(),
            "malformed response: not JSON (expected ident at line 1 column 2)"
        );
    }
}
