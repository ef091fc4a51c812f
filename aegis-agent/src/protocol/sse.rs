//! Server-Sent Events decoder (the `text/event-stream` format used by streamed model
//! responses), following the WHATWG HTML "event stream interpretation" rules:
//!
//! - lines end with CRLF, LF or CR; a CR ending one push may be followed by its LF at the
//!   start of the next;
//! - `data:` values are joined with '\n', `event:` sets the type, lines starting with ':'
//!   are comments, other fields (`id`, `retry`, unknown) are ignored; one space after the
//!   colon is removed;
//! - a blank line dispatches the event, unless it had no `data` line;
//! - a leading UTF-8 BOM is ignored, invalid UTF-8 is replaced (U+FFFD).
//!
//! Line terminators are ASCII, so lines are split on bytes and only the dispatched text is
//! converted from UTF-8 (lossily), which gives the same result as decoding the stream
//! first.
//!
//! One deviation: [`SseDecoder::finish`] dispatches a last event not followed by a blank
//! line (the standard drops it), because a capture that ends there still saw the event.
//!
//! Bound: an event's size is the bytes of its field lines (comments and line terminators
//! not counted). Once an event grows past `max_event_bytes` it is dropped and counted in
//! [`SseDecoder::oversized_events`], and the rest of its lines are skipped up to the blank
//! line without being buffered; so memory stays within about `max_event_bytes`.

/// What a stream may start with, and is then ignored.
const BOM: &[u8] = b"\xEF\xBB\xBF";

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, if any.
    pub event: Option<String>,
    /// The `data:` lines joined with '\n'.
    pub data: String,
}

/// Incremental decoder; events may be split anywhere across `push` calls.
pub struct SseDecoder {
    max_event_bytes: usize,
    /// Leading bytes matched against the BOM; `None` once past the start of the stream.
    bom_matched: Option<usize>,
    /// The last byte seen was a CR: a LF right after it belongs to the same line end.
    after_cr: bool,
    /// The current line has at least one byte.
    line_started: bool,
    /// The current line is a comment: its bytes are dropped as they arrive.
    comment: bool,
    /// The current field line, not yet terminated.
    line: Vec<u8>,
    /// Field-line bytes of the current event so far.
    event_bytes: usize,
    /// The current event went over the bound: skip to its blank line.
    skipping: bool,
    /// The data buffer: each `data` value followed by '\n'.
    data: Vec<u8>,
    event_type: Vec<u8>,
    oversized: u64,
}

impl SseDecoder {
    /// `max_event_bytes`: an event larger than this is dropped and counted.
    pub fn new(max_event_bytes: usize) -> Self {
        Self {
            max_event_bytes,
            bom_matched: Some(0),
            after_cr: false,
            line_started: false,
            comment: false,
            line: Vec::new(),
            event_bytes: 0,
            skipping: false,
            data: Vec::new(),
            event_type: Vec::new(),
            oversized: 0,
        }
    }

    pub fn push(&mut self, mut data: &[u8], out: &mut Vec<SseEvent>) {
        if let Some(matched) = self.bom_matched {
            // The BOM may itself be split across pushes.
            let n = data.len().min(BOM.len() - matched);
            if data[..n] == BOM[matched..matched + n] {
                data = &data[n..];
                if matched + n < BOM.len() {
                    self.bom_matched = Some(matched + n);
                    return;
                }
            } else {
                // Not a BOM after all: what matched so far is content.
                self.lines(&BOM[..matched], out);
            }
            self.bom_matched = None;
        }
        self.lines(data, out);
    }

    /// Flush a last event not followed by a blank line (stream ended).
    pub fn finish(&mut self, out: &mut Vec<SseEvent>) {
        if let Some(matched) = self.bom_matched.take() {
            // A stream cut inside what looked like a BOM: those bytes were content.
            self.lines(&BOM[..matched], out);
        }
        if self.line_started {
            self.end_line(out);
        }
        self.end_line(out);
        *self = Self { oversized: self.oversized, ..Self::new(self.max_event_bytes) };
    }

    /// Events dropped for being over the size bound.
    pub fn oversized_events(&self) -> u64 {
        self.oversized
    }

    fn lines(&mut self, mut data: &[u8], out: &mut Vec<SseEvent>) {
        if data.is_empty() {
            return;
        }
        if self.after_cr && data.first() == Some(&b'\n') {
            data = &data[1..];
        }
        self.after_cr = false;
        while !data.is_empty() {
            match memchr::memchr2(b'\r', b'\n', data) {
                Some(i) => {
                    self.line_bytes(&data[..i]);
                    self.end_line(out);
                    let crlf = data[i] == b'\r' && data.get(i + 1) == Some(&b'\n');
                    self.after_cr = data[i] == b'\r' && i + 1 == data.len();
                    data = &data[i + 1 + usize::from(crlf)..];
                }
                None => {
                    self.line_bytes(data);
                    break;
                }
            }
        }
    }

