//! AegisPlane's kernel side. One module per probe family; each names the prototypes it
//! relies on. The programs copy and tag bytes and never parse them.
#![no_std]
#![no_main]

mod openssl;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
