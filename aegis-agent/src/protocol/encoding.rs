//! Content decoding (identity, gzip, deflate, br) with a hard cap on decoded bytes, so a
//! compression bomb costs at most the cap.
//!
//! Design: a body is decoded by a chain of push-driven stages, one per listed coding, run
//! in reverse order of the `Content-Encoding` list (the last coding applied is undone
//! first). Each stage turns its input into output through a fixed scratch buffer
//! ([`SCRATCH`] bytes) and hands every piece to the next stage at once, so nothing is
//! buffered between pushes apart from the codecs' own state (a 32 KiB deflate window, or
//! a brotli ring buffer of at most 16 MiB: large-window brotli is refused).
//!
//! Bounds:
//! - at most `cap` decoded bytes are appended to `out`, over all pushes together;
//! - once output overflows the cap, a coded body stops decoding for good: the overflow
//!   seen so far is counted in [`BodyDecoder::over_cap`] (a lower bound of what the body
//!   would have decoded to), and later pushes do no work. A bomb therefore costs
//!   O(cap + [`SCRATCH`]), not O(decoded size). Identity bodies count every byte past the
//!   cap exactly, which costs nothing;
//! - in a chain ("gzip, br"), each inner stage may produce at most `2 * cap + 64 KiB`
//!   (a real compressed stream is barely larger than what it decodes to); bytes past that
//!   are counted in `over_cap` too and stop decoding;
//! - at most [`MAX_CODINGS`] codings are accepted.
//!
//! Corrupt input gives [`DecodeError::Corrupt`]; the error is sticky (later pushes return
//! it again). Bytes after the end of a compressed stream (trailing garbage, which browsers
//! ignore) are ignored; a gzip body may hold several members (RFC 1952 §2.2).

use brotli_decompressor::{BrotliDecompressStream, BrotliResult, BrotliState, StandardAlloc};
use flate2::{Crc, Decompress, FlushDecompress, Status};

/// Size of each stage's output buffer: the granularity at which output is handed on, and
/// so the most a stage decodes past the cap before it stops.
pub const SCRATCH: usize = 16 * 1024;

/// Most content codings accepted in one `Content-Encoding` value.
pub const MAX_CODINGS: usize = 4;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unsupported content-encoding {0:?}")]
    Unsupported(String),
    #[error("corrupt {0} data")]
    Corrupt(&'static str),
}

/// Streaming decoder of one message body.
pub struct BodyDecoder {
    /// Codecs in decoding order (reverse of the header's order).
    stages: Vec<Stage>,
    sink: Sink,
    failed: Option<DecodeError>,
}

impl BodyDecoder {
    /// `content_encoding` is the header value (may list several, applied in order);
    /// None or "identity" decodes nothing. `cap`: decoded bytes kept at most.
    pub fn new(content_encoding: Option<&[u8]>, cap: usize) -> Result<Self, DecodeError> {
        let mut codecs = Vec::new();
        for token in content_encoding.unwrap_or_default().split(|&b| b == b',') {
            let token = token.trim_ascii();
            if token.is_empty() || token.eq_ignore_ascii_case(b"identity") {
                continue;
            }
            let codec = if token.eq_ignore_ascii_case(b"gzip") || token.eq_ignore_ascii_case(b"x-gzip") {
                Codec::Gzip(Gzip::new())
            } else if token.eq_ignore_ascii_case(b"deflate") {
                Codec::Deflate(Deflate::new())
            } else if token.eq_ignore_ascii_case(b"br") {
                Codec::Brotli(Box::new(BrotliState::new_strict(
                    StandardAlloc::default(),
                    StandardAlloc::default(),
                    StandardAlloc::default(),
                )))
            } else {
                return Err(DecodeError::Unsupported(String::from_utf8_lossy(token).into_owned()));
            };
            if codecs.len() == MAX_CODINGS {
                let all = String::from_utf8_lossy(content_encoding.unwrap_or_default());
                return Err(DecodeError::Unsupported(all.into_owned()));
            }
            codecs.push(codec);
        }
        let inner_budget = (cap as u64).saturating_mul(2).saturating_add(64 * 1024);
        let last = codecs.len().saturating_sub(1);
        let stages = codecs
            .into_iter()
            .rev()
            .enumerate()
            .map(|(i, codec)| Stage {
                codec,
                done: false,
                scratch: vec![0; SCRATCH].into_boxed_slice(),
                produced: 0,
                budget: (i < last).then_some(inner_budget),
            })
            .collect();
        Ok(Self { stages, sink: Sink { cap, kept: 0, over_cap: 0, stopped: false }, failed: None })
    }

