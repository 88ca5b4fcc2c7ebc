//! Packed page payloads: a run's pages each compressed on its own (the LZ4 block format),
//! all-zero pages sent as a length of 0 with no bytes, pages that do not shrink sent raw.
//!
//! ```text
//! | len[0] u16 | len[1] u16 | ... | len[count-1] u16 | page 0's bytes | page 1's bytes | ...
//!   len 0:        an all-zero page, no bytes
//!   len 1..=4095: an LZ4 block that decompresses to exactly 4096 bytes
//!   len 4096:     the page as it is
//! ```
//!
//! A packed payload is only ever sent when it is smaller than the plain one (`count * 4096`
//! bytes), so it always fits the plain payload's limits ([`pack`] says when it would not).
//! [`unpack`] checks every length against the payload before it decodes a byte, and a page
//! that does not decode to exactly 4096 bytes is an error, never a short or wrong page.

use pagemesh_api::PAGE_SIZE;

/// Bytes of one page's length in the table.
pub const LEN_BYTES: usize = 2;

/// A page's length in the table when it is sent raw.
const RAW: usize = PAGE_SIZE;

/// Room [`pack`] needs for one page's LZ4 block before it knows whether it shrinks (the
/// codec's worst case for 4 KiB, which it asks of its output).
pub const SCRATCH_LEN: usize = lz4_flex::block::get_maximum_output_size(PAGE_SIZE);

/// Why a packed payload cannot be unpacked.
#[derive(thiserror::Error, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PackedError {
    /// Fewer bytes than the table of lengths needs.
    #[error("packed payload of {len} bytes is shorter than its table of {count} lengths")]
    Short {
        /// The payload's length.
        len: usize,
        /// Pages of the run.
        count: usize,
    },
    /// A length over a page.
    #[error("packed page {index} says {len} bytes; a page is at most 4096")]
    BadLength {
        /// The page's place in the run.
        index: usize,
        /// The length it says.
        len: usize,
    },
    /// The lengths do not add up to the payload.
    #[error("packed payload's lengths add up to {said} bytes of pages, it carries {got}")]
    Lengths {
        /// What the table says.
        said: usize,
        /// What follows the table.
        got: usize,
    },
    /// An LZ4 block that does not decode to a page.
    #[error("packed page {index} is not an LZ4 block of one page")]
    Corrupt {
        /// The page's place in the run.
        index: usize,
    },
}

/// Packs the pages of `pages` (a whole number of pages) into `dst`, using `scratch` (at
/// least [`SCRATCH_LEN`] bytes) for each page's trial compression. Returns the packed
/// payload's length, or `None` when it would not be smaller than `pages` (send them plain).
/// `dst` needs `pages.len()` bytes.
pub fn pack(pages: &[u8], dst: &mut [u8], scratch: &mut [u8]) -> Option<usize> {
    debug_assert!(pages.len().is_multiple_of(PAGE_SIZE));
    let count = pages.len() / PAGE_SIZE;
    // Smaller than plain, strictly.
    let limit = pages.len().min(dst.len()).checked_sub(1)?;
    let mut at = count * LEN_BYTES;
    if at > limit {
        return None;
    }
    for (i, page) in pages.chunks_exact(PAGE_SIZE).enumerate() {
        let len = if is_zero(page) {
            0
        } else {
            match lz4_flex::block::compress_into(page, scratch) {
                Ok(n) if n < RAW => {
                    dst.get_mut(at..at + n)?.copy_from_slice(&scratch[..n]);
                    n
                }
                // It does not shrink (or `scratch` is short): the page as it is.
                _ => {
                    dst.get_mut(at..at + RAW)?.copy_from_slice(page);
                    RAW
                }
            }
        };
        at += len;
        if at > limit {
            return None;
        }
        // `len` is at most 4096.
        dst[i * LEN_BYTES..(i + 1) * LEN_BYTES].copy_from_slice(&(len as u16).to_le_bytes());
    }
    Some(at)
}

/// Unpacks `payload`, the packed form of `dst.len() / 4096` pages, into `dst`. On an error
/// `dst` may hold some of the pages and must not be used.
pub fn unpack(payload: &[u8], dst: &mut [u8]) -> Result<(), PackedError> {
    debug_assert!(dst.len().is_multiple_of(PAGE_SIZE));
    let count = dst.len() / PAGE_SIZE;
    let table_len = count * LEN_BYTES;
    let Some((table, bytes)) = payload.split_at_checked(table_len) else {
        return Err(PackedError::Short {
            len: payload.len(),
            count,
        });
    };
    let lens = table
        .chunks_exact(LEN_BYTES)
        .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])));
    let mut said = 0;
    for (index, len) in lens.clone().enumerate() {
        if len > RAW {
            return Err(PackedError::BadLength { index, len });
        }
        said += len;
    }
    if said != bytes.len() {
        return Err(PackedError::Lengths {
            said,
            got: bytes.len(),
        });
    }
    let mut at = 0;
    for ((index, len), page) in lens.enumerate().zip(dst.chunks_exact_mut(PAGE_SIZE)) {
        let src = &bytes[at..at + len];
        match len {
            0 => page.fill(0),
            RAW => page.copy_from_slice(src),
            _ => match lz4_flex::block::decompress_into(src, page) {
                Ok(PAGE_SIZE) => {}
                _ => return Err(PackedError::Corrupt { index }),
            },
        }
        at += len;
    }
    Ok(())
}

