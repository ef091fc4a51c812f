//! The agent configuration (`config::Config::parse`): TOML layered over the embedded
//! defaults, then validated.
//!
//! Invariants: an accepted configuration is within the documented bounds (ring buffer a
//! power of two from 4 KiB to 256 MiB, at least one connection and one body byte, at least
//! one worker); parsing is deterministic; a refusal is an error message, never a panic.
#![no_main]

use aegis_agent::config::{Config, MAX_RING_BUFFER_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Config::parse(text) {
        Ok(c) => {
            let ring = c.capture.ring_buffer_bytes;
            assert!(ring.is_power_of_two() && (4096..=MAX_RING_BUFFER_BYTES).contains(&ring), "ring {ring}");
            assert!(c.capture.max_connections > 0 && c.capture.max_body_bytes > 0);
            assert!(c.workers() > 0);
            let again = Config::parse(text).expect("accepted once, accepted again");
            assert_eq!(format!("{again:?}"), format!("{c:?}"), "parsing is deterministic");
        }
        Err(e) => assert!(!format!("{e:#}").is_empty()),
    }
});
