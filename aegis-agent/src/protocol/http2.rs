//! HTTP/2 (RFC 9113) frames of one direction of one connection, with that direction's HPACK
//! (RFC 7541) header state.
//!
//! A [`FrameDecoder`] is fed the bytes of one direction as capture rebuilt them, in
//! arbitrary pieces, and yields [`H2Event`]s: header lists (HEADERS plus its CONTINUATIONs,
//! decoded), DATA payload pieces, stream ends, RST_STREAM and GOAWAY. Padding and priority
//! fields are taken off; SETTINGS, PING, PRIORITY, WINDOW_UPDATE and unknown frame types
//! are skipped without being buffered (flow control is the endpoints' business, not an
//! observer's).
//!
//! DATA payloads are handed on as they arrive, never accumulated; other frames are kept
//! whole only up to [`H2Limits::max_frame`], and a header block (HEADERS or PUSH_PROMISE
//! with its CONTINUATIONs) up to [`H2Limits::max_header_block`].
//!
//! HPACK is stateful: every header block of a direction updates the dynamic table that the
//! next ones index into, so a block that cannot be decoded (a decoding error, a block past
//! the bound, a frame sequence that breaks the rules) leaves every later block of that
//! direction undecodable. The decoder then fails for good ([`H2Error`]) and the caller gives
//! the connection up; it never guesses. A decoded header list over
//! [`H2Limits::max_header_list`] keeps the table in step (it is decoded whole) but its
//! fields are not kept ([`HeaderList::oversized`]).
//!
//! HPACK itself is `loona-hpack` (a maintained fork of the `hpack` crate, with its panics on
//! malformed input fixed): static table, Huffman and dynamic table, with the table size an
//! encoder may ask for bounded here ([`MAX_HEADER_TABLE`]).

use std::borrow::Cow;

/// What a client sends first on an HTTP/2 connection (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
/// Dynamic table size an encoder may switch to. Endpoints announce theirs in SETTINGS
/// (4096 by default, what curl, node and python's h2 keep); a bigger one is refused as an
/// HPACK error rather than grown without bound.
pub const MAX_HEADER_TABLE: usize = 64 * 1024;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const PUSH_PROMISE: u8 = 0x5;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Bounds applied to hostile input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct H2Limits {
    /// Payload of a non-DATA frame kept whole (HEADERS, CONTINUATION, RST_STREAM, GOAWAY).
    pub max_frame: usize,
    /// Compressed header block (a HEADERS and its CONTINUATIONs) kept for decoding.
    pub max_header_block: usize,
    /// Decoded header list kept, counted as RFC 9113 §6.5.2 does (name + value + 32 per
    /// field).
    pub max_header_list: usize,
}

impl Default for H2Limits {
    fn default() -> Self {
        Self { max_frame: 1 << 20, max_header_block: 256 * 1024, max_header_list: 64 * 1024 }
    }
}

/// A decoded header list; names are as sent (lower case in valid HTTP/2).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderList {
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
    /// Over [`H2Limits::max_header_list`]: `fields` holds what fitted.
    pub oversized: bool,
}

