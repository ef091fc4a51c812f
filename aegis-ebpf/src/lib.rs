#![no_std]
// Library target so that `cargo check --workspace` on the host has something to check.
