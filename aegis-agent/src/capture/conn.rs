//! Connections rebuilt from TLS events: per (tgid, `SSL *`), the two plaintext streams,
//! with capture gaps found and passed on, the connection's role (client or server end)
//! recognised, and its bytes handed to an [`ExchangeTracker`].
//!
//! The table is bounded: past `max` connections the least recently active one is finished
//! and evicted (counted). `SSL_free` ends a connection, so a reused `SSL *` starts afresh.

use std::{collections::HashMap, sync::Arc};

use aegis_common::{CHUNK_DATA_MAX, CHUNKS_PER_CALL_MAX, Direction, TlsHook};

use super::event::{ConnKey, TlsEvent};
use crate::{
    enforce::verdict::{Checkpoint, Enforcement},
    llm::exchange::{ExchangeStats, ExchangeTracker, Observation, Side},
    policy::Inspector,
};

/// Bytes of one library call the kernel copies at most.
const CALL_CAP: u64 = CHUNK_DATA_MAX as u64 * CHUNKS_PER_CALL_MAX as u64;
/// Library calls we look at for an HTTP/1.x start before giving up on a connection.
const ROLE_ATTEMPTS: u8 = 16;

/// A model API call seen on one connection, with what the kernel told about the caller.
#[derive(Debug)]
pub struct ConnObservation {
    pub obs: Observation,
    pub key: ConnKey,
    /// Thread that made the last library call of the exchange.
    pub tid: u32,
    pub uid: u32,
    pub cgroup_id: u64,
    /// Thread name as the kernel saw it (NUL-padded).
    pub comm: [u8; 16],
    /// Attach cookie: which probed file.
    pub source: u64,
    /// Library functions that carried this connection's bytes.
    pub hooks: Vec<&'static str>,
}

/// What the table counted.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnStats {
    pub connections: u64,
    pub evicted: u64,
    pub idle_expired: u64,
    /// Connections whose bytes were not HTTP/1.x (counted once each).
    pub not_http1: u64,
    /// Of those, HTTP/2 (recognised by its preface; not parsed yet).
    pub http2: u64,
    /// Bytes missing from streams (kernel drops, read failures, over-cap calls).
    pub gap_bytes: u64,
    /// Times a connection's stream position went back: the kernel's bounded table of
    /// positions forgot it, so a loss at that moment could not be measured.
    pub position_resets: u64,
    pub exchange: ExchangeStats,
}

#[derive(Default)]
struct DirState {
    /// Stream position of the next byte (None until the first event).
    next: Option<u64>,
}

enum Role {
    /// Not recognised yet; attempts left.
    Unknown(u8),
    /// Boxed: a tracker is large, and most table entries hold one anyway.
    Http1(Box<ExchangeTracker>),
    Ignored,
}

struct Conn {
    role: Role,
    last_ns: u64,
    egress: DirState,
    ingress: DirState,
    hooks: u8,
    tid: u32,
    uid: u32,
    cgroup_id: u64,
    comm: [u8; 16],
    source: u64,
}

/// A checkpoint of a call on one connection, with what the kernel told about the caller.
#[derive(Debug)]
pub struct ConnCheckpoint {
    pub checkpoint: Checkpoint,
    pub key: ConnKey,
    pub uid: u32,
    pub cgroup_id: u64,
    pub comm: [u8; 16],
}

pub struct ConnTable {
    conns: HashMap<ConnKey, Conn>,
    /// Raised by the trackers; the owner takes them after each event.
    pub checkpoints: Vec<ConnCheckpoint>,
    cp_scratch: Vec<Checkpoint>,
    max: usize,
    max_body: usize,
    inspector: Option<Arc<Inspector>>,
    pub stats: ConnStats,
    scratch: Vec<Observation>,
}

impl ConnTable {
    /// `inspector`: rules applied to every call found, if any.
    pub fn new(max: usize, max_body: usize, inspector: Option<Arc<Inspector>>) -> Self {
        Self {
            conns: HashMap::new(),
            checkpoints: Vec::new(),
            cp_scratch: Vec::new(),
            max,
            max_body,
            inspector,
            stats: ConnStats::default(),
            scratch: Vec::new(),
        }
    }

