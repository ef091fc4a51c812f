//! Incremental HTTP/1.1 parser for one direction of one connection.
//!
//! Bytes arrive in arbitrary pieces; the parser is a state machine that keeps only what
//! it must: the head being read (at most `Limits::max_head_bytes`), a few counters inside
//! chunked framing, and, for responses, the queue of request methods that decide whether
//! a response has a body. Body bytes are handed on at once as [`HttpEvent::Body`]
//! pieces, never accumulated.
//!
//! A head over `Limits::max_head_bytes` or `Limits::max_headers` is not given up: a large
//! head must not hide its message (two 40 KB headers in front of a model call would
//! otherwise make the call invisible). It is read on, up to
//! `Limits::max_oversized_head_bytes`, keeping only the start line (a request target cut
//! to fit) and the fields that frame and identify the message ([`FRAMING_FIELDS`]); the
//! head says what it did not keep ([`MessageHead::skimmed`]). A head that still cannot be
//! read (past that bound, a malformed field, a capture gap) after its start line was gives
//! [`HttpEvent::Unparsed`] with the start line, so that the message is still known to
//! exist: a request is answered by a response, whether its head was parsed or not. Past
//! the bound the head is still followed to its end by the same rules, and its body, framed
//! by the fields kept, is skipped (counted, no events): the stream stays in step with its
//! messages instead of resyncing inside a body.
//!
//! Message framing follows RFC 9112 §6.3: `Transfer-Encoding: chunked` wins over
//! `Content-Length`; several `Content-Length` fields, or a list, are refused; a request
//! without either has no body; a response without either runs until the connection
//! closes; 1xx, 204, 304 and responses to HEAD have no body. After a 101 or a 2xx to
//! CONNECT the stream is no longer HTTP: its bytes are counted in
//! [`Http1Parser::skipped_bytes`] and not parsed. Empty lines before a start line are
//! ignored (RFC 9112 §2.2), bare LF ends a line like CRLF, obsolete line folding is
//! joined with a space.
//!
//! Events: every `Head` is followed by its `Body` pieces and exactly one `End`. On an
//! error inside a message its `End { complete: false }` comes first, then `Error`; the
//! parser then resyncs: it discards bytes up to a line start that begins like a start
//! line (`TOKEN SP TARGET SP HTTP/1.` for requests, `HTTP/1.` for responses) and goes on
//! from there. One `Error` is emitted per resync; heads that fail while resyncing are
//! discarded silently. Every discarded byte is counted in `skipped_bytes`.
//!
//! Capture gaps ([`Http1Parser::gap`]) inside a body of known length (Content-Length, or
//! the current chunk's data) are skipped ([`HttpEvent::BodyGap`]) and make the message
//! incomplete; a gap anywhere else is an `Error { error: Gap }` and a resync.
//!
//! The parser never panics: every index is bounded by what was checked, and arithmetic on
//! lengths taken from the wire is checked.

use std::collections::VecDeque;

use bytes::Bytes;

/// Bounds applied to hostile input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Head bytes kept and parsed whole: request line or status line and header lines.
    pub max_head_bytes: usize,
    /// Header fields kept.
    pub max_headers: usize,
    /// A head past either bound above is still read to its end, up to this many bytes in
    /// all, keeping only its start line and its [`FRAMING_FIELDS`] (see the module doc);
    /// past it the head is given up ([`HttpEvent::Unparsed`]). At most `max_head_bytes`:
    /// over-limit heads are given up at once, as they were before skimming existed.
    pub max_oversized_head_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_head_bytes: 64 * 1024, max_headers: 128, max_oversized_head_bytes: 1024 * 1024 }
    }
}

/// The fields a head over the limits keeps: the message's framing (RFC 9112 §6) and what
/// identifies a model call (its host, its body's type and coding). Lower case.
pub const FRAMING_FIELDS: [&str; 5] =
    ["content-length", "transfer-encoding", "content-encoding", "content-type", "host"];

/// Bytes a head over the limits may keep for its [`FRAMING_FIELDS`] beyond
/// `Limits::max_head_bytes`.
const SKIM_RESERVE: usize = 16 * 1024;
/// Room left after a cut request target for ` HTTP/1.1` and the line end.
const START_RESERVE: usize = 16;
/// Bytes of a field name that can be one of [`FRAMING_FIELDS`] ("transfer-encoding").
const FRAMING_NAME_MAX: usize = 17;

/// What a head over the limits did not keep (see [`MessageHead::skimmed`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Skimmed {
    /// Bytes of header lines read and not kept.
    pub bytes_not_kept: u64,
    /// Header fields not kept.
    pub fields_not_kept: u64,
    /// Bytes of the request target past the part kept (the target was cut).
    pub target_bytes_cut: u64,
}

/// Which kind of message this byte stream carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    Requests,
    Responses,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Lower-cased field name.
    pub name: String,
    /// Raw value bytes, surrounding whitespace trimmed.
    pub value: Bytes,
}

/// Request line or status line and the header fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageHead {
    /// Requests only.
    pub method: Option<String>,
    /// Requests only: the request target as sent (origin-form, or absolute-form).
    pub target: Option<String>,
    /// Responses only.
    pub status: Option<u16>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    pub headers: Vec<Header>,
    /// Bytes of the head on the wire (start line + headers + blank line), kept or not.
    pub wire_len: usize,
    /// The head was over the limits: what of it was not kept (`None`: all of it was).
    pub skimmed: Option<Skimmed>,
}

impl MessageHead {
    /// First value of a header (name compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| &h.value[..])
    }
}

/// Why the parser gave up on the stream.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("malformed start line")]
    BadStartLine,
    #[error("malformed header line")]
    BadHeader,
    #[error("head larger than {0} bytes")]
    HeadTooLarge(usize),
    #[error("more than {0} header fields")]
    TooManyHeaders(usize),
    #[error("invalid Content-Length")]
    BadContentLength,
    #[error("malformed chunked encoding")]
    BadChunk,
    #[error("bytes missing from the capture")]
    Gap,
}

/// What the parser found, in stream order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpEvent {
    /// A message starts.
    Head(MessageHead),
    /// Body bytes, de-chunked but still content-encoded. Wire bytes, not copies of
    /// headers; may arrive in many pieces.
    Body(Bytes),
    /// This many bytes of the current message's body were lost to a capture gap.
    BodyGap(u64),
    /// A message whose start line was read but not the rest of its head (over
    /// `Limits::max_oversized_head_bytes`, a malformed field, a capture gap): `head` has the
    /// start line, the fields read well so far, and the bytes read of it in `wire_len`.
    /// Not followed by an
    /// `End`: the `Error` that starts the resync follows (unless one is in progress), and the
    /// message's body, whose framing is unknown, is discarded while resyncing.
    Unparsed { head: MessageHead, error: ParseError },
    /// The message ended. `complete` is false when it was cut short (connection ended,
    /// capture gap) before its declared length.
    End { complete: bool },
    /// The stream cannot be parsed from here on; `skipped` counts the bytes discarded
    /// so far in this resync (the parser looks for the next start line).
    Error { error: ParseError, skipped: u64 },
}
/// Responses only: most request methods queued by `expect_response_to` awaiting their
/// response; past this the oldest is dropped, so memory stays bounded when responses
/// are never seen.
pub const MAX_PENDING_REQUESTS: usize = 1024;

/// What the request method means for its response's body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RequestMethod {
    Head,
    Connect,
    Other,
}

/// Incremental parser of one direction of an HTTP/1.1 connection.
pub struct Http1Parser {
    kind: StreamKind,
    limits: Limits,
    state: State,
    head: HeadBuf,
    /// Looking for a start line after an error: until the next head parses, failures are
    /// silent (the error was already reported).
    resyncing: bool,
    /// The current message lost bytes to a capture gap.
    incomplete: bool,
    /// The current message was given up past the oversized-head bound: its head and body
    /// are followed to keep in step, but yield no events (their bytes count as skipped).
    mute: bool,
    requests: VecDeque<RequestMethod>,
    skipped: u64,
}

#[derive(Clone, Copy, Debug)]
enum State {
    /// Before or inside a message head (see `head`).
    Head,
    /// Resyncing: discard up to the end of the line, then look for a start line.
    Discard,
    /// Content-Length body.
    Fixed {
        remaining: u64,
    },
    ChunkSize(ChunkSize),
    ChunkData {
        remaining: u64,
    },
    /// The CRLF after a chunk's data.
    ChunkDataEnd {
        cr: bool,
    },
    Trailers(Trailers),
    /// A response body delimited by the end of the connection.
    UntilClose,
    /// After a protocol switch: not HTTP any more.
    Tunnel,
}

/// The head being read.
struct HeadBuf {
    buf: Vec<u8>,
    /// How far the start line matches the expected shape.
    start: StartMatch,
    /// Offset in `buf` of the line being read (0 until the start line is complete).
    line_start: usize,
    /// Header fields kept so far (continuation lines excluded).
    fields: usize,
    /// The head went over the limits: it is read on, keeping only what frames it.
    skim: Option<Skim>,
}

impl HeadBuf {
    fn new(kind: StreamKind) -> Self {
        Self { buf: Vec::new(), start: StartMatch::new(kind), line_start: 0, fields: 0, skim: None }
    }

    /// Forget the head, keeping the allocation.
    fn clear(&mut self, kind: StreamKind) {
        self.buf.clear();
        self.start = StartMatch::new(kind);
        self.line_start = 0;
        self.fields = 0;
        self.skim = None;
    }

    /// Bytes of this head read so far, kept or not.
    fn wire(&self) -> usize {
        let skimmed = self.skim.map_or(0, |s| {
            let pending = match s.line {
                SkimLine::BlankCr => 1,
                SkimLine::Name { len, .. } => len,
                _ => 0,
            };
            (s.counts.bytes_not_kept + s.counts.target_bytes_cut) as usize + pending
        });
        let synthetic = self.skim.map_or(0, |s| s.synthetic);
        self.buf.len() + skimmed - synthetic
    }
}

