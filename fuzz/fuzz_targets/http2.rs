//! HTTP/2 frames and HPACK (`protocol::http2`) and the calls of an HTTP/2 connection
//! (`llm::http2`).
//!
//! Input: two bytes giving where the client's stream ends, the client's stream (after the
//! preface, which the target adds), then the server's. Invariants: a direction decodes to
//! the same events (DATA pieces joined), and fails with the same error, whole or in pieces;
//! the connection gives the same calls (stream, model, status, tokens, completeness, notes)
//! whole or in pieces; no more calls than streams; a given-up connection parses nothing more.
#![no_main]

use aegis_agent::{
    llm::{
        exchange::{CallTracker, Observation, Side},
        http2::Http2Exchanges,
    },
    protocol::{
        http1::Limits,
        http2::{FrameDecoder, H2Error, H2Event, H2Limits, PREFACE},
    },
};
use aegis_fuzz::pieces;
use libfuzzer_sys::fuzz_target;

fn decode(preface: bool, feed: &[&[u8]]) -> (Vec<H2Event>, Option<H2Error>) {
    let mut d = FrameDecoder::new(preface, H2Limits { max_frame: 4096, max_header_block: 8192, max_header_list: 2048 });
    let mut out = Vec::new();
    let mut err = None;
    for piece in feed {
        if let Err(e) = d.feed(piece, &mut out) {
            err = Some(e);
            break;
        }
    }
    out.dedup_by(|b, a| match (a, b) {
        (H2Event::Data { stream: s1, data: d1 }, H2Event::Data { stream: s2, data: d2 }) if s1 == s2 => {
            d1.extend_from_slice(d2);
            true
        }
        _ => false,
    });
    out.retain(|e| !matches!(e, H2Event::Data { data, .. } if data.is_empty()));
    (out, err)
}

type Call = (Option<u32>, Option<String>, Option<u16>, Option<u64>, Option<u64>, bool, Vec<String>);

fn calls(side: Side, requests: &[&[u8]], responses: &[&[u8]]) -> (Vec<Call>, u64, bool) {
    let mut c = Http2Exchanges::new(side, 1 << 16, Limits::default(), None);
    let mut out: Vec<Observation> = Vec::new();
    for piece in requests {
        c.request_data(piece, 1, &mut out);
    }
    for piece in responses {
        c.response_data(piece, 2, &mut out);
    }
    let given_up = c.given_up().is_some();
    let before = out.len();
    c.finish(3, "closed", None, &mut out);
    if given_up {
        assert_eq!(out.len(), before, "a given-up connection reports nothing more");
    }
    let calls = out
        .into_iter()
        .map(|o| {
            (o.http2_stream, o.call.model, o.status, o.summary.input_tokens, o.summary.output_tokens, o.complete, o.notes)
        })
        .collect();
    (calls, c.h2.streams, given_up)
}

fuzz_target!(|data: &[u8]| {
    let Some((&[a, b], rest)) = data.split_first_chunk::<2>() else { return };
    let split = usize::from(u16::from_be_bytes([a, b])).min(rest.len());
    let (client, server) = rest.split_at(split);
    let request = [PREFACE, client].concat();

    for (preface, bytes) in [(true, &request[..]), (false, server)] {
        let whole = decode(preface, &[bytes]);
        assert_eq!(decode(preface, &pieces(bytes, 3)), whole, "pieces differ from whole");
        if bytes.len() <= 2048 {
            let each: Vec<&[u8]> = bytes.chunks(1).collect();
            assert_eq!(decode(preface, &each), whole, "byte at a time");
        }
    }

    let whole = calls(Side::Client, &[&request], &[server]);
    assert!(whole.0.len() as u64 <= whole.1, "more calls than streams: {whole:?}");
    let cut = calls(Side::Client, &pieces(&request, 5), &pieces(server, 7));
    assert_eq!(cut, whole, "calls differ in pieces");
});