    /// Decode `input`, append the output to `out` (never past the cap in total).
    /// Returns the bytes appended.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, DecodeError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        let before = out.len();
        if self.stages.is_empty() {
            // Identity: counting the overflow exactly is free, so never stop.
            self.sink.take(input, out);
            return Ok(out.len() - before);
        }
        if self.sink.stopped {
            return Ok(0);
        }
        if let Err(error) = run(&mut self.stages, input, &mut self.sink, out) {
            self.failed = Some(error.clone());
            return Err(error);
        }
        Ok(out.len() - before)
    }

    /// Decoded bytes that did not fit under the cap and were discarded (counted, not kept).
    pub fn over_cap(&self) -> u64 {
        self.sink.over_cap
    }

    /// Whether every coding has reached the end of its stream (always true for identity):
    /// false after the last push means the body was cut short, or decoding stopped at
    /// the cap.
    pub fn is_complete(&self) -> bool {
        // A coded body stopped at the cap was not decoded to its end, even when the step
        // that overflowed also reached the end of the stream.
        let cut = self.sink.stopped && !self.stages.is_empty();
        !cut && self.stages.iter().all(|stage| match &stage.codec {
            Codec::Gzip(gz) => gz.at_member_boundary(),
            _ => stage.done,
        })
    }
}

/// Where the last stage's output goes: `out`, up to the cap.
struct Sink {
    cap: usize,
    kept: usize,
    over_cap: u64,
    /// Output overflowed: stop decoding.
    stopped: bool,
}

impl Sink {
    fn take(&mut self, data: &[u8], out: &mut Vec<u8>) {
        let keep = data.len().min(self.cap - self.kept);
        out.extend_from_slice(&data[..keep]);
        self.kept += keep;
        if keep < data.len() {
            self.over_cap += (data.len() - keep) as u64;
            self.stopped = true;
        }
    }
}

struct Stage {
    codec: Codec,
    /// End of the compressed stream reached: further input is trailing garbage.
    done: bool,
    scratch: Box<[u8]>,
    produced: u64,
    /// Inner stages only: most bytes this stage may hand to the next one.
    budget: Option<u64>,
}

/// Feed `input` through `stages`, delivering the final output to `sink`.
fn run(stages: &mut [Stage], mut input: &[u8], sink: &mut Sink, out: &mut Vec<u8>) -> Result<(), DecodeError> {
    let Some((stage, rest)) = stages.split_first_mut() else {
        sink.take(input, out);
        return Ok(());
    };
    // Each step consumes input or produces output; a step doing neither means the codec
    // needs more input (everything it could decode has been handed on).
    while !sink.stopped {
        if stage.done {
            return Ok(());
        }
        let step = stage.codec.step(input, &mut stage.scratch)?;
        input = &input[step.used..];
        stage.done = step.done;
        let mut piece = &stage.scratch[..step.produced];
        if let Some(budget) = stage.budget {
            let allowed = budget.saturating_sub(stage.produced).min(piece.len() as u64) as usize;
            if allowed < piece.len() {
                sink.over_cap += (piece.len() - allowed) as u64;
                sink.stopped = true;
                piece = &piece[..allowed];
            }
        }
        stage.produced += piece.len() as u64;
        if !piece.is_empty() {
            run(rest, piece, sink, out)?;
        }
        if step.used == 0 && step.produced == 0 {
            break;
        }
    }
    Ok(())
}

/// What one decoding step did.
struct Step {
    used: usize,
    produced: usize,
    /// The compressed stream ended.
    done: bool,
}

enum Codec {
    Gzip(Gzip),
    Deflate(Deflate),
    Brotli(Box<BrotliState<StandardAlloc, StandardAlloc, StandardAlloc>>),
}

