//! The HTTP/1.1 parser (`protocol::http1`) on one direction of a connection, as requests
//! and as responses, with the default and with small limits.
//!
//! Invariants: the same events and skipped-byte count whether the stream is fed whole, in
//! pieces or a byte at a time (adjacent body pieces joined); every head has exactly one end;
//! no more bytes skipped, and no more body bytes handed on, than were fed; a head kept
//! within the head limits, or over them only as far as its framing fields go (skimmed),
//! and never read past the oversized-head bound unless reported unparsed; an unparsed
//! message never inside another. Three limits: the default, small ones given up at once,
//! small ones skimmed. Capture gaps are injected in a separate run, which must keep the
//! head/end pairing.
#![no_main]

use aegis_agent::protocol::http1::{Http1Parser, HttpEvent, Limits, StreamKind};
use aegis_fuzz::{next, pieces, seed};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

const SMALL: Limits = Limits { max_head_bytes: 256, max_headers: 4, max_oversized_head_bytes: 256 };
const SKIM: Limits = Limits { max_head_bytes: 256, max_headers: 4, max_oversized_head_bytes: 2048 };
/// Kept beyond `max_head_bytes` at most for the framing fields of a skimmed head.
const SKIM_RESERVE: usize = 16 * 1024;

/// Adjacent body pieces joined, empty ones dropped: the view that must not depend on cuts.
fn merged(events: Vec<HttpEvent>) -> Vec<HttpEvent> {
    let mut out: Vec<HttpEvent> = Vec::new();
    for event in events {
        match (out.last_mut(), event) {
            (_, HttpEvent::Body(piece)) if piece.is_empty() => {}
            (Some(HttpEvent::Body(previous)), HttpEvent::Body(piece)) => {
                let mut joined = previous.to_vec();
                joined.extend_from_slice(&piece);
                *previous = Bytes::from(joined);
            }
            (_, event) => out.push(event),
        }
    }
    out
}

/// A response parser is told the request methods first (HEAD and CONNECT change framing).
fn parser(kind: StreamKind, limits: Limits, methods: &[&str]) -> Http1Parser {
    let mut p = Http1Parser::new(kind, limits);
    for m in methods {
        p.expect_response_to(m);
    }
    p
}

fn run(kind: StreamKind, limits: Limits, methods: &[&str], feed: &[&[u8]]) -> (Vec<HttpEvent>, u64) {
    let mut p = parser(kind, limits, methods);
    let mut out = Vec::new();
    for piece in feed {
        p.feed(piece, &mut out);
    }
    p.finish(&mut out);
    (merged(out), p.skipped_bytes())
}

fn check_shape(events: &[HttpEvent], fed: usize, skipped: u64, limits: Limits) {
    let mut open = false;
    let mut body = 0usize;
    for e in events {
        match e {
            HttpEvent::Head(head) => {
                assert!(!open, "a head inside a message: {events:?}");
                assert!(head.wire_len <= limits.max_oversized_head_bytes.max(limits.max_head_bytes));
                match head.skimmed {
                    None => {
                        assert!(head.wire_len <= limits.max_head_bytes, "head of {} bytes", head.wire_len);
                        assert!(head.headers.len() <= limits.max_headers, "{} headers", head.headers.len());
                    }
                    Some(s) => {
                        let kept = head.wire_len - (s.bytes_not_kept + s.target_bytes_cut) as usize;
                        assert!(kept <= limits.max_head_bytes + SKIM_RESERVE, "{kept} bytes kept");
                    }
                }
                open = true;
            }
            HttpEvent::Unparsed { head, .. } => {
                assert!(!open, "an unparsed message inside a message: {events:?}");
                assert!(head.method.is_some() || head.status.is_some(), "an unparsed message has its start line");
                assert!(head.wire_len <= limits.max_oversized_head_bytes.max(limits.max_head_bytes) + 1);
            }
            HttpEvent::Body(b) => {
                assert!(open, "body outside a message");
                body += b.len();
            }
            HttpEvent::BodyGap(_) => assert!(open, "a body gap outside a message"),
            HttpEvent::End { .. } => {
                assert!(open, "an end without a head: {events:?}");
                open = false;
            }
            HttpEvent::Error { .. } => assert!(!open, "an error inside an open message"),
        }
    }
    assert!(!open, "a message left open after finish");
    assert!(body <= fed && skipped <= fed as u64, "body {body} / skipped {skipped} of {fed} bytes");
}

fuzz_target!(|data: &[u8]| {
    let mut state = seed(data) | 1;
    let methods: Vec<&str> =
        (0..4).map(|_| ["GET", "POST", "HEAD", "CONNECT"][(next(&mut state) % 4) as usize]).collect();
    for kind in [StreamKind::Requests, StreamKind::Responses] {
        for limits in [Limits::default(), SMALL, SKIM] {
            let whole = run(kind, limits, &methods, &[data]);
            check_shape(&whole.0, data.len(), whole.1, limits);
            let split = run(kind, limits, &methods, &pieces(data, 1));
            assert_eq!(split, whole, "pieces differ from whole ({kind:?}, {limits:?})");
            if data.len() <= 4096 {
                let bytes: Vec<&[u8]> = data.chunks(1).collect();
                assert_eq!(run(kind, limits, &methods, &bytes), whole, "byte at a time ({kind:?})");
            }
            // Gaps between pieces: what is lost differs, the pairing must not.
            let mut p = parser(kind, limits, &methods);
            let mut out = Vec::new();
            for piece in pieces(data, 2) {
                p.feed(piece, &mut out);
                if next(&mut state) % 8 == 0 {
                    p.gap(next(&mut state) % 300, &mut out);
                }
            }
            p.finish(&mut out);
            let heads = out.iter().filter(|e| matches!(e, HttpEvent::Head(_))).count();
            let ends = out.iter().filter(|e| matches!(e, HttpEvent::End { .. })).count();
            assert_eq!(heads, ends, "with gaps: every head has one end");
        }
    }
});
