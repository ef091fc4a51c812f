//! One pass over a text for every anchor of 3 and 4 bytes: the engine's keyword prefilter
//! where AVX-512 VBMI and GFNI are there (x86-64 since Ice Lake and Zen 4).
//!
//! Teddy (`aho-corasick`'s packed searcher) keeps its false candidates rare only with about 16
//! patterns per searcher, and the default pack has about 140 anchors: 9 passes over every text,
//! each about 0.12 ns per byte, 40% of a scan of clean traffic. This filter costs one pass
//! whatever the number of anchors (up to a few hundred), about a tenth of that.
//!
//! # How
//!
//! A Bloom-like test on the text's 4-byte (and 3-byte) windows, 64 positions at a time:
//! - Four hash functions of a window to 7 bits, each linear over GF(2): hash `j` is
//!   `M_j0·b0 ^ M_j1·b1 ^ M_j2·b2 ^ M_j3·b3`, with `M_jk` a random 8x8 bit matrix applied to
//!   the window's byte `k`. `vgf2p8affineqb` applies one matrix to 64 bytes in one
//!   instruction, so a hash of 64 windows is 4 of them and 2 XORs. (Before: tabulation
//!   hashes, a `vpermi2b` table lookup per byte and hash, which were the pass's bottleneck;
//!   the pass went from 20% to 14% of the rules bench's profile. A linear hash is weaker
//!   than random tables, which could only cost false candidates: on the bench's clean
//!   corpus there are fewer, 53,000 per pass against 66,000.)
//! - Each anchor is put in one of 8 buckets; bucket table `B_j[h]` (128 entries, one
//!   `vpermi2b`) has bit `b` set when an anchor of bucket `b` hashes to `h` under hash `j`. A
//!   position is a candidate when some bucket bit survives the AND of `B_0[h_0] .. B_3[h_3]`:
//!   with about 18 anchors per bucket, a window that is no anchor passes with odds of about
//!   8 x (18/128)^4, 0.3%.
//! - 3-byte anchors: the same on the first three bytes (the hashes' partial XORs), with four
//!   tables of their own (two before: the 3-byte part then made as many false candidates
//!   as the 4-byte one; 44,000 per pass now).
//! - The 48,000 real anchor occurrences per pass of that corpus cost more than the false
//!   candidates: most are keywords (`instructions`, `token`, `secret`), and some the anchor
//!   of a phrase (`truc` is in `structure`).
//! - Each candidate is checked exactly (its window looked up among the anchors), so the filter
//!   has no false positives and, by construction, no false negatives: an anchor's own window
//!   sets its bucket bit in all four tables.
//!
//! The last positions of a text (fewer than 67 bytes left) go through the same vector code on
//! a zero-padded copy. Without VBMI and GFNI the same hashes are computed one position at a
//! time; the engine uses Teddy there instead (a scalar pass of this filter is slower than
//! Teddy's passes), so that path serves the tests as the reference.

/// Hash functions for 4-byte windows; the first [`HASHES3`] serve 3-byte windows too.
const HASHES: usize = 4;
const HASHES3: usize = 4;
const BUCKETS: usize = 8;

#[repr(C, align(64))]
struct Tables {
    /// `four[j][h]`: the buckets of the 4-byte anchors with hash `j` equal to `h`.
    four: [[u8; 128]; HASHES],
    /// The same for the 3-byte anchors, over the first three bytes.
    three: [[u8; 128]; HASHES3],
    /// `matrix[j][k]`: the 8x8 bit matrix that maps the byte at offset `k` of a window to its
    /// part of hash `j` (in `vgf2p8affineqb`'s layout: byte `7 - i` holds output bit `i`'s row).
    matrix: [[u64; 4]; HASHES],
}

/// The filter over a set of anchors of 3 and 4 bytes.
pub struct WindowFilter {
    tables: Box<Tables>,
    /// The anchors by their window (little-endian, the 4th byte 0 for 3 bytes): an open
    /// addressing table of (window, 3 or 4 bytes, anchor id), at least 4 slots per anchor,
    /// a power of two ([`slot`]); empty slots have length 0.
    slots: Vec<(u32, u32, usize)>,
    /// How many 4-byte and 3-byte anchors there are.
    fours: usize,
    threes: usize,
    /// Whether this CPU has AVX-512 VBMI (checked once, at build).
    simd: bool,
}

