//! The deterministic page pattern memory nodes load and the `verify` guest checks.
//!
//! Word `j` (0..512) of page `p` holds `((p * 512 + j + 1) * K) ^ seed` with `K` the 64-bit
//! golden-ratio constant: every word of every page differs, so a misplaced, stale, torn or
//! zeroed page fails verification. The guest computes the same expression in
//! `vmm/src/guest.S`; keep the two in step.

use crate::PAGE_SIZE;

/// Multiplier of the pattern (2^64 / golden ratio).
pub const K: u64 = 0x9E37_79B9_7F4A_7C15;
/// 64-bit words in a page.
pub const WORDS_PER_PAGE: u64 = (PAGE_SIZE / 8) as u64;

/// The pattern word `j` of page `page`.
#[inline]
pub fn word(seed: u64, page: u64, j: u64) -> u64 {
    (page * WORDS_PER_PAGE + j + 1).wrapping_mul(K) ^ seed
}

/// Fills `dst` (one page) with the pattern of `page`.
pub fn fill_page(seed: u64, page: u64, dst: &mut [u8]) {
    debug_assert_eq!(dst.len(), PAGE_SIZE);
    for (j, chunk) in dst.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&word(seed, page, j as u64).to_le_bytes());
    }
}

/// The first word of `page`: what `read` and `rmw` guests add to their checksum.
#[inline]
pub fn first_word(seed: u64, page: u64) -> u64 {
    word(seed, page, 0)
}

/// Index of the first word of `src` (one page) that differs from the pattern of `page`.
pub fn first_mismatch(seed: u64, page: u64, src: &[u8]) -> Option<usize> {
    src.chunks_exact(8).enumerate().position(|(j, chunk)| {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        u64::from_le_bytes(b) != word(seed, page, j as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_and_check_agree() {
        let mut page = vec![0u8; PAGE_SIZE];
        fill_page(7, 42, &mut page);
        assert_eq!(first_mismatch(7, 42, &page), None);
        assert_eq!(first_mismatch(7, 43, &page), Some(0));
        assert_eq!(first_mismatch(8, 42, &page), Some(0));
        page[4095] ^= 1;
        assert_eq!(first_mismatch(7, 42, &page), Some(511));
    }
}
