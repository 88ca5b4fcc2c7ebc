//! The page server's whole request loop over an in-memory connection (`serve_stream`), as a
//! client that sends the input and closes: the handshake, every op, framing errors,
//! truncation. The first byte picks a keyless or a keyed server (the fuzzer cannot forge a
//! proof, so the keyed one tests that nothing gets past the handshake). Whatever comes in,
//! the server must not panic, must answer only with well-formed reply frames, and a keyed
//! server must serve no page.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pagemesh_api::placement::Placement;
use pagemesh_api::{Content, PAGE_SIZE, Vm};
use pagemesh_auth::Keyring;
use pagemesh_protocol::{Direction, check};
use pagemesh_server::{PageStore, ScriptedStream, ServerContext, serve_stream};

const ME: u32 = 1;

/// A VM of 64 pages, half of them on this node, for any id the client names.
fn vm(id: u32) -> Vm {
    Vm {
        id,
        compute_node: 9,
        mem_bytes: 64 * PAGE_SIZE as u64,
        placement: Placement::interleave(vec![ME, 2], 4, 64).expect("a valid placement"),
        content: Content::Pattern { seed: 7 },
        local_memory_bytes: None,
        replicas: 1,
        retired: Vec::new(),
        repairs: Vec::new(),
    }
}

fn context(keyed: bool) -> ServerContext {
    let ctx = ServerContext::new(ME, PageStore::new(256), |id| Ok(vm(id)))
        .with_cluster("fuzz".to_owned())
        .expect("a valid cluster name");
    if keyed {
        ctx.with_keyring(Keyring::from_secret(&[0x5a; 32]))
    } else {
        ctx
    }
}

fuzz_target!(|data: &[u8]| {
    static PEER: OnceLock<std::net::SocketAddr> = OnceLock::new();
    let peer = *PEER.get_or_init(|| "127.0.0.1:9".parse().unwrap());
    let Some((&mode, script)) = data.split_first() else {
        return;
    };
    let keyed = mode & 1 == 1;
    // A fresh server each time: a store's state must not leak from one input to the next.
    let ctx = context(keyed);
    let mut stream = ScriptedStream::new(script);
    serve_stream(&mut stream, peer, &ctx);
    let mut out = &stream.output[..];
    while !out.is_empty() {
        let len = check(out, Direction::Response)
            .unwrap_or_else(|e| panic!("the server wrote a malformed reply: {e}"));
        out = &out[len..];
    }
    if keyed {
        assert_eq!(
            ctx.pages_served(),
            0,
            "a keyed server served a page unauthenticated"
        );
    }
});
