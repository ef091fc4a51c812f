//! Request/response pairing on one connection, and the model API view of each pair.
//!
//! An [`ExchangeTracker`] is fed the two byte streams of one HTTP/1.1 connection, as the
//! capture layer rebuilt them, and yields one [`Observation`] per model API call once its
//! response has ended (or the connection did). Requests that are surely not model calls
//! (anything but POST) keep no body and their responses are framed but not decoded, so
//! other HTTPS traffic costs little beyond parsing heads.
//!
//! Both ends of a call can be on this host (a local inference server behind TLS): the
//! tracker does not care which end it sits at; [`Side`] says, and the request
//! [`Observation::fingerprint`] lets the correlator join the two views.

use std::{
    collections::VecDeque,
    hash::{DefaultHasher, Hasher as _},
    sync::Arc,
};

use bytes::Bytes;

use super::{
    detect::{self, ApiCall, RequestView},
    response::ResponseReader,
    usage::ResponseSummary,
};
use crate::{
    enforce::verdict::{Checkpoint, Enforcement},
    policy::{
        Inspector,
        decision::{Decision, Half},
        inspect::CallInspection,
    },
    protocol::{
        encoding::BodyDecoder,
        http1::{Http1Parser, HttpEvent, Limits, MessageHead, StreamKind},
    },
    rules::pack::Action,
};

/// Which end of the connection the observing process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// It sent the request.
    Client,
    /// It received the request.
    Server,
}

/// Request body bytes that enter the fingerprint.
const FINGERPRINT_BODY_BYTES: usize = 64 * 1024;

/// One model API call as seen from one end of one connection.
#[derive(Debug)]
pub struct Observation {
    pub side: Side,
    pub call: ApiCall,
    pub summary: ResponseSummary,
    pub method: String,
    pub target: String,
    pub host: Option<String>,
    pub status: Option<u16>,
    /// Monotonic timestamps (ns) of the request's first byte, the response's first and
    /// last byte.
    pub request_start_ns: u64,
    pub response_first_ns: Option<u64>,
    pub response_end_ns: Option<u64>,
    /// Bytes on the wire (heads and bodies as sent, before decoding).
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// Hash of method, target, host and the request body's first bytes: equal on both
    /// ends of the same call.
    pub fingerprint: u64,
    /// False when any part was missing or cut short; `notes` says what.
    pub complete: bool,
    pub notes: Vec<String>,
    /// The rules' inspection of the call, when rules are in force; finished (with the
    /// tenant's provider allowlist) into `decision` once the caller is known.
    pub inspection: Option<CallInspection>,
    pub decision: Option<Decision>,
    /// The call was stopped while on the wire, and how (or, observed, would have been).
    pub enforcement: Option<Enforcement>,
}

/// Counters of what was skipped, for the agent's health report.
#[derive(Clone, Copy, Debug, Default)]
pub struct ExchangeStats {
    pub exchanges: u64,
    pub ignored_exchanges: u64,
    pub parse_errors: u64,
    /// Bytes the HTTP parsers discarded (unparseable, or searching for the next message).
    pub skipped_bytes: u64,
}

struct RequestState {
    head: MessageHead,
    start_ns: u64,
    wire_bytes: u64,
    keep_body: bool,
    decoder: Option<BodyDecoder>,
    body: Vec<u8>,
    body_len: u64,
    hasher: DefaultHasher,
    ended: bool,
    complete: bool,
    notes: Vec<String>,
    /// Set at request end: the call, or None (not a model API call).
    call: Option<ApiCall>,
}

struct ResponseState {
    head: Option<MessageHead>,
    first_ns: Option<u64>,
    end_ns: Option<u64>,
    wire_bytes: u64,
    decoder: Option<BodyDecoder>,
    /// Reads the decoded body as it arrives, once the request is known to be a call.
    reader: Option<ResponseReader>,
    /// Decoded bytes that arrived before the request was recognised (capped).
    early: Vec<u8>,
    ended: bool,
    complete: bool,
    notes: Vec<String>,
}