/// Reading a head past the limits: each line is kept whole (the start line, framing
/// fields and their continuations) or counted and dropped as it streams by.
#[derive(Clone, Copy, Debug)]
struct Skim {
    counts: Skimmed,
    /// Bytes in the buffer that were never on the wire: the line end given to a start line
    /// whose rest (and real line end) was counted as not kept.
    synthetic: usize,
    line: SkimLine,
    /// The last field was kept: its continuation lines are kept too.
    last_kept: bool,
    /// Past `Limits::max_oversized_head_bytes`: the message was reported unparsed and is
    /// followed muted (see the module doc).
    over_bound: bool,
}

impl Skim {
    fn new(line: SkimLine) -> Self {
        Self { counts: Skimmed::default(), synthetic: 0, line, last_kept: false, over_bound: false }
    }
}

#[derive(Clone, Copy, Debug)]
enum SkimLine {
    /// At the start of a line.
    Start,
    /// A CR at the start of a line: the blank line ending the head if LF follows.
    BlankCr,
    /// A field name: its first bytes, lower-cased, and its length so far (not yet kept).
    Name { name: [u8; FRAMING_NAME_MAX], len: usize },
    /// The rest of a kept line, buffered.
    Keep,
    /// The rest of a line not kept.
    Skip,
}

/// Byte-at-a-time matcher of the beginning of a start line, up to and including
/// `HTTP/1.`, so that garbage is refused at its first byte rather than buffered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StartMatch {
    /// Request method: `len` token bytes so far.
    Method {
        len: usize,
    },
    TargetStart,
    Target,
    /// `k` bytes of "HTTP/1." matched.
    Version(usize),
    Matched,
}

const VERSION_PREFIX: &[u8] = b"HTTP/1.";

impl StartMatch {
    fn new(kind: StreamKind) -> Self {
        match kind {
            StreamKind::Requests => StartMatch::Method { len: 0 },
            StreamKind::Responses => StartMatch::Version(0),
        }
    }

    /// The next state, or None if `b` cannot continue a start line.
    fn push(self, b: u8) -> Option<Self> {
        match self {
            StartMatch::Method { len } if is_tchar(b) => Some(StartMatch::Method { len: len + 1 }),
            StartMatch::Method { len } if len > 0 && b == b' ' => Some(StartMatch::TargetStart),
            StartMatch::TargetStart | StartMatch::Target if is_target_byte(b) => Some(StartMatch::Target),
            StartMatch::Target if b == b' ' => Some(StartMatch::Version(0)),
            StartMatch::Version(k) if VERSION_PREFIX.get(k) == Some(&b) => {
                Some(if k + 1 == VERSION_PREFIX.len() { StartMatch::Matched } else { StartMatch::Version(k + 1) })
            }
            _ => None,
        }
    }
}

/// Progress through a chunk-size line: `1a;name=value CRLF`.
#[derive(Clone, Copy, Debug, Default)]
struct ChunkSize {
    size: u64,
    /// At least one hex digit seen.
    digits: bool,
    /// Whitespace after the digits: only an extension or the line end may follow.
    after_digits: bool,
    in_extension: bool,
    cr: bool,
    /// Bytes of the line so far (bounded by `max_head_bytes`).
    len: usize,
}

/// Progress through the trailer section (parsed for its end, not reported).
#[derive(Clone, Copy, Debug, Default)]
struct Trailers {
    /// Bytes of the section so far (bounded by `max_head_bytes`).
    bytes: usize,
    /// Bytes of the current line so far.
    line_len: usize,
    /// The current line's last byte so far is CR.
    cr_last: bool,
    fields: usize,
}

/// How a message's body is delimited.
enum Framing {
    Empty,
    /// No body, and the connection leaves HTTP after this message.
    EmptyThenTunnel,
    Fixed(u64),
    Chunked,
    UntilClose,
}

impl Http1Parser {
    pub fn new(kind: StreamKind, limits: Limits) -> Self {
        Self {
            kind,
            limits,
            state: State::Head,
            head: HeadBuf::new(kind),
            resyncing: false,
            incomplete: false,
            mute: false,
            requests: VecDeque::new(),
            skipped: 0,
        }
    }

    /// Responses only: the next response answers a request with this method (HEAD and
    /// CONNECT responses have no body). Called once per request, in request order.
    pub fn expect_response_to(&mut self, method: &str) {
        if self.kind != StreamKind::Responses {
            return;
        }
        if self.requests.len() == MAX_PENDING_REQUESTS {
            self.requests.pop_front();
        }
        self.requests.push_back(match method {
            "HEAD" => RequestMethod::Head,
            "CONNECT" => RequestMethod::Connect,
            _ => RequestMethod::Other,
        });
    }

    /// Parse `data`; push what was found to `out`.
    pub fn feed(&mut self, mut data: &[u8], out: &mut Vec<HttpEvent>) {
        // Every step consumes at least one byte, or moves to a state that will.
        while !data.is_empty() {
            let used = match self.state {
                State::Head => self.head_bytes(data, out),
                State::Discard => {
                    let used = memchr::memchr(b'\n', data).map_or(data.len(), |lf| {
                        self.state = State::Head;
                        lf + 1
                    });
                    self.skipped += used as u64;
                    used
                }
                State::Fixed { remaining } => {
                    let used = self.body(remaining, data, out);
                    if used as u64 == remaining {
                        self.end_message(out);
                    } else {
                        self.state = State::Fixed { remaining: remaining - used as u64 };
                    }
                    used
                }
                State::ChunkSize(size) => self.chunk_size(size, data, out),
                State::ChunkData { remaining } => {
                    let used = self.body(remaining, data, out);
                    self.state = if used as u64 == remaining {
                        State::ChunkDataEnd { cr: false }
                    } else {
                        State::ChunkData { remaining: remaining - used as u64 }
                    };
                    used
                }
                State::ChunkDataEnd { cr } => match data[0] {
                    b'\r' if !cr => {
                        self.state = State::ChunkDataEnd { cr: true };
                        1
                    }
                    b'\n' => {
                        self.state = State::ChunkSize(ChunkSize::default());
                        1
                    }
                    _ => {
                        self.fail(ParseError::BadChunk, 0, false, out);
                        0
                    }
                },
                State::Trailers(trailers) => self.trailers(trailers, data, out),
                State::UntilClose => self.body(u64::MAX, data, out),
                State::Tunnel => {
                    self.skipped += data.len() as u64;
                    data.len()
                }
            };
            data = &data[used..];
        }
    }

    /// `n` bytes are missing from the stream at this point (capture drop).
    pub fn gap(&mut self, n: u64, out: &mut Vec<HttpEvent>) {
        if n == 0 {
            return;
        }
        match self.state {
            State::Fixed { remaining } => {
                self.incomplete = true;
                self.body_gap(n.min(remaining), out);
                if n < remaining {
                    self.state = State::Fixed { remaining: remaining - n };
                } else {
                    self.end_message(out);
                    if n > remaining {
                        // The rest of the gap swallowed (part of) what came next.
                        self.fail(ParseError::Gap, 0, true, out);
                    }
                }
            }
            State::ChunkData { remaining } if n <= remaining => {
                self.incomplete = true;
                self.body_gap(n, out);
                self.state = if n == remaining {
                    State::ChunkDataEnd { cr: false }
                } else {
                    State::ChunkData { remaining: remaining - n }
                };
            }
            State::UntilClose => {
                self.incomplete = true;
                self.body_gap(n, out);
            }
            State::Tunnel => {}
            // The gap may end at a message boundary: look for a start line right away.
            _ => self.fail(ParseError::Gap, self.head.wire() as u64, true, out),
        }
    }

    /// Whether a capture gap of `n` bytes here falls inside the current message's body
    /// (then it cannot have held whole messages).
    pub fn absorbs_gap(&self, n: u64) -> bool {
        match self.state {
            State::Fixed { remaining } | State::ChunkData { remaining } => n <= remaining,
            State::UntilClose | State::Tunnel => true,
            _ => n == 0,
        }
    }

    /// The connection ended: ends a close-delimited body, or a message cut short.
    pub fn finish(&mut self, out: &mut Vec<HttpEvent>) {
        match self.state {
            // A head cut short: its bytes are lost.
            State::Head => self.skipped += self.head.wire() as u64,
            State::UntilClose => self.end_message(out),
            State::Fixed { .. }
            | State::ChunkSize(_)
            | State::ChunkData { .. }
            | State::ChunkDataEnd { .. }
            | State::Trailers(_) => {
                if !self.mute {
                    out.push(HttpEvent::End { complete: false });
                }
            }
            State::Discard | State::Tunnel => {}
        }
        self.state = State::Head;
        self.head.clear(self.kind);
        self.resyncing = false;
        self.incomplete = false;
        self.mute = false;
        self.requests.clear();
    }

    /// Bytes discarded so far: while resyncing after errors, of heads cut short by
    /// `finish`, and after a protocol switch (101, CONNECT).
    pub fn skipped_bytes(&self) -> u64 {
        self.skipped
    }

    /// Whether a message's head was emitted and its `End` not yet.
    fn in_message(&self) -> bool {
        matches!(
            self.state,
            State::Fixed { .. }
                | State::ChunkSize(_)
                | State::ChunkData { .. }
                | State::ChunkDataEnd { .. }
                | State::Trailers(_)
                | State::UntilClose
        )
    }

    /// Give up on the stream here: end the message in progress, report the error (once
    /// per resync), and look for the next start line, right away if `at_line_start`.
    /// `discarded` bytes were consumed and are lost.
    fn fail(&mut self, error: ParseError, discarded: u64, at_line_start: bool, out: &mut Vec<HttpEvent>) {
        if self.in_message() && !std::mem::take(&mut self.mute) {
            out.push(HttpEvent::End { complete: false });
        }
        // A head given up after its start line: the message exists all the same. Said even
        // while resyncing, since a whole start line at a line start is a message.
        let reported = self.head.skim.is_some_and(|s| s.over_bound);
        if matches!(self.state, State::Head) && self.head.line_start > 0 && !reported {
            let wire = self.head.wire();
            self.unparsed(&self.head.buf[..self.head.line_start], wire, error.clone(), out);
        }
        self.skipped += discarded;
        if !self.resyncing {
            self.resyncing = true;
            out.push(HttpEvent::Error { error, skipped: discarded });
        }
        self.head.clear(self.kind);
        self.state = if at_line_start { State::Head } else { State::Discard };
    }

