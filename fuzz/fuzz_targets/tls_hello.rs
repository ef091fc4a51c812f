//! The SNI watch's readers (`capture::blindspot::sni`): a packet's TCP payload and the server
//! name of the ClientHello it starts with, on hostile bytes (the packet socket hands over
//! whatever a local process sends that looks like a hello).
//!
//! Invariants: no panic; a name read is a plausible DNS name, lower-cased, at most 253
//! bytes; a payload read lies within the packet; a prefix of the input ends either in the
//! same name (the rest was not needed), or as truncated or malformed, never in another name.
#![no_main]

use aegis_agent::capture::blindspot::sni::{server_name, tcp_payload};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((_, _, payload)) = tcp_payload(data) {
        assert!(payload.len() <= data.len());
        let _ = server_name(payload);
    }
    let whole = server_name(data);
    if let Ok(Some(name)) = &whole {
        assert!(!name.is_empty() && name.len() <= 253, "{name:?}");
        assert!(
            name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_')),
            "{name:?}"
        );
        for cut in 0..data.len() {
            if let Ok(Some(other)) = server_name(&data[..cut]) {
                assert_eq!(&other, name, "a prefix of {cut} bytes reads another name");
            }
        }
    }
});
