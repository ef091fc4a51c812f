//! AegisPlane's enforcement programs, a separate object from the capture probes so that
//! enforcement can be loaded, attached and pinned on its own.
#![no_std]
#![no_main]

mod connect;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