    fn end_message(&mut self, out: &mut Vec<HttpEvent>) {
        if !std::mem::take(&mut self.mute) {
            out.push(HttpEvent::End { complete: !self.incomplete });
        }
        self.state = State::Head;
    }

    fn body_gap(&mut self, n: u64, out: &mut Vec<HttpEvent>) {
        if !self.mute {
            out.push(HttpEvent::BodyGap(n));
        }
    }

    /// Report a message whose head failed after its start line, from `kept` (its complete
    /// lines read so far: the start line, and fields), `wire` bytes of it read. A start
    /// line that does not parse is no message. Fields that read well are kept (the Host a
    /// stop needs to find the connection); the others are left out.
    fn unparsed(&self, kept: &[u8], wire: usize, error: ParseError, out: &mut Vec<HttpEvent>) {
        let mut lines = kept.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
        let mut head = MessageHead {
            method: None,
            target: None,
            status: None,
            minor_version: 0,
            headers: Vec::new(),
            wire_len: wire,
            skimmed: None,
        };
        if parse_start_line(self.kind, lines.next().unwrap_or_default(), &mut head).is_err() {
            return;
        }
        for line in lines {
            let Some(colon) = memchr::memchr(b':', line) else { continue };
            let name = &line[..colon];
            if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
                continue;
            }
            head.headers.push(Header {
                name: String::from_utf8_lossy(name).to_ascii_lowercase(),
                value: Bytes::copy_from_slice(line[colon + 1..].trim_ascii()),
            });
        }
        out.push(HttpEvent::Unparsed { head, error });
    }

    /// Emit up to `limit` bytes of `data` as body; returns how many.
    fn body(&mut self, limit: u64, data: &[u8], out: &mut Vec<HttpEvent>) -> usize {
        let n = data.len().min(usize::try_from(limit).unwrap_or(usize::MAX));
        if self.mute {
            self.skipped += n as u64;
        } else {
            out.push(HttpEvent::Body(Bytes::copy_from_slice(&data[..n])));
        }
        n
    }

    /// State::Head: buffer head bytes, a line at a time once the start line is known to
    /// look right.
    fn head_bytes(&mut self, data: &[u8], out: &mut Vec<HttpEvent>) -> usize {
        let max = self.limits.max_head_bytes;
        if self.head.start != StartMatch::Matched {
            for (i, &b) in data.iter().enumerate() {
                if self.head.buf.is_empty() && (b == b'\r' || b == b'\n') {
                    // Empty lines before a start line are allowed (RFC 9112 §2.2).
                    if self.resyncing {
                        self.skipped += 1;
                    }
                    continue;
                }
                let Some(next) = self.head.start.push(b) else {
                    self.fail(ParseError::BadStartLine, self.head.wire() as u64 + 1, b == b'\n', out);
                    return i + 1;
                };
                if next == StartMatch::Target && self.skimming() && self.head.buf.len() + START_RESERVE >= max {
                    // A request target too long to keep: cut it, read on.
                    let skim = self.head.skim.get_or_insert(Skim::new(SkimLine::Keep));
                    skim.counts.target_bytes_cut += 1;
                    self.head.start = next;
                    if self.head.wire() > self.limits.max_oversized_head_bytes {
                        let limit = self.limits.max_oversized_head_bytes;
                        self.fail(ParseError::HeadTooLarge(limit), self.head.wire() as u64, false, out);
                        return i + 1;
                    }
                    continue;
                }
                if self.head.buf.len() >= max {
                    self.fail(ParseError::HeadTooLarge(max), self.head.wire() as u64, false, out);
                    return i;
                }
                self.head.buf.push(b);
                self.head.start = next;
                if next == StartMatch::Matched {
                    return i + 1;
                }
            }
            return data.len();
        }
        if self.head.skim.is_some() {
            return self.skim(data, out);
        }
        let room = max.saturating_sub(self.head.buf.len());
        let window = &data[..data.len().min(room)];
        match memchr::memchr(b'\n', window) {
            Some(lf) => {
                self.head.buf.extend_from_slice(&window[..=lf]);
                self.head_line(out);
                lf + 1
            }
            None => {
                self.head.buf.extend_from_slice(window);
                if data.len() > room {
                    self.over_limit(ParseError::HeadTooLarge(max), out);
                }
                window.len()
            }
        }
    }

    /// Whether a head over the limits is read on (see [`Limits::max_oversized_head_bytes`]).
    fn skimming(&self) -> bool {
        self.limits.max_oversized_head_bytes > self.limits.max_head_bytes
    }

    /// The head being read went over a limit (`error`) in the line it is reading: read on,
    /// keeping only what frames it, or give it up when skimming is off.
    fn over_limit(&mut self, error: ParseError, out: &mut Vec<HttpEvent>) {
        if !self.skimming() {
            self.fail(error, self.head.wire() as u64, false, out);
            return;
        }
        if self.head.line_start == 0 {
            // The start line itself (a long reason phrase): keep what is buffered of it.
            self.head.skim = Some(Skim::new(SkimLine::Skip));
            return;
        }
        // The line in progress is read again, by the rules of skimming.
        let line = self.head.buf.split_off(self.head.line_start);
        self.head.skim = Some(Skim::new(SkimLine::Start));
        let used = self.skim(&line, out);
        debug_assert!(used == line.len() || self.head.skim.is_none(), "a partial line does not end the head");
    }

    /// State::Head past the limits: keep the start line and the framing fields, count the
    /// rest. Returns the bytes used; the head completes or fails on the way.
    fn skim(&mut self, data: &[u8], out: &mut Vec<HttpEvent>) -> usize {
        let max_kept = self.limits.max_head_bytes + SKIM_RESERVE;
        let mut i = 0;
        while i < data.len() {
            let wire = self.head.wire();
            let bound = self.limits.max_oversized_head_bytes;
            let Some(skim) = &mut self.head.skim else { return i };
            let allowed = if skim.over_bound { usize::MAX } else { bound.saturating_sub(wire) };
            if allowed == 0 {
                // Given up as a message, followed on to its end (see the module doc).
                skim.over_bound = true;
                if self.head.line_start > 0 {
                    self.unparsed(&self.head.buf[..self.head.line_start], wire, ParseError::HeadTooLarge(bound), out);
                }
                continue;
            }
            let b = data[i];
            match skim.line {
                SkimLine::Start => match b {
                    b'\n' => {
                        self.head.buf.push(b);
                        self.complete_head(out);
                        return i + 1;
                    }
                    b'\r' => skim.line = SkimLine::BlankCr,
                    b' ' | b'\t' => {
                        // obs-fold: goes with the field it continues.
                        skim.line = if skim.last_kept { SkimLine::Keep } else { SkimLine::Skip };
                        continue;
                    }
                    _ if is_tchar(b) => {
                        let mut name = [0; FRAMING_NAME_MAX];
                        name[0] = b.to_ascii_lowercase();
                        skim.line = SkimLine::Name { name, len: 1 };
                    }
                    _ => {
                        self.fail(ParseError::BadHeader, self.head.wire() as u64, b == b'\n', out);
                        return i + 1;
                    }
                },
                SkimLine::BlankCr => {
                    if b != b'\n' {
                        self.fail(ParseError::BadHeader, self.head.wire() as u64, false, out);
                        return i;
                    }
                    skim.line = SkimLine::Start;
                    self.head.buf.extend_from_slice(b"\r\n");
                    self.complete_head(out);
                    return i + 1;
                }
                SkimLine::Name { mut name, len } => match b {
                    b':' => {
                        let kept = &name[..len.min(FRAMING_NAME_MAX)];
                        let keep = len <= FRAMING_NAME_MAX && FRAMING_FIELDS.iter().any(|f| f.as_bytes() == kept);
                        if keep {
                            self.head.buf.extend_from_slice(kept);
                            self.head.buf.push(b':');
                            skim.line = SkimLine::Keep;
                        } else {
                            skim.counts.bytes_not_kept += len as u64 + 1;
                            skim.counts.fields_not_kept += 1;
                            skim.line = SkimLine::Skip;
                        }
                        skim.last_kept = keep;
                    }
                    _ if is_tchar(b) => {
                        if len < FRAMING_NAME_MAX {
                            name[len] = b.to_ascii_lowercase();
                        }
                        skim.line = SkimLine::Name { name, len: len + 1 };
                    }
                    _ => {
                        self.fail(ParseError::BadHeader, self.head.wire() as u64, b == b'\n', out);
                        return i + 1;
                    }
                },
                SkimLine::Keep | SkimLine::Skip => {
                    let rest = &data[i..data.len().min(i.saturating_add(allowed))];
                    let lf = memchr::memchr(b'\n', rest);
                    let take = lf.map_or(rest.len(), |at| at + 1);
                    if matches!(skim.line, SkimLine::Skip) {
                        skim.counts.bytes_not_kept += take as u64;
                    } else if self.head.buf.len() + take > max_kept {
                        self.fail(ParseError::HeadTooLarge(max_kept), self.head.wire() as u64, false, out);
                        return i;
                    } else {
                        self.head.buf.extend_from_slice(&rest[..take]);
                    }
                    i += take;
                    if lf.is_some() {
                        self.skim_line_end();
                    }
                    continue;
                }
            }
            i += 1;
        }
        data.len()
    }

    /// A line of a skimmed head ended (its LF is consumed, and buffered if it was kept).
    fn skim_line_end(&mut self) {
        let head = &mut self.head;
        let Some(skim) = &mut head.skim else { return };
        if head.line_start == 0 {
            // The start line: when its rest was not kept, end what was kept of it.
            if matches!(skim.line, SkimLine::Skip) {
                head.buf.extend_from_slice(b"\r\n");
                skim.synthetic += 2;
            }
        } else if matches!(skim.line, SkimLine::Keep) && head.buf.len() > head.line_start {
            let first = head.buf[head.line_start];
            if first != b' ' && first != b'\t' {
                head.fields += 1;
            }
        }
        head.line_start = head.buf.len();
        skim.line = SkimLine::Start;
    }

    /// A head line (ending with the LF just buffered) is complete.
    fn head_line(&mut self, out: &mut Vec<HttpEvent>) {
        let head = &mut self.head;
        let line = &head.buf[head.line_start..head.buf.len() - 1];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let is_start_line = head.line_start == 0;
        let first = line.first().copied();
        let line_begin = head.line_start;
        head.line_start = head.buf.len();
        match first {
            _ if is_start_line => {}
            None => self.complete_head(out),
            // Continuation of the previous field (obs-fold).
            Some(b' ' | b'\t') => {}
            Some(_) => {
                head.fields += 1;
                if head.fields > self.limits.max_headers {
                    // This field is one too many: it is read again by the rules of skimming.
                    head.fields -= 1;
                    head.line_start = line_begin;
                    self.over_limit(ParseError::TooManyHeaders(self.limits.max_headers), out);
                }
            }
        }
    }

    /// The blank line ending the head was read: parse it and set up the body.
    fn complete_head(&mut self, out: &mut Vec<HttpEvent>) {
        let wire = self.head.wire();
        let skimmed = self.head.skim.map(|s| s.counts);
        let muted = self.head.skim.is_some_and(|s| s.over_bound);
        let raw = Bytes::from(std::mem::take(&mut self.head.buf));
        self.head.clear(self.kind);
        let parsed = parse_head(self.kind, &raw).and_then(|mut head| {
            head.wire_len = wire;
            head.skimmed = skimmed;
            let framing = self.framing(&head)?;
            Ok((head, framing))
        });
        let (head, framing) = match parsed {
            Ok(parsed) => parsed,
            Err(error) => {
                if !muted {
                    self.unparsed(&raw, wire, error.clone(), out);
                }
                self.fail(error, wire as u64, true, out);
                return;
            }
        };
        self.resyncing = false;
        self.incomplete = false;
        if muted {
            // Reported unparsed already: its bytes are skipped, its body too.
            self.skipped += wire as u64;
            self.mute = true;
        } else {
            out.push(HttpEvent::Head(head));
        }
        self.state = match framing {
            Framing::Empty | Framing::Fixed(0) => {
                self.end_message(out);
                State::Head
            }
            Framing::EmptyThenTunnel => {
                self.end_message(out);
                State::Tunnel
            }
            Framing::Fixed(remaining) => State::Fixed { remaining },
            Framing::Chunked => State::ChunkSize(ChunkSize::default()),
            Framing::UntilClose => State::UntilClose,
        };
    }

    /// How the body of a message with this head is delimited (RFC 9112 §6.3).
    fn framing(&mut self, head: &MessageHead) -> Result<Framing, ParseError> {
        if let Some(status) = head.status {
            // Interim responses (1xx but 101) precede the final one to the same request.
            let method = if status >= 200 || status == 101 {
                self.requests.pop_front().unwrap_or(RequestMethod::Other)
            } else {
                RequestMethod::Other
            };
            if status == 101 || (method == RequestMethod::Connect && (200..300).contains(&status)) {
                return Ok(Framing::EmptyThenTunnel);
            }
            if status < 200 || status == 204 || status == 304 || method == RequestMethod::Head {
                return Ok(Framing::Empty);
            }
        }
        let mut transfer_encodings = head.headers.iter().filter(|h| h.name == "transfer-encoding").peekable();
        if transfer_encodings.peek().is_some() {
            let last = transfer_encodings.last().map(|h| &h.value[..]).unwrap_or_default();
            let final_coding = last.rsplit(|&b| b == b',').next().unwrap_or_default().trim_ascii();
            return if final_coding.eq_ignore_ascii_case(b"chunked") {
                Ok(Framing::Chunked)
            } else if self.kind == StreamKind::Responses {
                Ok(Framing::UntilClose)
            } else {
                // A request body whose length cannot be known (RFC 9112 §6.3 ¶4).
                Err(ParseError::BadHeader)
            };
        }
        let mut lengths = head.headers.iter().filter(|h| h.name == "content-length");
        match (lengths.next(), lengths.next()) {
            (None, _) if self.kind == StreamKind::Requests => Ok(Framing::Empty),
            (None, _) => Ok(Framing::UntilClose),
            (Some(length), None) => parse_content_length(&length.value).map(Framing::Fixed),
            (Some(_), Some(_)) => Err(ParseError::BadContentLength),
        }
    }

    /// State::ChunkSize: read the chunk-size line, byte by byte.
    fn chunk_size(&mut self, mut line: ChunkSize, data: &[u8], out: &mut Vec<HttpEvent>) -> usize {
        for (i, &b) in data.iter().enumerate() {
            let at_line_start = line.len == 0;
            line.len += 1;
            let valid = if line.len > self.limits.max_head_bytes {
                false
            } else if b == b'\n' {
                line.digits
            } else if line.cr {
                false
            } else {
                match b {
                    b'\r' => {
                        line.cr = true;
                        true
                    }
                    _ if line.in_extension => true,
                    b';' if line.digits => {
                        line.in_extension = true;
                        true
                    }
                    b' ' | b'\t' if line.digits => {
                        line.after_digits = true;
                        true
                    }
                    _ if line.after_digits => false,
                    _ => match hex_value(b).and_then(|d| line.size.checked_mul(16)?.checked_add(d)) {
                        Some(size) => {
                            line.size = size;
                            line.digits = true;
                            true
                        }
                        None => false,
                    },
                }
            };
            if !valid {
                // Not consumed: at a line start it may begin the next message.
                self.fail(ParseError::BadChunk, 0, at_line_start, out);
                return i;
            }
            if b == b'\n' {
                self.state = if line.size == 0 {
                    State::Trailers(Trailers::default())
                } else {
                    State::ChunkData { remaining: line.size }
                };
                return i + 1;
            }
        }
        self.state = State::ChunkSize(line);
        data.len()
    }

    /// State::Trailers: skip trailer fields up to the blank line.
    fn trailers(&mut self, mut trailers: Trailers, data: &[u8], out: &mut Vec<HttpEvent>) -> usize {
        let max = self.limits.max_head_bytes;
        let room = max.saturating_sub(trailers.bytes);
        let window = &data[..data.len().min(room)];
        let Some(lf) = memchr::memchr(b'\n', window) else {
            trailers.bytes += window.len();
            trailers.line_len += window.len();
            if let Some(&last) = window.last() {
                trailers.cr_last = last == b'\r';
            }
            if data.len() > room {
                self.fail(ParseError::HeadTooLarge(max), 0, false, out);
            } else {
                self.state = State::Trailers(trailers);
            }
            return window.len();
        };
        let cr_last = if lf > 0 { window[lf - 1] == b'\r' } else { trailers.cr_last };
        let line_len = trailers.line_len + lf - usize::from(cr_last);
        if line_len == 0 {
            self.end_message(out);
            return lf + 1;
        }
        trailers.fields += 1;
        if trailers.fields > self.limits.max_headers {
            self.fail(ParseError::TooManyHeaders(self.limits.max_headers), 0, true, out);
            return lf + 1;
        }
        trailers.bytes += lf + 1;
        trailers.line_len = 0;
        trailers.cr_last = false;
        self.state = State::Trailers(trailers);
        lf + 1
    }
}

