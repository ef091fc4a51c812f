//! The calls of one HTTP/2 connection: each stream is one request/response exchange, read
//! by the same [`ExchangeTracker`] as an HTTP/1.1 call, so that recognition, bodies (gzip,
//! br, SSE), rules, checkpoints, containment and records are one path for both versions.
//!
//! [`FrameDecoder`]s turn each direction into header lists and DATA pieces; every stream
//! gets its own tracker, fed the stream's messages written out as HTTP/1.1: the
//! pseudo-headers become the request line (`:method`, `:path`), `Host` (`:authority`) and
//! the status line (`:status`); the body is chunked (its DATA frames, as they come), ended
//! by END_STREAM, with trailers as chunked trailers. Connection-specific fields and
//! `Content-Length` are left out (HTTP/2 frames the body itself). A field that could not be
//! written out as HTTP/1.1 (a CR, LF or NUL, or a name that is no lower-case token) makes
//! the stream malformed (RFC 9113 §8.2.1): it is skipped and counted, never passed on.
//!
//! Streams are bounded ([`MAX_STREAMS`] open at once, more are counted and skipped). A
//! RST_STREAM ends its stream's call as it stands (noted `http2_rst_stream:<half>:code=N`);
//! a GOAWAY ends the streams above its last one (`http2_goaway:last_stream=N`). The connection is given up, counted and
//! never guessed at, when a direction cannot be decoded any more: a broken frame, an HPACK
//! error (the header state of that direction is lost for good), or bytes capture missed
//! (HPACK and framing cannot be resynchronised). Open calls are then reported as they
//! stand, with a note saying why.
//!
//! Exchange numbers (for rulings and enforcement) carry the stream id in their upper 32
//! bits. Killing a call kills its connection, and with it every other stream on it: the
//! killed call's record says how many (`http2_connection_killed:other_streams=N`), and each
//! of those says which stream's verdict ended it.

use std::{collections::BTreeMap, sync::Arc};

use super::exchange::{CallTracker, ExchangeStats, ExchangeTracker, Observation, Side};
use crate::{
    policy::{
        Inspector,
        ruling::{Checkpoint, Enforcement, Outcome, Ruling},
    },
    protocol::{
        http1::Limits,
        http2::{FrameDecoder, H2Error, H2Event, H2Limits, HeaderList},
    },
};

/// Streams tracked at once on one connection; more are skipped and counted.
pub const MAX_STREAMS: usize = 256;

/// What HTTP/2 connections counted (added up in the capture stats).
#[derive(Clone, Copy, Debug, Default)]
pub struct Http2Stats {
    pub streams: u64,
    /// Streams not tracked: over [`MAX_STREAMS`] open at once.
    pub streams_over_limit: u64,
    /// Streams whose fields could not be read as HTTP (RFC 9113 §8.2.1) or whose header list
    /// was over its bound.
    pub streams_malformed: u64,
    /// Connections given up, by cause.
    pub given_up_gap: u64,
    pub given_up_hpack: u64,
    pub given_up_frames: u64,
    /// Bytes of control and unknown frames passed over (not errors: counted to account).
    pub control_bytes: u64,
}

impl Http2Stats {
    pub fn add(&mut self, o: &Http2Stats) {
        let Http2Stats {
            streams,
            streams_over_limit,
            streams_malformed,
            given_up_gap,
            given_up_hpack,
            given_up_frames,
            control_bytes,
        } = o;
        self.streams += streams;
        self.streams_over_limit += streams_over_limit;
        self.streams_malformed += streams_malformed;
        self.given_up_gap += given_up_gap;
        self.given_up_hpack += given_up_hpack;
        self.given_up_frames += given_up_frames;
        self.control_bytes += control_bytes;
    }

    pub fn given_up(&self) -> u64 {
        self.given_up_gap + self.given_up_hpack + self.given_up_frames
    }
}

struct Stream {
    tracker: ExchangeTracker,
    /// Each half: its head was written out, and whether its chunked body is still open.
    request_head: bool,
    request_open: bool,
    response_head: bool,
    response_open: bool,
    request_done: bool,
    response_done: bool,
    /// A HEAD request: its response has no body, whatever its fields say.
    head_request: bool,
    /// Notes for the stream's call (a kill of its connection).
    notes: Vec<String>,
}

