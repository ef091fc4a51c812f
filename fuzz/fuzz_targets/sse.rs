//! The Server-Sent Events decoder (`protocol::sse`) with a large and a small event bound.
//!
//! Invariants: the same events and oversized count whether the stream is pushed whole, in
//! pieces or a byte at a time; no event's data has more characters than the bound; an event type is
//! a single line.
#![no_main]

use aegis_agent::protocol::sse::{SseDecoder, SseEvent};
use aegis_fuzz::pieces;
use libfuzzer_sys::fuzz_target;

fn run(max: usize, feed: &[&[u8]]) -> (Vec<SseEvent>, u64) {
    let mut d = SseDecoder::new(max);
    let mut out = Vec::new();
    for piece in feed {
        d.push(piece, &mut out);
    }
    d.finish(&mut out);
    (out, d.oversized_events())
}

fuzz_target!(|data: &[u8]| {
    for max in [1 << 20, 48] {
        let whole = run(max, &[data]);
        for e in &whole.0 {
            // Invalid UTF-8 grows into U+FFFD (3 bytes), so the bound holds on characters: one
            // per byte read at most.
            let chars = e.data.chars().count();
            assert!(chars <= max, "event data of {chars} characters over the bound {max}");
            let no_line_end = |s: &str| !s.contains(['\r', '\n']);
            assert!(e.event.as_deref().is_none_or(no_line_end), "multi-line event type {:?}", e.event);
        }
        assert_eq!(run(max, &pieces(data, 5)), whole, "pieces differ from whole (bound {max})");
        if data.len() <= 4096 {
            let bytes: Vec<&[u8]> = data.chunks(1).collect();
            assert_eq!(run(max, &bytes), whole, "byte at a time (bound {max})");
        }
    }
});