struct Exchange {
    /// Number of this exchange on its connection.
    seq: u64,
    req: RequestState,
    resp: ResponseState,
    /// Rules at work on this call (set when the request is recognised).
    inspection: Option<CallInspection>,
    /// Strongest rule action already raised in a checkpoint.
    raised: Option<Action>,
    enforcement: Option<Enforcement>,
}

/// Pairs requests and responses of one connection and summarises model API calls.
pub struct ExchangeTracker {
    side: Side,
    max_body: usize,
    inspector: Option<Arc<Inspector>>,
    /// Decoder output of one body piece (reused).
    scratch: Vec<u8>,
    requests: Http1Parser,
    responses: Http1Parser,
    /// Exchanges in request order; the front one is what responses answer.
    queue: VecDeque<Exchange>,
    /// The last exchange in `queue` is still receiving its request.
    receiving: bool,
    events: Vec<HttpEvent>,
    stats: ExchangeStats,
    next_seq: u64,
    /// Raised since the owner last took them (see [`ExchangeTracker::take_checkpoints`]).
    checkpoints: Vec<Checkpoint>,
    /// The exchange whose call was stopped (or observed): later bytes on the connection are
    /// counted against it.
    stopped: Option<u64>,
}

impl ExchangeTracker {
    /// `inspector`: the rules to apply to every call, if any.
    pub fn new(side: Side, max_body: usize, inspector: Option<Arc<Inspector>>) -> Self {
        Self {
            side,
            max_body,
            inspector,
            scratch: Vec::new(),
            requests: Http1Parser::new(StreamKind::Requests, Limits::default()),
            responses: Http1Parser::new(StreamKind::Responses, Limits::default()),
            queue: VecDeque::new(),
            receiving: false,
            events: Vec::new(),
            stats: ExchangeStats::default(),
            next_seq: 0,
            checkpoints: Vec::new(),
            stopped: None,
        }
    }

    /// Checkpoints raised since the last call: calls whose request was inspected, or
    /// whose response's inspection reached a stronger action.
    pub fn take_checkpoints(&mut self, into: &mut Vec<Checkpoint>) {
        into.append(&mut self.checkpoints);
    }

    /// The call of exchange `seq` was stopped (or observed): keep how, and count the bytes
    /// that still pass on this connection.
    pub fn record_enforcement(&mut self, seq: u64, enforcement: Enforcement) {
        if let Some(x) = self.queue.iter_mut().find(|x| x.seq == seq) {
            x.enforcement = Some(enforcement);
            self.stopped = Some(seq);
        }
    }

    /// Count `n` bytes passing after a stop against the stopped call.
    fn after_stop(&mut self, n: usize, half: Half) {
        let Some(seq) = self.stopped else { return };
        match self.queue.iter_mut().find(|x| x.seq == seq).and_then(|x| x.enforcement.as_mut()) {
            Some(e) if half == Half::Request => e.bytes_out_after_verdict += n as u64,
            Some(e) => e.bytes_in_after_verdict += n as u64,
            None => self.stopped = None,
        }
    }

    pub fn side(&self) -> Side {
        self.side
    }

    pub fn stats(&self) -> ExchangeStats {
        ExchangeStats { skipped_bytes: self.requests.skipped_bytes() + self.responses.skipped_bytes(), ..self.stats }
    }

    /// Request-stream bytes at monotonic time `ts`.
    pub fn request_data(&mut self, data: &[u8], ts: u64, out: &mut Vec<Observation>) {
        self.after_stop(data.len(), Half::Request);
        self.parse(Half::Request, ts, out, |p, ev| p.feed(data, ev));
    }

    /// Response-stream bytes at monotonic time `ts`.
    pub fn response_data(&mut self, data: &[u8], ts: u64, out: &mut Vec<Observation>) {
        self.after_stop(data.len(), Half::Response);
        self.parse(Half::Response, ts, out, |p, ev| p.feed(data, ev));
    }