impl WindowFilter {
    /// Whether this CPU runs the filter's vector path; elsewhere the engine should use Teddy.
    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vbmi")
                && std::arch::is_x86_feature_detected!("gfni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// A filter for `anchors`: (bytes, id), each of 3 or 4 bytes, no two equal.
    pub fn new(anchors: &[(&[u8], usize)]) -> Self {
        let mut tables =
            Box::new(Tables { four: [[0; 128]; HASHES], three: [[0; 128]; HASHES3], matrix: [[0; 4]; HASHES] });
        // Fixed seed: the same pack gives the same filter on every host.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for m in tables.matrix.as_flattened_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *m = state;
        }
        let (mut four, mut three) = (Vec::new(), Vec::new());
        let mut slots = vec![(0, 0, 0); (anchors.len() * 4).next_power_of_two().max(256)];
        for &(bytes, id) in anchors {
            assert!((3..=4).contains(&bytes.len()), "anchors of 3 or 4 bytes");
            let mut w = [0u8; 4];
            w[..bytes.len()].copy_from_slice(bytes);
            let key = u32::from_le_bytes(w);
            if bytes.len() == 4 {
                four.push((key, id))
            } else {
                three.push((key, id))
            }
            let mut at = slot(key, slots.len());
            while slots[at].1 != 0 {
                at = (at + 1) & (slots.len() - 1);
            }
            slots[at] = (key, bytes.len() as u32, id);
        }
        // Buckets in the anchors' order (sorted: neighbours, which share leading bytes, go to
        // different buckets).
        four.sort_unstable();
        three.sort_unstable();
        for (i, &(key, _)) in four.iter().enumerate() {
            let bit = 1u8 << (i % BUCKETS);
            let b = key.to_le_bytes();
            for j in 0..HASHES {
                tables.four[j][usize::from(hash(&tables, j, &b))] |= bit;
            }
        }
        for (i, &(key, _)) in three.iter().enumerate() {
            let bit = 1u8 << (i % BUCKETS);
            let b = key.to_le_bytes();
            for j in 0..HASHES3 {
                tables.three[j][usize::from(hash3(&tables, j, &b))] |= bit;
            }
        }
        WindowFilter { tables, slots, fours: four.len(), threes: three.len(), simd: Self::available() }
    }

    /// Call `on(anchor, position)` for every occurrence of every anchor in `text`, in the
    /// order of positions.
    pub fn each(&self, text: &[u8], mut on: impl FnMut(usize, usize)) {
        #[cfg(target_arch = "x86_64")]
        if self.simd {
            // SAFETY: `simd` says the CPU has the features `scan_avx512` is compiled for.
            unsafe {
                if self.threes == 0 {
                    self.scan_avx512::<false>(text, &mut on)
                } else {
                    self.scan_avx512::<true>(text, &mut on)
                }
            }
            return;
        }
        self.scan_scalar(text, &mut on);
    }

    /// Every position, one at a time.
    fn scan_scalar(&self, text: &[u8], on: &mut impl FnMut(usize, usize)) {
        let t = &*self.tables;
        for i in 0..text.len().saturating_sub(2) {
            let mut b = [0u8; 4];
            let n = (text.len() - i).min(4);
            b[..n].copy_from_slice(&text[i..i + n]);
            let mut four = if n == 4 && self.fours > 0 { 0xff } else { 0 };
            for j in 0..HASHES {
                four &= t.four[j][usize::from(hash(t, j, &b))];
            }
            let mut three = if self.threes == 0 { 0 } else { 0xff };
            for j in 0..HASHES3 {
                three &= t.three[j][usize::from(hash3(t, j, &b))];
            }
            if four | three != 0 {
                self.verify(text, i, on);
            }
        }
    }

    /// Check a candidate position exactly.
    #[inline]
    fn verify(&self, text: &[u8], i: usize, on: &mut impl FnMut(usize, usize)) {
        let mut b = [0u8; 4];
        let n = (text.len() - i).min(4);
        b[..n].copy_from_slice(&text[i..i + n]);
        if n == 4 {
            self.lookup(u32::from_le_bytes(b), 4, i, on);
        }
        b[3] = 0;
        if n >= 3 && self.threes > 0 {
            self.lookup(u32::from_le_bytes(b), 3, i, on);
        }
    }

    #[inline]
    fn lookup(&self, key: u32, len: u32, i: usize, on: &mut impl FnMut(usize, usize)) {
        let mut at = slot(key, self.slots.len());
        loop {
            let (k, l, id) = self.slots[at];
            if l == 0 {
                return;
            }
            if k == key && l == len {
                on(id, i);
                return;
            }
            at = (at + 1) & (self.slots.len() - 1);
        }
    }