/// The exchanges of one HTTP/2 connection (see the module doc).
pub struct Http2Exchanges {
    side: Side,
    requests: FrameDecoder,
    responses: FrameDecoder,
    streams: BTreeMap<u32, Stream>,
    /// Highest stream id opened: a lower unknown one is closed (or was skipped).
    highest: u32,
    max_body: usize,
    limits: Limits,
    inspector: Option<Arc<Inspector>>,
    keep_payloads: bool,
    /// Why the connection was given up, once it was.
    given_up: Option<String>,
    events: Vec<H2Event>,
    text: Vec<u8>,
    checkpoints: Vec<Checkpoint>,
    announced: Vec<u64>,
    /// Counts of the trackers of streams already ended.
    ended: ExchangeStats,
    pub h2: Http2Stats,
}

impl Http2Exchanges {
    pub fn new(side: Side, max_body: usize, limits: Limits, inspector: Option<Arc<Inspector>>) -> Self {
        let h2_limits = H2Limits { max_header_list: limits.max_oversized_head_bytes.max(1024), ..H2Limits::default() };
        Self {
            side,
            requests: FrameDecoder::new(true, h2_limits),
            responses: FrameDecoder::new(false, h2_limits),
            streams: BTreeMap::new(),
            highest: 0,
            max_body,
            limits,
            inspector,
            keep_payloads: false,
            given_up: None,
            events: Vec::new(),
            text: Vec::new(),
            checkpoints: Vec::new(),
            announced: Vec::new(),
            ended: ExchangeStats::default(),
            h2: Http2Stats::default(),
        }
    }

    pub fn with_payloads(mut self, keep: bool) -> Self {
        self.keep_payloads = keep;
        self
    }

    /// Why the connection was given up, if it was.
    pub fn given_up(&self) -> Option<&str> {
        self.given_up.as_deref()
    }

    fn feed(&mut self, request: bool, data: &[u8], ts: u64, out: &mut Vec<Observation>) {
        if self.given_up.is_some() {
            return;
        }
        let mut events = std::mem::take(&mut self.events);
        let decoder = if request { &mut self.requests } else { &mut self.responses };
        let result = decoder.feed(data, &mut events);
        let skipped = self.requests.skipped_bytes + self.responses.skipped_bytes;
        self.h2.control_bytes = skipped;
        // What was decoded before an error still counts.
        for ev in events.drain(..) {
            self.event(request, ev, ts, out);
        }
        self.events = events;
        if let Err(e) = result {
            match e {
                H2Error::Hpack(_) | H2Error::HeaderBlockTooLarge(_) => self.h2.given_up_hpack += 1,
                H2Error::Preface | H2Error::Frame { .. } => self.h2.given_up_frames += 1,
            }
            let half = if request { "request" } else { "response" };
            tracing::debug!(error = %e, half, "HTTP/2 connection given up");
            let why = match e {
                H2Error::Hpack(_) | H2Error::HeaderBlockTooLarge(_) => "hpack_error",
                _ => "frame_error",
            };
            self.give_up(format!("http2_{why}:{half}"), ts, out);
        }
    }

    /// Stop parsing the connection: report its open calls as they stand.
    fn give_up(&mut self, why: String, ts: u64, out: &mut Vec<Observation>) {
        let ids: Vec<u32> = self.streams.keys().copied().collect();
        for id in ids {
            self.end_stream_noted(id, why.clone(), ts, out);
        }
        self.given_up = Some(why);
    }