impl Codec {
    fn step(&mut self, input: &[u8], buf: &mut [u8]) -> Result<Step, DecodeError> {
        match self {
            Codec::Gzip(gz) => gz.step(input, buf).ok_or(DecodeError::Corrupt("gzip")),
            Codec::Deflate(d) => d.step(input, buf).ok_or(DecodeError::Corrupt("deflate")),
            Codec::Brotli(state) => brotli_step(state, input, buf).ok_or(DecodeError::Corrupt("br")),
        }
    }
}

/// One call of the inflater; None on corrupt data.
fn inflate(d: &mut Decompress, input: &[u8], buf: &mut [u8]) -> Option<Step> {
    let (in0, out0) = (d.total_in(), d.total_out());
    let status = d.decompress(input, buf, FlushDecompress::None).ok()?;
    Some(Step {
        used: (d.total_in() - in0) as usize,
        produced: (d.total_out() - out0) as usize,
        // BufError only means "no progress possible now": more input is needed.
        done: status == Status::StreamEnd,
    })
}

fn brotli_step(
    state: &mut BrotliState<StandardAlloc, StandardAlloc, StandardAlloc>,
    input: &[u8],
    buf: &mut [u8],
) -> Option<Step> {
    // The decoder refuses inputs of 4 GiB or more in one call.
    let input = &input[..input.len().min(1 << 30)];
    let (mut avail_in, mut in_off) = (input.len(), 0);
    let (mut avail_out, mut out_off, mut total) = (buf.len(), 0, 0);
    let result =
        BrotliDecompressStream(&mut avail_in, &mut in_off, input, &mut avail_out, &mut out_off, buf, &mut total, state);
    let done = match result {
        BrotliResult::ResultFailure => return None,
        BrotliResult::ResultSuccess => true,
        BrotliResult::NeedsMoreInput | BrotliResult::NeedsMoreOutput => false,
    };
    Some(Step { used: in_off, produced: out_off, done })
}

/// `deflate` as sent: RFC 9110 means zlib-wrapped (RFC 1950), but some servers send raw
/// deflate (RFC 1951); like browsers, sniff the first two bytes for a zlib header.
struct Deflate {
    sniff: Vec<u8>,
    inflater: Option<Decompress>,
}

impl Deflate {
    fn new() -> Self {
        Self { sniff: Vec::with_capacity(2), inflater: None }
    }

    fn step(&mut self, input: &[u8], buf: &mut [u8]) -> Option<Step> {
        if let Some(inflater) = &mut self.inflater {
            return inflate(inflater, input, buf);
        }
        let take = input.len().min(2 - self.sniff.len());
        self.sniff.extend_from_slice(&input[..take]);
        if self.sniff.len() < 2 {
            return Some(Step { used: take, produced: 0, done: false });
        }
        let (cmf, flg) = (self.sniff[0], self.sniff[1]);
        // Method 8 (deflate), window ≤ 32 KiB, check bits valid, no preset dictionary.
        let zlib =
            cmf & 0x0f == 8 && cmf >> 4 <= 7 && ((u16::from(cmf) << 8) | u16::from(flg)) % 31 == 0 && flg & 0x20 == 0;
        let inflater = self.inflater.insert(Decompress::new(zlib));
        // Two bytes decode to a few bytes at most, so this call takes both of them; any
        // left over follow an already finished stream and are ignored.
        let step = inflate(inflater, &self.sniff, buf)?;
        Some(Step { used: take, ..step })
    }
}

/// gzip (RFC 1952): header, raw deflate, CRC-32 and length trailer; members may follow
/// one another.
struct Gzip {
    phase: GzPhase,
    /// A member was decoded: what follows may be another member, or trailing garbage.
    member_seen: bool,
    inflater: Decompress,
    crc: Crc,
}

enum GzPhase {
    Header(GzHeader),
    Body,
    Trailer {
        buf: [u8; 8],
        len: usize,
    },
    /// Trailing garbage after the last member: ignored.
    Garbage,
}