    /// Every position, 64 at a time.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,gfni")]
    fn scan_avx512<const THREE: bool>(&self, text: &[u8], on: &mut impl FnMut(usize, usize)) {
        use std::arch::x86_64::{
            __m512i, _mm512_and_si512, _mm512_gf2p8affine_epi64_epi8, _mm512_load_si512, _mm512_loadu_si512,
            _mm512_permutex2var_epi8, _mm512_set1_epi8, _mm512_set1_epi64, _mm512_ternarylogic_epi64,
            _mm512_test_epi8_mask, _mm512_xor_si512,
        };
        let t = &*self.tables;
        // `table[idx]` for 64 indices (low 7 bits of each byte).
        macro_rules! look {
            ($table:expr, $idx:expr) => {{
                let x: &[u8; 128] = $table;
                // SAFETY: `Tables` is 64-byte aligned and each table is 128 bytes at a multiple
                // of 128 from its start: two aligned loads inside it.
                let (lo, hi) = unsafe {
                    (
                        _mm512_load_si512(x.as_ptr().cast::<__m512i>()),
                        _mm512_load_si512(x.as_ptr().add(64).cast::<__m512i>()),
                    )
                };
                _mm512_permutex2var_epi8(lo, $idx, hi)
            }};
        }
        let ones = _mm512_set1_epi8(-1);
        // Hash `j`'s part of the bytes in `x`, each taken at offset `k` of a window.
        let part = |x: __m512i, j: usize, k: usize| {
            _mm512_gf2p8affine_epi64_epi8::<0>(x, _mm512_set1_epi64(t.matrix[j][k] as i64))
        };
        // The candidates among the 64 positions from `p`, which has 67 readable bytes.
        let block = |p: *const u8| -> u64 {
            // SAFETY: the four loads read p[0..67], readable (the caller's promise).
            let b = unsafe {
                [
                    _mm512_loadu_si512(p.cast()),
                    _mm512_loadu_si512(p.add(1).cast()),
                    _mm512_loadu_si512(p.add(2).cast()),
                    _mm512_loadu_si512(p.add(3).cast()),
                ]
            };
            let (mut four, mut three) = (ones, ones);
            for j in 0..HASHES {
                // 0x96: a ^ b ^ c.
                let x = _mm512_ternarylogic_epi64::<0x96>(part(b[0], j, 0), part(b[1], j, 1), part(b[2], j, 2));
                if THREE && j < HASHES3 {
                    three = _mm512_and_si512(three, look!(&t.three[j], x));
                }
                let x = _mm512_xor_si512(x, part(b[3], j, 3));
                four = _mm512_and_si512(four, look!(&t.four[j], x));
            }
            let hits = _mm512_test_epi8_mask(four, four);
            if THREE { hits | _mm512_test_epi8_mask(three, three) } else { hits }
        };
        let mut i = 0;
        while i + 64 + 3 <= text.len() {
            // text[i..i + 67] is inside `text` (the loop's condition).
            self.verify_each(text, i, block(text[i..].as_ptr()), on);
            i += 64;
        }
        // The last positions (at most 64: fewer than 67 bytes are left) through a copy padded
        // with zeros; a window running into the padding is a candidate at worst, and `verify`
        // reads only `text`.
        let rest = text.len() - i;
        if rest >= 3 {
            let mut padded = [0u8; 128];
            padded[..rest].copy_from_slice(&text[i..]);
            self.verify_each(text, i, block(padded.as_ptr()) & (u64::MAX >> (64 - (rest - 2))), on);
        }
    }

    /// [`WindowFilter::verify`] each candidate of a block: bit k of `hits` is position `at + k`.
    #[inline]
    fn verify_each(&self, text: &[u8], at: usize, mut hits: u64, on: &mut impl FnMut(usize, usize)) {
        while hits != 0 {
            let k = hits.trailing_zeros() as usize;
            hits &= hits - 1;
            self.verify(text, at + k, on);
        }
    }
}

/// The first slot to look at for `key` in a table of `len` slots (a power of two).
#[inline(always)]
fn slot(key: u32, len: usize) -> usize {
    (key.wrapping_mul(0x9e37_79b1) >> (32 - len.trailing_zeros())) as usize
}

