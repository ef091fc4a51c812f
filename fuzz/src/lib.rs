//! What the fuzz targets share: how one input is cut into the pieces an incremental parser
//! is fed.
//!
//! Captured bytes reach a parser in whatever pieces the TLS library wrote, so every
//! incremental parser must give the same result for any cutting of the same bytes. The
//! targets feed each input whole and in [`pieces`], and compare. The cuts come from a hash
//! of the input itself: any mutation of the input also moves the cuts, and a crash input
//! replays with the same cuts. Seed files are plain streams (an HTTP exchange, an SSE
//! stream), with no header to describe the cuts.

/// FNV-1a of `data`: the seed of the cuts.
pub fn seed(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// xorshift64: the next pseudo-random number.
pub fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// `data` cut at pseudo-random points (from [`seed`]`(salt)`): pieces of 0 to 64 bytes most
/// of the time, now and then a long one, so both byte-sized and bulk paths are taken. Empty
/// pieces are included on purpose: a parser must accept them.
pub fn pieces(data: &[u8], salt: u64) -> Vec<&[u8]> {
    let mut state = seed(data) ^ salt | 1;
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let r = next(&mut state);
        let len = if r % 8 == 0 { (r >> 8) as usize % 4096 } else { (r >> 8) as usize % 65 };
        let (piece, tail) = rest.split_at(len.min(rest.len()));
        out.push(piece);
        rest = tail;
    }
    out
}

/// `data` split at the first `separator`: (before, after). Without one, all of it is `before`.
pub fn split_at_separator<'a>(data: &'a [u8], separator: &[u8]) -> (&'a [u8], &'a [u8]) {
    match data.windows(separator.len()).position(|w| w == separator) {
        Some(i) => (&data[..i], &data[i + separator.len()..]),
        None => (data, &[]),
    }
}