    fn event(&mut self, request: bool, ev: H2Event, ts: u64, out: &mut Vec<Observation>) {
        match ev {
            H2Event::Headers { stream, headers } => self.headers(request, stream, headers, ts, out),
            H2Event::Data { stream, data } => {
                let Some(s) = self.streams.get_mut(&stream) else { return };
                let open = if request { s.request_open } else { s.response_open };
                if !open {
                    return;
                }
                self.text.clear();
                self.text.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                self.write(stream, request, ts, out);
                self.text.extend_from_slice(&data);
                self.text.extend_from_slice(b"\r\n");
                self.write(stream, request, ts, out);
            }
            H2Event::EndStream { stream } => {
                let Some(s) = self.streams.get_mut(&stream) else { return };
                let open = if request { &mut s.request_open } else { &mut s.response_open };
                if std::mem::take(open) {
                    self.text.clear();
                    self.text.extend_from_slice(b"0\r\n\r\n");
                    self.write(stream, request, ts, out);
                }
                self.half_done(stream, request, ts, out);
            }
            H2Event::Reset { stream, code } => {
                let half = if request { "request" } else { "response" };
                self.end_stream_noted(stream, format!("http2_rst_stream:{half}:code={code}"), ts, out);
            }
            H2Event::GoAway { last_stream, .. } => {
                // Streams the sender will not process; which ones depends on who sent it
                // (its peer's streams), and only client streams are tracked.
                let above: Vec<u32> = self.streams.range(last_stream.saturating_add(1)..).map(|(id, _)| *id).collect();
                for id in above {
                    self.end_stream_noted(id, format!("http2_goaway:last_stream={last_stream}"), ts, out);
                }
            }
        }
    }

    fn headers(&mut self, request: bool, stream: u32, headers: HeaderList, ts: u64, out: &mut Vec<Observation>) {
        if request && !self.streams.contains_key(&stream) {
            // A new request: client streams are odd and rise.
            if stream % 2 == 0 || stream <= self.highest {
                return;
            }
            self.highest = stream;
            self.h2.streams += 1;
            if self.streams.len() >= MAX_STREAMS {
                self.h2.streams_over_limit += 1;
                return;
            }
            let tracker = ExchangeTracker::new(self.side, self.max_body, self.inspector.clone())
                .with_head_limits(self.limits)
                .with_payloads(self.keep_payloads)
                .with_first_seq(u64::from(stream) << 32);
            self.streams.insert(
                stream,
                Stream {
                    tracker,
                    request_head: false,
                    request_open: false,
                    response_head: false,
                    response_open: false,
                    request_done: false,
                    response_done: false,
                    head_request: false,
                    notes: Vec::new(),
                },
            );
        }
        let Some(s) = self.streams.get_mut(&stream) else { return };
        let head_written = if request { s.request_head } else { s.response_head };
        self.text.clear();
        let written = if head_written {
            // Trailers end the chunked body.
            let open = if request { &mut s.request_open } else { &mut s.response_open };
            if !std::mem::take(open) {
                return;
            }
            self.text.extend_from_slice(b"0\r\n");
            fields(&headers, &mut self.text).map(|()| self.text.extend_from_slice(b"\r\n"))
        } else if headers.oversized {
            Err("header_list_over_limit")
        } else if request {
            request_head(&headers, &mut self.text)
        } else {
            response_head(&headers, !s.head_request, &mut self.text)
        };
        if let Err(why) = written {
            self.h2.streams_malformed += 1;
            let half = if request { "request" } else { "response" };
            self.end_stream_noted(stream, format!("http2_malformed_{half}:{why}"), ts, out);
            return;
        }
        let s = self.streams.get_mut(&stream).expect("present");
        if !head_written {
            // An interim (1xx) response head leaves the stream waiting for the final one.
            let interim = !request && headers.get(b":status").is_some_and(|v| v.first() == Some(&b'1'));
            let chunked = self.text.ends_with(b"transfer-encoding: chunked\r\n\r\n");
            match request {
                true => {
                    (s.request_head, s.request_open) = (true, chunked);
                    s.head_request = headers.get(b":method") == Some(b"HEAD");
                }
                false if !interim => (s.response_head, s.response_open) = (true, chunked),
                false => {}
            }
        }
        self.write(stream, request, ts, out);
    }

    /// Feed `self.text` to stream `stream`'s tracker.
    fn write(&mut self, stream: u32, request: bool, ts: u64, out: &mut Vec<Observation>) {
        let Some(s) = self.streams.get_mut(&stream) else { return };
        let from = out.len();
        if request {
            s.tracker.request_data(&self.text, ts, out);
        } else {
            s.tracker.response_data(&self.text, ts, out);
        }
        self.text.clear();
        s.tracker.take_checkpoints(&mut self.checkpoints);
        s.tracker.take_announced(&mut self.announced);
        tag(stream, &s.notes, &mut out[from..]);
    }