    /// `n` bytes of the request stream were lost in capture.
    pub fn request_gap(&mut self, n: u64, ts: u64, out: &mut Vec<Observation>) {
        if self.receiving
            && let Some(x) = self.queue.back_mut()
        {
            x.req.notes.push(format!("request_capture_gap:{n}"));
            x.req.complete = false;
        }
        self.parse(Half::Request, ts, out, |p, ev| p.gap(n, ev));
    }

    /// `n` bytes of the response stream were lost in capture.
    pub fn response_gap(&mut self, n: u64, ts: u64, out: &mut Vec<Observation>) {
        // The response being received is the oldest one not ended.
        if let Some(x) = self.queue.iter_mut().find(|x| !x.resp.ended)
            && x.resp.head.is_some()
        {
            x.resp.notes.push(format!("response_capture_gap:{n}"));
            x.resp.complete = false;
        }
        self.parse(Half::Response, ts, out, |p, ev| p.gap(n, ev));
    }

    /// Run `step` on one stream's parser and handle the events it yields.
    fn parse(
        &mut self,
        half: Half,
        ts: u64,
        out: &mut Vec<Observation>,
        step: impl FnOnce(&mut Http1Parser, &mut Vec<HttpEvent>),
    ) {
        let mut events = std::mem::take(&mut self.events);
        match half {
            Half::Request => step(&mut self.requests, &mut events),
            Half::Response => step(&mut self.responses, &mut events),
        }
        for e in events.drain(..) {
            match half {
                Half::Request => self.on_request_event(e, ts),
                Half::Response => self.on_response_event(e, ts),
            }
        }
        self.events = events;
        self.flush(out);
    }

    /// The connection ended (closed, freed, or idle too long): report what is pending.
    pub fn finish(&mut self, ts: u64, reason: &str, out: &mut Vec<Observation>) {
        self.parse(Half::Request, ts, out, |p, ev| p.finish(ev));
        self.parse(Half::Response, ts, out, |p, ev| p.finish(ev));
        // What remains never got a full response.
        while let Some(mut x) = self.queue.pop_front() {
            if !x.req.ended {
                x.req.ended = true;
                x.req.complete = false;
                x.req.notes.push("request_cut_short".into());
                self.detect(&mut x, ts);
            }
            if !x.resp.ended {
                x.resp.notes.push(format!("no_complete_response:{reason}"));
                x.resp.complete = false;
                x.resp.end_ns = x.resp.end_ns.or(x.resp.first_ns);
            }
            if let Some(o) = self.observe(x) {
                out.push(o);
            }
        }
    }

