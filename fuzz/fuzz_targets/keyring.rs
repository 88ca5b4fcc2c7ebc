//! The cluster key file's parser: any bytes are refused with an error or give a keyring
//! whose proofs and token work.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use pagemesh_auth::{Keyring, Nonce, Transcript};

fuzz_target!(|data: &[u8]| {
    let Ok(keyring) = Keyring::parse(data, Path::new("fuzz.key")) else {
        return;
    };
    assert!(keyring.len() >= 1);
    let token = keyring.coordinator_token();
    assert_eq!(token.len(), 64);
    assert!(keyring.accepts_token(&token));
    let transcript = Transcript {
        client: 1,
        server: 2,
        session: 3,
        cluster: b"fuzz",
        client_nonce: &Nonce([1; 32]),
        server_nonce: &Nonce([2; 32]),
    };
    let proof = keyring.client_proof(&transcript);
    let index = keyring
        .check_client(&transcript, &proof)
        .expect("its own proof");
    let back = keyring.server_proof(index, &transcript);
    assert!(keyring.check_server(&transcript, &back));
});