impl HeaderList {
    /// The first value of `name`.
    pub fn get(&self, name: &[u8]) -> Option<&[u8]> {
        self.fields.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum H2Event {
    /// A header list on a stream: a request's or response's head, an interim (1xx) head, or
    /// trailers. An `EndStream` follows when the frame ended the stream.
    Headers {
        stream: u32,
        headers: HeaderList,
    },
    /// A piece of a DATA frame's payload (padding taken off).
    Data {
        stream: u32,
        data: Vec<u8>,
    },
    /// The stream's sender is done (END_STREAM).
    EndStream {
        stream: u32,
    },
    Reset {
        stream: u32,
        code: u32,
    },
    /// The sender processes no stream above `last_stream`.
    GoAway {
        last_stream: u32,
        code: u32,
    },
}

/// Why a direction cannot be decoded any more.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum H2Error {
    #[error("the connection does not start with the HTTP/2 client preface")]
    Preface,
    #[error("frame of type {frame_type} with {len} bytes breaks RFC 9113: {why}")]
    Frame { frame_type: u8, len: usize, why: &'static str },
    #[error("header block of {0} bytes is over the bound")]
    HeaderBlockTooLarge(usize),
    #[error("HPACK decoding failed: {0}")]
    Hpack(String),
}

enum State {
    /// Reading a frame header (`have` bytes of it so far).
    Header,
    /// Inside a DATA frame: the pad length byte still to read, data and padding left.
    Data { stream: u32, end_stream: bool, pad_len_pending: bool, data_left: usize, pad_left: usize },
    /// Keeping a frame's payload whole.
    Payload { frame_type: u8, flags: u8, stream: u32, len: usize },
    /// Passing over a frame nobody reads.
    Skip { left: usize },
}

/// A header block waiting for its CONTINUATIONs.
struct PendingBlock {
    stream: u32,
    end_stream: bool,
    /// PUSH_PROMISE: decoded (the table needs it), not handed on.
    promise: bool,
    block: Vec<u8>,
}

pub struct FrameDecoder {
    /// Client preface bytes still to match.
    preface_left: usize,
    state: State,
    header: [u8; FRAME_HEADER],
    have: usize,
    payload: Vec<u8>,
    pending: Option<PendingBlock>,
    hpack: loona_hpack::Decoder<'static>,
    limits: H2Limits,
    failed: Option<H2Error>,
    /// Bytes of frames skipped whole (control frames, unknown types).
    pub skipped_bytes: u64,
}

impl FrameDecoder {
    /// `preface`: this direction is the client's and starts with [`PREFACE`].
    pub fn new(preface: bool, limits: H2Limits) -> Self {
        let mut hpack = loona_hpack::Decoder::new();
        hpack.set_max_allowed_table_size(MAX_HEADER_TABLE);
        Self {
            preface_left: if preface { PREFACE.len() } else { 0 },
            state: State::Header,
            header: [0; FRAME_HEADER],
            have: 0,
            payload: Vec::new(),
            pending: None,
            hpack,
            limits,
            failed: None,
            skipped_bytes: 0,
        }
    }

    /// The error this direction failed with, if it did.
    pub fn failed(&self) -> Option<&H2Error> {
        self.failed.as_ref()
    }

    /// Decode `data`, the next bytes of this direction. After an error nothing more is
    /// decoded: every later call returns the same error.
    pub fn feed(&mut self, mut data: &[u8], out: &mut Vec<H2Event>) -> Result<(), H2Error> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.preface_left > 0 {
            let at = PREFACE.len() - self.preface_left;
            let n = self.preface_left.min(data.len());
            if data[..n] != PREFACE[at..at + n] {
                return self.fail(H2Error::Preface);
            }
            self.preface_left -= n;
            data = &data[n..];
        }
        while !data.is_empty() {
            let used = match self.step(data, out) {
                Ok(used) => used,
                Err(e) => return self.fail(e),
            };
            data = &data[used..];
        }
        Ok(())
    }

    fn fail(&mut self, e: H2Error) -> Result<(), H2Error> {
        self.failed = Some(e.clone());
        self.payload = Vec::new();
        self.pending = None;
        Err(e)
    }

    /// Take what the current state needs from `data`; returns the bytes used (at least 1).
    fn step(&mut self, data: &[u8], out: &mut Vec<H2Event>) -> Result<usize, H2Error> {
        match &mut self.state {
            State::Header => {
                let n = (FRAME_HEADER - self.have).min(data.len());
                self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
                self.have += n;
                if self.have == FRAME_HEADER {
                    self.have = 0;
                    self.start_frame(out)?;
                }
                Ok(n)
            }
            State::Skip { left } => {
                let n = (*left).min(data.len());
                *left -= n;
                self.skipped_bytes += n as u64;
                if *left == 0 {
                    self.state = State::Header;
                }
                Ok(n)
            }
            State::Data { stream, end_stream, pad_len_pending, data_left, pad_left } => {
                let (stream, end_stream) = (*stream, *end_stream);
                let used = if *pad_len_pending {
                    let pad = usize::from(data[0]);
                    // `data_left` holds the payload after the pad length byte.
                    if pad > *data_left {
                        return Err(H2Error::Frame {
                            frame_type: DATA,
                            len: *data_left + 1,
                            why: "padding longer than payload",
                        });
                    }
                    *pad_len_pending = false;
                    *data_left -= pad;
                    *pad_left = pad;
                    1
                } else if *data_left > 0 {
                    let n = (*data_left).min(data.len());
                    *data_left -= n;
                    out.push(H2Event::Data { stream, data: data[..n].to_vec() });
                    n
                } else {
                    let n = (*pad_left).min(data.len());
                    *pad_left -= n;
                    n
                };
                if let State::Data { pad_len_pending: false, data_left: 0, pad_left: 0, .. } = self.state {
                    self.end_data(stream, end_stream, out);
                }
                Ok(used)
            }
            State::Payload { frame_type, flags, stream, len } => {
                let n = (*len - self.payload.len()).min(data.len());
                self.payload.extend_from_slice(&data[..n]);
                if self.payload.len() == *len {
                    let (frame_type, flags, stream) = (*frame_type, *flags, *stream);
                    self.state = State::Header;
                    let payload = std::mem::take(&mut self.payload);
                    self.frame(frame_type, flags, stream, &payload, out)?;
                    self.payload = payload;
                    self.payload.clear();
                }
                Ok(n)
            }
        }
    }

    fn end_data(&mut self, stream: u32, end_stream: bool, out: &mut Vec<H2Event>) {
        self.state = State::Header;
        if end_stream {
            out.push(H2Event::EndStream { stream });
        }
    }

    /// A frame header was read: decide how its payload is taken.
    fn start_frame(&mut self, out: &mut Vec<H2Event>) -> Result<(), H2Error> {
        let h = &self.header;
        let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        let (frame_type, flags) = (h[3], h[4]);
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        let bad = |why| H2Error::Frame { frame_type, len, why };
        if self.pending.is_some() && frame_type != CONTINUATION {
            return Err(bad("a header block's CONTINUATION expected"));
        }
        match frame_type {
            DATA => {
                if stream == 0 {
                    return Err(bad("DATA on stream 0"));
                }
                let padded = flags & PADDED != 0;
                if padded && len == 0 {
                    return Err(bad("padded frame without its pad length"));
                }
                self.state = State::Data {
                    stream,
                    end_stream: flags & END_STREAM != 0,
                    pad_len_pending: padded,
                    data_left: len - usize::from(padded),
                    pad_left: 0,
                };
                if len == 0 {
                    self.end_data(stream, flags & END_STREAM != 0, out);
                }
            }
            HEADERS | PUSH_PROMISE | CONTINUATION | RST_STREAM | GOAWAY => {
                if len > self.limits.max_frame {
                    return Err(bad("frame over the bound"));
                }
                self.state = State::Payload { frame_type, flags, stream, len };
                if len == 0 {
                    self.state = State::Header;
                    self.frame(frame_type, flags, stream, &[], out)?;
                }
            }
            _ => {
                self.skipped_bytes += FRAME_HEADER as u64;
                self.state = if len == 0 { State::Header } else { State::Skip { left: len } };
            }
        }
        Ok(())
    }

    /// A kept frame is whole.
    fn frame(
        &mut self,
        frame_type: u8,
        flags: u8,
        stream: u32,
        p: &[u8],
        out: &mut Vec<H2Event>,
    ) -> Result<(), H2Error> {
        let bad = |why| H2Error::Frame { frame_type, len: p.len(), why };
        match frame_type {
            RST_STREAM => {
                let [a, b, c, d] = *p else { return Err(bad("RST_STREAM is not 4 bytes")) };
                if stream == 0 {
                    return Err(bad("RST_STREAM on stream 0"));
                }
                out.push(H2Event::Reset { stream, code: u32::from_be_bytes([a, b, c, d]) });
            }
            GOAWAY => {
                if p.len() < 8 || stream != 0 {
                    return Err(bad("GOAWAY shorter than 8 bytes or on a stream"));
                }
                let last_stream = u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff;
                let code = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
                out.push(H2Event::GoAway { last_stream, code });
            }
            HEADERS | PUSH_PROMISE => {
                if stream == 0 {
                    return Err(bad("header block on stream 0"));
                }
                let mut fragment = unpad(flags, p).ok_or_else(|| bad("padding longer than payload"))?;
                let skip = match frame_type {
                    HEADERS if flags & PRIORITY != 0 => 5,
                    HEADERS => 0,
                    _ => 4, // the promised stream id
                };
                fragment = fragment.get(skip..).ok_or_else(|| bad("shorter than its fixed fields"))?;
                self.pending = Some(PendingBlock {
                    stream,
                    end_stream: frame_type == HEADERS && flags & END_STREAM != 0,
                    promise: frame_type == PUSH_PROMISE,
                    block: Vec::new(),
                });
                self.block_fragment(fragment, flags & END_HEADERS != 0, out)?;
            }
            CONTINUATION => {
                if self.pending.as_ref().is_none_or(|b| b.stream != stream) {
                    return Err(bad("CONTINUATION without a header block on its stream"));
                }
                self.block_fragment(p, flags & END_HEADERS != 0, out)?;
            }
            _ => {}
        }
        Ok(())
    }

    fn block_fragment(&mut self, fragment: &[u8], end: bool, out: &mut Vec<H2Event>) -> Result<(), H2Error> {
        let pending = self.pending.as_mut().expect("a header block is open");
        if pending.block.len() + fragment.len() > self.limits.max_header_block {
            return Err(H2Error::HeaderBlockTooLarge(pending.block.len() + fragment.len()));
        }
        pending.block.extend_from_slice(fragment);
        if !end {
            return Ok(());
        }
        let PendingBlock { stream, end_stream, promise, block } = self.pending.take().expect("open");
        let mut headers = HeaderList::default();
        let mut size = 0usize;
        let max = self.limits.max_header_list;
        self.hpack
            .decode_with_cb(&block, |name: Cow<[u8]>, value: Cow<[u8]>| {
                size += name.len() + value.len() + 32;
                if size > max {
                    headers.oversized = true;
                } else {
                    headers.fields.push((name.into_owned(), value.into_owned()));
                }
            })
            .map_err(|e| H2Error::Hpack(format!("{e:?}")))?;
        if !promise {
            out.push(H2Event::Headers { stream, headers });
            if end_stream {
                out.push(H2Event::EndStream { stream });
            }
        }
        Ok(())
    }
}

/// A padded frame's payload without its pad length byte and padding; None when the padding
/// does not fit.
fn unpad(flags: u8, p: &[u8]) -> Option<&[u8]> {
    if flags & PADDED == 0 {
        return Some(p);
    }
    let (&pad, rest) = p.split_first()?;
    rest.len().checked_sub(usize::from(pad)).map(|end| &rest[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(frame_type: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, frame_type, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn encode(fields: &[(&str, &str)], encoder: &mut loona_hpack::Encoder) -> Vec<u8> {
        encoder.encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
    }

    fn decode_all(decoder: &mut FrameDecoder, bytes: &[u8], piece: usize) -> Result<Vec<H2Event>, H2Error> {
        let mut out = Vec::new();
        for chunk in bytes.chunks(piece.max(1)) {
            decoder.feed(chunk, &mut out)?;
        }
        Ok(out)
    }

    fn headers(fields: &[(&str, &str)]) -> HeaderList {
        HeaderList {
            fields: fields.iter().map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec())).collect(),
            oversized: false,
        }
    }

    /// A client's bytes: preface, SETTINGS, two interleaved streams with CONTINUATION,
    /// padding, priority, a WINDOW_UPDATE and trailers. The same events come out whatever
    /// the pieces the bytes arrive in.
    #[test]
    fn interleaved_streams_decode_the_same_in_any_pieces() {
        let mut enc = loona_hpack::Encoder::new();
        let h1 = encode(
            &[
                (":method", "POST"),
                (":path", "/v1/chat/completions"),
                (":authority", "api"),
                ("content-type", "application/json"),
            ],
            &mut enc,
        );
        let h3 = encode(&[(":method", "POST"), (":path", "/v1/embeddings"), (":authority", "api")], &mut enc);
        // The second request of stream 1's kind indexes into the dynamic table.
        let trailers = encode(&[("x-checksum", "abc")], &mut enc);
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]));
        // HEADERS of stream 1 split over a CONTINUATION, padded with priority.
        let (a, b) = h1.split_at(h1.len() / 2);
        let mut p = vec![3];
        p.extend_from_slice(&[0, 0, 0, 0, 16]);
        p.extend_from_slice(a);
        p.extend_from_slice(&[0, 0, 0]);
        bytes.extend(frame(HEADERS, PADDED | PRIORITY, 1, &p));
        bytes.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        bytes.extend(frame(HEADERS, END_HEADERS, 3, &h3));
        bytes.extend(frame(DATA, 0, 1, b"{\"model\":"));
        bytes.extend(frame(0x8, 0, 0, &[0, 0, 1, 0]));
        let mut padded = vec![2];
        padded.extend_from_slice(b"[1]");
        padded.extend_from_slice(&[0, 0]);
        bytes.extend(frame(DATA, PADDED | END_STREAM, 3, &padded));
        bytes.extend(frame(DATA, 0, 1, b"\"m\"}"));
        bytes.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &trailers));
        bytes.extend(frame(RST_STREAM, 0, 5, &[0, 0, 0, 8]));
        bytes.extend(frame(GOAWAY, 0, 0, &[0, 0, 0, 3, 0, 0, 0, 0, b'd', b'b', b'g']));
        let expected = vec![
            H2Event::Headers {
                stream: 1,
                headers: headers(&[
                    (":method", "POST"),
                    (":path", "/v1/chat/completions"),
                    (":authority", "api"),
                    ("content-type", "application/json"),
                ]),
            },
            H2Event::Headers {
                stream: 3,
                headers: headers(&[(":method", "POST"), (":path", "/v1/embeddings"), (":authority", "api")]),
            },
            H2Event::Data { stream: 1, data: b"{\"model\":".to_vec() },
            H2Event::Data { stream: 3, data: b"[1]".to_vec() },
            H2Event::EndStream { stream: 3 },
            H2Event::Data { stream: 1, data: b"\"m\"}".to_vec() },
            H2Event::Headers { stream: 1, headers: headers(&[("x-checksum", "abc")]) },
            H2Event::EndStream { stream: 1 },
            H2Event::Reset { stream: 5, code: 8 },
            H2Event::GoAway { last_stream: 3, code: 0 },
        ];
        for piece in [1, 2, 7, 9, 64, bytes.len()] {
            let mut d = FrameDecoder::new(true, H2Limits::default());
            let mut events = decode_all(&mut d, &bytes, piece).unwrap();
            // DATA pieces follow the input's: join adjacent ones of one stream to compare.
            events.dedup_by(|b, a| match (a, b) {
                (H2Event::Data { stream: s1, data: d1 }, H2Event::Data { stream: s2, data: d2 }) if s1 == s2 => {
                    d1.extend_from_slice(d2);
                    true
                }
                _ => false,
            });
            assert_eq!(events, expected, "pieces of {piece}");
        }
    }

    #[test]
    fn hpack_errors_poison_the_direction() {
        let mut d = FrameDecoder::new(false, H2Limits::default());
        // Index 70 does not exist in an empty dynamic table.
        let bytes = frame(HEADERS, END_HEADERS, 1, &[0x80 | 70]);
        let err = decode_all(&mut d, &bytes, 100).unwrap_err();
        assert!(matches!(err, H2Error::Hpack(_)), "{err:?}");
        // Everything later fails too, even a valid frame.
        let mut out = Vec::new();
        assert_eq!(d.feed(&frame(RST_STREAM, 0, 1, &[0, 0, 0, 0]), &mut out), Err(err));
        assert!(out.is_empty());
    }

    #[test]
    fn a_table_size_over_the_bound_is_an_error() {
        let mut d = FrameDecoder::new(false, H2Limits::default());
        // Dynamic table size update to 1 MiB (0x3f prefix, then the integer's rest).
        let mut block = vec![0x3f];
        let mut v = (1usize << 20) - 31;
        while v >= 128 {
            block.push((v % 128) as u8 | 0x80);
            v /= 128;
        }
        block.push(v as u8);
        block.push(0x82); // :method GET
        let err = decode_all(&mut d, &frame(HEADERS, END_HEADERS, 1, &block), 100).unwrap_err();
        assert!(matches!(err, H2Error::Hpack(_)), "{err:?}");
    }

    #[test]
    fn broken_frame_sequences_are_errors() {
        let mut enc = loona_hpack::Encoder::new();
        let block = encode(&[(":status", "200")], &mut enc);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("DATA on stream 0", frame(DATA, 0, 0, b"x")),
            ("padding past the payload", frame(DATA, PADDED, 1, &[5, b'a'])),
            ("header padding past the payload", frame(HEADERS, PADDED | END_HEADERS, 1, &[9, 0x88])),
            ("RST_STREAM of 3 bytes", frame(RST_STREAM, 0, 1, &[0, 0, 0])),
            ("GOAWAY on a stream", frame(GOAWAY, 0, 1, &[0; 8])),
            ("CONTINUATION alone", frame(CONTINUATION, END_HEADERS, 1, &block)),
            ("a frame inside a header block", [frame(HEADERS, 0, 1, &block), frame(DATA, 0, 1, b"x")].concat()),
            (
                "CONTINUATION of another stream",
                [frame(HEADERS, 0, 1, &block), frame(CONTINUATION, END_HEADERS, 3, &[])].concat(),
            ),
        ];
        for (what, bytes) in cases {
            let mut d = FrameDecoder::new(false, H2Limits::default());
            let err = decode_all(&mut d, &bytes, 3).unwrap_err();
            assert!(matches!(err, H2Error::Frame { .. }), "{what}: {err:?}");
        }
        let mut d = FrameDecoder::new(true, H2Limits::default());
        assert_eq!(decode_all(&mut d, b"GET / HTTP/1.1\r\n", 4), Err(H2Error::Preface));
    }

    #[test]
    fn oversized_blocks_and_lists_are_bounded() {
        let limits = H2Limits { max_frame: 1 << 20, max_header_block: 4096, max_header_list: 200 };
        let mut enc = loona_hpack::Encoder::new();
        let big = "v".repeat(300);
        let block = encode(&[(":status", "200"), ("x-big", &big), ("x-after", "1")], &mut enc);
        let mut d = FrameDecoder::new(false, limits);
        let events = decode_all(&mut d, &frame(HEADERS, END_HEADERS, 1, &block), 50).unwrap();
        let H2Event::Headers { headers, .. } = &events[0] else { panic!("{events:?}") };
        assert!(headers.oversized);
        assert_eq!(headers.get(b":status"), Some(&b"200"[..]));
        // The table stayed in step: the next block indexes what the oversized one added.
        let next = encode(&[(":status", "200"), ("x-big", &big)], &mut enc);
        assert!(next.len() < 10, "indexed, not literal");
        let events = decode_all(&mut d, &frame(HEADERS, END_HEADERS, 3, &next), 50).unwrap();
        let H2Event::Headers { headers, .. } = &events[0] else { panic!("{events:?}") };
        assert!(headers.oversized, "300 bytes are over 200");
        // A block over its bound, built from CONTINUATIONs, fails the direction.
        let mut bytes = frame(HEADERS, 0, 5, &[0; 3000]);
        bytes.extend(frame(CONTINUATION, END_HEADERS, 5, &[0; 3000]));
        assert_eq!(decode_all(&mut d, &bytes, 1000), Err(H2Error::HeaderBlockTooLarge(6000)));
    }

    #[test]
    fn control_frames_are_skipped_without_being_kept() {
        let mut d = FrameDecoder::new(false, H2Limits { max_frame: 16, ..H2Limits::default() });
        // A 64 KiB unknown frame and a WINDOW_UPDATE pass; a 17-byte GOAWAY is over the bound.
        let mut bytes = frame(0xfa, 0, 0, &vec![7; 65536]);
        bytes.extend(frame(0x8, 0, 1, &[0, 0, 1, 0]));
        bytes.extend(frame(DATA, END_STREAM, 1, b""));
        let events = decode_all(&mut d, &bytes, 4096).unwrap();
        assert_eq!(events, vec![H2Event::EndStream { stream: 1 }]);
        assert_eq!(d.skipped_bytes, 65536 + 4 + 18);
        let err = decode_all(&mut d, &frame(GOAWAY, 0, 0, &[0; 17]), 4).unwrap_err();
        assert!(matches!(err, H2Error::Frame { .. }));
    }
}
