//! Feeds arbitrary bytes to the page protocol's decoder, both ways round: `check` and
//! `parse` must never panic, must agree, and must only accept frames that lie inside the
//! input, whose payload matches their checksum, that encode back to the same bytes, and whose
//! every strict prefix is incomplete. A bad checksum is only reported for a whole frame with
//! a valid header.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pagemesh_protocol::{
    Direction, FrameError, HEADER_LEN, Header, check, encode_frame, parse,
};

fuzz_target!(|data: &[u8]| {
    for dir in [Direction::Request, Direction::Response] {
        let checked = check(data, dir);
        match (checked, parse(data, dir)) {
            (Ok(len), Ok((header, payload))) => {
                assert!(len <= data.len());
                assert_eq!(len, HEADER_LEN + payload.len());
                assert_eq!(header.frame_len(), len);
                assert_eq!(header.validate(dir), Ok(len));
                assert_eq!(header.verify_checksum(payload), Ok(()));
                let mut again = vec![0u8; len];
                assert_eq!(encode_frame(&header, payload, &mut again), Some(len));
                assert_eq!(again, &data[..len]);
                for end in [0, HEADER_LEN - 1, len / 2, len - 1] {
                    let end = end.min(len - 1);
                    assert_eq!(check(&data[..end], dir), Err(FrameError::Incomplete));
                }
            }
            (Err(a), Err(b)) => {
                assert_eq!(a, b);
                if let FrameError::BadChecksum { expected, actual } = a {
                    let header = Header::peek(data).expect("a whole header");
                    let len = header.validate(dir).expect("a valid header");
                    assert!(len <= data.len());
                    assert_eq!(expected, header.crc32c());
                    assert_ne!(expected, actual);
                }
            }
            (a, b) => panic!("check and parse disagree: {a:?} vs {:?}", b.map(|(h, _)| h)),
        }
    }
});