/// Incremental gzip header parser: 10 fixed bytes, then the optional fields the flags
/// announce, in this order.
#[derive(Default)]
struct GzHeader {
    fixed_len: usize,
    /// Optional fields still to read.
    pending: u8,
    /// Bytes read of the current optional field.
    count: u32,
    /// FEXTRA's length.
    xlen: u32,
}

const FHCRC: u8 = 0x02;
const FEXTRA: u8 = 0x04;
const FNAME: u8 = 0x08;
const FCOMMENT: u8 = 0x10;
const FIELD_ORDER: [u8; 4] = [FEXTRA, FNAME, FCOMMENT, FHCRC];

enum HeaderByte {
    More,
    Done,
    /// Not a gzip member at all (bad magic).
    NotGzip,
    Corrupt,
}

impl GzHeader {
    fn byte(&mut self, b: u8) -> HeaderByte {
        if self.fixed_len < 10 {
            self.fixed_len += 1;
            match (self.fixed_len, b) {
                (1, b) if b != 0x1f => return HeaderByte::NotGzip,
                (2, b) if b != 0x8b => return HeaderByte::NotGzip,
                // Compression method 8 (deflate) is the only one defined.
                (3, b) if b != 8 => return HeaderByte::Corrupt,
                // Reserved flag bits must be zero.
                (4, b) if b & 0xe0 != 0 => return HeaderByte::Corrupt,
                (4, b) => self.pending = b & (FEXTRA | FNAME | FCOMMENT | FHCRC),
                _ => {}
            }
            return self.state();
        }
        let Some(field) = FIELD_ORDER.into_iter().find(|&f| self.pending & f != 0) else {
            return HeaderByte::Done;
        };
        self.count += 1;
        let field_done = match field {
            // Little-endian length, then that many bytes.
            FEXTRA => {
                if self.count <= 2 {
                    self.xlen |= u32::from(b) << (8 * (self.count - 1));
                }
                self.count >= 2 && self.count == 2 + self.xlen
            }
            // Zero-terminated strings.
            FNAME | FCOMMENT => b == 0,
            // FHCRC: two bytes, not checked (browsers don't either).
            _ => self.count == 2,
        };
        if field_done {
            self.pending &= !field;
            self.count = 0;
        }
        self.state()
    }

    fn state(&self) -> HeaderByte {
        if self.fixed_len == 10 && self.pending == 0 { HeaderByte::Done } else { HeaderByte::More }
    }
}

impl Gzip {
    fn new() -> Self {
        Self {
            phase: GzPhase::Header(GzHeader::default()),
            member_seen: false,
            inflater: Decompress::new(false),
            crc: Crc::new(),
        }
    }

    fn step(&mut self, input: &[u8], buf: &mut [u8]) -> Option<Step> {
        let mut used = 0;
        match &mut self.phase {
            GzPhase::Header(header) => {
                for &b in input {
                    used += 1;
                    match header.byte(b) {
                        HeaderByte::More => {}
                        HeaderByte::Done => {
                            self.phase = GzPhase::Body;
                            break;
                        }
                        HeaderByte::NotGzip if self.member_seen => {
                            self.phase = GzPhase::Garbage;
                            break;
                        }
                        HeaderByte::NotGzip | HeaderByte::Corrupt => return None,
                    }
                }
                Some(Step { used, produced: 0, done: false })
            }
            GzPhase::Body => {
                let step = inflate(&mut self.inflater, input, buf)?;
                self.crc.update(&buf[..step.produced]);
                if step.done {
                    self.phase = GzPhase::Trailer { buf: [0; 8], len: 0 };
                }
                Some(Step { done: false, ..step })
            }
            GzPhase::Trailer { buf: trailer, len } => {
                used = input.len().min(8 - *len);
                trailer[*len..*len + used].copy_from_slice(&input[..used]);
                *len += used;
                if *len < 8 {
                    return Some(Step { used, produced: 0, done: false });
                }
                let crc = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
                let size = u32::from_le_bytes([trailer[4], trailer[5], trailer[6], trailer[7]]);
                if crc != self.crc.sum() || size != self.crc.amount() {
                    return None;
                }
                self.crc.reset();
                self.inflater.reset(false);
                self.member_seen = true;
                self.phase = GzPhase::Header(GzHeader::default());
                Some(Step { used, produced: 0, done: false })
            }
            GzPhase::Garbage => Some(Step { used: input.len(), produced: 0, done: false }),
        }
    }