    fn on_request_event(&mut self, event: HttpEvent, ts: u64) {
        match event {
            HttpEvent::Head(head) => {
                let method = head.method.clone().unwrap_or_default();
                let target = head.target.clone().unwrap_or_default();
                self.responses.expect_response_to(&method);
                let keep_body = detect::may_be_api_call(&method, &target);
                let decoder =
                    keep_body.then(|| BodyDecoder::new(head.header("content-encoding"), self.max_body).ok()).flatten();
                let mut hasher = DefaultHasher::new();
                hasher.write(method.as_bytes());
                hasher.write(target.as_bytes());
                hasher.write(head.header("host").unwrap_or_default());
                let wire = head.wire_len as u64;
                let mut notes = Vec::new();
                if keep_body && decoder.is_none() && head.header("content-encoding").is_some() {
                    notes.push("request_body_encoding_unsupported".into());
                }
                let seq = self.next_seq;
                self.next_seq += 1;
                self.queue.push_back(Exchange {
                    seq,
                    raised: None,
                    enforcement: None,
                    req: RequestState {
                        head,
                        start_ns: ts,
                        wire_bytes: wire,
                        keep_body,
                        decoder,
                        body: Vec::new(),
                        body_len: 0,
                        hasher,
                        ended: false,
                        complete: true,
                        notes,
                        call: None,
                    },
                    resp: ResponseState {
                        head: None,
                        first_ns: None,
                        end_ns: None,
                        wire_bytes: 0,
                        decoder: None,
                        reader: None,
                        early: Vec::new(),
                        ended: false,
                        complete: true,
                        notes: Vec::new(),
                    },
                    inspection: None,
                });
                self.receiving = true;
            }
            HttpEvent::Body(bytes) => {
                if !self.receiving {
                    return;
                }
                let Some(x) = self.queue.back_mut() else { return };
                let req = &mut x.req;
                req.wire_bytes += bytes.len() as u64;
                if req.body_len < FINGERPRINT_BODY_BYTES as u64 {
                    let take = (FINGERPRINT_BODY_BYTES as u64 - req.body_len).min(bytes.len() as u64);
                    req.hasher.write(&bytes[..take as usize]);
                }
                req.body_len += bytes.len() as u64;
                if req.keep_body {
                    decode_into(&mut req.decoder, &bytes, &mut req.body, &mut req.notes, "request");
                }
            }
            HttpEvent::End { complete } => {
                if !self.receiving {
                    return;
                }
                self.receiving = false;
                if let Some(mut x) = self.queue.pop_back() {
                    x.req.ended = true;
                    if !complete {
                        x.req.complete = false;
                        x.req.notes.push("request_incomplete".into());
                    }
                    self.detect(&mut x, ts);
                    self.queue.push_back(x);
                }
            }
            HttpEvent::Error { error, .. } => {
                self.stats.parse_errors += 1;
                if self.receiving
                    && let Some(x) = self.queue.back_mut()
                {
                    x.req.notes.push(format!("request_parse_error:{error}"));
                    x.req.complete = false;
                }
            }
        }
    }

    fn on_response_event(&mut self, event: HttpEvent, ts: u64) {
        // Responses answer the oldest exchange whose response has not ended.
        let max_body = self.max_body;
        let Some(x) = self.queue.iter_mut().find(|x| !x.resp.ended) else {
            if let HttpEvent::Error { .. } = event {
                self.stats.parse_errors += 1;
            }
            return;
        };
        let resp = &mut x.resp;
        match event {
            HttpEvent::Head(head) => {
                resp.first_ns.get_or_insert(ts);
                resp.wire_bytes += head.wire_len as u64;
                // An interim 1xx response: the real one follows.
                if head.status.is_some_and(|s| (100..200).contains(&s)) {
                    return;
                }
                // Decode only what may be a model call (detection may still be pending).
                if x.req.call.is_some() || (x.req.keep_body && !x.req.ended) {
                    match BodyDecoder::new(head.header("content-encoding"), max_body) {
                        Ok(d) => resp.decoder = Some(d),
                        Err(e) => resp.notes.push(format!("response_body_not_decoded:{e}")),
                    }
                }
                if let Some(call) = &x.req.call {
                    resp.reader = Some(ResponseReader::new(call, &head, max_body));
                }
                resp.head = Some(head);
            }
            HttpEvent::Body(bytes) => {
                resp.wire_bytes += bytes.len() as u64;
                let Some(decoder) = &mut resp.decoder else { return };
                self.scratch.clear();
                if let Err(e) = decoder.push(&bytes, &mut self.scratch) {
                    resp.notes.push(format!("response_body_undecodable:{e}"));
                    resp.decoder = None;
                    return;
                }
                match &mut resp.reader {
                    Some(reader) => {
                        reader.feed(&self.scratch);
                        if let Some(inspection) = &mut x.inspection {
                            let at_ms = ts.saturating_sub(resp.first_ns.unwrap_or(ts)) as f64 / 1e6;
                            inspection.response_text(&reader.take_text(), at_ms);
                            let strongest = inspection.strongest();
                            if strongest.as_ref().map(|(a, _)| *a) > x.raised {
                                x.raised = strongest.as_ref().map(|(a, _)| *a);
                                self.checkpoints.push(checkpoint(x.seq, &x.req, Half::Response, ts, strongest));
                            }
                        }
                    }
                    None => {
                        let room = max_body.saturating_sub(resp.early.len());
                        resp.early.extend_from_slice(&self.scratch[..room.min(self.scratch.len())]);
                    }
                }
            }
            HttpEvent::End { complete } => {
                if resp.head.is_none() {
                    // End of an interim response.
                    return;
                }
                resp.ended = true;
                resp.end_ns = Some(ts);
                if !complete {
                    resp.complete = false;
                    resp.notes.push("response_incomplete".into());
                }
            }
            HttpEvent::Error { error, .. } => {
                self.stats.parse_errors += 1;
                resp.notes.push(format!("response_parse_error:{error}"));
                resp.complete = false;
            }
        }
    }