    fn half_done(&mut self, stream: u32, request: bool, ts: u64, out: &mut Vec<Observation>) {
        let Some(s) = self.streams.get_mut(&stream) else { return };
        if request {
            s.request_done = true;
        } else {
            s.response_done = true;
        }
        if s.request_done && s.response_done {
            self.end_stream(stream, "closed", ts, out);
        }
    }

    /// The stream was cut short by `note` (which its call's record carries).
    fn end_stream_noted(&mut self, stream: u32, note: String, ts: u64, out: &mut Vec<Observation>) {
        let Some(s) = self.streams.get_mut(&stream) else { return };
        s.notes.push(note.clone());
        self.end_stream(stream, &note, ts, out);
    }

    /// The stream is over: its call is reported as it stands.
    fn end_stream(&mut self, stream: u32, reason: &str, ts: u64, out: &mut Vec<Observation>) {
        let Some(mut s) = self.streams.remove(&stream) else { return };
        let from = out.len();
        s.tracker.finish(ts, reason, None, out);
        s.tracker.take_checkpoints(&mut self.checkpoints);
        s.tracker.take_announced(&mut self.announced);
        self.ended.add(&s.tracker.stats());
        tag(stream, &s.notes, &mut out[from..]);
    }

    fn stream_of(seq: u64) -> u32 {
        (seq >> 32) as u32
    }
}

/// Mark observations of `stream` as such.
fn tag(stream: u32, notes: &[String], out: &mut [Observation]) {
    for o in out {
        o.http2_stream = Some(stream);
        o.notes.extend(notes.iter().cloned());
        if !notes.is_empty() {
            o.complete = false;
        }
    }
}

/// Fields HTTP/2 leaves out or frames itself (RFC 9113 §8.2.2), not written out.
const DROPPED: [&[u8]; 7] =
    [b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"content-length", b"te"];

/// Write the regular fields of `headers` as HTTP/1.1 field lines.
fn fields(headers: &HeaderList, text: &mut Vec<u8>) -> Result<(), &'static str> {
    for (name, value) in &headers.fields {
        if name.first() == Some(&b':') {
            continue;
        }
        if name.is_empty() || !name.iter().all(|&b| is_token(b) && !b.is_ascii_uppercase()) {
            return Err("field_name");
        }
        if value.iter().any(|&b| matches!(b, b'\r' | b'\n' | 0)) {
            return Err("field_value");
        }
        if DROPPED.contains(&name.as_slice()) || name == b"host" {
            continue;
        }
        text.extend_from_slice(name);
        text.extend_from_slice(b": ");
        text.extend_from_slice(value);
        text.extend_from_slice(b"\r\n");
    }
    Ok(())
}

fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A pseudo-header's value, if it is safe in a start line (no space, CR, LF or NUL).
fn pseudo<'a>(headers: &'a HeaderList, name: &[u8]) -> Result<&'a [u8], &'static str> {
    let v = headers.get(name).ok_or("pseudo_header_missing")?;
    if v.is_empty() || v.iter().any(|&b| b <= b' ' || b == 0x7f) {
        return Err("pseudo_header_value");
    }
    Ok(v)
}

fn request_head(headers: &HeaderList, text: &mut Vec<u8>) -> Result<(), &'static str> {
    let method = pseudo(headers, b":method")?;
    let path = pseudo(headers, b":path")?;
    text.extend_from_slice(method);
    text.push(b' ');
    text.extend_from_slice(path);
    text.extend_from_slice(b" HTTP/1.1\r\n");
    let host = match headers.get(b":authority") {
        Some(_) => Some(pseudo(headers, b":authority")?),
        None => headers.get(b"host"),
    };
    if let Some(host) = host {
        if host.iter().any(|&b| matches!(b, b'\r' | b'\n' | 0)) {
            return Err("field_value");
        }
        text.extend_from_slice(b"host: ");
        text.extend_from_slice(host);
        text.extend_from_slice(b"\r\n");
    }
    fields(headers, text)?;
    text.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
    Ok(())
}