    /// Bytes of the current line (no terminator).
    fn line_bytes(&mut self, bytes: &[u8]) {
        let Some(&first) = bytes.first() else { return };
        if !self.line_started {
            self.line_started = true;
            self.comment = first == b':';
        }
        if self.comment || self.skipping {
            return;
        }
        self.event_bytes = self.event_bytes.saturating_add(bytes.len());
        if self.event_bytes > self.max_event_bytes {
            self.oversized += 1;
            self.skipping = true;
            self.line.clear();
            self.data.clear();
            self.event_type.clear();
            return;
        }
        self.line.extend_from_slice(bytes);
    }

    fn end_line(&mut self, out: &mut Vec<SseEvent>) {
        if !self.line_started {
            // Blank line: the event ends.
            if !self.skipping {
                self.dispatch(out);
            }
            self.skipping = false;
            self.event_bytes = 0;
            self.data.clear();
            self.event_type.clear();
            return;
        }
        if !self.comment && !self.skipping {
            self.field();
        }
        self.line.clear();
        self.line_started = false;
        self.comment = false;
    }

    /// Interpret the buffered field line.
    fn field(&mut self) {
        let line = &self.line[..];
        let (name, value) = match memchr::memchr(b':', line) {
            Some(i) => {
                let value = &line[i + 1..];
                (&line[..i], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        match name {
            b"data" => {
                self.data.extend_from_slice(value);
                self.data.push(b'\n');
            }
            b"event" => self.event_type = value.to_vec(),
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) {
        // An event without a data line is not dispatched.
        let Some(data) = self.data.strip_suffix(b"\n") else {
            return;
        };
        let event = (!self.event_type.is_empty()).then(|| String::from_utf8_lossy(&self.event_type).into_owned());
        out.push(SseEvent { event, data: String::from_utf8_lossy(data).into_owned() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(event: Option<&str>, data: &str) -> SseEvent {
        SseEvent { event: event.map(str::to_owned), data: data.to_owned() }
    }

    fn decode_pieces(pieces: &[&[u8]], max: usize) -> (Vec<SseEvent>, u64) {
        let mut decoder = SseDecoder::new(max);
        let mut out = Vec::new();
        for piece in pieces {
            decoder.push(piece, &mut out);
        }
        decoder.finish(&mut out);
        (out, decoder.oversized_events())
    }

    fn decode(stream: &[u8]) -> Vec<SseEvent> {
        decode_pieces(&[stream], 1 << 20).0
    }

    /// Decoding `stream` whole, split at every position, and byte at a time must agree.
    fn assert_split_invariant(stream: &[u8], max: usize) -> (Vec<SseEvent>, u64) {
        let whole = decode_pieces(&[stream], max);
        for at in 0..=stream.len() {
            let (a, b) = stream.split_at(at);
            assert_eq!(decode_pieces(&[a, b], max), whole, "split at {at} of {:?}", String::from_utf8_lossy(stream));
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(decode_pieces(&bytes, max), whole, "byte at a time: {:?}", String::from_utf8_lossy(stream));
        whole
    }

    const OPENAI: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n\
data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\n\
data: [DONE]\n\n";

    const ANTHROPIC: &[u8] = b"event: message_start\ndata: {\"type\":\"message_start\"}\n\n\
event: ping\ndata: {\"type\": \"ping\"}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"Hi\"}}\n\n";

    #[test]
    fn openai_style_stream() {
        let (events, oversized) = assert_split_invariant(OPENAI, 1 << 20);
        assert_eq!(
            events,
            vec![
                ev(None, r#"{"choices":[{"delta":{"content":"Hel"}}]}"#),
                ev(None, r#"{"choices":[{"delta":{"content":"lo"}}]}"#),
                ev(None, "[DONE]"),
            ]
        );
        assert_eq!(oversized, 0);
    }

    #[test]
    fn anthropic_style_stream_with_event_names() {
        let (events, _) = assert_split_invariant(ANTHROPIC, 1 << 20);
        assert_eq!(
            events,
            vec![
                ev(Some("message_start"), r#"{"type":"message_start"}"#),
                ev(Some("ping"), r#"{"type": "ping"}"#),
                ev(Some("content_block_delta"), r#"{"type":"content_block_delta","delta":{"text":"Hi"}}"#),
            ]
        );
    }

    #[test]
    fn data_lines_join_with_newline() {
        let events = decode(b"data: a\ndata:b\ndata\ndata:  c\n\n");
        assert_eq!(events, vec![ev(None, "a\nb\n\n c")], "one leading space removed, not two");
    }

    #[test]
    fn crlf_cr_and_lf_line_ends_are_equivalent() {
        let lf = b"event: e\ndata: x\ndata: y\n\ndata: z\n\n";
        let expected = vec![ev(Some("e"), "x\ny"), ev(None, "z")];
        for stream in [
            lf.to_vec(),
            lf.iter().flat_map(|&b| if b == b'\n' { b"\r\n".to_vec() } else { vec![b] }).collect(),
            lf.iter().map(|&b| if b == b'\n' { b'\r' } else { b }).collect(),
        ] {
            let (events, _) = assert_split_invariant(&stream, 1 << 20);
            assert_eq!(events, expected, "stream {:?}", String::from_utf8_lossy(&stream));
        }
        // Mixed, and a CR split from its LF across pushes.
        assert_eq!(decode(b"data: x\r\rdata: y\n\r\ndata: z\r\n\n"), vec![ev(None, "x"), ev(None, "y"), ev(None, "z")]);
        assert_eq!(decode_pieces(&[b"data: x\r", b"", b"\ndata: y\r", b"\n\r", b"\n"], 100).0, vec![ev(None, "x\ny")]);
    }

    #[test]
    fn comments_and_other_fields_are_ignored() {
        let stream = b": keep-alive\nid: 7\nretry: 100\nfoo: bar\ndata: x\n:comment\n\n: just a comment\n\n";
        let (events, _) = assert_split_invariant(stream, 1 << 20);
        assert_eq!(events, vec![ev(None, "x")]);
    }

    #[test]
    fn events_without_data_are_not_dispatched() {
        assert_eq!(
            decode(b"event: lonely\n\ndata: x\n\n"),
            vec![ev(None, "x")],
            "the type does not leak into the next event"
        );
        assert_eq!(decode(b"data\n\n"), vec![ev(None, "")], "an empty data line is still data");
        assert_eq!(decode(b"event:\ndata: x\n\n"), vec![ev(None, "x")], "an empty type is no type");
    }

    #[test]
    fn bom_is_ignored_only_at_the_start() {
        let (events, _) = assert_split_invariant(b"\xEF\xBB\xBFdata: x\n\n\xEF\xBB\xBFdata: y\n\n", 1 << 20);
        assert_eq!(events, vec![ev(None, "x")], "a second BOM makes the field name unknown");
        assert_eq!(decode(b"\xEF\xBBdata: x\n\n"), vec![], "half a BOM is content");
        assert_eq!(decode(b"\xEF\xBB\xBF\xEF\xBB\xBFdata: x\n\n"), vec![], "only one BOM is stripped");
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        let (events, _) = assert_split_invariant(b"event: \xff\ndata: a\xC3\n\n", 1 << 20);
        assert_eq!(events, vec![ev(Some("\u{FFFD}"), "a\u{FFFD}")]);
        assert_eq!(decode("data: héllo 🦀\n\n".as_bytes()), vec![ev(None, "héllo 🦀")]);
    }

    #[test]
    fn finish_flushes_an_unterminated_event() {
        assert_eq!(decode(b"data: a\n\ndata: b"), vec![ev(None, "a"), ev(None, "b")]);
        assert_eq!(decode(b"data: a\ndata: b\n"), vec![ev(None, "a\nb")]);
        assert_eq!(decode(b"data: a\r"), vec![ev(None, "a")]);
        assert_eq!(decode(b": only a comment"), vec![]);
        let mut decoder = SseDecoder::new(100);
        let mut out = Vec::new();
        decoder.push(b"data: a", &mut out);
        decoder.finish(&mut out);
        decoder.finish(&mut out);
        assert_eq!(out, vec![ev(None, "a")], "a second finish dispatches nothing");
    }

    #[test]
    fn oversized_events_are_dropped_and_counted() {
        // Field-line bytes: "data: 12345" is 11.
        let stream =
            b"data: 12345\n\ndata: 123456\n\ndata: 1234\ndata: 1\n\n: a comment as long as it likes\ndata: ok\n\n";
        let (events, oversized) = assert_split_invariant(stream, 11);
        assert_eq!(events, vec![ev(None, "12345"), ev(None, "ok")]);
        assert_eq!(oversized, 2, "the 12-byte event and the two-line 19-byte one");
    }

    #[test]
    fn oversized_event_is_not_buffered() {
        let mut decoder = SseDecoder::new(64);
        let mut out = Vec::new();
        decoder.push(b"event: big\ndata: ", &mut out);
        for _ in 0..10_000 {
            decoder.push(&[b'x'; 100], &mut out);
        }
        assert!(decoder.line.capacity() <= 128, "line buffer stayed small: {}", decoder.line.capacity());
        decoder.push(b"\ndata: more\n\ndata: next\n\n", &mut out);
        assert_eq!(out, vec![ev(None, "next")], "the big event's type does not leak");
        assert_eq!(decoder.oversized_events(), 1);
    }

    #[test]
    fn oversized_unterminated_event_is_not_flushed() {
        let (events, oversized) = decode_pieces(&[b"data: 0123456789"], 5);
        assert_eq!((events, oversized), (vec![], 1));
    }
}