/// tchar (RFC 9110 §5.6.2): the bytes of methods and field names.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Request-target bytes: visible ASCII, and (leniently) non-ASCII.
fn is_target_byte(b: u8) -> bool {
    b.is_ascii_graphic() || b >= 0x80
}

fn hex_value(b: u8) -> Option<u64> {
    char::from(b).to_digit(16).map(u64::from)
}

fn parse_content_length(value: &[u8]) -> Result<u64, ParseError> {
    if value.is_empty() {
        return Err(ParseError::BadContentLength);
    }
    value.iter().try_fold(0u64, |n, &b| {
        let digit = char::from(b).to_digit(10).ok_or(ParseError::BadContentLength)?;
        n.checked_mul(10).and_then(|n| n.checked_add(u64::from(digit))).ok_or(ParseError::BadContentLength)
    })
}

/// `HTTP/1.x` → x.
fn parse_version(bytes: &[u8]) -> Option<u8> {
    match bytes {
        [prefix @ .., minor] if prefix == VERSION_PREFIX && minor.is_ascii_digit() => Some(minor - b'0'),
        _ => None,
    }
}

/// Parse a complete head (ending with its blank line) held in `raw`.
fn parse_head(kind: StreamKind, raw: &Bytes) -> Result<MessageHead, ParseError> {
    // Lines as ranges of `raw`, without their CRLF or LF.
    let mut line_start = 0;
    let mut lines = memchr::memchr_iter(b'\n', &raw[..]).map(|lf| {
        let start = std::mem::replace(&mut line_start, lf + 1);
        let end = if lf > start && raw[lf - 1] == b'\r' { lf - 1 } else { lf };
        start..end
    });
    let start_line = &raw[lines.next().ok_or(ParseError::BadStartLine)?];
    let mut head = MessageHead {
        method: None,
        target: None,
        status: None,
        minor_version: 0,
        headers: Vec::new(),
        wire_len: raw.len(),
        skimmed: None,
    };
    parse_start_line(kind, start_line, &mut head)?;
    for range in lines {
        let line = &raw[range.clone()];
        if line.is_empty() {
            break;
        }
        // Bare CR and NUL are invalid in fields (RFC 9110 §5.5), and smuggling tools.
        if line.iter().any(|&b| b == b'\r' || b == 0) {
            return Err(ParseError::BadHeader);
        }
        if let Some(fold) = line.strip_prefix(b" ").or_else(|| line.strip_prefix(b"\t")) {
            // obs-fold: the line continues the previous field's value.
            let previous = head.headers.last_mut().ok_or(ParseError::BadHeader)?;
            let fold = fold.trim_ascii();
            if !fold.is_empty() {
                let mut value = previous.value.to_vec();
                if !value.is_empty() {
                    value.push(b' ');
                }
                value.extend_from_slice(fold);
                previous.value = Bytes::from(value);
            }
            continue;
        }
        let colon = memchr::memchr(b':', line).ok_or(ParseError::BadHeader)?;
        let name = &line[..colon];
        // No whitespace before the colon (RFC 9112 §5.1): a request-smuggling vector.
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return Err(ParseError::BadHeader);
        }
        let value = &line[colon + 1..];
        let start = range.start + colon + 1 + (value.len() - value.trim_ascii_start().len());
        let end = range.end - (value.len() - value.trim_ascii_end().len());
        head.headers.push(Header {
            name: String::from_utf8_lossy(name).to_ascii_lowercase(),
            value: raw.slice(start..end.max(start)),
        });
    }
    Ok(head)
}