    fn detect(&mut self, x: &mut Exchange, ts: u64) {
        let req = &mut x.req;
        self.stats.exchanges += 1;
        if !req.keep_body {
            self.stats.ignored_exchanges += 1;
            return;
        }
        // Without a decoder (unsupported or corrupt encoding) the body is not available;
        // after a capture gap it has a hole. Detection then relies on the path and a
        // textual scan.
        let truncated = !req.complete || req.decoder.as_ref().map_or(req.body_len > 0, |d| d.over_cap() > 0);
        let method = req.head.method.as_deref().unwrap_or_default();
        let target = req.head.target.as_deref().unwrap_or_default();
        let host = req.head.header("host").map(|h| String::from_utf8_lossy(h).into_owned());
        let view = RequestView {
            method,
            target,
            host: host.as_deref(),
            content_type: req.head.header("content-type"),
            body: &req.body,
            body_truncated: truncated,
        };
        req.call = detect::detect(&view);
        let Some(call) = &req.call else {
            self.stats.ignored_exchanges += 1;
            req.body = Vec::new();
            return;
        };
        if truncated {
            req.notes.push(format!("request_body_truncated_at:{}", req.body.len()));
        }
        if let Some(inspector) = &self.inspector {
            let mut inspection = CallInspection::new(inspector.clone());
            inspection.request(call.api, &req.body, truncated);
            x.inspection = Some(inspection);
        }
        // The response may have started before the request was complete.
        if let Some(head) = &x.resp.head
            && x.resp.reader.is_none()
        {
            x.resp.reader = Some(ResponseReader::new(call, head, self.max_body));
        }
        x.req.body = Vec::new();
        let strongest = x.inspection.as_ref().and_then(CallInspection::strongest);
        x.raised = strongest.as_ref().map(|(a, _)| *a);
        self.checkpoints.push(checkpoint(x.seq, &x.req, Half::Request, ts, strongest));
    }

    /// Emit, in order, every exchange at the front whose request and response both ended.
    fn flush(&mut self, out: &mut Vec<Observation>) {
        while self.queue.front().is_some_and(|x| x.req.ended && x.resp.ended) {
            let x = self.queue.pop_front().expect("front exists");
            if let Some(o) = self.observe(x) {
                out.push(o);
            }
        }
    }