/// Whether `page` is all zero bytes.
fn is_zero(page: &[u8]) -> bool {
    // Eight bytes at a time; the compiler vectorizes it.
    page.chunks_exact(8)
        .all(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) == 0)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn text_page(i: u8) -> Vec<u8> {
        b"pagemesh packs pages "
            .iter()
            .cycle()
            .take(PAGE_SIZE)
            .map(|&b| b ^ i)
            .collect()
    }

    fn noise_page(seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..PAGE_SIZE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn round_trip(pages: &[u8]) -> Option<usize> {
        let mut dst = vec![0u8; pages.len()];
        let mut scratch = vec![0u8; SCRATCH_LEN];
        let len = pack(pages, &mut dst, &mut scratch)?;
        let mut back = vec![0xAAu8; pages.len()];
        unpack(&dst[..len], &mut back).unwrap();
        assert_eq!(back, pages);
        Some(len)
    }

    #[test]
    fn zero_pages_take_their_length_alone_and_text_shrinks() {
        let zeros = vec![0u8; 4 * PAGE_SIZE];
        assert_eq!(round_trip(&zeros), Some(4 * LEN_BYTES));
        let mut mixed = text_page(1);
        mixed.extend(vec![0u8; PAGE_SIZE]);
        mixed.extend(noise_page(3));
        let len = round_trip(&mixed).unwrap();
        // The noise page goes raw, the text page in well under a tenth.
        assert!(len < 3 * LEN_BYTES + PAGE_SIZE + PAGE_SIZE / 10, "{len}");
    }

    #[test]
    fn pages_that_do_not_shrink_are_sent_plain() {
        let noise: Vec<u8> = (0..4).flat_map(noise_page).collect();
        assert_eq!(round_trip(&noise), None);
    }

    #[test]
    fn damaged_payloads_are_errors() {
        let mut pages = text_page(7);
        pages.extend(text_page(9));
        let mut packed = vec![0u8; pages.len()];
        let mut scratch = vec![0u8; SCRATCH_LEN];
        let len = pack(&pages, &mut packed, &mut scratch).unwrap();
        let packed = &packed[..len];
        let mut dst = vec![0u8; 2 * PAGE_SIZE];
        assert_eq!(
            unpack(&packed[..3], &mut dst),
            Err(PackedError::Short { len: 3, count: 2 })
        );
        assert!(matches!(
            unpack(&packed[..len - 1], &mut dst),
            Err(PackedError::Lengths { .. })
        ));
        let mut long = packed.to_vec();
        long[..2].copy_from_slice(&4097u16.to_le_bytes());
        assert_eq!(
            unpack(&long, &mut dst),
            Err(PackedError::BadLength {
                index: 0,
                len: 4097
            })
        );
        // The first block's bytes garbled: it no longer decodes to one page.
        let mut garbled = packed.to_vec();
        for b in &mut garbled[4..12] {
            *b = 0xFF;
        }
        assert_eq!(
            unpack(&garbled, &mut dst),
            Err(PackedError::Corrupt { index: 0 })
        );
        // A block that decodes to less than a page.
        let short = lz4_flex::block::compress(&[1u8; 100]);
        let mut small = (short.len() as u16).to_le_bytes().to_vec();
        small.extend(&short);
        assert_eq!(
            unpack(&small, &mut dst[..PAGE_SIZE]),
            Err(PackedError::Corrupt { index: 0 })
        );
    }

    proptest! {
        #[test]
        fn whatever_packs_unpacks_to_the_same_pages(
            kinds in proptest::collection::vec(0u8..3, 1..16),
            seed in any::<u64>(),
        ) {
            let pages: Vec<u8> = kinds
                .iter()
                .enumerate()
                .flat_map(|(i, k)| match k {
                    0 => vec![0u8; PAGE_SIZE],
                    1 => text_page(i as u8),
                    _ => noise_page(seed ^ i as u64),
                })
                .collect();
            if let Some(len) = round_trip(&pages) {
                prop_assert!(len < pages.len());
            }
        }

        #[test]
        fn no_payload_unpacks_into_a_wrong_length(
            payload in proptest::collection::vec(any::<u8>(), 0..9000),
            count in 1usize..3,
        ) {
            let mut dst = vec![0u8; count * PAGE_SIZE];
            // Anything may be refused; nothing may panic.
            let _ = unpack(&payload, &mut dst);
        }
    }
}