    /// The call of exchange `seq` on connection `key` was stopped (or observed: see
    /// `enforce::verdict`).
    pub fn record_enforcement(&mut self, key: ConnKey, seq: u64, enforcement: Enforcement) {
        if let Some(Conn { role: Role::Http1(tracker), .. }) = self.conns.get_mut(&key) {
            tracker.record_enforcement(seq, enforcement);
        }
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    pub fn on_event(&mut self, ev: TlsEvent, out: &mut Vec<ConnObservation>) {
        if ev.hook == TlsHook::SslFree {
            if let Some(conn) = self.conns.remove(&ev.key) {
                self.finish(ev.key, conn, ev.timestamp_ns, "closed", out);
            }
            return;
        }
        if !self.conns.contains_key(&ev.key) {
            if self.conns.len() >= self.max {
                self.evict_oldest(ev.timestamp_ns, out);
            }
            self.stats.connections += 1;
            self.conns.insert(
                ev.key,
                Conn {
                    role: Role::Unknown(ROLE_ATTEMPTS),
                    last_ns: ev.timestamp_ns,
                    egress: DirState::default(),
                    ingress: DirState::default(),
                    hooks: 0,
                    tid: ev.tid,
                    uid: ev.uid,
                    cgroup_id: ev.cgroup_id,
                    comm: ev.comm,
                    source: ev.source,
                },
            );
        }
        let conn = self.conns.get_mut(&ev.key).expect("inserted above");
        conn.last_ns = ev.timestamp_ns;
        conn.hooks |= 1 << ev.hook as u8;
        conn.tid = ev.tid;
        conn.comm = ev.comm;

        let dir = match ev.direction {
            Direction::Egress => &mut conn.egress,
            Direction::Ingress => &mut conn.ingress,
        };
        // Find bytes the kernel saw move but did not deliver: each event says where its
        // bytes sit in the connection's stream, so a jump is exactly what was lost, within a
        // call or across whole calls (ring full). A connection first seen past position 0
        // lost its beginning (the kernel counts from the first call its probes saw).
        let at = ev.stream_pos + u64::from(ev.offset);
        let mut gap_before = match dir.next {
            Some(next) if at < next => {
                // The kernel forgot the connection (its table is bounded) and counts anew.
                self.stats.position_resets += 1;
                0
            }
            Some(next) => at - next,
            None => at,
        };
        let delivered_end = u64::from(ev.offset) + ev.data.len() as u64 + u64::from(ev.missing);
        let mut gap_after = u64::from(ev.missing);
        dir.next = Some(ev.stream_pos + delivered_end);
        if delivered_end == CALL_CAP && u64::from(ev.call_len) > CALL_CAP {
            // The kernel copies at most CALL_CAP bytes of one call: the rest is lost now.
            gap_after += u64::from(ev.call_len) - CALL_CAP;
            dir.next = Some(ev.stream_pos + u64::from(ev.call_len));
        }
        self.stats.gap_bytes += gap_before + gap_after;

        if let Role::Unknown(left) = conn.role {
            if ev.offset != 0 || ev.data.is_empty() {
                return;
            }
            conn.role = match recognise(ev.direction, &ev.data) {
                Recognised::Http1(side) => {
                    Role::Http1(Box::new(ExchangeTracker::new(side, self.max_body, self.inspector.clone())))
                }
                Recognised::Http2 => {
                    self.stats.not_http1 += 1;
                    self.stats.http2 += 1;
                    Role::Ignored
                }
                Recognised::Unknown if left > 1 => Role::Unknown(left - 1),
                Recognised::Unknown => {
                    self.stats.not_http1 += 1;
                    Role::Ignored
                }
            };
            // Bytes before the first recognised message are not a gap of the message.
            gap_before = 0;
        }
        let Role::Http1(tracker) = &mut conn.role else { return };
        let requests = matches!(
            (tracker.side(), ev.direction),
            (Side::Client, Direction::Egress) | (Side::Server, Direction::Ingress)
        );
        let obs = &mut self.scratch;
        let ts = ev.timestamp_ns;
        if requests {
            if gap_before > 0 {
                tracker.request_gap(gap_before, ts, obs);
            }
            tracker.request_data(&ev.data, ts, obs);
            if gap_after > 0 {
                tracker.request_gap(gap_after, ts, obs);
            }
        } else {
            if gap_before > 0 {
                tracker.response_gap(gap_before, ts, obs);
            }
            tracker.response_data(&ev.data, ts, obs);
            if gap_after > 0 {
                tracker.response_gap(gap_after, ts, obs);
            }
        }
        tracker.take_checkpoints(&mut self.cp_scratch);
        if !self.cp_scratch.is_empty() {
            let conn = self.conns.get(&ev.key).expect("present");
            for checkpoint in self.cp_scratch.drain(..) {
                self.checkpoints.push(ConnCheckpoint {
                    checkpoint,
                    key: ev.key,
                    uid: conn.uid,
                    cgroup_id: conn.cgroup_id,
                    comm: conn.comm,
                });
            }
        }
        if !self.scratch.is_empty() {
            let conn = self.conns.get(&ev.key).expect("present");
            for o in self.scratch.drain(..) {
                out.push(describe(ev.key, conn, o));
            }
        }
    }

    /// Finish connections idle since before `cutoff_ns`.
    pub fn expire_idle(&mut self, cutoff_ns: u64, now_ns: u64, out: &mut Vec<ConnObservation>) {
        let idle: Vec<ConnKey> = self.conns.iter().filter(|(_, c)| c.last_ns < cutoff_ns).map(|(k, _)| *k).collect();
        for key in idle {
            let conn = self.conns.remove(&key).expect("listed");
            self.stats.idle_expired += 1;
            self.finish(key, conn, now_ns, "idle", out);
        }
    }

    /// Finish every connection (agent shutting down).
    pub fn finish_all(&mut self, now_ns: u64, out: &mut Vec<ConnObservation>) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            let conn = self.conns.remove(&key).expect("listed");
            self.finish(key, conn, now_ns, "agent_stopped", out);
        }
    }

    fn evict_oldest(&mut self, now_ns: u64, out: &mut Vec<ConnObservation>) {
        if let Some(key) = self.conns.iter().min_by_key(|(_, c)| c.last_ns).map(|(k, _)| *k) {
            let conn = self.conns.remove(&key).expect("found");
            self.stats.evicted += 1;
            self.finish(key, conn, now_ns, "evicted", out);
        }
    }

    fn finish(&mut self, key: ConnKey, mut conn: Conn, ts: u64, reason: &str, out: &mut Vec<ConnObservation>) {
        if let Role::Http1(tracker) = &mut conn.role {
            tracker.finish(ts, reason, &mut self.scratch);
            add_stats(&mut self.stats.exchange, &tracker.stats());
        }
        for o in self.scratch.drain(..) {
            out.push(describe(key, &conn, o));
        }
    }
}

