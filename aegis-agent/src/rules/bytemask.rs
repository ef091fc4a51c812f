//! 64-byte class bitmaps: bit k says whether byte k of a block is in a class of bytes (digits,
//! the base64 alphabet). The scans of `normalize` and `engine` walk these masks instead of
//! testing byte by byte.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::__m128i;

/// A class of bytes, said two ways: 16 bytes at a time with SSE2, and one byte at a time.
pub trait ByteClass {
    /// 0xFF in each byte of `v` that is in the class, 0 elsewhere.
    #[cfg(target_arch = "x86_64")]
    fn sse2(v: __m128i) -> __m128i;
    /// Whether `b` is in the class. Without branches or a table, so that it vectorises.
    #[cfg_attr(
        target_arch = "x86_64",
        allow(dead_code, reason = "x86-64 classifies with SSE2; the tests check both ways agree")
    )]
    fn scalar(b: u8) -> bool;
}

/// Bit k: whether `block[k]` is in class `C` (`block` has at most 64 bytes; the bits past its
/// end are 0 for any class without the space). On x86-64, SSE2 (always there) classifies 16
/// bytes per instruction and `pmovmskb` packs the flags; elsewhere the flags are computed a
/// vector at a time, then each 8 of them (0 or 1 per byte) are gathered into the top byte of a
/// product, bit k from byte k.
#[inline(always)]
pub fn mask<C: ByteClass>(block: &[u8]) -> u64 {
    let mut padded = [b' '; 64];
    let block: &[u8; 64] = match block.try_into() {
        Ok(full) => full,
        Err(_) => {
            padded[..block.len()].copy_from_slice(block);
            &padded
        }
    };
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_loadu_si128, _mm_movemask_epi8};
        let mut mask = 0u64;
        for (k, sixteen) in block.as_chunks::<16>().0.iter().enumerate() {
            // SAFETY: SSE2 is part of x86-64; the load reads the 16 bytes of `sixteen`.
            let bits = unsafe { _mm_movemask_epi8(C::sse2(_mm_loadu_si128(sixteen.as_ptr().cast()))) as u16 };
            mask |= u64::from(bits) << (16 * k);
        }
        mask
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let mut flags = [0u8; 64];
        for (flag, &b) in flags.iter_mut().zip(block) {
            *flag = u8::from(C::scalar(b));
        }
        // Bytes of 0/1, times this constant, gather bit k of the result's top byte from byte k
        // (the partial products land on distinct bits: no carries).
        const GATHER: u64 = 0x0102_0408_1020_4080;
        flags
            .as_chunks::<8>()
            .0
            .iter()
            .enumerate()
            .fold(0u64, |mask, (j, eight)| mask | ((u64::from_le_bytes(*eight).wrapping_mul(GATHER) >> 56) << (8 * j)))
    }
}

/// 0xFF in each byte of `v` within `lo..lo + width` (unsigned), 0 elsewhere.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub fn sse2_in_range(v: __m128i, lo: u8, width: u8) -> __m128i {
    use std::arch::x86_64::{_mm_cmpeq_epi8, _mm_min_epu8, _mm_set1_epi8, _mm_sub_epi8};
    // SAFETY: SSE2 is part of x86-64; register operations only.
    unsafe {
        let d = _mm_sub_epi8(v, _mm_set1_epi8(lo as i8));
        _mm_cmpeq_epi8(_mm_min_epu8(d, _mm_set1_epi8((width - 1) as i8)), d)
    }
}