    fn observe(&self, x: Exchange) -> Option<Observation> {
        let Exchange { req, mut resp, mut inspection, enforcement, .. } = x;
        let call = req.call?;
        let mut notes = req.notes;
        notes.append(&mut resp.notes);
        // What of the response the rules did not see although it arrived: the body past the
        // cap, oversized stream events, text over the reader's bounds.
        let mut unread = Vec::new();
        if let Some(d) = &resp.decoder
            && d.over_cap() > 0
        {
            unread.push(format!("response_body_truncated_at:{}", self.max_body));
        }
        // A response that started before its request was recognised is read now.
        if resp.reader.is_none()
            && let Some(head) = &resp.head
            && resp.decoder.is_some()
        {
            let mut reader = ResponseReader::new(&call, head, self.max_body);
            reader.feed(&std::mem::take(&mut resp.early));
            resp.reader = Some(reader);
        }
        let summary = match &mut resp.reader {
            Some(reader) => {
                reader.finish();
                if let Some(inspection) = &mut inspection {
                    let at_ms = resp.end_ns.zip(resp.first_ns).map_or(0.0, |(e, f)| e.saturating_sub(f) as f64 / 1e6);
                    inspection.response_text(&reader.take_text(), at_ms);
                }
                unread.extend(reader.notes());
                reader.summary().clone()
            }
            None => ResponseSummary::default(),
        };
        if let Some(i) = &mut inspection {
            if !(req.complete && resp.complete) || resp.head.is_some() && resp.decoder.is_none() {
                i.not_scanned("call_not_seen_whole: see notes");
            }
            for note in &unread {
                i.not_scanned(note.clone());
            }
        }
        notes.append(&mut unread);
        let head = resp.head.as_ref();
        Some(Observation {
            side: self.side,
            summary,
            method: req.head.method.clone().unwrap_or_default(),
            target: req.head.target.clone().unwrap_or_default(),
            host: req.head.header("host").map(|h| String::from_utf8_lossy(h).into_owned()),
            status: head.and_then(|h| h.status),
            request_start_ns: req.start_ns,
            response_first_ns: resp.first_ns,
            response_end_ns: resp.end_ns,
            request_bytes: req.wire_bytes,
            response_bytes: resp.wire_bytes,
            fingerprint: {
                let mut h = req.hasher;
                h.write_u64(req.body_len);
                h.finish()
            },
            complete: req.complete && resp.complete,
            notes,
            inspection,
            decision: None,
            enforcement,
            call,
        })
    }
}

/// A checkpoint for the call of `req` (detected already).
fn checkpoint(seq: u64, req: &RequestState, half: Half, ts: u64, rules: Option<(Action, String)>) -> Checkpoint {
    let call = req.call.as_ref().expect("checkpoints are raised for detected calls");
    Checkpoint {
        exchange: seq,
        half,
        ts,
        provider: call.provider,
        model: call.model.clone(),
        host: req.head.header("host").map(|h| String::from_utf8_lossy(h).into_owned()),
        path: req.head.target.as_deref().unwrap_or_default().split('?').next().unwrap_or_default().to_owned(),
        rules,
    }
}