fn add_stats(total: &mut ExchangeStats, s: &ExchangeStats) {
    total.exchanges += s.exchanges;
    total.ignored_exchanges += s.ignored_exchanges;
    total.parse_errors += s.parse_errors;
    total.skipped_bytes += s.skipped_bytes;
}

fn describe(key: ConnKey, conn: &Conn, obs: Observation) -> ConnObservation {
    let hooks =
        (0..4u8).filter(|h| conn.hooks & (1 << h) != 0).filter_map(TlsHook::from_u8).map(TlsHook::symbol).collect();
    ConnObservation {
        obs,
        key,
        tid: conn.tid,
        uid: conn.uid,
        cgroup_id: conn.cgroup_id,
        comm: conn.comm,
        source: conn.source,
        hooks,
    }
}

enum Recognised {
    Http1(Side),
    Http2,
    Unknown,
}

/// Which end of an HTTP/1.x connection sent or received `data` (the start of a library
/// call): a request line going out means the client end, and so on.
fn recognise(direction: Direction, data: &[u8]) -> Recognised {
    if data.starts_with(b"PRI * HTTP/2.0") {
        return Recognised::Http2;
    }
    let request = looks_like_request_line(data);
    let response = data.starts_with(b"HTTP/1.");
    match (direction, request, response) {
        (Direction::Egress, true, _) | (Direction::Ingress, _, true) => Recognised::Http1(Side::Client),
        (Direction::Ingress, true, _) | (Direction::Egress, _, true) => Recognised::Http1(Side::Server),
        _ => Recognised::Unknown,
    }
}