/// Hash `j` of a 4-byte window.
#[inline(always)]
fn hash(t: &Tables, j: usize, b: &[u8; 4]) -> u8 {
    hash3(t, j, b) ^ (affine(t.matrix[j][3], b[3]) & 0x7f)
}

/// Hash `j` of a window's first 3 bytes.
#[inline(always)]
fn hash3(t: &Tables, j: usize, b: &[u8; 4]) -> u8 {
    let m = &t.matrix[j];
    (affine(m[0], b[0]) ^ affine(m[1], b[1]) ^ affine(m[2], b[2])) & 0x7f
}

/// `vgf2p8affineqb`'s map of one byte with no constant: output bit `i` is the parity of `x`
/// AND byte `7 - i` of `matrix`.
fn affine(matrix: u64, x: u8) -> u8 {
    (0..8).fold(0, |out, i| out | ((((matrix >> (8 * (7 - i))) as u8 & x).count_ones() as u8 & 1) << i))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(anchors: &[(&[u8], usize)], text: &[u8]) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for i in 0..text.len() {
            for &(a, id) in anchors {
                if text[i..].starts_with(a) {
                    out.push((id, i));
                }
            }
        }
        out
    }

    fn found(f: &WindowFilter, text: &[u8]) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        f.each(text, |a, i| out.push((a, i)));
        // Same position: the 4-byte anchor is reported first; naive goes by anchor order.
        out.sort_by_key(|&(a, i)| (i, a));
        out
    }

    /// Random texts of every length around the block size, with anchors planted at every
    /// offset (block edges and the tail included) and non-ASCII bytes: the vector path, the
    /// scalar tail and the scalar path alone all find exactly what a naive search finds.
    #[test]
    fn finds_every_occurrence_and_nothing_else() {
        let mut state = 12345u64;
        let mut rand = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        const ALPHABET: &[u8] = b"0123456789abcdef_-.qz";
        let owned: Vec<Vec<u8>> = (0..200)
            .map(|i| (0..3 + usize::from(i % 3 != 0)).map(|_| ALPHABET[(rand() % 21) as usize]).collect())
            .collect::<std::collections::BTreeSet<Vec<u8>>>()
            .into_iter()
            .collect();
        // Substring-free, as the engine's anchors are.
        let owned: Vec<Vec<u8>> = owned
            .iter()
            .filter(|a| !owned.iter().any(|b| b.len() < a.len() && a.windows(b.len()).any(|w| w == b.as_slice())))
            .cloned()
            .collect();
        let anchors: Vec<(&[u8], usize)> = owned.iter().enumerate().map(|(i, a)| (a.as_slice(), i)).collect();
        assert!(anchors.iter().filter(|a| a.0.len() == 3).count() > 10);
        let vector = WindowFilter::new(&anchors);
        let scalar = WindowFilter { simd: false, ..WindowFilter::new(&anchors) };
        let mut total = 0;
        for len in 0..300usize {
            let mut text: Vec<u8> = (0..len)
                .map(|_| match rand() % 10 {
                    0 => 0xc3,
                    1 => b' ',
                    _ => ALPHABET[(rand() % 21) as usize],
                })
                .collect();
            let mut at = rand() as usize % 5;
            while at + 4 <= len {
                let a = &anchors[rand() as usize % anchors.len()].0;
                text[at..at + a.len()].copy_from_slice(a);
                at += 1 + rand() as usize % 40;
            }
            if len >= 4 {
                let a = &anchors[rand() as usize % anchors.len()].0;
                text[len - a.len()..].copy_from_slice(a);
            }
            let want = naive(&anchors, &text);
            total += want.len();
            assert_eq!(found(&vector, &text), want, "len {len}");
            assert_eq!(found(&scalar, &text), want, "len {len}, scalar");
        }
        assert!(total > 1000, "{total} planted occurrences");
    }

    #[test]
    fn only_three_or_only_four_byte_anchors() {
        for anchors in [vec![(&b"abc"[..], 0), (b"xyz", 1)], vec![(&b"abcd"[..], 0), (b"wxyz", 1)]] {
            let f = WindowFilter::new(&anchors);
            let text: Vec<u8> = b"..abcd..wxyz..xyz".iter().copied().cycle().take(500).collect();
            assert_eq!(found(&f, &text), naive(&anchors, &text));
        }
        assert!(found(&WindowFilter::new(&[]), b"anything at all, long enough for a block or two of it").is_empty());
    }
}
