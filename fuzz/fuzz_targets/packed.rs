//! The packed-run decoder: whatever the bytes, `unpack` either fills every page or refuses,
//! never panics or writes past the run; and what `pack` makes of pages unpacks to them.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pagemesh_protocol::packed::{SCRATCH_LEN, pack, unpack};

const PAGE: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    // The first byte: pages of the run (1 to 4).
    let count = usize::from(first % 4) + 1;
    let mut dst = vec![0u8; count * PAGE];
    let _ = unpack(rest, &mut dst);
    // The rest as pages (zero-padded): packed, then unpacked, they are the same.
    let mut pages = vec![0u8; count * PAGE];
    let n = rest.len().min(pages.len());
    pages[..n].copy_from_slice(&rest[..n]);
    let mut packed = vec![0u8; pages.len()];
    let mut scratch = vec![0u8; SCRATCH_LEN];
    if let Some(len) = pack(&pages, &mut packed, &mut scratch) {
        assert!(len < pages.len());
        unpack(&packed[..len], &mut dst).expect("a packed run unpacks");
        assert_eq!(dst, pages);
    }
});