/// "METHOD SP" with an upper-case token method, as every registered method is.
fn looks_like_request_line(data: &[u8]) -> bool {
    let method_len = data.iter().take(16).take_while(|b| b.is_ascii_uppercase()).count();
    (3..=10).contains(&method_len) && data.get(method_len) == Some(&b' ')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One event of connection 7 of process 42 carrying `data` whole.
    fn event(direction: Direction, stream_pos: u64, data: &[u8]) -> TlsEvent {
        TlsEvent {
            key: ConnKey { tgid: 42, conn: 7 },
            tid: 42,
            uid: 0,
            cgroup_id: 1,
            source: 0,
            timestamp_ns: stream_pos + 1,
            hook: if direction == Direction::Egress { TlsHook::SslWrite } else { TlsHook::SslRead },
            direction,
            call_len: data.len() as u32,
            offset: 0,
            stream_pos,
            comm: [0; 16],
            data: bytes::Bytes::copy_from_slice(data),
            missing: 0,
        }
    }

    #[test]
    fn whole_calls_lost_in_the_kernel_are_measured_from_stream_positions() {
        let req = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let (rq, rs) = (req.len() as u64, resp.len() as u64);
        let mut table = ConnTable::new(16, 1 << 20, None);
        let mut out = Vec::new();
        table.on_event(event(Direction::Egress, 0, req), &mut out);
        table.on_event(event(Direction::Ingress, 0, resp), &mut out);
        assert_eq!(table.stats.gap_bytes, 0);
        // The second exchange never reached the agent (ring full): the third one's
        // positions say how much is missing in each direction.
        table.on_event(event(Direction::Egress, 2 * rq, req), &mut out);
        table.on_event(event(Direction::Ingress, 2 * rs, resp), &mut out);
        assert_eq!(table.stats.gap_bytes, rq + rs);
        assert_eq!(table.stats.position_resets, 0);
        // A position that goes back (the kernel forgot the connection) is counted, not a gap.
        table.on_event(event(Direction::Egress, 0, req), &mut out);
        assert_eq!((table.stats.gap_bytes, table.stats.position_resets), (rq + rs, 1));
    }

    #[test]
    fn a_connection_first_seen_past_its_start_lost_its_beginning() {
        let mut table = ConnTable::new(16, 1 << 20, None);
        let mut out = Vec::new();
        table.on_event(event(Direction::Egress, 500, b"tail of something"), &mut out);
        assert_eq!(table.stats.gap_bytes, 500);
    }

    #[test]
    fn roles_are_recognised_from_either_direction() {
        let req = b"POST /v1/chat/completions HTTP/1.1\r\n";
        let resp = b"HTTP/1.1 200 OK\r\n";
        assert!(matches!(recognise(Direction::Egress, req), Recognised::Http1(Side::Client)));
        assert!(matches!(recognise(Direction::Ingress, resp), Recognised::Http1(Side::Client)));
        assert!(matches!(recognise(Direction::Ingress, req), Recognised::Http1(Side::Server)));
        assert!(matches!(recognise(Direction::Egress, resp), Recognised::Http1(Side::Server)));
        assert!(matches!(recognise(Direction::Egress, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Recognised::Http2));
        assert!(matches!(recognise(Direction::Egress, b"\x16\x03\x01binary"), Recognised::Unknown));
        assert!(matches!(recognise(Direction::Egress, b"post /x HTTP/1.1"), Recognised::Unknown));
    }
}
