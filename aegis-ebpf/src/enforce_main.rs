//! AegisPlane's enforcement programs, a separate object from the capture probes so that
//! enforcement can be loaded, attached and pinned on its own.
#![no_std]
#![no_main]

mod connect;
mod runtime;