/// `body`: the response may have a body (not one to HEAD).
fn response_head(headers: &HeaderList, body: bool, text: &mut Vec<u8>) -> Result<(), &'static str> {
    let status = pseudo(headers, b":status")?;
    if status.len() != 3 || !status.iter().all(u8::is_ascii_digit) {
        return Err("pseudo_header_value");
    }
    text.extend_from_slice(b"HTTP/1.1 ");
    text.extend_from_slice(status);
    text.extend_from_slice(b" \r\n");
    fields(headers, text)?;
    // Interim heads, 204 and 304 have no body to frame.
    if body && !matches!(status[0], b'1') && status != b"204" && status != b"304" {
        text.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    text.extend_from_slice(b"\r\n");
    Ok(())
}

impl CallTracker for Http2Exchanges {
    fn side(&self) -> Side {
        self.side
    }

    /// Turns pair HTTP/1.1 exchanges; HTTP/2 pairs by stream.
    fn call_turn(&mut self, _turn: u64) {}

    fn forget_turns(&mut self) {}

    fn request_data(&mut self, data: &[u8], ts: u64, out: &mut Vec<Observation>) {
        self.feed(true, data, ts, out);
    }

    fn response_data(&mut self, data: &[u8], ts: u64, out: &mut Vec<Observation>) {
        self.feed(false, data, ts, out);
    }

    /// HPACK and framing cannot be resynchronised after lost bytes: the connection is given
    /// up, its open calls reported as they stand.
    fn request_gap(&mut self, n: u64, ts: u64, out: &mut Vec<Observation>) {
        if self.given_up.is_none() {
            self.h2.given_up_gap += 1;
            self.give_up(format!("http2_capture_gap:request:{n}"), ts, out);
        }
    }

    fn response_gap(&mut self, n: u64, ts: u64, out: &mut Vec<Observation>) {
        if self.given_up.is_none() {
            self.h2.given_up_gap += 1;
            self.give_up(format!("http2_capture_gap:response:{n}"), ts, out);
        }
    }

    fn take_checkpoints(&mut self, into: &mut Vec<Checkpoint>) {
        into.append(&mut self.checkpoints);
    }

    fn take_announced(&mut self, into: &mut Vec<u64>) {
        into.append(&mut self.announced);
    }

    fn record_ruling(&mut self, seq: u64, ruling: Ruling) {
        if let Some(s) = self.streams.get_mut(&Self::stream_of(seq)) {
            s.tracker.record_ruling(seq, ruling);
        }
    }

    fn record_enforcement(&mut self, seq: u64, enforcement: Enforcement) {
        let stream = Self::stream_of(seq);
        let killed = enforcement.outcome == Outcome::ConnectionKilled;
        let Some(s) = self.streams.get_mut(&stream) else { return };
        s.tracker.record_enforcement(seq, enforcement);
        if !killed {
            return;
        }
        let others: Vec<u32> = self.streams.keys().copied().filter(|&id| id != stream).collect();
        let s = self.streams.get_mut(&stream).expect("present");
        s.notes.push(format!("http2_connection_killed:other_streams={}", others.len()));
        for id in others {
            let s = self.streams.get_mut(&id).expect("listed");
            s.notes.push(format!("http2_connection_killed_for_stream:{stream}"));
        }
    }

    fn finish(&mut self, ts: u64, reason: &str, _last_turn: Option<u64>, out: &mut Vec<Observation>) {
        let ids: Vec<u32> = self.streams.keys().copied().collect();
        for id in ids {
            self.end_stream(id, reason, ts, out);
        }
    }

