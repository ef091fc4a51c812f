//! The control protocol (`control::protocol`): request and response lines as the daemon and
//! the CLI read them off the socket, the validation of a block, and the command-line parsers
//! of destinations, durations, routes and cgroups (`control::blocks`).
//!
//! Invariants: a decoded request (response) encodes to a line that decodes to the same
//! request (response); validating a block spec is idempotent, and a valid spec's block
//! matches a subject made of its own target; a parsed destination prints in a form that
//! parses back to it; a refusal is a message, never a panic.
#![no_main]

use std::path::Path;

use aegis_agent::control::{
    Actor, Block, BlockTarget, Request, Scope, Subject, parse_cgroup, parse_dest, parse_duration, parse_route,
    protocol::{decode_request, decode_response, encode_request, encode_response},
};
use libfuzzer_sys::fuzz_target;

fn actor() -> Actor {
    Actor { uid: 0, gid: 0, pid: 1, comm: "fuzz".into(), user: None }
}

fuzz_target!(|data: &[u8]| {
    for line in data.split(|&b| b == b'\n') {
        match decode_request(line) {
            Ok(req) => {
                let again = decode_request(encode_request(&req).as_bytes());
                assert_eq!(again.as_ref(), Ok(&req), "request round trip");
                if let Request::Block(spec) = req
                    && let Ok(valid) = spec.validated()
                {
                    assert_eq!(valid.clone().validated().as_ref(), Ok(&valid), "validation is idempotent");
                    if let Ok(block) = Block::new("blk-fuzz".into(), valid, actor(), 1_800_000_000_000) {
                        check_block_matches_itself(&block);
                    }
                }
            }
            Err(message) => assert!(!message.is_empty()),
        }
        if let Ok(resp) = decode_response(line) {
            assert_eq!(decode_response(encode_response(&resp).as_bytes()).as_ref(), Ok(&resp), "response round trip");
        }
    }
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(dest) = parse_dest(text) {
        assert_eq!(parse_dest(&dest.to_string()), Ok(dest), "{dest} prints as it parses");
    }
    let _ = parse_duration(text);
    let _ = parse_route(text);
    if let Ok(cgroup) = parse_cgroup(text) {
        assert_eq!(parse_cgroup(&cgroup).as_ref(), Ok(&cgroup), "cgroup normalisation is idempotent");
    }
});

/// A block on a model, route or tenant stops a call that is exactly what it names.
fn check_block_matches_itself(block: &Block) {
    let exe = match &block.spec.scope {
        Scope::Exe(p) => Some(p.as_path()),
        _ => None,
    };
    let cgroup = match (&block.spec.scope, &block.spec.target) {
        (Scope::Cgroup(c), _) | (_, BlockTarget::Tenant(c)) => c.as_str(),
        _ => "/",
    };
    let mut subject =
        Subject { cgroup: Some(cgroup), exe: exe.or(Some(Path::new("/usr/bin/x"))), ..Subject::default() };
    match &block.spec.target {
        BlockTarget::Model(m) => subject.model = Some(m),
        BlockTarget::Route { host, path_prefix } => {
            subject.host = Some(host);
            subject.path = Some(path_prefix);
        }
        BlockTarget::Tenant(_) => {}
        BlockTarget::Provider(_) | BlockTarget::Dest(_) => return,
    }
    assert!(block.matches(&subject), "{block:?} does not stop {subject:?}");
}