    /// Whether the stream may end here: after a complete member.
    fn at_member_boundary(&self) -> bool {
        match &self.phase {
            GzPhase::Header(header) => self.member_seen && header.fixed_len == 0,
            GzPhase::Garbage => true,
            GzPhase::Body | GzPhase::Trailer { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use flate2::{
        Compression,
        write::{DeflateEncoder, GzEncoder, ZlibEncoder},
    };

    use super::*;

    /// `BROTLI_PLAIN` compressed by the reference encoder (python brotli, quality 11).
    const BROTLI: &[u8] = &[
        0x1b, 0xfb, 0x03, 0x18, 0x9c, 0x07, 0xb6, 0xad, 0x62, 0x7d, 0xd1, 0x6c, 0xe3, 0x70, 0xd0, 0xc4, 0xb3, 0xb7,
        0xa9, 0x45, 0xf6, 0xb6, 0x74, 0xb6, 0x82, 0x4e, 0x57, 0x9f, 0x04, 0x41, 0x2a, 0x4b, 0x11, 0xb6, 0xb7, 0x16,
        0xa4, 0x94, 0x55, 0x1a, 0xd4, 0x16, 0x44, 0x50, 0xe9, 0x02, 0x38, 0x59, 0xc6, 0x27, 0x2f, 0x23, 0x37, 0x98,
        0xba, 0xf6, 0x0d, 0x0a,
    ];
    const BROTLI_LINE: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"Hello\"}}]}\n\n";
    fn brotli_plain() -> Vec<u8> {
        BROTLI_LINE.repeat(20)
    }

    /// 50 MiB of zeros, brotli quality 11 (python brotli).
    const BROTLI_BOMB: &[u8] = &[
        0xcb, 0xff, 0xff, 0x3f, 0xf8, 0x27, 0x00, 0xe2, 0xb1, 0x40, 0x20, 0xf7, 0xfe, 0x8f, 0xff, 0xff, 0x7f, 0xf0,
        0x4f, 0x00, 0xc4, 0x61, 0x11, 0x80, 0xee, 0xfd, 0x1f, 0xff, 0xff, 0xff, 0xe0, 0x9f, 0x00, 0x88, 0xc3, 0x02,
        0x00, 0xdd, 0xfb, 0x3f, 0xfe, 0xff, 0xff, 0xc1, 0x3f, 0x01, 0x10, 0x87, 0x05, 0x00, 0xba, 0xf7, 0x7f, 0xfc,
        0xff, 0xff, 0x83, 0x7f, 0x02, 0x20, 0x0e, 0x0b, 0x00, 0x74, 0xef, 0xff, 0xf8, 0xff, 0xff, 0x07, 0xff, 0x04,
        0x40, 0x1c, 0x16, 0x00, 0xe8, 0xde, 0xff, 0xe5, 0xff, 0xff, 0x07, 0xfe, 0x09, 0x80, 0x38, 0x2c, 0x00, 0xd0,
        0xbd, 0xff, 0x00,
    ];

    fn sample() -> Vec<u8> {
        (0..20_000u32).flat_map(|i| format!("token {i} {}\n", i % 7).into_bytes()).collect()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = ZlibEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn raw_deflate(data: &[u8]) -> Vec<u8> {
        let mut e = DeflateEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// A gzip member with every optional header field, built by hand.
    fn gzip_all_fields(data: &[u8]) -> Vec<u8> {
        let mut out = vec![0x1f, 0x8b, 8, FEXTRA | FNAME | FCOMMENT | FHCRC, 1, 2, 3, 4, 0, 255];
        out.extend_from_slice(&[3, 0, b'a', b'b', b'c']); // FEXTRA: xlen 3
        out.extend_from_slice(b"name.txt\0");
        out.extend_from_slice(b"a comment\0");
        out.extend_from_slice(&[0xaa, 0xbb]); // FHCRC
        out.extend_from_slice(&raw_deflate(data));
        let mut crc = Crc::new();
        crc.update(data);
        out.extend_from_slice(&crc.sum().to_le_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out
    }

    /// Decode `body` pushed in pieces of `piece` bytes; returns (output, over_cap).
    fn decode(encoding: Option<&str>, cap: usize, body: &[u8], piece: usize) -> Result<(Vec<u8>, u64), DecodeError> {
        let mut decoder = BodyDecoder::new(encoding.map(str::as_bytes), cap)?;
        let mut out = Vec::new();
        for chunk in body.chunks(piece.max(1)) {
            let before = out.len();
            let appended = decoder.push(chunk, &mut out)?;
            assert_eq!(appended, out.len() - before, "push must return the bytes it appended");
        }
        Ok((out, decoder.over_cap()))
    }

    /// Decodes whole, byte at a time and in odd pieces; all must give `expected`.
    fn assert_decodes(encoding: &str, body: &[u8], expected: &[u8]) {
        for piece in [body.len(), 1, 7, 4096] {
            let (out, over) = decode(Some(encoding), usize::MAX, body, piece)
                .unwrap_or_else(|e| panic!("{encoding} in pieces of {piece}: {e}"));
            assert!(
                out == expected,
                "{encoding} in pieces of {piece}: got {} bytes, want {}",
                out.len(),
                expected.len()
            );
            assert_eq!(over, 0, "{encoding}: nothing over the cap");
        }
    }

    #[test]
    fn identity_passes_through_under_the_cap() {
        for encoding in [None, Some("identity"), Some(""), Some(" Identity , ")] {
            let (out, over) = decode(encoding, 10, b"0123456789abcdef", 3).unwrap();
            assert_eq!(out, b"0123456789", "{encoding:?}");
            assert_eq!(over, 6, "{encoding:?}: identity counts the overflow exactly");
        }
        let decoder = BodyDecoder::new(None, 0).unwrap();
        assert!(decoder.is_complete(), "identity is always complete");
    }

    #[test]
    fn gzip_round_trips_in_any_pieces() {
        let data = sample();
        let body = gzip(&data);
        assert_decodes("gzip", &body, &data);
        assert_decodes("x-gzip", &body, &data);
        assert_decodes("GZip", &body, &data);
    }

    #[test]
    fn gzip_header_optional_fields_are_skipped() {
        let data = sample();
        assert_decodes("gzip", &gzip_all_fields(&data), &data);
    }

    #[test]
    fn gzip_members_concatenate_and_trailing_garbage_is_ignored() {
        let mut body = gzip(b"first ");
        body.extend_from_slice(&gzip(b"second"));
        assert_decodes("gzip", &body, b"first second");
        body.extend_from_slice(b"\0\0garbage");
        assert_decodes("gzip", &body, b"first second");
        let mut decoder = BodyDecoder::new(Some(b"gzip"), 100).unwrap();
        decoder.push(&body, &mut Vec::new()).unwrap();
        assert!(decoder.is_complete(), "ended after a whole member");
    }

    #[test]
    fn truncated_gzip_is_not_complete() {
        let data = sample();
        let body = gzip(&data);
        let mut decoder = BodyDecoder::new(Some(b"gzip"), usize::MAX).unwrap();
        let mut out = Vec::new();
        decoder.push(&body[..body.len() - 4], &mut out).unwrap();
        assert!(!decoder.is_complete(), "trailer missing");
        assert_eq!(out, data, "all the data was decoded before the trailer");
        decoder.push(&body[body.len() - 4..], &mut out).unwrap();
        assert!(decoder.is_complete(), "trailer received");
    }

    #[test]
    fn corrupt_gzip_is_an_error_and_stays_one() {
        let data = sample();
        let good = gzip(&data);

        let err = decode(Some("gzip"), usize::MAX, b"not gzip at all", 100).unwrap_err();
        assert_eq!(err, DecodeError::Corrupt("gzip"), "bad magic");

        let mut bad_method = good.clone();
        bad_method[2] = 7;
        assert_eq!(decode(Some("gzip"), usize::MAX, &bad_method, 100).unwrap_err(), DecodeError::Corrupt("gzip"));

        let mut bad_crc = good.clone();
        let at = bad_crc.len() - 8;
        bad_crc[at] ^= 1;
        assert_eq!(decode(Some("gzip"), usize::MAX, &bad_crc, 1).unwrap_err(), DecodeError::Corrupt("gzip"));

        // An invalid block type (BTYPE 11) right after the header.
        let mut bad_block = good[..10].to_vec();
        bad_block.extend_from_slice(&[0xff; 32]);
        let mut decoder = BodyDecoder::new(Some(b"gzip"), usize::MAX).unwrap();
        let mut out = Vec::new();
        assert_eq!(decoder.push(&bad_block, &mut out), Err(DecodeError::Corrupt("gzip")));
        assert_eq!(decoder.push(&good, &mut out), Err(DecodeError::Corrupt("gzip")), "the error is sticky");
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for round in 0..200 {
            let body: Vec<u8> = (0..round * 7)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            for encoding in ["gzip", "deflate", "br", "gzip, br"] {
                let _ = decode(Some(encoding), 4096, &body, 5);
            }
        }
    }

    #[test]
    fn deflate_accepts_zlib_and_raw() {
        let data = sample();
        assert_decodes("deflate", &zlib(&data), &data);
        assert_decodes("deflate", &raw_deflate(&data), &data);
        assert_decodes("deflate", &zlib(b""), b"");
        assert_decodes("deflate", &raw_deflate(b"x"), b"x");
    }

    #[test]
    fn corrupt_deflate_is_an_error() {
        let mut body = zlib(&sample());
        let at = body.len() - 1;
        body[at] ^= 0xff; // Adler-32 checksum
        assert_eq!(decode(Some("deflate"), usize::MAX, &body, 64).unwrap_err(), DecodeError::Corrupt("deflate"));
        assert_eq!(decode(Some("deflate"), usize::MAX, &[0xff; 40], 3).unwrap_err(), DecodeError::Corrupt("deflate"));
    }

    #[test]
    fn brotli_decodes_a_reference_stream() {
        assert_decodes("br", BROTLI, &brotli_plain());
        let mut decoder = BodyDecoder::new(Some(b"br"), usize::MAX).unwrap();
        decoder.push(&BROTLI[..30], &mut Vec::new()).unwrap();
        assert!(!decoder.is_complete(), "half a stream");
        decoder.push(&BROTLI[30..], &mut Vec::new()).unwrap();
        assert!(decoder.is_complete(), "whole stream");
    }

    #[test]
    fn corrupt_brotli_is_an_error() {
        let mut body = BROTLI.to_vec();
        body[0] = 0xff; // WBITS 0x7f: invalid window size
        assert_eq!(decode(Some("br"), usize::MAX, &body, 100).unwrap_err(), DecodeError::Corrupt("br"));
    }

    #[test]
    fn codings_are_undone_in_reverse_order() {
        // "br, gzip": brotli was applied first, so gzip is undone first.
        assert_decodes("br, gzip", &gzip(BROTLI), &brotli_plain());
        let data = sample();
        assert_decodes("gzip,deflate", &zlib(&gzip(&data)), &data);
        assert_decodes("deflate , identity, gzip", &gzip(&raw_deflate(&data)), &data);
    }

    #[test]
    fn unknown_codings_are_unsupported() {
        let err = |value: &str| BodyDecoder::new(Some(value.as_bytes()), 10).err();
        assert_eq!(err("zstd"), Some(DecodeError::Unsupported("zstd".into())));
        assert_eq!(err("gzip, compress"), Some(DecodeError::Unsupported("compress".into())));
        assert_eq!(
            err("gzip, gzip, gzip, gzip, gzip"),
            Some(DecodeError::Unsupported("gzip, gzip, gzip, gzip, gzip".into()))
        );
        assert_eq!(err("gzip, gzip, gzip, gzip"), None, "{MAX_CODINGS} codings are accepted");
    }

    #[test]
    fn cap_holds_across_pushes() {
        let data = sample();
        let (out, over) = decode(Some("gzip"), 1000, &gzip(&data), 100).unwrap();
        assert_eq!(out, &data[..1000], "output is the first `cap` bytes");
        assert!(over > 0 && over <= SCRATCH as u64, "decoding stops within one scratch buffer: over {over}");
    }

    #[test]
    fn gzip_bomb_costs_the_cap() {
        // 50 MiB of zeros, compressed from a repeated buffer to keep the test fast.
        let zeros = vec![0u8; 1 << 20];
        let mut e = GzEncoder::new(Vec::new(), Compression::fast());
        for _ in 0..50 {
            e.write_all(&zeros).unwrap();
        }
        let bomb = e.finish().unwrap();
        assert!(bomb.len() < 1 << 20, "the bomb is small: {} bytes", bomb.len());
        let cap = 1 << 20;
        let (out, over) = decode(Some("gzip"), cap, &bomb, 64 * 1024).unwrap();
        assert_eq!(out.len(), cap, "exactly the cap is kept");
        assert!(out.iter().all(|&b| b == 0), "the kept bytes are the decoded ones");
        assert!(over > 0 && over <= SCRATCH as u64, "decoding stopped right after the cap: over {over}");
    }

    #[test]
    fn brotli_bomb_costs_the_cap() {
        let cap = 1 << 20;
        let (out, over) = decode(Some("br"), cap, BROTLI_BOMB, 10).unwrap();
        assert_eq!(out.len(), cap, "exactly the cap is kept");
        assert!(out.iter().all(|&b| b == 0), "the kept bytes are the decoded ones");
        assert!(over > 0 && over <= SCRATCH as u64, "decoding stopped right after the cap: over {over}");
    }

    #[test]
    fn inner_stage_is_bounded_too() {
        // A brotli stream followed by 1 MiB of zeros, all gzipped: brotli ignores what
        // follows its end, so only the inner budget stops gunzip from inflating it all.
        let mut inner = BROTLI.to_vec();
        inner.extend_from_slice(&vec![0; 1 << 20]);
        let cap = 16 * 1024;
        let (out, over) = decode(Some("br, gzip"), cap, &gzip(&inner), 1 << 20).unwrap();
        assert_eq!(out, brotli_plain(), "the brotli stream decodes");
        let budget = 2 * cap as u64 + 64 * 1024;
        assert!(over > 0 && over <= SCRATCH as u64, "gunzip stopped at its budget of {budget}: over {over}");
    }

    /// Found by the `encoding` fuzz target: a deflate stream whose last step both reached
    /// the end of the stream and overflowed the cap was reported complete.
    #[test]
    fn a_body_stopped_at_the_cap_is_not_complete() {
        let text = b"0123456789".repeat(10);
        for encoding in ["deflate", "gzip", "br"] {
            let body = match encoding {
                "deflate" => {
                    let mut e = ZlibEncoder::new(Vec::new(), Compression::default());
                    e.write_all(&text).unwrap();
                    e.finish().unwrap()
                }
                "gzip" => {
                    let mut e = GzEncoder::new(Vec::new(), Compression::default());
                    e.write_all(&text).unwrap();
                    e.finish().unwrap()
                }
                _ => BROTLI.to_vec(),
            };
            let mut decoder = BodyDecoder::new(Some(encoding.as_bytes()), 1).unwrap();
            let mut out = Vec::new();
            assert_eq!(decoder.push(&body, &mut out), Ok(1), "{encoding}");
            assert!(decoder.over_cap() > 0 && !decoder.is_complete(), "{encoding}: cut at the cap, so not complete");
        }
        // Under the cap, the same body is complete.
        let mut decoder = BodyDecoder::new(Some(b"identity"), 1).unwrap();
        decoder.push(&text, &mut Vec::new()).unwrap();
        assert!(decoder.is_complete(), "identity bodies are always complete (over_cap counts the rest)");
    }

    #[test]
    fn stopped_decoder_does_no_more_work() {
        let mut decoder = BodyDecoder::new(Some(b"br"), 10).unwrap();
        let mut out = Vec::new();
        assert_eq!(decoder.push(BROTLI_BOMB, &mut out), Ok(10));
        let over = decoder.over_cap();
        assert_eq!(decoder.push(b"more", &mut out), Ok(0));
        assert_eq!(decoder.over_cap(), over, "nothing decoded after stopping");
        assert_eq!(out.len(), 10);
    }
}