    fn stats(&self) -> ExchangeStats {
        let mut s = self.ended;
        for stream in self.streams.values() {
            s.add(&stream.tracker.stats());
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;
    use crate::{control::mode::EnforceMode, policy::decision::Half, protocol::http2::PREFACE};

    /// One connection's two directions, written by real HPACK encoders.
    struct Wire {
        client: loona_hpack::Encoder<'static>,
        server: loona_hpack::Encoder<'static>,
    }

    fn frame(frame_type: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, frame_type, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    impl Wire {
        fn new() -> Self {
            Self { client: loona_hpack::Encoder::new(), server: loona_hpack::Encoder::new() }
        }

        fn headers(&mut self, client: bool, stream: u32, fields: &[(&str, &str)], end: bool) -> Vec<u8> {
            let enc = if client { &mut self.client } else { &mut self.server };
            let block = enc.encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
            frame(0x1, 0x4 | u8::from(end), stream, &block)
        }

        fn request(&mut self, stream: u32, path: &str, body: &str) -> (Vec<u8>, Vec<u8>) {
            let fields = [
                (":method", "POST"),
                (":scheme", "https"),
                (":path", path),
                (":authority", "api.openai.com"),
                ("content-type", "application/json"),
                ("authorization", "Bearer sk-secret"),
            ];
            (self.headers(true, stream, &fields, false), frame(0x0, 0x1, stream, body.as_bytes()))
        }
    }

    fn chat(model: &str, stream: bool) -> String {
        format!(r#"{{"model":"{model}","stream":{stream},"messages":[{{"role":"user","content":"hi"}}]}}"#)
    }

    fn answer(model: &str, input: u64, output: u64) -> String {
        format!(
            r#"{{"id":"c1","object":"chat.completion","model":"{model}","choices":[{{"index":0,"message":{{"role":"assistant","content":"yo"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":{input},"completion_tokens":{output},"total_tokens":{}}}}}"#,
            input + output
        )
    }

    fn sse(model: &str) -> Vec<String> {
        vec![
            format!(
                "data: {{\"id\":\"c2\",\"object\":\"chat.completion.chunk\",\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"a\"}}}}]}}\n\n"
            ),
            format!(
                "data: {{\"id\":\"c2\",\"object\":\"chat.completion.chunk\",\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}],\"usage\":{{\"prompt_tokens\":3,\"completion_tokens\":4,\"total_tokens\":7}}}}\n\n"
            ),
            "data: [DONE]\n\n".to_owned(),
        ]
    }

    fn client() -> Http2Exchanges {
        Http2Exchanges::new(Side::Client, 1 << 20, Limits::default(), None)
    }

    fn requests(c: &mut Http2Exchanges, bytes: &[u8], out: &mut Vec<Observation>) {
        // Byte by byte: frames and HPACK blocks cut everywhere.
        for b in bytes.chunks(7) {
            c.request_data(b, 1, out);
        }
    }

    fn responses(c: &mut Http2Exchanges, bytes: &[u8], out: &mut Vec<Observation>) {
        for b in bytes.chunks(5) {
            c.response_data(b, 2, out);
        }
    }

    fn settings() -> Vec<u8> {
        frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100])
    }

    /// Two streams interleaved on one connection, one answered with JSON in gzip, one
    /// streamed with SSE; the streamed one ends first. Each is one call with its own model,
    /// tokens, status and stream id; nothing secret in what comes out.
    #[test]
    fn interleaved_streams_are_separate_calls() {
        let mut w = Wire::new();
        let mut c = client();
        let mut out = Vec::new();
        let (h1, d1) = w.request(1, "/v1/chat/completions", &chat("gpt-a", false));
        let (h3, d3) = w.request(3, "/v1/chat/completions", &chat("gpt-b", true));
        requests(&mut c, &[PREFACE, &settings(), &h1, &h3, &d3, &d1].concat(), &mut out);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(answer("gpt-a", 11, 22).as_bytes()).unwrap();
        let gz = gz.finish().unwrap();
        let mut resp = settings();
        resp.extend(w.headers(
            false,
            1,
            &[(":status", "200"), ("content-type", "application/json"), ("content-encoding", "gzip")],
            false,
        ));
        resp.extend(w.headers(false, 3, &[(":status", "200"), ("content-type", "text/event-stream")], false));
        let (a, b) = gz.split_at(gz.len() / 2);
        resp.extend(frame(0x0, 0, 1, a));
        for event in sse("gpt-b") {
            resp.extend(frame(0x0, 0, 3, event.as_bytes()));
        }
        resp.extend(frame(0x0, 0x1, 3, b""));
        resp.extend(frame(0x0, 0x1, 1, b));
        responses(&mut c, &resp, &mut out);
        let got: Vec<_> = out
            .iter()
            .map(|o| {
                (
                    o.http2_stream,
                    o.call.model.clone(),
                    o.status,
                    o.summary.input_tokens,
                    o.summary.output_tokens,
                    o.complete,
                    o.call.stream,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (Some(3), Some("gpt-b".into()), Some(200), Some(3), Some(4), true, true),
                (Some(1), Some("gpt-a".into()), Some(200), Some(11), Some(22), true, false),
            ],
            "{out:#?}"
        );
        assert_eq!(out[0].host.as_deref(), Some("api.openai.com"));
        assert_eq!(out[0].target.as_deref(), Some("/v1/chat/completions"));
        assert!(!format!("{out:?}").contains("sk-secret"));
        assert!(c.streams.is_empty(), "closed streams are forgotten");
        assert_eq!((c.h2.streams, c.h2.given_up()), (2, 0));
    }

    /// RST_STREAM ends its call as it stands; the other stream goes on.
    #[test]
    fn a_reset_stream_ends_its_call_only() {
        let mut w = Wire::new();
        let mut c = client();
        let mut out = Vec::new();
        let (h1, d1) = w.request(1, "/v1/chat/completions", &chat("gpt-a", false));
        let (h3, d3) = w.request(3, "/v1/chat/completions", &chat("gpt-b", false));
        requests(&mut c, &[PREFACE, &h1, &d1, &h3, &d3].concat(), &mut out);
        let mut resp = w.headers(false, 1, &[(":status", "200"), ("content-type", "application/json")], false);
        resp.extend(frame(0x3, 0, 1, &[0, 0, 0, 8]));
        let body = answer("gpt-b", 1, 2);
        resp.extend(w.headers(false, 3, &[(":status", "200"), ("content-type", "application/json")], false));
        resp.extend(frame(0x0, 0x1, 3, body.as_bytes()));
        responses(&mut c, &resp, &mut out);
        assert_eq!(out.len(), 2, "{out:#?}");
        assert_eq!((out[0].http2_stream, out[0].complete), (Some(1), false));
        assert!(out[0].notes.iter().any(|n| n == "http2_rst_stream:response:code=8"), "{:?}", out[0].notes);
        assert_eq!((out[1].http2_stream, out[1].complete, out[1].summary.output_tokens), (Some(3), true, Some(2)));
    }

    /// An HPACK error loses the direction's header state: the connection is given up, its
    /// open calls reported with why, and nothing after is parsed.
    #[test]
    fn an_hpack_error_gives_the_connection_up() {
        let mut w = Wire::new();
        let mut c = client();
        let mut out = Vec::new();
        let (h1, d1) = w.request(1, "/v1/chat/completions", &chat("gpt-a", false));
        requests(&mut c, &[PREFACE, &h1, &d1].concat(), &mut out);
        responses(&mut c, &frame(0x1, 0x4, 1, &[0x80 | 90]), &mut out);
        assert_eq!(out.len(), 1);
        assert!(out[0].notes.iter().any(|n| n == "http2_hpack_error:response"), "{:?}", out[0].notes);
        assert_eq!(c.h2.given_up_hpack, 1);
        let (h3, d3) = w.request(3, "/v1/chat/completions", &chat("gpt-b", false));
        requests(&mut c, &[h3, d3].concat(), &mut out);
        c.finish(3, "closed", None, &mut out);
        assert_eq!(out.len(), 1, "nothing is parsed after the error");
    }

    /// A gap in captured bytes cannot be resynchronised: given up and counted.
    #[test]
    fn a_capture_gap_gives_the_connection_up() {
        let mut w = Wire::new();
        let mut c = client();
        let mut out = Vec::new();
        let (h1, _) = w.request(1, "/v1/chat/completions", &chat("gpt-a", false));
        requests(&mut c, &[PREFACE, &h1].concat(), &mut out);
        c.request_gap(100, 2, &mut out);
        assert_eq!(out.len(), 1);
        assert!(!out[0].complete);
        assert!(out[0].notes.iter().any(|n| n.contains("http2_capture_gap:request:100")), "{:?}", out[0].notes);
        assert_eq!(c.h2.given_up_gap, 1);
    }

    /// Streams over the bound are counted and skipped; a field that would smuggle a line
    /// into the HTTP/1.1 form makes its stream malformed.
    #[test]
    fn streams_are_bounded_and_malformed_ones_skipped() {
        let mut w = Wire::new();
        let mut c = client();
        let mut out = Vec::new();
        let mut bytes = PREFACE.to_vec();
        for i in 0..(MAX_STREAMS as u32 + 10) {
            let (h, _) = w.request(2 * i + 1, "/v1/chat/completions", &chat("m", false));
            bytes.extend(h);
        }
        requests(&mut c, &bytes, &mut out);
        assert_eq!((c.streams.len(), c.h2.streams_over_limit), (MAX_STREAMS, 10));
        let mut c = client();
        let bad = w.headers(
            true,
            1,
            &[(":method", "POST"), (":path", "/v1/chat/completions"), ("x-a", "1\r\ncontent-length: 0")],
            false,
        );
        let upper =
            w.headers(true, 3, &[(":method", "POST"), (":path", "/v1/chat/completions"), ("X-Upper", "1")], false);
        let no_path = w.headers(true, 5, &[(":method", "POST")], false);
        requests(&mut c, &[PREFACE, &bad, &upper, &no_path].concat(), &mut out);
        assert_eq!((c.h2.streams_malformed, c.streams.len()), (3, 0));
    }

    /// Killing a call kills its connection: its record and the other open streams' say so.
    #[test]
    fn a_kill_of_one_stream_is_said_on_every_stream_of_the_connection() {
        let mut w = Wire::new();
        let mut c = client();
        let mut out = Vec::new();
        let (h1, d1) = w.request(1, "/v1/chat/completions", &chat("gpt-a", false));
        let (h3, d3) = w.request(3, "/v1/chat/completions", &chat("gpt-b", false));
        requests(&mut c, &[PREFACE, &h1, &d1, &h3, &d3].concat(), &mut out);
        let enforcement = Enforcement {
            by: "operator:b1".into(),
            half: Half::Request,
            mode: EnforceMode::Enforce,
            outcome: Outcome::ConnectionKilled,
            detail: None,
            connections_killed: 1,
            verdict_to_kill_us: Some(5),
            bytes_out_after_verdict: 0,
            bytes_in_after_verdict: 0,
        };
        c.record_enforcement(3 << 32, enforcement);
        c.finish(3, "closed", None, &mut out);
        assert_eq!(out.len(), 2);
        let one = out.iter().find(|o| o.http2_stream == Some(1)).unwrap();
        let three = out.iter().find(|o| o.http2_stream == Some(3)).unwrap();
        assert!(three.enforcement.is_some());
        assert!(three.notes.iter().any(|n| n == "http2_connection_killed:other_streams=1"), "{:?}", three.notes);
        assert!(one.notes.iter().any(|n| n == "http2_connection_killed_for_stream:3"), "{:?}", one.notes);
    }

    /// Trailers, an interim 100 head, a HEAD request and padding on the response side.
    #[test]
    fn trailers_interim_heads_and_head_requests() {
        let mut w = Wire::new();
        let mut c = client();
        let mut out = Vec::new();
        let (h1, d1) = w.request(1, "/v1/chat/completions", &chat("gpt-a", false));
        let head = w.headers(true, 3, &[(":method", "HEAD"), (":path", "/v1/models"), (":authority", "a")], true);
        requests(&mut c, &[PREFACE, &h1, &d1, &head].concat(), &mut out);
        let mut resp = w.headers(false, 3, &[(":status", "200"), ("content-length", "99")], true);
        resp.extend(w.headers(false, 1, &[(":status", "100")], false));
        resp.extend(w.headers(false, 1, &[(":status", "200"), ("content-type", "application/json")], false));
        let body = answer("gpt-a", 5, 6);
        let mut padded = vec![4];
        padded.extend_from_slice(body.as_bytes());
        padded.extend_from_slice(&[0; 4]);
        resp.extend(frame(0x0, 0x8, 1, &padded));
        resp.extend(w.headers(false, 1, &[("grpc-status", "0")], true));
        responses(&mut c, &resp, &mut out);
        assert_eq!(out.len(), 1, "the HEAD is no model call: {out:#?}");
        assert_eq!((out[0].complete, out[0].summary.output_tokens), (true, Some(6)), "{:?}", out[0].notes);
        let stats = c.stats();
        assert_eq!((stats.parse_errors, stats.skipped_bytes), (0, 0), "{stats:?}");
    }
}
