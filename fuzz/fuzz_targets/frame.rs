//! The frame decoder, both ways: whatever the bytes, `check` and `parse` agree, never read
//! past what they were given, and a frame they accept re-encodes to the same bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pagemesh_protocol::{Direction, HEADER_LEN, Header, check, encode_frame, parse};

fuzz_target!(|data: &[u8]| {
    for dir in [Direction::Request, Direction::Response] {
        let checked = check(data, dir);
        match parse(data, dir) {
            Ok((header, payload)) => {
                let len = checked.expect("parse accepted what check refused");
                assert_eq!(len, HEADER_LEN + payload.len());
                assert!(len <= data.len());
                assert_eq!(header.frame_len(), len);
                let mut out = vec![0u8; len];
                assert_eq!(encode_frame(&header, payload, &mut out), Some(len));
                assert_eq!(out, data[..len]);
            }
            Err(e) => {
                // check may stop at "need more bytes" where parse reports the same.
                if let Ok(len) = checked {
                    panic!("check accepted {len} bytes that parse refused: {e}");
                }
            }
        }
        if let Some(header) = Header::peek(data) {
            let _ = header.validate(dir);
            let _ = header.op();
            let _ = header.status();
            let _ = header.auth_scheme();
            let body = &data[HEADER_LEN.min(data.len())..];
            let _ = header.verify_checksum(body);
        }
    }
});
