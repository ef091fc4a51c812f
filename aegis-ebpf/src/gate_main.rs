//! AegisPlane's content-gate object: its own SSL_write probes (the keyword scan), the
//! sockops program that gathers gated sockets and the sk_msg verdict that refuses a flagged
//! send. Loaded only when the gate is enabled; a kernel that refuses it loses the gate and
//! nothing else.
#![no_std]
#![no_main]

mod gate;
mod runtime;
