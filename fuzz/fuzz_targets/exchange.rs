//! One connection's two streams through `llm::exchange`: HTTP/1.1 parsing, request/response
//! pairing, API detection (`llm::detect`), body decoding, response reading and usage
//! extraction (`llm::response`, `llm::usage`), and the rules' inspection of each call.
//!
//! Input: the request stream, then [`SEPARATOR`], then the response stream (seeds are real
//! exchanges of every API).
//!
//! Invariants:
//! - fed whole or in pieces (requests first, then responses, as one thread sees a blocking
//!   call), the observations are the same: call, usage summary, status, byte counts,
//!   fingerprint, completeness, notes; and so are the counters;
//! - at most one observation per request head or response head (a response alone is
//!   reported when it shows a model API), none for a request that is not a call;
//! - with rules in force, pieces interleaved, capture gaps and the kernel's turns (counted
//!   as the kernel does, a turn per change of direction): "never a silent allow": a call
//!   not seen whole, or with a body cut at the cap, has `scan_complete: false`; and at
//!   most one observation per head there too.
#![no_main]

use std::sync::{Arc, OnceLock};

use aegis_agent::{
    llm::exchange::{ExchangeTracker, Observation, Side},
    policy::{Inspector, redact::Redactor},
    rules,
};
use aegis_fuzz::{next, pieces, seed, split_at_separator};
use libfuzzer_sys::fuzz_target;

/// Between the request stream and the response stream in an input.
const SEPARATOR: &[u8] = b"\n--aegis-fuzz-response--\n";
/// Body cap of the trackers: small, so that the cap is often reached.
const MAX_BODY: usize = 4096;

/// What must not depend on how the streams were cut. The usage summary is left out of a
/// call whose body turned out corrupt: how much was decoded before the corruption showed
/// depends on the cuts.
fn view(o: &Observation) -> String {
    let corrupt = o.notes.iter().any(|n| n.contains("undecodable"));
    format!(
        "{:?} {} {:?} {:?} {:?} {:?} req={} resp={} fp={:?} complete={} {:?}",
        o.call,
        if corrupt { "(corrupt body)".to_owned() } else { format!("{:?}", o.summary) },
        o.method,
        o.target,
        o.host,
        o.status,
        o.request_bytes,
        o.response_bytes,
        o.fingerprint,
        o.complete,
        o.notes
    )
}

fn run(requests: &[&[u8]], responses: &[&[u8]]) -> (Vec<String>, String) {
    let mut t = ExchangeTracker::new(Side::Client, MAX_BODY, None);
    let mut out = Vec::new();
    for piece in requests {
        t.request_data(piece, 1, &mut out);
    }
    for piece in responses {
        t.response_data(piece, 2, &mut out);
    }
    t.finish(3, "closed", None, &mut out);
    let s = t.stats();
    let stats = format!("{} {} {} {}", s.exchanges, s.ignored_exchanges, s.parse_errors, s.skipped_bytes);
    (out.iter().map(view).collect(), stats)
}

fn inspector() -> Arc<Inspector> {
    static INSPECTOR: OnceLock<Arc<Inspector>> = OnceLock::new();
    INSPECTOR
        .get_or_init(|| {
            let engine = rules::load_engine(&[]).expect("the default pack compiles");
            Arc::new(Inspector::new(engine, Redactor::new([7; 32])))
        })
        .clone()
}

fuzz_target!(|data: &[u8]| {
    let (requests, responses) = split_at_separator(data, SEPARATOR);
    let whole = run(&[requests], &[responses]);
    assert_eq!(run(&pieces(requests, 6), &pieces(responses, 7)), whole, "pieces differ from whole");
    // Every request head has a start line with " HTTP/1." in it, every response head one
    // that starts "HTTP/1.".
    let heads = requests.windows(8).filter(|w| w == b" HTTP/1.").count()
        + responses.windows(7).filter(|w| w == b"HTTP/1.").count();
    assert!(whole.0.len() <= heads, "{} observations from {heads} start lines", whole.0.len());

    // The daemon's way: rules in force, the two streams interleaved, capture gaps.
    let mut t = ExchangeTracker::new(Side::Client, MAX_BODY, Some(inspector()));
    let mut out = Vec::new();
    let mut state = seed(data) | 1;
    let (mut req, mut resp) = (pieces(requests, 8).into_iter(), pieces(responses, 9).into_iter());
    let mut ts = 0;
    // The kernel's turns: one more at each change of direction.
    let (mut turn, mut last_request) = (0u64, None);
    let mut turn_for = |request: bool| {
        if last_request.is_some_and(|last| last != request) {
            turn += 1;
        }
        last_request = Some(request);
        turn
    };
    loop {
        ts += 1_000;
        let r = next(&mut state);
        match (r % 16, req.len(), resp.len()) {
            (_, 0, 0) => break,
            (0, _, _) => {
                t.call_turn(turn_for(true));
                t.request_gap(r >> 40, ts, &mut out)
            }
            (1, _, _) => {
                t.call_turn(turn_for(false));
                t.response_gap(r >> 40, ts, &mut out)
            }
            (2..=8, n, _) if n > 0 => {
                t.call_turn(turn_for(true));
                t.request_data(req.next().unwrap_or_default(), ts, &mut out)
            }
            (_, _, n) if n > 0 => {
                t.call_turn(turn_for(false));
                t.response_data(resp.next().unwrap_or_default(), ts, &mut out)
            }
            _ => {
                t.call_turn(turn_for(true));
                t.request_data(req.next().unwrap_or_default(), ts, &mut out)
            }
        }
        let mut checkpoints = Vec::new();
        t.take_checkpoints(&mut checkpoints);
    }
    t.finish(ts, "closed", Some(turn), &mut out);
    assert!(out.len() <= heads, "{} observations from {heads} start lines (interleaved)", out.len());
    for o in out {
        let cut = o.notes.iter().any(|n| n.contains("truncated") || n.contains("not_kept") || n.contains("over_size"));
        let seen_whole = o.complete && !cut;
        let decision = o.inspection.expect("a call with rules in force is inspected").finish(false);
        assert!(
            seen_whole || !decision.scan_complete,
            "a call not seen whole is reported as fully scanned: notes {:?}, decision {decision:?}",
            o.notes
        );
    }
});