/// Parse a start line (without its line end) into `head`.
fn parse_start_line(kind: StreamKind, start_line: &[u8], head: &mut MessageHead) -> Result<(), ParseError> {
    if start_line.iter().any(|&b| b == b'\r' || b == 0) {
        return Err(ParseError::BadStartLine);
    }
    match kind {
        StreamKind::Requests => {
            let mut parts = start_line.splitn(3, |&b| b == b' ');
            let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
                return Err(ParseError::BadStartLine);
            };
            let valid_method = !method.is_empty() && method.iter().all(|&b| is_tchar(b));
            let valid_target = !target.is_empty() && target.iter().all(|&b| is_target_byte(b));
            if !valid_method || !valid_target {
                return Err(ParseError::BadStartLine);
            }
            head.minor_version = parse_version(version).ok_or(ParseError::BadStartLine)?;
            head.method = Some(String::from_utf8_lossy(method).into_owned());
            head.target = Some(String::from_utf8_lossy(target).into_owned());
        }
        StreamKind::Responses => {
            // HTTP/1.x SP 3DIGIT [ SP reason ]; an empty reason may lack its SP.
            let (version, rest) =
                start_line.split_at_checked(VERSION_PREFIX.len() + 1).ok_or(ParseError::BadStartLine)?;
            head.minor_version = parse_version(version).ok_or(ParseError::BadStartLine)?;
            let status = match rest {
                [b' ', d @ ..] if d.len() == 3 => d,
                [b' ', d @ .., b' '] if d.len() == 3 => d,
                _ if rest.len() > 4 && rest[0] == b' ' && rest[4] == b' ' => &rest[1..4],
                _ => return Err(ParseError::BadStartLine),
            };
            if !status.iter().all(u8::is_ascii_digit) || status[0] == b'0' {
                return Err(ParseError::BadStartLine);
            }
            head.status = Some(status.iter().fold(0, |n, &d| n * 10 + u16::from(d - b'0')));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use HttpEvent::{Body, End};
    use StreamKind::{Requests, Responses};

    use super::*;

    /// Small limits, a head over them given up at once (as before skimming).
    const SMALL: Limits = Limits { max_head_bytes: 256, max_headers: 4, max_oversized_head_bytes: 256 };
    /// Small limits, heads over them read on up to 4 KiB.
    const SKIM: Limits = Limits { max_head_bytes: 256, max_headers: 4, max_oversized_head_bytes: 4096 };

    const fn end(complete: bool) -> HttpEvent {
        End { complete }
    }

    const fn error(error: ParseError, skipped: u64) -> HttpEvent {
        HttpEvent::Error { error, skipped }
    }

    /// Adjacent Body pieces joined, empty ones dropped: the feeding-independent view.
    fn merged(events: Vec<HttpEvent>) -> Vec<HttpEvent> {
        let mut out: Vec<HttpEvent> = Vec::new();
        for event in events {
            match (out.last_mut(), event) {
                (_, Body(piece)) if piece.is_empty() => {}
                (Some(Body(previous)), Body(piece)) => {
                    let mut joined = previous.to_vec();
                    joined.extend_from_slice(&piece);
                    *previous = Bytes::from(joined);
                }
                (_, event) => out.push(event),
            }
        }
        out
    }

    /// Feed `pieces`, then finish; merged events and skipped bytes.
    fn run(kind: StreamKind, limits: Limits, pieces: &[&[u8]]) -> (Vec<HttpEvent>, u64) {
        let mut parser = Http1Parser::new(kind, limits);
        let mut out = Vec::new();
        for piece in pieces {
            parser.feed(piece, &mut out);
        }
        parser.finish(&mut out);
        (merged(out), parser.skipped_bytes())
    }

    /// Parse `stream` whole, byte at a time, and split at every position (short streams):
    /// all must give the same events; returns them.
    fn parse_with(kind: StreamKind, limits: Limits, stream: &[u8]) -> (Vec<HttpEvent>, u64) {
        let whole = run(kind, limits, &[stream]);
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(run(kind, limits, &bytes), whole, "byte at a time: {:?}", String::from_utf8_lossy(stream));
        if stream.len() <= 600 {
            for at in 0..=stream.len() {
                let (a, b) = stream.split_at(at);
                assert_eq!(run(kind, limits, &[a, b]), whole, "split at {at}: {:?}", String::from_utf8_lossy(stream));
            }
        }
        whole
    }

    fn parse(kind: StreamKind, stream: &str) -> Vec<HttpEvent> {
        parse_with(kind, Limits::default(), stream.as_bytes()).0
    }

    fn head(event: &HttpEvent) -> &MessageHead {
        match event {
            HttpEvent::Head(head) => head,
            other => panic!("expected a Head, got {other:?}"),
        }
    }

    /// (method, target) of a request head, or the status of a response head.
    fn summary(event: &HttpEvent) -> String {
        let head = head(event);
        match (&head.method, &head.target, head.status) {
            (Some(m), Some(t), None) => format!("{m} {t}"),
            (None, None, Some(status)) => status.to_string(),
            _ => panic!("inconsistent head {head:?}"),
        }
    }

    /// Events with heads reduced to `summary`, for compact expectations.
    fn shape(events: &[HttpEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                HttpEvent::Head(_) => format!("head {}", summary(e)),
                Body(b) => format!("body {}", String::from_utf8_lossy(b)),
                HttpEvent::BodyGap(n) => format!("gap {n}"),
                HttpEvent::Unparsed { head, error } => {
                    format!("unparsed {} {error:?}", summary(&HttpEvent::Head(head.clone())))
                }
                End { complete } => format!("end {complete}"),
                HttpEvent::Error { error, skipped } => format!("error {error:?} {skipped}"),
            })
            .collect()
    }

    #[test]
    fn simple_request_head() {
        let raw =
            "GET /v1/models?x=1 HTTP/1.1\r\nHost: api.openai.com\r\nX-Empty:\r\nAuthorization:  Bearer k  \r\n\r\n";
        let events = parse(Requests, raw);
        assert_eq!(events.len(), 2, "{events:?}");
        let head = head(&events[0]);
        assert_eq!(head.method.as_deref(), Some("GET"));
        assert_eq!(head.target.as_deref(), Some("/v1/models?x=1"));
        assert_eq!(head.status, None);
        assert_eq!(head.minor_version, 1);
        assert_eq!(head.wire_len, raw.len());
        let names: Vec<&str> = head.headers.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["host", "x-empty", "authorization"], "names lower-cased, in order");
        assert_eq!(head.header("HOST"), Some(&b"api.openai.com"[..]));
        assert_eq!(head.header("x-empty"), Some(&b""[..]));
        assert_eq!(head.header("authorization"), Some(&b"Bearer k"[..]), "value trimmed");
        assert_eq!(events[1], end(true), "a request without a length has no body");
    }

    #[test]
    fn request_with_content_length_body() {
        let events = parse(Requests, "POST /v1/chat HTTP/1.1\r\nContent-Length: 11\r\n\r\n{\"a\":\"b\"}\r\n");
        assert_eq!(shape(&events), ["head POST /v1/chat", "body {\"a\":\"b\"}\r\n", "end true"]);
    }

    #[test]
    fn pipelined_requests_in_one_feed() {
        let stream = "GET /1 HTTP/1.1\r\nHost: a\r\n\r\n\
                      POST /2 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc\
                      \r\n\
                      DELETE http://h/3 HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n";
        let events = parse(Requests, stream);
        assert_eq!(
            shape(&events),
            [
                "head GET /1",
                "end true",
                "head POST /2",
                "body abc",
                "end true",
                "head DELETE http://h/3",
                "body hi",
                "end true"
            ]
        );
        assert_eq!(head(&events[5]).minor_version, 0);
    }

    #[test]
    fn keep_alive_responses() {
        let one = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello";
        let stream = one.repeat(20);
        let events = parse(Responses, &stream);
        assert_eq!(events.len(), 60);
        for message in events.chunks(3) {
            assert_eq!(shape(message), ["head 200", "body hello", "end true"]);
            assert_eq!(head(&message[0]).wire_len, one.len() - 5);
        }
    }

    #[test]
    fn chunked_with_extensions_and_trailers() {
        let stream = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                      4;ext=1\r\nWiki\r\n\
                      5 ; name=\"q;x\"\r\npedia\r\n\
                      00C\r\n in \r\nchunks\r\n\
                      0;last\r\nExpires: never\r\nX-Checksum: 1\r\n\r\n\
                      HTTP/1.1 204 No Content\r\n\r\n";
        assert_eq!(
            shape(&parse(Responses, stream)),
            ["head 200", "body Wikipedia in \r\nchunks", "end true", "head 204", "end true"]
        );
    }

    #[test]
    fn chunked_sizes_are_hex_of_any_case() {
        let data = "x".repeat(0x1a);
        let stream = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1A\r\n{data}\r\n0\r\n\r\n");
        assert_eq!(
            shape(&parse(Responses, &stream)),
            ["head 200".to_string(), format!("body {data}"), "end true".into()]
        );
    }

    #[test]
    fn bad_chunk_sizes_end_the_message_and_resync() {
        let next = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let cases = [
            ("1ffffffffffffffff\r\n", "overflow"),
            ("zz\r\n", "not hex"),
            ("\r\n", "empty size"),
            ("5 5\r\n", "digits after whitespace"),
            ("5\rx\n", "CR not before LF"),
        ];
        for (size_line, why) in cases {
            let stream = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{size_line}junk\r\n{next}");
            let (events, _) = parse_with(Responses, Limits::default(), stream.as_bytes());
            assert_eq!(
                shape(&events),
                ["head 200", "end false", "error BadChunk 0", "head 200", "body ok", "end true"],
                "{why}"
            );
        }
        // The missing CRLF after chunk data.
        let stream = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokX\r\n{next}");
        assert_eq!(
            shape(&parse(Responses, &stream)),
            ["head 200", "body ok", "end false", "error BadChunk 0", "head 200", "body ok", "end true"]
        );
    }

    #[test]
    fn truncated_chunked_message_resyncs_on_the_next_status_line() {
        // The chunk size line position holds a new response: resync without losing it.
        let stream =
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
        let (events, skipped) = parse_with(Responses, Limits::default(), stream.as_bytes());
        assert_eq!(shape(&events), ["head 200", "end false", "error BadChunk 0", "head 404", "end true"]);
        assert_eq!(skipped, 0);
    }

    #[test]
    fn transfer_encoding_wins_over_content_length() {
        let stream =
            "HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        assert_eq!(shape(&parse(Responses, stream)), ["head 200", "body abc", "end true"]);
    }

    #[test]
    fn request_transfer_encoding_must_end_in_chunked() {
        let stream = "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n";
        assert_eq!(
            shape(&parse(Requests, stream)),
            ["unparsed POST / BadHeader".to_owned(), format!("error BadHeader {}", stream.len())]
        );
    }

    #[test]
    fn response_without_length_runs_until_close() {
        let events = parse(
            Responses,
            "HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: 1\n\ndata: 2\n\nHTTP/1.1 200 OK\r\n",
        );
        assert_eq!(shape(&events), ["head 200", "body data: 1\n\ndata: 2\n\nHTTP/1.1 200 OK\r\n", "end true"]);
        assert_eq!(head(&events[0]).minor_version, 0);
        // Transfer-Encoding without chunked, in a response: until close too.
        let events = parse(Responses, "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzzz");
        assert_eq!(shape(&events), ["head 200", "body zzz", "end true"]);
    }

    #[test]
    fn interim_responses_are_messages_of_their_own() {
        let stream = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        assert_eq!(
            shape(&parse(Responses, stream)),
            ["head 100", "end true", "head 103", "end true", "head 200", "body ok", "end true"]
        );
    }

    #[test]
    fn no_body_statuses() {
        let stream = "HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n\
                      HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n\
                      HTTP/1.1 200\r\nContent-Length: 1\r\n\r\nx";
        assert_eq!(
            shape(&parse(Responses, stream)),
            ["head 204", "end true", "head 304", "end true", "head 200", "body x", "end true"]
        );
    }

    #[test]
    fn responses_to_head_have_no_body() {
        let mut parser = Http1Parser::new(Responses, Limits::default());
        parser.expect_response_to("HEAD");
        parser.expect_response_to("GET");
        parser.expect_response_to("HEAD");
        let mut out = Vec::new();
        parser.feed(
            b"HTTP/1.1 100 Continue\r\n\r\n\
              HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n\
              HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello\
              HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
              HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            &mut out,
        );
        parser.finish(&mut out);
        assert_eq!(
            shape(&merged(out)),
            [
                "head 100",
                "end true",
                "head 200",
                "end true",
                "head 200",
                "body hello",
                "end true",
                "head 200",
                "end true",
                "head 200",
                "body ok",
                "end true"
            ],
            "the 100 does not use up the HEAD; the fifth response answers an unknown request"
        );
    }

    #[test]
    fn protocol_switches_leave_http() {
        let tunnel = "\x16\x03\x01 binary TLS bytes\r\n\r\n";
        let mut parser = Http1Parser::new(Responses, Limits::default());
        parser.expect_response_to("CONNECT");
        let mut out = Vec::new();
        parser.feed(format!("HTTP/1.1 200 Connection established\r\n\r\n{tunnel}").as_bytes(), &mut out);
        parser.finish(&mut out);
        assert_eq!(shape(&out), ["head 200", "end true"]);
        assert_eq!(parser.skipped_bytes(), tunnel.len() as u64);

        let (events, skipped) = run(
            Responses,
            Limits::default(),
            &[b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello"],
        );
        assert_eq!(shape(&events), ["head 101", "end true"]);
        assert_eq!(skipped, 7);

        // A refused CONNECT stays HTTP.
        let mut parser = Http1Parser::new(Responses, Limits::default());
        parser.expect_response_to("CONNECT");
        let mut out = Vec::new();
        parser.feed(b"HTTP/1.1 407 Proxy Auth\r\nContent-Length: 1\r\n\r\nx", &mut out);
        assert_eq!(shape(&out), ["head 407", "body x", "end true"]);
    }

    #[test]
    fn bad_content_lengths() {
        for (value, why) in [
            ("Content-Length: abc\r\n", "not a number"),
            ("Content-Length: -1\r\n", "negative"),
            ("Content-Length:\r\n", "empty"),
            ("Content-Length: 5, 5\r\n", "a list"),
            ("Content-Length: 5\r\nContent-Length: 5\r\n", "duplicate"),
            ("Content-Length: 5\r\ncontent-length: 6\r\n", "conflicting"),
            ("Content-Length: 18446744073709551616\r\n", "u64 overflow"),
        ] {
            let head = format!("POST / HTTP/1.1\r\n{value}\r\n");
            let stream = format!("{head}hello GET /next HTTP/1.1\r\n\r\nGET /after HTTP/1.1\r\n\r\n");
            let (events, skipped) = parse_with(Requests, Limits::default(), stream.as_bytes());
            assert_eq!(
                shape(&events),
                [
                    "unparsed POST / BadContentLength".to_owned(),
                    format!("error BadContentLength {}", head.len()),
                    "head GET /after".into(),
                    "end true".into()
                ],
                "{why}: the request is known by its start line"
            );
            assert_eq!(skipped, (head.len() + "hello GET /next HTTP/1.1\r\n\r\n".len()) as u64, "{why}: skipped bytes");
        }
        let max = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\nabc", u64::MAX);
        assert_eq!(shape(&parse(Responses, &max)), ["head 200", "body abc", "end false"], "u64::MAX is a valid length");
    }

    #[test]
    fn malformed_start_lines_resync() {
        let garbage = "\x00\x01binary junk\n";
        let stream = format!("{garbage}GET / HTTP/1.1\r\n\r\n");
        let (events, skipped) = parse_with(Requests, Limits::default(), stream.as_bytes());
        assert_eq!(shape(&events), ["error BadStartLine 1", "head GET /", "end true"]);
        assert_eq!(skipped, garbage.len() as u64);

        for (line, why) in [
            ("GET /\r\n", "no version"),
            ("GET  / HTTP/1.1\r\n", "two spaces"),
            ("GET / HTTP/2.0\r\n", "version 2"),
            ("GET / HTTP/1.1 x\r\n", "text after the version"),
            ("GET / HTTP/1.x\r\n", "minor not a digit"),
            ("G(T / HTTP/1.1\r\n", "method not a token"),
            ("GET /a\x7fb HTTP/1.1\r\n", "control byte in target"),
        ] {
            let stream = format!("{line}Host: x\r\n\r\nbody\r\nPUT /ok HTTP/1.1\r\nContent-Length: 1\r\n\r\n!");
            let (events, skipped) = parse_with(Requests, Limits::default(), stream.as_bytes());
            assert_eq!(shape(&events)[1..], ["head PUT /ok", "body !", "end true"], "{why}");
            assert!(matches!(events[0], HttpEvent::Error { error: ParseError::BadStartLine, .. }), "{why}: {events:?}");
            assert_eq!(skipped, stream.find("PUT").unwrap() as u64, "{why}: every byte before PUT skipped");
        }

        for (line, why) in [
            ("HTTP/1.1 20 OK\r\n", "two-digit status"),
            ("HTTP/1.1 2000 OK\r\n", "four-digit status"),
            ("HTTP/1.1 099 OK\r\n", "status below 100"),
            ("HTTP/1.1  200 OK\r\n", "two spaces"),
            ("HTTP/1.1\r\n", "no status"),
            ("HTTX/1.1 200 OK\r\n", "not HTTP"),
            ("http/1.1 200 OK\r\n", "lower case"),
        ] {
            let stream = format!("{line}\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n");
            let (events, skipped) = parse_with(Responses, Limits::default(), stream.as_bytes());
            assert_eq!(shape(&events)[1..], ["head 201", "end true"], "{why}");
            assert!(matches!(events[0], HttpEvent::Error { error: ParseError::BadStartLine, .. }), "{why}: {events:?}");
            assert_eq!(skipped, line.len() as u64 + 2, "{why}: skipped bytes");
        }
    }

    #[test]
    fn resync_reports_one_error_and_counts_every_byte() {
        let junk = "junk junk\nmore HTTP/1.1 junk\nHTTP/1.1 abc\r\n\r\n\r\nHTTP/1.1 2x0 bad\n\n";
        let stream = format!("{junk}HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        let (events, skipped) = parse_with(Responses, Limits::default(), stream.as_bytes());
        assert_eq!(
            shape(&events),
            ["error BadStartLine 1", "head 200", "end true"],
            "later failures while resyncing are silent"
        );
        assert_eq!(skipped, junk.len() as u64);
    }

    #[test]
    fn bad_header_lines() {
        for (line, why) in [
            ("Host : x\r\n", "space before colon"),
            ("No colon\r\n", "no colon"),
            (": empty name\r\n", "empty name"),
            ("X: a\rb\r\n", "bare CR"),
            ("X: a\0b\r\n", "NUL"),
            (" folded-first: x\r\n", "continuation with nothing to continue"),
        ] {
            let head = format!("GET / HTTP/1.1\r\n{line}\r\n");
            let stream = format!("{head}GET /next HTTP/1.1\r\n\r\n");
            let (events, _) = parse_with(Requests, Limits::default(), stream.as_bytes());
            assert_eq!(
                shape(&events),
                [
                    "unparsed GET / BadHeader".to_owned(),
                    format!("error BadHeader {}", head.len()),
                    "head GET /next".into(),
                    "end true".into()
                ],
                "{why}"
            );
        }
    }

    #[test]
    fn bare_lf_line_endings() {
        let events = parse(
            Responses,
            "HTTP/1.1 200 OK\nContent-Length: 2\nX: y\n\nokHTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n1\nA\n0\nT: 1\n\n",
        );
        assert_eq!(shape(&events), ["head 200", "body ok", "end true", "head 200", "body A", "end true"]);
        assert_eq!(head(&events[0]).header("x"), Some(&b"y"[..]));
        assert_eq!(head(&events[0]).wire_len, 40);
    }

    #[test]
    fn leading_empty_lines_are_ignored() {
        let (events, skipped) = parse_with(Requests, Limits::default(), b"\r\n\n\r\nGET / HTTP/1.1\r\n\r\n");
        assert_eq!(shape(&events), ["head GET /", "end true"]);
        assert_eq!(head(&events[0]).wire_len, 18, "the empty lines are not part of the head");
        assert_eq!(skipped, 0);
    }

    #[test]
    fn obsolete_line_folding_is_joined() {
        let events = parse(Requests, "GET / HTTP/1.1\r\nX-Long: part one\r\n  part two\r\n\tthree \r\nY: z\r\n\r\n");
        let head = head(&events[0]);
        assert_eq!(head.header("x-long"), Some(&b"part one part two three"[..]));
        assert_eq!(head.headers.len(), 2);
    }

    #[test]
    fn header_values_are_bytes() {
        let events = parse_with(
            Requests,
            Limits::default(),
            b"GET / HTTP/1.1\r\nX-Bin: \xff\xfe\x80 ok\r\nX-Utf8: h\xc3\xa9\r\n\r\n",
        )
        .0;
        let head = head(&events[0]);
        assert_eq!(head.header("x-bin"), Some(&b"\xff\xfe\x80 ok"[..]));
        assert_eq!(head.header("x-utf8"), Some("hé".as_bytes()));
    }

    #[test]
    fn head_size_bound() {
        // Exactly at the limit is fine.
        let exact = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(SMALL.max_head_bytes - 23));
        assert_eq!(exact.len(), SMALL.max_head_bytes);
        let (events, _) = parse_with(Requests, SMALL, exact.as_bytes());
        assert_eq!(shape(&events), ["head GET /", "end true"]);

        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(SMALL.max_head_bytes));
        let stream = format!("{big}GET /next HTTP/1.1\r\n\r\n");
        let (events, skipped) = parse_with(Requests, SMALL, stream.as_bytes());
        assert_eq!(
            shape(&events),
            ["unparsed GET / HeadTooLarge(256)", "error HeadTooLarge(256) 256", "head GET /next", "end true"],
            "skimming off: given up at once"
        );
        assert_eq!(skipped, big.len() as u64);

        // A start line that never ends.
        let endless = format!("GET /{}", "a".repeat(10_000));
        let (events, skipped) = parse_with(Requests, SMALL, endless.as_bytes());
        assert_eq!(shape(&events), ["error HeadTooLarge(256) 256"]);
        assert_eq!(skipped, endless.len() as u64);
    }

    #[test]
    fn head_buffer_stays_bounded() {
        let mut parser = Http1Parser::new(Responses, SMALL);
        let mut out = Vec::new();
        parser.feed(b"HTTP/1.1 200 OK\r\n", &mut out);
        for _ in 0..1000 {
            parser.feed(b"X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", &mut out);
            assert!(parser.head.buf.len() <= SMALL.max_head_bytes, "head buffer {} bytes", parser.head.buf.len());
        }
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(matches!(&out[0], HttpEvent::Unparsed { head, .. } if head.status == Some(200)), "{out:?}");
        assert_eq!(out[1], error(ParseError::HeadTooLarge(256), 256));

        // Skimming: the head is followed, keeping nothing but what frames it.
        let mut parser = Http1Parser::new(Responses, SKIM);
        let mut out = Vec::new();
        parser.feed(b"HTTP/1.1 200 OK\r\n", &mut out);
        for _ in 0..1000 {
            parser.feed(b"X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n", &mut out);
            assert!(parser.head.buf.len() <= SKIM.max_head_bytes, "head buffer {} bytes", parser.head.buf.len());
        }
        parser.feed(b"Content-Length: 2\r\n\r\nokHTTP/1.1 204 No Content\r\n\r\n", &mut out);
        assert_eq!(shape(&out), ["unparsed 200 HeadTooLarge(4096)", "head 204", "end true"]);
    }

    #[test]
    fn header_count_bound() {
        let fields = |n: usize| (0..n).map(|i| format!("H{i}: v\r\n")).collect::<String>();
        let ok = format!("GET / HTTP/1.1\r\n{}\r\n", fields(4));
        assert_eq!(shape(&parse_with(Requests, SMALL, ok.as_bytes()).0), ["head GET /", "end true"]);

        let head = format!("GET / HTTP/1.1\r\n{}", fields(5));
        let stream = format!("{head}H6: v\r\n\r\nGET /next HTTP/1.1\r\n\r\n");
        let (events, skipped) = parse_with(Requests, SMALL, stream.as_bytes());
        assert_eq!(
            shape(&events),
            [
                "unparsed GET / TooManyHeaders(4)".to_owned(),
                format!("error TooManyHeaders(4) {}", head.len()),
                "head GET /next".into(),
                "end true".into()
            ],
            "skimming off: given up at once"
        );
        assert_eq!(skipped, (head.len() + "H6: v\r\n\r\n".len()) as u64);
    }

    #[test]
    fn a_head_over_the_limits_is_read_on_keeping_its_framing() {
        // Two large fields before the framing ones, then more fields than allowed.
        let pad = "p".repeat(300);
        let fields = (0..6).map(|i| format!("X-{i}: v\r\n")).collect::<String>();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nX-Pad: {pad}\r\nX-Pad-2: {pad}\r\n  folded {pad}\r\n\
             Host: api.example\r\n{fields}Content-Type: application/json\r\nContent-Length: 5\r\n\r\n"
        );
        let stream = format!("{head}hello");
        let (events, skipped) = parse_with(Requests, SKIM, stream.as_bytes());
        assert_eq!(shape(&events), ["head POST /v1/chat/completions", "body hello", "end true"]);
        assert_eq!(skipped, 0);
        let h = super::tests::head(&events[0]);
        assert_eq!(h.wire_len, head.len(), "the head's size on the wire, kept or not");
        assert_eq!(h.header("content-length"), Some(&b"5"[..]));
        assert_eq!(h.header("host"), Some(&b"api.example"[..]));
        assert_eq!(h.header("content-type"), Some(&b"application/json"[..]));
        let skimmed = h.skimmed.expect("over the limits");
        assert_eq!(skimmed.fields_not_kept, 8, "X-Pad (the line that crossed the limit), X-Pad-2, X-0 to X-5");
        assert!(h.headers.len() <= SKIM.max_headers + FRAMING_FIELDS.len(), "{:?}", h.headers);

        // Too many fields alone (each line short).
        let many = format!("GET / HTTP/1.1\r\n{fields}Content-Length: 0\r\n\r\nGET /next HTTP/1.1\r\n\r\n");
        let (events, _) = parse_with(Requests, SKIM, many.as_bytes());
        assert_eq!(shape(&events), ["head GET /", "end true", "head GET /next", "end true"]);
        assert_eq!(super::tests::head(&events[0]).skimmed.map(|s| s.fields_not_kept), Some(2));
    }

    #[test]
    fn a_request_target_too_long_is_cut() {
        let target = format!("/v1/chat/completions?{}", "q".repeat(400));
        let stream = format!("POST {target} HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi");
        let (events, _) = parse_with(Requests, SKIM, stream.as_bytes());
        assert_eq!(events.len(), 3, "{events:?}");
        let h = super::tests::head(&events[0]);
        let kept = h.target.as_deref().unwrap();
        assert!(target.starts_with(kept) && kept.len() < target.len(), "{kept}");
        assert_eq!(h.skimmed.unwrap().target_bytes_cut as usize, target.len() - kept.len());
        assert_eq!(h.wire_len, stream.len() - 2);
    }

    #[test]
    fn a_head_past_the_oversized_bound_is_unparsed_with_its_start_line() {
        // Framed by the fields kept, its body is skipped: the next request is in step.
        let pad = "p".repeat(5000);
        let head = format!("POST /v1/messages HTTP/1.1\r\nX-Pad: {pad}\r\nContent-Length: 2\r\n\r\n");
        let stream = format!("{head}hiGET /next HTTP/1.1\r\n\r\n");
        let (events, skipped) = parse_with(Requests, SKIM, stream.as_bytes());
        assert_eq!(shape(&events), ["unparsed POST /v1/messages HeadTooLarge(4096)", "head GET /next", "end true"]);
        let HttpEvent::Unparsed { head: unparsed, .. } = &events[0] else { unreachable!() };
        assert_eq!(unparsed.wire_len, 4096, "read up to the bound when it was given up");
        assert_eq!(skipped, head.len() as u64 + 2, "its head and body are skipped");
        // Chunked, and with a gap in its body.
        let stream = format!(
            "POST /v1/messages HTTP/1.1\r\nX-Pad: {pad}\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\nGET /n HTTP/1.1\r\n\r\n"
        );
        let (events, _) = parse_with(Requests, SKIM, stream.as_bytes());
        assert_eq!(shape(&events), ["unparsed POST /v1/messages HeadTooLarge(4096)", "head GET /n", "end true"]);
        // A malformed field in a skimmed head, and a response.
        let bad =
            format!("HTTP/1.1 200 OK\r\nX-Pad: {}\r\nBad Field: x\r\n\r\nHTTP/1.1 204 No\r\n\r\n", "p".repeat(300));
        let (events, _) = parse_with(Responses, SKIM, bad.as_bytes());
        assert_eq!(
            shape(&events)[..2],
            ["unparsed 200 BadHeader".to_owned(), format!("error BadHeader {}", 17 + 308 + 4)]
        );
        assert_eq!(shape(&events)[2..], ["head 204", "end true"]);
    }

    #[test]
    fn a_gap_in_a_head_after_its_start_line_says_the_message_exists() {
        let mut parser = Http1Parser::new(Requests, Limits::default());
        let mut out = Vec::new();
        parser.feed(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-", &mut out);
        parser.gap(100, &mut out);
        parser.feed(b"GET /next HTTP/1.1\r\n\r\n", &mut out);
        assert_eq!(
            shape(&out),
            ["unparsed POST /v1/chat/completions Gap", "error Gap 53", "head GET /next", "end true"]
        );
    }

    #[test]
    fn body_gaps_are_reported_with_their_size() {
        let mut parser = Http1Parser::new(Responses, Limits::default());
        let mut out = Vec::new();
        parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab", &mut out);
        parser.gap(20, &mut out);
        parser.feed(b"HTTP/1.1 204 No Content\r\n\r\n", &mut out);
        assert_eq!(shape(&out), ["head 200", "body ab", "gap 8", "end false", "error Gap 0", "head 204", "end true"]);
    }

    #[test]
    fn trailer_bounds() {
        let trailers = (0..5).map(|i| format!("T{i}: v\r\n")).collect::<String>();
        let stream = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n{trailers}\r\n");
        let (events, _) = parse_with(Responses, SMALL, stream.as_bytes());
        assert_eq!(shape(&events), ["head 200", "body x", "end false", "error TooManyHeaders(4) 0"]);

        let stream =
            format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nT: {}\r\n\r\n", "a".repeat(300));
        let (events, _) = parse_with(Responses, SMALL, stream.as_bytes());
        assert_eq!(shape(&events), ["head 200", "end false", "error HeadTooLarge(256) 0"]);
    }

    #[test]
    fn finish_mid_message() {
        let (events, _) = run(Responses, Limits::default(), &[b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf"]);
        assert_eq!(shape(&events), ["head 200", "body half", "end false"]);

        let (events, _) =
            run(Responses, Limits::default(), &[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"]);
        assert_eq!(shape(&events), ["head 200", "body ab", "end false"]);

        let (events, _) =
            run(Responses, Limits::default(), &[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nT: 1\r\n"]);
        assert_eq!(shape(&events), ["head 200", "end false"], "trailers not finished");

        let partial = b"HTTP/1.1 200 OK\r\nContent-Le";
        let (events, skipped) = run(Responses, Limits::default(), &[partial]);
        assert_eq!(events, []);
        assert_eq!(skipped, partial.len() as u64, "a head cut short is counted as skipped");
    }

    #[test]
    fn gap_inside_content_length_body() {
        let mut parser = Http1Parser::new(Responses, Limits::default());
        let mut out = Vec::new();
        parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab", &mut out);
        parser.gap(5, &mut out);
        parser.feed(b"fghHTTP/1.1 204 No Content\r\n\r\n", &mut out);
        assert_eq!(
            shape(&merged(out)),
            ["head 200", "body ab", "gap 5", "body fgh", "end false", "head 204", "end true"]
        );
        assert_eq!(parser.skipped_bytes(), 0);
    }

    #[test]
    fn gap_reaching_past_the_body() {
        let mut parser = Http1Parser::new(Responses, Limits::default());
        let mut out = Vec::new();
        parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab", &mut out);
        parser.gap(2, &mut out);
        parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab", &mut out);
        parser.gap(10, &mut out);
        parser.feed(b"ers: x\r\n\r\nHTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n", &mut out);
        assert_eq!(
            shape(&merged(out)),
            [
                "head 200",
                "body ab",
                "gap 2",
                "end false",
                "head 200",
                "body ab",
                "gap 2",
                "end false",
                "error Gap 0",
                "head 202",
                "end true"
            ]
        );
        assert_eq!(parser.skipped_bytes(), 10, "the rest of the lost head is skipped, its blank line too");
    }

    #[test]
    fn gap_in_a_head_resyncs() {
        let mut parser = Http1Parser::new(Requests, Limits::default());
        let mut out = Vec::new();
        parser.feed(b"POST /v1 HTTP/1.1\r\nHost: x\r\nContent-", &mut out);
        parser.gap(100, &mut out);
        parser.feed(b"-more-\r\n\r\nbody\nGET /next HTTP/1.1\r\n\r\n", &mut out);
        assert_eq!(shape(&merged(out)), ["unparsed POST /v1 Gap", "error Gap 36", "head GET /next", "end true"]);
        assert_eq!(parser.skipped_bytes(), 36 + 15);

        // Between messages: the gap may hold a whole head, so it is an error too.
        let mut parser = Http1Parser::new(Requests, Limits::default());
        let mut out = Vec::new();
        parser.gap(10, &mut out);
        parser.feed(b"GET / HTTP/1.1\r\n\r\n", &mut out);
        assert_eq!(shape(&out), ["error Gap 0", "head GET /", "end true"]);
    }

    #[test]
    fn gap_in_chunked_body() {
        let mut parser = Http1Parser::new(Responses, Limits::default());
        let mut out = Vec::new();
        parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n01", &mut out);
        parser.gap(4, &mut out);
        parser.feed(b"6789\r\n", &mut out);
        parser.gap(3, &mut out); // in the framing
        parser.feed(b"1\r\nx\r\n0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", &mut out);
        assert_eq!(
            shape(&merged(out)),
            ["head 200", "body 01", "gap 4", "body 6789", "end false", "error Gap 0", "head 200", "end true"]
        );

        // A gap covering exactly the rest of a chunk.
        let mut parser = Http1Parser::new(Responses, Limits::default());
        let mut out = Vec::new();
        parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nab", &mut out);
        parser.gap(2, &mut out);
        parser.feed(b"\r\n0\r\n\r\n", &mut out);
        assert_eq!(shape(&merged(out)), ["head 200", "body ab", "gap 2", "end false"]);
    }

    #[test]
    fn gap_in_close_delimited_body() {
        let mut parser = Http1Parser::new(Responses, Limits::default());
        let mut out = Vec::new();
        parser.feed(b"HTTP/1.1 200 OK\r\n\r\nab", &mut out);
        parser.gap(100, &mut out);
        parser.feed(b"cd", &mut out);
        parser.finish(&mut out);
        assert_eq!(shape(&merged(out)), ["head 200", "body ab", "gap 100", "body cd", "end false"]);
    }

    #[test]
    fn pending_requests_are_bounded() {
        let mut parser = Http1Parser::new(Responses, Limits::default());
        for _ in 0..MAX_PENDING_REQUESTS + 10 {
            parser.expect_response_to("HEAD");
        }
        assert_eq!(parser.requests.len(), MAX_PENDING_REQUESTS);
        let mut requests = Http1Parser::new(Requests, Limits::default());
        requests.expect_response_to("HEAD");
        assert!(requests.requests.is_empty(), "a request parser keeps no queue");
    }

    /// xorshift: deterministic pseudo-random bytes.
    fn noise(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    #[test]
    fn hostile_input_never_panics_and_splits_agree() {
        let valid: &[&[u8]] = &[
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nT: 1\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        ];
        let alphabet = b"\r\n :;0aF HTTP/1.1 GET / chunked\xff\x00";
        let mut seed = 0x9e37_79b9_7f4a_7c15;
        for round in 0..300 {
            let mut stream = valid[round % valid.len()].to_vec();
            for _ in 0..1 + round % 8 {
                let at = noise(&mut seed) as usize % stream.len();
                match noise(&mut seed) % 3 {
                    0 => stream[at] = alphabet[noise(&mut seed) as usize % alphabet.len()],
                    1 => {
                        stream.remove(at);
                    }
                    _ => stream.insert(at, noise(&mut seed) as u8),
                }
            }
            stream.extend_from_slice(&stream.clone());
            for (kind, limits) in [(Requests, SMALL), (Responses, SMALL), (Requests, SKIM), (Responses, SKIM)] {
                let (events, skipped) = parse_with(kind, limits, &stream);
                let heads = events.iter().filter(|e| matches!(e, HttpEvent::Head(_))).count();
                let ends = events.iter().filter(|e| matches!(e, End { .. })).count();
                assert_eq!(heads, ends, "every head has one end: {events:?}");
                assert!(skipped <= stream.len() as u64, "cannot skip more than was fed");
            }
        }
        for len in [0, 1, 100, 5000] {
            let stream: Vec<u8> = (0..len).map(|_| noise(&mut seed) as u8).collect();
            for kind in [Requests, Responses] {
                let (events, skipped) = run(kind, Limits::default(), &[&stream]);
                assert!(
                    events.iter().all(|e| matches!(e, HttpEvent::Error { .. })),
                    "noise parses as nothing: {events:?}"
                );
                assert_eq!(skipped, len as u64, "every noise byte is counted");
            }
        }
    }

    #[test]
    fn zero_limits_do_not_hang() {
        let zero = Limits { max_head_bytes: 0, max_headers: 0, max_oversized_head_bytes: 0 };
        let stream = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        let (events, skipped) = parse_with(Requests, zero, stream);
        assert_eq!(events, [error(ParseError::HeadTooLarge(0), 0)]);
        assert_eq!(skipped, stream.len() as u64, "blank lines too: they are discarded while resyncing");
    }
    /// A start line over the head limit, skimmed: its line end is kept for the parser but
    /// was counted with the rest of the line, so the head's wire length is exact, and a
    /// start line that then fails to parse discards exactly the bytes fed (fuzz regression).
    #[test]
    fn a_skimmed_start_line_counts_its_bytes_once() {
        let skim = Limits { max_head_bytes: 256, max_headers: 4, max_oversized_head_bytes: 2048 };
        let head = format!("HTTP/1.1 200 {}\r\nContent-Length: 2\r\n\r\n", "r".repeat(300));
        let stream = format!("{head}{{}}");
        let (events, skipped) = parse_with(Responses, skim, stream.as_bytes());
        assert_eq!(skipped, 0);
        match &events[0] {
            HttpEvent::Head(h) => assert_eq!(h.wire_len, head.len(), "{events:?}"),
            other => panic!("expected a head: {other:?}"),
        }
        let bad = format!("HTTP/1.1 1{}\r\nContent-Length: 2\r\n\r\n{{}}", "\"x".repeat(150));
        let (_, skipped) = parse_with(Responses, skim, bad.as_bytes());
        assert_eq!(skipped, bad.len() as u64, "every byte discarded once");
    }
}
