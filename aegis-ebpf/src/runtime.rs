//! What every eBPF object of this crate needs: a panic handler (never reached: the
//! verifier rejects code that could panic) and the GPL licence section that unlocks the
//! GPL-only helpers.

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