/// Decode `bytes` into `body` (capped), noting the first decoding error.
fn decode_into(
    decoder: &mut Option<BodyDecoder>,
    bytes: &Bytes,
    body: &mut Vec<u8>,
    notes: &mut Vec<String>,
    what: &str,
) {
    let Some(d) = decoder else { return };
    if let Err(e) = d.push(bytes, body) {
        notes.push(format!("{what}_body_undecodable:{e}"));
        *decoder = None;
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;
    use crate::llm::detect::ApiKind;

    const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    const CHAT_RESP: &str = r#"{"id":"c1","model":"gpt-4o-mini-2024","choices":[{"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":5}}"#;

    fn request(path: &str, body: &str) -> Vec<u8> {
        format!(
            "POST {path} HTTP/1.1\r\nHost: api.openai.com\r\nAuthorization: Bearer sk-secret\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    fn response(body: &[u8], extra: &str) -> Vec<u8> {
        let mut v = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        v.extend_from_slice(body);
        v
    }

    fn tracker() -> ExchangeTracker {
        ExchangeTracker::new(Side::Client, 1 << 20, None)
    }

    #[test]
    fn one_call_with_usage_and_timing() {
        let mut t = tracker();
        let mut out = Vec::new();
        t.request_data(&request("/v1/chat/completions", CHAT), 1_000, &mut out);
        assert!(out.is_empty());
        t.response_data(&response(CHAT_RESP.as_bytes(), ""), 3_000_000, &mut out);
        assert_eq!(out.len(), 1);
        let o = &out[0];
        assert_eq!(o.call.api, ApiKind::ChatCompletions);
        assert_eq!(o.call.provider, "openai");
        assert_eq!(o.call.model.as_deref(), Some("gpt-4o-mini"));
        assert_eq!(o.summary.model.as_deref(), Some("gpt-4o-mini-2024"));
        assert_eq!((o.summary.input_tokens, o.summary.output_tokens), (Some(3), Some(5)));
        assert_eq!(o.status, Some(200));
        assert_eq!(
            (o.request_start_ns, o.response_first_ns, o.response_end_ns),
            (1_000, Some(3_000_000), Some(3_000_000))
        );
        assert_eq!(o.request_bytes, request("/v1/chat/completions", CHAT).len() as u64);
        assert!(o.complete, "{:?}", o.notes);
    }

    #[test]
    fn keep_alive_mixes_calls_and_other_requests_in_order() {
        let mut t = tracker();
        let mut out = Vec::new();
        let mut reqs = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        reqs.extend(request("/v1/chat/completions", CHAT));
        reqs.extend(request("/api/login", r#"{"user":"a","password":"b"}"#));
        reqs.extend(request("/v1/embeddings", r#"{"model":"e-1","input":"x y"}"#));
        // Pipelined requests in one piece, responses byte by byte.
        t.request_data(&reqs, 1, &mut out);
        let mut resps = response(b"{\"ok\":true}", "");
        resps.extend(response(CHAT_RESP.as_bytes(), ""));
        resps.extend(response(b"{\"token\":\"t\"}", ""));
        resps.extend(response(br#"{"model":"e-1","usage":{"prompt_tokens":2,"total_tokens":2}}"#, ""));
        for (i, b) in resps.iter().enumerate() {
            t.response_data(&[*b], 10 + i as u64, &mut out);
        }
        let apis: Vec<_> = out.iter().map(|o| o.call.api).collect();
        assert_eq!(apis, [ApiKind::ChatCompletions, ApiKind::Embeddings]);
        assert_eq!(out[1].summary.input_tokens, Some(2));
        assert_eq!(t.stats().exchanges, 4);
        assert_eq!(t.stats().ignored_exchanges, 2);
    }

    #[test]
    fn gzip_response_is_decoded() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(CHAT_RESP.as_bytes()).unwrap();
        let body = gz.finish().unwrap();
        let mut t = tracker();
        let mut out = Vec::new();
        t.request_data(&request("/v1/chat/completions", CHAT), 1, &mut out);
        t.response_data(&response(&body, "Content-Encoding: gzip\r\n"), 2, &mut out);
        assert_eq!(out[0].summary.output_tokens, Some(5));
        assert_eq!(out[0].response_bytes, response(&body, "Content-Encoding: gzip\r\n").len() as u64);
    }

    /// Found by the `exchange` fuzz target: a response decoded past the body cap was
    /// inspected only up to the cap, and the decision still said `scan_complete: true`.
    #[test]
    fn a_response_over_the_cap_is_not_reported_as_fully_scanned() {
        let engine = crate::rules::load_engine(&[]).unwrap();
        let inspector = Arc::new(Inspector::new(engine, crate::policy::redact::Redactor::new([7; 32])));
        let mut t = ExchangeTracker::new(Side::Client, 100, Some(inspector));
        let mut out = Vec::new();
        t.request_data(&request("/v1/chat/completions", CHAT), 1, &mut out);
        t.response_data(&response(CHAT_RESP.as_bytes(), ""), 2, &mut out);
        let o = out.pop().expect("one call");
        assert_eq!(o.notes, ["response_body_truncated_at:100"]);
        let decision = o.inspection.expect("rules in force").finish(false);
        assert!(!decision.scan_complete, "{decision:?}");
        assert_eq!(decision.not_scanned, ["response_body_truncated_at:100"]);
    }

    #[test]
    fn sse_stream_usage_is_read() {
        let body = "data: {\"id\":\"c\",\"model\":\"m\",\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n\
                    data: {\"id\":\"c\",\"model\":\"m\",\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
                    data: {\"id\":\"c\",\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":7}}\n\n\
                    data: [DONE]\n\n";
        let req = r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#;
        let mut chunked = String::new();
        for piece in body.as_bytes().chunks(37) {
            chunked.push_str(&format!("{:x}\r\n{}\r\n", piece.len(), std::str::from_utf8(piece).unwrap()));
        }
        chunked.push_str("0\r\n\r\n");
        let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut t = tracker();
        let mut out = Vec::new();
        t.request_data(&request("/v1/chat/completions", req), 1, &mut out);
        t.response_data(head.as_bytes(), 2, &mut out);
        t.response_data(chunked.as_bytes(), 9, &mut out);
        assert_eq!(out.len(), 1);
        let o = &out[0];
        assert!(o.call.stream);
        assert_eq!((o.summary.input_tokens, o.summary.output_tokens), (Some(4), Some(7)));
        assert_eq!(o.summary.finish_reason.as_deref(), Some("stop"));
        assert_eq!((o.response_first_ns, o.response_end_ns), (Some(2), Some(9)));
    }

    #[test]
    fn server_side_sees_the_same_fingerprint() {
        let req = request("/v1/chat/completions", CHAT);
        let resp = response(CHAT_RESP.as_bytes(), "");
        let (mut c, mut s) = (tracker(), ExchangeTracker::new(Side::Server, 1 << 20, None));
        let (mut oc, mut os) = (Vec::new(), Vec::new());
        c.request_data(&req, 1, &mut oc);
        c.response_data(&resp, 2, &mut oc);
        // The server reads the request in odd pieces.
        for piece in req.chunks(7) {
            s.request_data(piece, 1, &mut os);
        }
        s.response_data(&resp, 2, &mut os);
        assert_eq!(oc[0].fingerprint, os[0].fingerprint);
        assert_eq!(os[0].side, Side::Server);
        // A different body gives a different fingerprint.
        let mut other = tracker();
        let mut oo = Vec::new();
        other.request_data(&request("/v1/chat/completions", &CHAT.replace("hi", "ho")), 1, &mut oo);
        other.response_data(&resp, 2, &mut oo);
        assert_ne!(oo[0].fingerprint, oc[0].fingerprint);
    }

    #[test]
    fn connection_end_reports_a_call_without_response() {
        let mut t = tracker();
        let mut out = Vec::new();
        t.request_data(
            &request("/v1/messages", r#"{"model":"claude","max_tokens":5,"messages":[{"role":"user","content":"x"}]}"#),
            1,
            &mut out,
        );
        t.response_data(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"partial", 5, &mut out);
        assert!(out.is_empty());
        t.finish(9, "closed", &mut out);
        assert_eq!(out.len(), 1);
        let o = &out[0];
        assert_eq!(o.call.api, ApiKind::AnthropicMessages);
        assert!(!o.complete);
        assert!(o.notes.iter().any(|n| n == "response_incomplete"), "{:?}", o.notes);
    }

    #[test]
    fn capture_gap_in_a_body_is_noted_and_framing_survives() {
        let mut t = tracker();
        let mut out = Vec::new();
        let req = request("/v1/chat/completions", CHAT);
        t.request_data(&req[..req.len() - 10], 1, &mut out);
        t.request_gap(10, 2, &mut out);
        t.response_data(&response(CHAT_RESP.as_bytes(), ""), 3, &mut out);
        // The next exchange on the connection is still parsed.
        t.request_data(&req, 4, &mut out);
        t.response_data(&response(CHAT_RESP.as_bytes(), ""), 5, &mut out);
        assert_eq!(out.len(), 2, "{out:#?}");
        assert!(!out[0].complete);
        assert!(out[0].notes.iter().any(|n| n.starts_with("request_capture_gap")), "{:?}", out[0].notes);
        assert!(out[1].complete, "{:?}", out[1].notes);
    }

    #[test]
    fn records_carry_no_header_values() {
        let mut t = tracker();
        let mut out = Vec::new();
        t.request_data(&request("/v1/chat/completions", CHAT), 1, &mut out);
        t.response_data(&response(CHAT_RESP.as_bytes(), ""), 2, &mut out);
        assert!(!format!("{:?}", out[0]).contains("sk-secret"));
    }
}
