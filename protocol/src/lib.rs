//! The binary page protocol, version 5.
//!
//! A compute node's pager talks to each memory node over one TCP connection. Every frame,
//! request or reply, is a 48-byte little-endian [`Header`] followed by `payload_len` bytes of
//! payload, whose CRC32C the header carries ([`checksum`]). A connection carries one request
//! at a time: the client sends a request and reads its reply before sending the next (the
//! server answers in order, so pipelining also works).
//!
//! ```text
//! compute node (TcpPeer)                                memory node (PageServer)
//!        |                                                       |
//!        |-- Hello page=<compute id> + session + Nc + "<cluster>" ->| same cluster, or
//!        |<-- Ok page=<memory id> count=<auth> + Ns + "<cluster>" --| either has none
//!        |-- Auth + HMAC(key, client, transcript) ---------------->| the cluster key?
//!        |<----------------- Ok + HMAC(key, server, transcript) ---| (count=1: required)
//!        |-- Load vm=7 ----------------------------------------->| vm_lookup(7), then
//!        |<------------------------------ Ok page=<held> --------| load its share of VM 7
//!        |-- Fetch id=5 vm=7 page=12 count=4 ------------------->| copy out, lend
//!        |<------------------------------ Ok + 4 * 4096 bytes ---| pages 12..16 to the session
//!        |   (reply lost: reconnect, Hello with the same session, ask again)
//!        |-- Fetch id=6 vm=7 page=12 count=4 ------------------->| still held: lend again
//!        |<------------------------------ Ok + 4 * 4096 bytes ---|
//!        |-- Fetch id=7 ack=6 vm=7 page=40 count=1 ------------->| free what ids <= 6 lent
//!        |<------------------------------ Ok + 4096 bytes -------| (pages 12..16), lend 40
//!        |-- Ack ack=7 ----------------------------------------->| free page 40
//!        |<------------------------------ Ok --------------------|
//!        |-- WriteBack vm=7 page=12 count=1 + 4096 bytes ------->| holds page 12 again
//!        |<------------------------------ Ok --------------------|
//!        |-- Held vm=7 ----------------------------------------->|
//!        |<------------------------------ Ok page=<held> --------|
//!        |-- Release vm=7 -------------------------------------->| drop every page of VM 7
//!        |<------------------------------ Ok page=<dropped> -----|
//! ```
//!
//! Nothing but Hello (and then Auth, when the server has a cluster key) is served before the
//! handshake is done: any other request is refused with [`Status::Unauthenticated`] and no
//! payload, and the connection closed. The proofs are HMAC-SHA256 tags over a transcript of
//! both node ids, the session, the cluster name and both nonces (`pagemesh-auth`); the
//! nonces are fresh per connection, so a recorded handshake cannot be replayed.
//!
//! Decoding is two steps, as in mini-redis: [`check`] tells whether a buffer starts with a
//! whole, valid frame (and how long it is) without copying anything, with
//! [`FrameError::Incomplete`] as the "need more bytes" state; [`parse`] then hands out the
//! header and a borrowed payload. A receiver that reads the header and the payload apart (the
//! server, [`TcpPeer`](super::tcp::TcpPeer)) runs [`Header::validate`] on the header and
//! [`Header::verify_checksum`] on the payload before using it. Encoding writes into a
//! caller's buffer and never allocates. `docs/protocol.md` is the prose version of this
//! module; keep the two in step.

use std::fmt;

pub mod packed;

use pagemesh_api::{PAGE_SIZE, VmId};
use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"PGMS";
/// The protocol version this module speaks. Version 1 had no checksum and no cluster name;
/// version 2 had no acknowledgements (a Fetch freed its pages at once) and no session;
/// version 3 had no nonces and no Auth (anyone could fetch); version 4 had no packed
/// payloads (no compression).
pub const VERSION: u8 = 5;
/// The bit of the op byte that marks a run's payload as packed ([`packed`]): in a Fetch or
/// Read request it asks for a packed reply (the server may still answer plain), in their
/// OK reply and in a WriteBack request it says the payload is packed. Only on a connection
/// whose Hello agreed to [`FEATURE_PACKED`].
pub const PACKED: u8 = 0x80;
/// A feature bit of the Hello's `vm` field: packed run payloads ([`PACKED`]). A client's
/// Hello offers features, the server's OK reply says which of them it accepts.
pub const FEATURE_PACKED: u32 = 1;
/// Bytes in a [`Header`].
pub const HEADER_LEN: usize = 48;
/// Most pages one Fetch, Read or WriteBack may carry.
pub const MAX_RUN_PAGES: u32 = 256;
/// Most payload bytes of any frame (a full run of pages, 1 MiB).
pub const MAX_RUN_BYTES: usize = MAX_RUN_PAGES as usize * PAGE_SIZE;
/// Most bytes of the message an error reply carries.
pub const MAX_MESSAGE_LEN: usize = 1024;
/// Most bytes of the cluster name a Hello request or its OK reply carries.
pub const MAX_CLUSTER_LEN: usize = 64;
/// Bytes of the session id that starts a Hello request's payload.
pub const SESSION_LEN: usize = 8;
/// Bytes of the nonce each side's Hello carries (after the session id in a request, first in
/// an OK reply).
pub const NONCE_LEN: usize = 32;
/// Bytes of the proof an Auth request and its OK reply carry (an HMAC-SHA256 tag).
pub const PROOF_LEN: usize = 32;
/// Bytes of a Hello request's payload before the cluster name.
pub const HELLO_REQUEST_FIXED: usize = SESSION_LEN + NONCE_LEN;
/// Bytes of a Hello OK reply's payload before the cluster name.
pub const HELLO_REPLY_FIXED: usize = NONCE_LEN;

/// The `count` of a Hello OK reply: whether the server wants an Auth before anything else.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum AuthScheme {
    /// The server has no cluster key: the Hello is the whole handshake.
    None = 0,
    /// The server has a cluster key: the client must send [`Op::Auth`] next.
    ClusterKey = 1,
}

impl TryFrom<u32> for AuthScheme {
    type Error = FrameError;

    fn try_from(value: u32) -> Result<Self, FrameError> {
        match value {
            0 => Ok(AuthScheme::None),
            1 => Ok(AuthScheme::ClusterKey),
            other => Err(FrameError::UnknownAuth(other)),
        }
    }
}
/// Most bytes of any frame, header included: the size of a buffer that holds any frame.
pub const MAX_FRAME_LEN: usize = HEADER_LEN + MAX_RUN_BYTES;

/// [`PAGE_SIZE`] as a `u32` (4096 fits).
const PAGE_BYTES: u32 = PAGE_SIZE as u32;
/// [`PROOF_LEN`] as a `u32`.
const PROOF_BYTES: u32 = PROOF_LEN as u32;

/// The fixed 48-byte header of every frame, as it is on the wire (little-endian, no padding).
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 4 | `magic` = `b"PGMS"` |
/// | 4 | 1 | `version` = 5 |
/// | 5 | 1 | `op` ([`Op`]; bit 7 is [`PACKED`]) |
/// | 6 | 2 | `status` ([`Status`], 0 in requests) |
/// | 8 | 8 | `request_id` |
/// | 16 | 4 | `vm` |
/// | 20 | 4 | `count` (pages of the run) |
/// | 24 | 8 | `page` (first page of the run, or a node id / page count, see [`Op`]) |
/// | 32 | 4 | `payload_len` |
/// | 36 | 4 | `crc32c` = [`checksum`] of the payload (0 when there is none) |
/// | 40 | 8 | `ack`: in requests, the client's acknowledgement (see [`Op::Fetch`]); 0 in replies |
///
/// Fields are private so that a header can only be built by the constructors below; a header
/// read from the network is only meaningful after [`Header::validate`], and its payload only
/// after [`Header::verify_checksum`] (both of which [`check`] and [`parse`] run).
#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    magic: [u8; 4],
    version: u8,
    op: u8,
    status: U16,
    request_id: U64,
    vm: U32,
    count: U32,
    page: U64,
    payload_len: U32,
    crc32c: U32,
    ack: U64,
}

const _: () = assert!(size_of::<Header>() == HEADER_LEN);

/// What a request asks for. A reply carries the op of its request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    /// Introduction: request `page` = the client's node id, payload = its session id
    /// ([`SESSION_LEN`] bytes, little-endian), its nonce ([`NONCE_LEN`]) and then its cluster
    /// name; reply `page` = the server's node id, `count` = the [`AuthScheme`], payload = the
    /// server's nonce and its cluster name. Names are UTF-8 of at most [`MAX_CLUSTER_LEN`]
    /// bytes, empty for none; the server refuses a client of another cluster
    /// ([`Status::WrongCluster`]). The session outlives the connection: a client that
    /// reconnects says Hello with the same session, and its loans and acknowledgements carry
    /// over. A connection says Hello once; a second one after the handshake is refused.
    /// The request's `vm` is the features the client offers ([`FEATURE_PACKED`]), the
    /// reply's those of them the server accepts.
    Hello = 1,
    /// Claim `count` pages from `page` on, in two phases: the reply carries them and the
    /// server *lends* them to the client's session (it still holds them, and lends them again
    /// if asked, so a lost reply loses nothing). The server frees them once a request of the
    /// same session carries an `ack` at or above this request's id: the client acknowledges
    /// by request id, cumulatively, on whatever request it sends next ([`Op::Ack`] if none).
    Fetch = 2,
    /// Like [`Op::Fetch`], but the server keeps its copy.
    Read = 3,
    /// Hand `count` pages from `page` on to the server (payload `count * 4096` bytes), which
    /// holds them from then on, replacing any copy it had. The reply has no payload.
    WriteBack = 4,
    /// Load the server's share of VM `vm`; reply `page` = pages it then holds for `vm`.
    Load = 5,
    /// Reply `page` = pages held for VM `vm`.
    Held = 6,
    /// Drop every page of VM `vm`; reply `page` = pages dropped.
    Release = 7,
    /// Nothing but the header's `ack` (see [`Op::Fetch`]); the reply has no payload. A client
    /// sends it when it has an acknowledgement to deliver and no other request to carry it.
    Ack = 8,
    /// The client's proof that it holds the cluster key ([`PROOF_LEN`] bytes over the Hello's
    /// transcript); the OK reply carries the server's proof. Sent right after a Hello whose
    /// reply asked for it ([`AuthScheme::ClusterKey`]); a wrong proof is refused with
    /// [`Status::Unauthenticated`] and the connection closed.
    Auth = 9,
    /// Where `count` pages from `page` on are in the server's page store: the reply's payload
    /// is a little-endian `u32` slot per page ([`SLOT_BYTES`] each), [`NO_SLOT`] for a page
    /// it does not hold. What a reader needs to address a page in the regions the server
    /// registered for RDMA (`pagemesh_transport::rdma::plan`); `count` is 1 to
    /// [`MAX_SLOTS`]. A slot stays the page's while the server holds it.
    Slots = 10,
    /// Claim `count` pages from `page` on without receiving them, in two phases like
    /// [`Op::Fetch`] (lent, then freed by a later `ack` at or above this request's id); the
    /// reply has no payload. What a client sends for pages it read itself with one-sided
    /// RDMA READ. A page of the run not held is [`Status::NotHeld`], and nothing is lent.
    Claim = 11,
    /// Connect a queue pair for one-sided reads: the payload is the client's [`QueuePair`]
    /// ([`QUEUE_PAIR_LEN`] bytes), the OK reply's the one the server made for it and
    /// connected to it. The server keeps it as long as the connection: one per client
    /// connection. A server without RDMA answers [`Status::Unsupported`] saying why.
    RdmaConnect = 12,
}

/// One end of an RDMA reliable connection, as [`Op::RdmaConnect`] carries it: the port's
/// GID, its LID, the queue pair number and the first packet sequence number (both 24-bit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueuePair {
    /// The port's GID.
    pub gid: [u8; 16],
    /// The port's LID (0 on RoCE).
    pub lid: u16,
    /// Queue pair number.
    pub qpn: u32,
    /// First packet sequence number.
    pub psn: u32,
}

/// Bytes of a [`QueuePair`] on the wire: the GID, then the LID, QPN and PSN little-endian.
pub const QUEUE_PAIR_LEN: usize = 16 + 2 + 4 + 4;

impl QueuePair {
    /// Its wire form.
    pub fn to_bytes(&self) -> [u8; QUEUE_PAIR_LEN] {
        let mut b = [0u8; QUEUE_PAIR_LEN];
        b[..16].copy_from_slice(&self.gid);
        b[16..18].copy_from_slice(&self.lid.to_le_bytes());
        b[18..22].copy_from_slice(&self.qpn.to_le_bytes());
        b[22..].copy_from_slice(&self.psn.to_le_bytes());
        b
    }

    /// Read from its wire form; numbers past 24 bits are refused.
    pub fn from_bytes(b: &[u8]) -> Result<QueuePair, FrameError> {
        let b: &[u8; QUEUE_PAIR_LEN] = b.try_into().map_err(|_| FrameError::BadLength {
            op: Op::RdmaConnect,
            len: b.len() as u32,
            expected: QUEUE_PAIR_LEN as u32,
        })?;
        let word = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let qp = QueuePair {
            gid: b[..16].try_into().expect("16 bytes"),
            lid: u16::from_le_bytes([b[16], b[17]]),
            qpn: word(18),
            psn: word(22),
        };
        for value in [qp.qpn, qp.psn] {
            if value >= 1 << 24 {
                return Err(FrameError::BadQueuePair(value));
            }
        }
        Ok(qp)
    }
}

/// Bytes per slot in an [`Op::Slots`] reply.
pub const SLOT_BYTES: u32 = 4;

/// The slot of a page the server does not hold, in an [`Op::Slots`] reply.
pub const NO_SLOT: u32 = u32::MAX;

/// The most pages one [`Op::Slots`] request asks about (its reply fills a run's payload).
pub const MAX_SLOTS: u32 = MAX_RUN_BYTES as u32 / SLOT_BYTES;

impl Op {
    /// Every op, in code order.
    pub const ALL: [Op; 12] = [
        Op::Hello,
        Op::Fetch,
        Op::Read,
        Op::WriteBack,
        Op::Load,
        Op::Held,
        Op::Release,
        Op::Ack,
        Op::Auth,
        Op::Slots,
        Op::Claim,
        Op::RdmaConnect,
    ];

    /// Whether the op names a run of pages with `page` and `count`.
    pub fn carries_run(self) -> bool {
        matches!(self, Op::Fetch | Op::Read | Op::WriteBack | Op::Claim)
    }

    /// Whether the op's run may be packed ([`PACKED`]).
    pub fn packs(self) -> bool {
        matches!(self, Op::Fetch | Op::Read | Op::WriteBack)
    }

    /// The op's name as the docs spell it.
    pub fn name(self) -> &'static str {
        match self {
            Op::Hello => "Hello",
            Op::Fetch => "Fetch",
            Op::Read => "Read",
            Op::WriteBack => "WriteBack",
            Op::Load => "Load",
            Op::Held => "Held",
            Op::Release => "Release",
            Op::Ack => "Ack",
            Op::Auth => "Auth",
            Op::Slots => "Slots",
            Op::Claim => "Claim",
            Op::RdmaConnect => "RdmaConnect",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl From<Op> for u8 {
    fn from(op: Op) -> u8 {
        op as u8
    }
}

impl TryFrom<u8> for Op {
    type Error = FrameError;

    fn try_from(value: u8) -> Result<Self, FrameError> {
        Op::ALL
            .into_iter()
            .find(|&op| op as u8 == value)
            .ok_or(FrameError::UnknownOp(value))
    }
}

/// The outcome a reply reports. Every status but [`Status::Ok`] comes with a UTF-8 message
/// payload of at most [`MAX_MESSAGE_LEN`] bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Status {
    /// Done; the reply carries what the op promises.
    Ok = 0,
    /// The request broke the framing rules or a limit.
    BadRequest = 1,
    /// The server has not loaded this VM.
    UnknownVm = 2,
    /// A page of the run is not held by the server.
    NotHeld = 3,
    /// The server has no room for the pages.
    NoCapacity = 4,
    /// Loading the VM's pages failed.
    LoadFailed = 5,
    /// Unknown op or protocol version.
    Unsupported = 6,
    /// A Hello from a node of another cluster.
    WrongCluster = 7,
    /// The handshake was skipped or failed: no Hello yet, no Auth where the server wants
    /// one, or a proof made with another key. The connection is closed after this reply.
    Unauthenticated = 8,
}

impl Status {
    /// Every status, in code order.
    pub const ALL: [Status; 9] = [
        Status::Ok,
        Status::BadRequest,
        Status::UnknownVm,
        Status::NotHeld,
        Status::NoCapacity,
        Status::LoadFailed,
        Status::Unsupported,
        Status::WrongCluster,
        Status::Unauthenticated,
    ];
}

impl From<Status> for u16 {
    fn from(status: Status) -> u16 {
        status as u16
    }
}

impl TryFrom<u16> for Status {
    type Error = FrameError;

    fn try_from(value: u16) -> Result<Self, FrameError> {
        Status::ALL
            .into_iter()
            .find(|&s| s as u16 == value)
            .ok_or(FrameError::UnknownStatus(value))
    }
}

/// Which way a frame travels; requests and replies follow different length rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client to server.
    Request,
    /// Server to client.
    Response,
}

/// Why bytes are not (yet) a valid frame.
///
/// [`FrameError::Incomplete`] is a state, not a failure: read more and check again. Every
/// other variant is a protocol violation; [`FrameError::is_fatal`] tells which of them leave
/// the frame boundaries unknown, so that the connection cannot be used any further.
/// [`FrameError::BadChecksum`] is the only one found in the payload rather than the header.
#[derive(thiserror::Error, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Not enough bytes yet for the whole frame.
    #[error("frame is incomplete")]
    Incomplete,
    /// The frame does not start with `PGMS`.
    #[error("bad magic; the peer does not speak the pagemesh page protocol")]
    BadMagic,
    /// A protocol version this node does not speak.
    #[error("protocol version {0} is not supported; this node speaks version {VERSION}")]
    BadVersion(u8),
    /// An op code this node does not know.
    #[error("unknown op {0}")]
    UnknownOp(u8),
    /// A status code this node does not know.
    #[error("unknown status {0}")]
    UnknownStatus(u16),
    /// A request with a non-zero status field.
    #[error("request carries status {0}; requests must carry 0")]
    StatusInRequest(u16),
    /// A reply with a non-zero acknowledgement field.
    #[error("reply carries acknowledgement {0}; replies must carry 0")]
    AckInReply(u64),
    /// A run of zero pages or of more than [`MAX_RUN_PAGES`].
    #[error("{op} of {count} pages; a run must have 1 to 256 pages")]
    BadCount {
        /// The op of the frame.
        op: Op,
        /// The count it carried.
        count: u32,
    },
    /// A Slots request or reply for no pages or more than [`MAX_SLOTS`].
    #[error("Slots of {0} pages; it asks about 1 to 262144 pages")]
    BadSlotCount(u32),
    /// A payload length the op and status do not allow.
    #[error("{op} frame with a payload of {len} bytes; it must have {expected}")]
    BadLength {
        /// The op of the frame.
        op: Op,
        /// The payload length it carried.
        len: u32,
        /// The only length allowed.
        expected: u32,
    },
    /// An error reply with a message over [`MAX_MESSAGE_LEN`] bytes.
    #[error("error message of {0} bytes; it must be at most 1024")]
    MessageTooLong(u32),
    /// A Hello (request or OK reply) with a cluster name over [`MAX_CLUSTER_LEN`] bytes.
    #[error("Hello with a cluster name of {0} bytes; it must be at most 64")]
    ClusterTooLong(u32),
    /// A Hello whose payload is too short for its fixed part (a request's session id and
    /// nonce, a reply's nonce).
    #[error("Hello with a payload of {len} bytes; it must have at least {fixed}")]
    ShortHello {
        /// The payload length it carried.
        len: u32,
        /// The fixed part's length.
        fixed: u32,
    },
    /// A Hello reply naming an authentication scheme this node does not know.
    #[error("Hello reply asks for authentication scheme {0}, which this node does not know")]
    UnknownAuth(u32),
    /// The payload is not the one the header's `crc32c` was computed over: it was damaged on
    /// the way, or the sender computed it wrongly.
    #[error(
        "payload checksum mismatch: the header says {expected:#010x}, the payload has {actual:#010x}"
    )]
    BadChecksum {
        /// The header's `crc32c`.
        expected: u32,
        /// The [`checksum`] of the payload received.
        actual: u32,
    },
    /// A payload over [`MAX_RUN_BYTES`].
    #[error("payload of {0} bytes is over the 1 MiB limit")]
    TooLarge(u32),
    /// The [`PACKED`] bit on an op that carries no run, or on a reply that carries no pages.
    #[error("{0} frame marked packed; only runs of pages are")]
    PackedOp(Op),
    /// A packed payload whose length cannot be that of `count` packed pages: shorter than
    /// its table of lengths, or not smaller than the plain pages.
    #[error(
        "packed {op} of {count} pages with a payload of {len} bytes; it must have at least \
         {count} two-byte lengths and be smaller than the plain pages"
    )]
    BadPackedLength {
        /// The op of the frame.
        op: Op,
        /// Pages of the run.
        count: u32,
        /// The payload length it carried.
        len: u32,
    },
    /// A packed payload that does not unpack to its pages.
    #[error("packed payload does not unpack")]
    BadPacked(#[source] packed::PackedError),
    /// An RdmaConnect queue pair whose QPN or PSN does not fit 24 bits.
    #[error("RdmaConnect queue pair number or sequence number {0:#x} does not fit 24 bits")]
    BadQueuePair(u32),
}

impl FrameError {
    /// Whether the error leaves the end of the frame unknown (or the peer speaking another
    /// protocol), so that the connection must be closed rather than skipped past. A bad
    /// checksum is not fatal: the header, and so the frame's end, was valid.
    pub fn is_fatal(self) -> bool {
        matches!(
            self,
            FrameError::BadMagic
                | FrameError::BadVersion(_)
                | FrameError::BadLength { .. }
                | FrameError::MessageTooLong(_)
                | FrameError::ClusterTooLong(_)
                | FrameError::ShortHello { .. }
                | FrameError::TooLarge(_)
                | FrameError::PackedOp(_)
                | FrameError::BadPackedLength { .. }
        )
    }
}

impl Header {
    fn raw(op: u8, request_id: u64, status: Status, vm: VmId, page: u64, count: u32) -> Self {
        Header {
            magic: MAGIC,
            version: VERSION,
            op,
            status: U16::new(status.into()),
            request_id: U64::new(request_id),
            vm: U32::new(vm),
            count: U32::new(count),
            page: U64::new(page),
            payload_len: U32::new(0),
            crc32c: U32::new(0),
            ack: U64::new(0),
        }
    }

    /// A request. Its payload length follows from the op: `count * 4096` for
    /// [`Op::WriteBack`], 0 otherwise (give a Hello's cluster name its length with
    /// [`Header::with_payload_len`]). For ops without a run pass `count` 0 (and `page` 0,
    /// except the client's node id for [`Op::Hello`]). The checksum is 0 until
    /// [`Header::with_checksum`] (or [`encode_frame`]) sets it.
    pub fn request(op: Op, request_id: u64, vm: VmId, page: u64, count: u32) -> Self {
        let mut h = Header::raw(op.into(), request_id, Status::Ok, vm, page, count);
        if op == Op::WriteBack {
            h.payload_len = U32::new(count.saturating_mul(PAGE_BYTES));
        }
        h
    }

    /// The reply to this request with `status`: the same op byte (even an unknown one),
    /// request id, VM, page and count, and no payload. Chain [`Header::with_page`],
    /// [`Header::with_payload_len`] and [`Header::with_checksum`] to fill in what the op
    /// returns.
    pub fn reply(&self, status: Status) -> Self {
        Header::raw(
            self.op,
            self.request_id(),
            status,
            self.vm(),
            self.page(),
            self.count(),
        )
    }

    /// An error reply to a request whose header cannot be trusted (bad magic): op byte and
    /// request id as given, everything else 0.
    pub fn error_reply(op: u8, request_id: u64, status: Status) -> Self {
        Header::raw(op, request_id, status, 0, 0, 0)
    }

    /// This request with its acknowledgement set: every Fetch of this session with a request
    /// id up to `ack` has been received (or asked again and received), so the server may
    /// free what they lent.
    #[must_use]
    pub fn with_ack(mut self, ack: u64) -> Self {
        self.ack = U64::new(ack);
        self
    }

    /// This Hello reply with `count` set to the server's [`AuthScheme`].
    #[must_use]
    pub fn with_auth_scheme(mut self, scheme: AuthScheme) -> Self {
        self.count = U32::new(scheme as u32);
        self
    }

    /// The [`AuthScheme`] of a Hello OK reply (its `count`).
    pub fn auth_scheme(&self) -> Result<AuthScheme, FrameError> {
        AuthScheme::try_from(self.count())
    }

    /// This Hello (request or reply) with `features` ([`FEATURE_PACKED`]) in its `vm`.
    #[must_use]
    pub fn with_features(mut self, features: u32) -> Self {
        self.vm = U32::new(features);
        self
    }

    /// The features a Hello offers (request) or accepts (reply).
    pub fn features(&self) -> u32 {
        self.vm()
    }

    /// This header with the [`PACKED`] bit set on its op.
    #[must_use]
    pub fn with_packed(mut self) -> Self {
        self.op |= PACKED;
        self
    }

    /// This header with the [`PACKED`] bit cleared (a reply sent plain after all).
    #[must_use]
    pub fn without_packed(mut self) -> Self {
        self.op &= !PACKED;
        self
    }

    /// Whether the op byte has the [`PACKED`] bit.
    pub fn is_packed(&self) -> bool {
        self.op & PACKED != 0
    }

    /// This header with `page` replaced.
    #[must_use]
    pub fn with_page(mut self, page: u64) -> Self {
        self.page = U64::new(page);
        self
    }

    /// This header with `payload_len` replaced.
    #[must_use]
    pub fn with_payload_len(mut self, len: u32) -> Self {
        self.payload_len = U32::new(len);
        self
    }

    /// This header with `crc32c` set to the [`checksum`] of `payload`, the payload it is sent
    /// with.
    #[must_use]
    pub fn with_checksum(mut self, payload: &[u8]) -> Self {
        self.crc32c = U32::new(checksum(payload));
        self
    }

    /// The first [`HEADER_LEN`] bytes of `buf` as a header, without any validation (for
    /// replying to a malformed request); `None` if `buf` is shorter.
    pub fn peek(buf: &[u8]) -> Option<Self> {
        Header::read_from_prefix(buf).ok().map(|(h, _)| h)
    }

    /// The magic bytes.
    pub fn magic(&self) -> [u8; 4] {
        self.magic
    }

    /// The protocol version byte.
    pub fn version(&self) -> u8 {
        self.version
    }

    /// The op, if known (whatever its [`PACKED`] bit).
    pub fn op(&self) -> Result<Op, FrameError> {
        Op::try_from(self.op & !PACKED)
    }

    /// The raw op byte, [`PACKED`] bit included.
    pub fn op_byte(&self) -> u8 {
        self.op
    }

    /// The status, if known.
    pub fn status(&self) -> Result<Status, FrameError> {
        Status::try_from(self.status.get())
    }

    /// The raw status code.
    pub fn status_code(&self) -> u16 {
        self.status.get()
    }

    /// The request id, echoed by the reply.
    pub fn request_id(&self) -> u64 {
        self.request_id.get()
    }

    /// The VM.
    pub fn vm(&self) -> VmId {
        self.vm.get()
    }

    /// Pages of the run.
    pub fn count(&self) -> u32 {
        self.count.get()
    }

    /// First page of the run, or the value the op returns (see [`Op`]).
    pub fn page(&self) -> u64 {
        self.page.get()
    }

    /// Bytes of payload after the header.
    pub fn payload_len(&self) -> u32 {
        self.payload_len.get()
    }

    /// The acknowledgement a request carries (see [`Op::Fetch`]); 0 acknowledges nothing.
    pub fn ack(&self) -> u64 {
        self.ack.get()
    }

    /// The CRC32C of the payload, as the sender computed it (see [`checksum`]).
    pub fn crc32c(&self) -> u32 {
        self.crc32c.get()
    }

    /// Bytes of the whole frame, header included.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len() as usize
    }

    /// The header's bytes, ready to send.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out.copy_from_slice(self.as_bytes());
        out
    }

    /// Writes the header into the first [`HEADER_LEN`] bytes of `dst`; `None` if `dst` is
    /// shorter.
    pub fn encode(&self, dst: &mut [u8]) -> Option<usize> {
        self.write_to_prefix(dst).ok().map(|()| HEADER_LEN)
    }

    /// Checks every field against the rules of `dir` and returns the frame's total length.
    ///
    /// Checks run in this order, so that the first error is the most telling one and every
    /// non-fatal error leaves `payload_len` trustworthy (at most [`MAX_RUN_BYTES`]): magic,
    /// version, payload size limit, acknowledgement (replies), status, op, count, payload length. An error reply's op
    /// byte is not checked: a server echoes ops it does not know with [`Status::Unsupported`].
    /// The `crc32c` field can only be judged with the payload: [`Header::verify_checksum`].
    pub fn validate(&self, dir: Direction) -> Result<usize, FrameError> {
        if self.magic != MAGIC {
            return Err(FrameError::BadMagic);
        }
        if self.version != VERSION {
            return Err(FrameError::BadVersion(self.version));
        }
        let len = self.payload_len();
        if len as usize > MAX_RUN_BYTES {
            return Err(FrameError::TooLarge(len));
        }
        let expected = match dir {
            Direction::Request => {
                if self.status_code() != 0 {
                    return Err(FrameError::StatusInRequest(self.status_code()));
                }
                let op = self.op()?;
                match op {
                    _ if self.is_packed() && !op.packs() => {
                        return Err(FrameError::PackedOp(op));
                    }
                    Op::Hello => return self.hello_request_len(),
                    Op::Fetch | Op::Read => (op, self.run_pages(op).map(|_| 0)?),
                    Op::WriteBack if self.is_packed() => return self.packed_len(op),
                    Op::WriteBack => (op, self.run_pages(op)? * PAGE_BYTES),
                    Op::Auth => (op, PROOF_BYTES),
                    Op::Slots => (op, self.slot_count().map(|_| 0)?),
                    Op::Claim => (op, self.run_pages(op).map(|_| 0)?),
                    Op::RdmaConnect => (op, QUEUE_PAIR_LEN as u32),
                    _ => (op, 0),
                }
            }
            Direction::Response => {
                if self.ack() != 0 {
                    return Err(FrameError::AckInReply(self.ack()));
                }
                if self.status()? != Status::Ok {
                    if len as usize > MAX_MESSAGE_LEN {
                        return Err(FrameError::MessageTooLong(len));
                    }
                    return Ok(self.frame_len());
                }
                let op = self.op()?;
                match op {
                    Op::Fetch | Op::Read if self.is_packed() => return self.packed_len(op),
                    _ if self.is_packed() => return Err(FrameError::PackedOp(op)),
                    Op::Hello => return self.hello_len(),
                    Op::Fetch | Op::Read => (op, self.run_pages(op)? * PAGE_BYTES),
                    Op::Auth => (op, PROOF_BYTES),
                    Op::Slots => (op, self.slot_count()? * SLOT_BYTES),
                    Op::RdmaConnect => (op, QUEUE_PAIR_LEN as u32),
                    _ => (op, 0),
                }
            }
        };
        let (op, expected) = expected;
        if len != expected {
            return Err(FrameError::BadLength { op, len, expected });
        }
        Ok(self.frame_len())
    }

    /// Checks the payload against the header's `crc32c`: `Ok` if `payload` is what the sender
    /// computed it over. Run it on every payload before using it; it reads the payload once
    /// and never allocates.
    pub fn verify_checksum(&self, payload: &[u8]) -> Result<(), FrameError> {
        let actual = checksum(payload);
        if actual == self.crc32c() {
            Ok(())
        } else {
            Err(FrameError::BadChecksum {
                expected: self.crc32c(),
                actual,
            })
        }
    }

    /// The frame length of a Hello request, whose payload is a session id, a nonce and a
    /// cluster name.
    fn hello_request_len(&self) -> Result<usize, FrameError> {
        self.hello_payload(HELLO_REQUEST_FIXED)
    }

    /// The frame length of a Hello OK reply, whose payload is a nonce and a cluster name,
    /// and whose `count` is a known [`AuthScheme`].
    fn hello_len(&self) -> Result<usize, FrameError> {
        AuthScheme::try_from(self.count())?;
        self.hello_payload(HELLO_REPLY_FIXED)
    }

    /// The frame length of a Hello whose payload is `fixed` bytes and a cluster name.
    fn hello_payload(&self, fixed: usize) -> Result<usize, FrameError> {
        let len = self.payload_len();
        if (len as usize) < fixed {
            return Err(FrameError::ShortHello {
                len,
                fixed: fixed as u32,
            });
        }
        if len as usize > fixed + MAX_CLUSTER_LEN {
            return Err(FrameError::ClusterTooLong(len - fixed as u32));
        }
        Ok(self.frame_len())
    }

    /// The frame length of a packed run of `op`: its payload holds `count` lengths and is
    /// smaller than the plain pages ([`packed`]).
    fn packed_len(&self, op: Op) -> Result<usize, FrameError> {
        let count = self.run_pages(op)?;
        let len = self.payload_len();
        let table = count * packed::LEN_BYTES as u32;
        if len < table || len >= count * PAGE_BYTES {
            return Err(FrameError::BadPackedLength { op, count, len });
        }
        Ok(self.frame_len())
    }

    /// `count`, if it is a valid run length for `op`.
    fn slot_count(&self) -> Result<u32, FrameError> {
        let count = self.count();
        if (1..=MAX_SLOTS).contains(&count) {
            Ok(count)
        } else {
            Err(FrameError::BadSlotCount(count))
        }
    }

    fn run_pages(&self, op: Op) -> Result<u32, FrameError> {
        let count = self.count();
        if (1..=MAX_RUN_PAGES).contains(&count) {
            Ok(count)
        } else {
            Err(FrameError::BadCount { op, count })
        }
    }
}

impl fmt::Debug for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Header")
            .field("magic", &self.magic)
            .field("version", &self.version)
            .field("op", &self.op)
            .field("status", &self.status_code())
            .field("request_id", &self.request_id())
            .field("vm", &self.vm())
            .field("count", &self.count())
            .field("page", &self.page())
            .field("payload_len", &self.payload_len())
            .field("crc32c", &format_args!("{:#010x}", self.crc32c()))
            .field("ack", &self.ack())
            .finish()
    }
}

/// The CRC32C of a payload: CRC-32C (Castagnoli; reflected polynomial `0x82F63B78`, initial
/// value and final XOR `0xFFFFFFFF`, as in iSCSI and ext4), so `b"123456789"` gives
/// `0xE3069283`. An empty payload gives 0, which is also what that definition yields.
///
/// Uses the CPU's CRC32C instruction when it has one (SSE4.2, ARMv8 CRC).
pub fn checksum(payload: &[u8]) -> u32 {
    if payload.is_empty() {
        return 0;
    }
    crc32c::crc32c(payload)
}

/// Whether `buf` starts with a whole valid frame travelling in `dir`; if so, its length.
///
/// Bad magic and version are reported as soon as their bytes are in, before the header is
/// complete; every other header field is judged once the 48 header bytes are in, before the
/// payload is; the checksum once the whole payload is in. So [`FrameError::Incomplete`] after
/// a whole header means the header is valid and `payload_len` more bytes are due
/// ([`Header::frame_len`]). Never reads past the frame and never panics.
pub fn check(buf: &[u8], dir: Direction) -> Result<usize, FrameError> {
    let seen = buf.len().min(MAGIC.len());
    if buf[..seen] != MAGIC[..seen] {
        return Err(FrameError::BadMagic);
    }
    if let Some(&version) = buf.get(MAGIC.len())
        && version != VERSION
    {
        return Err(FrameError::BadVersion(version));
    }
    let Some(header) = Header::peek(buf) else {
        return Err(FrameError::Incomplete);
    };
    let len = header.validate(dir)?;
    if buf.len() < len {
        return Err(FrameError::Incomplete);
    }
    header.verify_checksum(&buf[HEADER_LEN..len])?;
    Ok(len)
}

/// The header and payload of the frame `buf` starts with (see [`check`]); bytes after the
/// frame are left alone.
pub fn parse(buf: &[u8], dir: Direction) -> Result<(Header, &[u8]), FrameError> {
    let len = check(buf, dir)?;
    let header = Header::peek(buf).ok_or(FrameError::Incomplete)?;
    Ok((header, &buf[HEADER_LEN..len]))
}

/// Writes `header`, with its checksum set to that of `payload`, and `payload` into `dst`;
/// returns the frame length, or `None` if `dst` is too short or `payload.len()` is not the
/// header's `payload_len`.
pub fn encode_frame(header: &Header, payload: &[u8], dst: &mut [u8]) -> Option<usize> {
    let len = header.frame_len();
    if payload.len() != header.payload_len() as usize || dst.len() < len {
        return None;
    }
    header.with_checksum(payload).encode(dst)?;
    dst[HEADER_LEN..len].copy_from_slice(payload);
    Some(len)
}

/// Writes an error reply (header with `op`, `request_id` and `status`, then `message`) into
/// `dst` without allocating; returns the frame length.
///
/// The message is cut to [`MAX_MESSAGE_LEN`] bytes (and to the room in `dst`) on a character
/// boundary, so it stays valid UTF-8.
///
/// # Panics
///
/// If `dst` is shorter than [`HEADER_LEN`].
pub fn encode_error(
    dst: &mut [u8],
    op: u8,
    request_id: u64,
    status: Status,
    message: fmt::Arguments<'_>,
) -> usize {
    debug_assert_ne!(status, Status::Ok, "an error reply needs an error status");
    let (head, body) = dst.split_at_mut(HEADER_LEN);
    let room = body.len().min(MAX_MESSAGE_LEN);
    let mut writer = TruncatingWriter {
        buf: &mut body[..room],
        len: 0,
        full: false,
    };
    // The writer never fails; a message that does not fit is cut, which is what we want.
    let _ = fmt::write(&mut writer, message);
    let len = writer.len;
    // len <= MAX_MESSAGE_LEN, which fits in u32.
    let header = Header::error_reply(op, request_id, status)
        .with_payload_len(len as u32)
        .with_checksum(&body[..len]);
    head.copy_from_slice(header.as_bytes());
    HEADER_LEN + len
}

/// A `fmt::Write` into a fixed slice that keeps the longest prefix that fits, cut on a
/// character boundary, and drops everything after the first cut.
struct TruncatingWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
    full: bool,
}

impl fmt::Write for TruncatingWriter<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.full {
            return Ok(());
        }
        let room = self.buf.len() - self.len;
        let mut take = s.len().min(room);
        while !s.is_char_boundary(take) {
            take -= 1;
        }
        self.buf[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        self.full = take < s.len();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A valid frame and the header and payload it was built from.
    #[derive(Debug, Clone)]
    struct Built {
        dir: Direction,
        header: Header,
        payload: Vec<u8>,
        bytes: Vec<u8>,
    }

    /// Encodes `header` (whose checksum [`encode_frame`] fills in) and `payload`.
    fn build(dir: Direction, header: Header, payload: Vec<u8>) -> Built {
        let mut bytes = vec![0u8; header.frame_len()];
        assert_eq!(
            encode_frame(&header, &payload, &mut bytes),
            Some(bytes.len())
        );
        Built {
            dir,
            header: header.with_checksum(&payload),
            payload,
            bytes,
        }
    }

    /// `len` bytes that vary with `seed` (cheaper than drawing every byte from proptest).
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                // splitmix64
                x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = x;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                (z ^ (z >> 31)) as u8
            })
            .collect()
    }

    /// A cluster name of 0 to 64 bytes (any bytes: framing does not look at them).
    fn cluster() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..=MAX_CLUSTER_LEN)
    }

    fn any_op() -> impl Strategy<Value = Op> {
        proptest::sample::select(Op::ALL.to_vec())
    }

    /// Requests of every op. Runs are kept short so that prefix and corruption sweeps stay
    /// fast; the 256-page limit has its own unit test.
    fn request() -> impl Strategy<Value = Built> {
        (
            any_op(),
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
            1u32..=4,
            any::<u64>(),
            cluster(),
        )
            .prop_map(|(op, id, vm, page, count, seed, cluster)| {
                let count = if op.carries_run() || op == Op::Slots {
                    count
                } else {
                    0
                };
                let mut h = Header::request(op, id, vm, page, count).with_ack(seed);
                let mut hello = seed.to_le_bytes().to_vec();
                hello.extend_from_slice(&noise(seed, NONCE_LEN));
                hello.extend_from_slice(&cluster);
                if op == Op::Hello {
                    h = h.with_payload_len(hello.len() as u32);
                }
                if op == Op::Auth {
                    h = h.with_payload_len(PROOF_BYTES);
                }
                if op == Op::RdmaConnect {
                    h = h.with_payload_len(QUEUE_PAIR_LEN as u32);
                }
                let payload = match op {
                    Op::Hello => hello,
                    _ => noise(seed, h.payload_len() as usize),
                };
                build(Direction::Request, h, payload)
            })
    }

    fn ok_response() -> impl Strategy<Value = Built> {
        (request(), any::<u64>(), any::<u64>(), cluster()).prop_map(|(req, page, seed, cluster)| {
            let op = req.header.op().unwrap();
            let mut h = req.header.reply(Status::Ok);
            let mut payload = Vec::new();
            match op {
                Op::Fetch | Op::Read => {
                    payload = noise(seed, req.header.count() as usize * PAGE_SIZE);
                }
                Op::WriteBack => {}
                Op::Hello => {
                    h = Header::raw(
                        Op::Hello.into(),
                        h.request_id(),
                        Status::Ok,
                        0,
                        page,
                        (seed & 1) as u32,
                    );
                    payload = noise(seed, NONCE_LEN);
                    payload.extend_from_slice(&cluster);
                }
                Op::Auth => payload = noise(seed, PROOF_LEN),
                Op::Slots => {
                    payload = noise(seed, req.header.count() as usize * SLOT_BYTES as usize);
                }
                Op::RdmaConnect => payload = noise(seed, QUEUE_PAIR_LEN),
                _ => h = h.with_page(page),
            }
            let h = h.with_payload_len(payload.len() as u32);
            build(Direction::Response, h, payload)
        })
    }

    fn error_response() -> impl Strategy<Value = Built> {
        (
            any::<u8>(),
            any::<u64>(),
            proptest::sample::select(Status::ALL[1..].to_vec()),
            proptest::collection::vec(any::<u8>(), 0..=MAX_MESSAGE_LEN),
        )
            .prop_map(|(op, id, status, msg)| {
                let h = Header::error_reply(op, id, status).with_payload_len(msg.len() as u32);
                build(Direction::Response, h, msg)
            })
    }

    /// Frames whose every length is determined by their header (not Hello's, whose payload
    /// may be shorter than its limit).
    fn strict_frame() -> impl Strategy<Value = Built> {
        prop_oneof![request(), ok_response()].prop_filter("a Hello's length is not fixed", |f| {
            f.header.op() != Ok(Op::Hello)
        })
    }

    fn any_frame() -> impl Strategy<Value = Built> {
        prop_oneof![request(), ok_response(), error_response()]
    }

    proptest! {
        #[test]
        fn valid_frames_round_trip(f in any_frame(), trailing in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut bytes = f.bytes.clone();
            bytes.extend_from_slice(&trailing);
            prop_assert_eq!(check(&bytes, f.dir), Ok(f.bytes.len()));
            let (header, payload) = parse(&bytes, f.dir).unwrap();
            prop_assert_eq!(header, f.header);
            prop_assert_eq!(payload, &f.payload[..]);
            prop_assert_eq!(header.crc32c(), checksum(&f.payload));
            prop_assert_eq!(header.verify_checksum(payload), Ok(()));
            // Re-encoding what was parsed gives the same bytes.
            let mut again = vec![0u8; f.bytes.len()];
            prop_assert_eq!(encode_frame(&header, payload, &mut again), Some(f.bytes.len()));
            prop_assert_eq!(again, f.bytes);
        }

        #[test]
        fn any_corruption_of_the_checksum_or_payload_is_detected(
            f in any_frame(),
            at in any::<proptest::sample::Index>(),
            flip in 1..=255u8,
        ) {
            // One of the 4 checksum bytes or one of the payload's.
            let i = at.index(4 + f.payload.len());
            let pos = if i < 4 { 36 + i } else { HEADER_LEN + i - 4 };
            let mut bytes = f.bytes.clone();
            bytes[pos] ^= flip;
            let got = check(&bytes, f.dir);
            prop_assert!(matches!(got, Err(FrameError::BadChecksum { .. })), "byte {} ^ {:#x}: {:?}", pos, flip, got);
            prop_assert!(!got.unwrap_err().is_fatal());
        }

        #[test]
        fn every_strict_prefix_is_incomplete(f in any_frame()) {
            for end in 0..f.bytes.len() {
                prop_assert_eq!(check(&f.bytes[..end], f.dir), Err(FrameError::Incomplete), "prefix {}", end);
            }
        }

        #[test]
        fn corrupting_fixed_fields_is_an_error(f in strict_frame()) {
            // magic, version, payload_len: any change is detected (crc32c: see below).
            for at in (0..5).chain(32..36) {
                for flip in 1..=255u8 {
                    let mut bytes = f.bytes.clone();
                    bytes[at] ^= flip;
                    let got = check(&bytes, f.dir);
                    prop_assert!(
                        matches!(got, Err(e) if e != FrameError::Incomplete),
                        "byte {} ^ {:#x}: {:?}", at, flip, got
                    );
                }
            }
        }

        #[test]
        fn corrupting_the_op_is_an_error_or_reads_as_that_op(f in strict_frame()) {
            for flip in 1..=255u8 {
                let mut bytes = f.bytes.clone();
                bytes[5] ^= flip;
                match check(&bytes, f.dir) {
                    Ok(_) => {
                        // Undetectable only when another op has the same shape (Fetch and
                        // Read requests); then the frame reads as exactly that op.
                        let (h, _) = parse(&bytes, f.dir).unwrap();
                        prop_assert_eq!(h.op_byte(), bytes[5]);
                        prop_assert!(h.op().is_ok());
                    }
                    Err(e) => prop_assert_ne!(e, FrameError::Incomplete),
                }
            }
        }

        #[test]
        fn error_replies_survive_any_single_corruption(f in error_response(), at in 0usize..HEADER_LEN, flip in 1..=255u8) {
            let mut bytes = f.bytes.clone();
            bytes[at] ^= flip;
            let got = check(&bytes, f.dir);
            if !(5..36).contains(&at) {
                prop_assert!(matches!(got, Err(e) if e != FrameError::Incomplete), "{:?}", got);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128), mut header in proptest::array::uniform32(any::<u8>())) {
            for dir in [Direction::Request, Direction::Response] {
                let _ = check(&bytes, dir);
                let _ = parse(&bytes, dir);
                // And with a valid magic and version, so that the later checks run too.
                let mut framed = bytes.clone();
                header[..4].copy_from_slice(&MAGIC);
                header[4] = VERSION;
                framed.splice(0..0, header.iter().copied());
                if let Ok((h, payload)) = parse(&framed, dir) {
                    prop_assert_eq!(payload.len(), h.payload_len() as usize);
                }
            }
        }
    }

    #[test]
    fn every_single_byte_corruption_of_a_short_payload_is_detected() {
        // Exhaustively, where that is cheap: every byte of the checksum and of a full-length
        // cluster name or a short message, XORed with every non-zero value.
        let cluster = [0xA5u8; MAX_CLUSTER_LEN];
        let hello = Header::request(Op::Hello, 1, 0, 3, 0).with_payload_len(64);
        let message = b"page 12 of VM 7 is not held here".repeat(3);
        let error =
            Header::error_reply(2, 9, Status::NotHeld).with_payload_len(message.len() as u32);
        for (dir, header, payload) in [
            (Direction::Request, hello, &cluster[..]),
            (Direction::Response, error, &message[..]),
        ] {
            let mut frame = vec![0u8; header.frame_len()];
            encode_frame(&header, payload, &mut frame).unwrap();
            assert_eq!(check(&frame, dir), Ok(frame.len()));
            for pos in (36..40).chain(HEADER_LEN..frame.len()) {
                for flip in 1..=255u8 {
                    frame[pos] ^= flip;
                    assert!(
                        matches!(check(&frame, dir), Err(FrameError::BadChecksum { .. })),
                        "byte {pos} ^ {flip:#x}"
                    );
                    frame[pos] ^= flip;
                }
            }
        }
    }

    #[test]
    fn checksum_is_crc32c() {
        assert_eq!(checksum(b""), 0);
        assert_eq!(checksum(b"123456789"), 0xE306_9283);
        // RFC 3720 B.4: 32 bytes of zeros, and of 0xFF.
        assert_eq!(checksum(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(checksum(&[0xFFu8; 32]), 0x62A8_AB43);
        let h = Header::request(Op::Held, 1, 1, 0, 0);
        assert_eq!(h.with_checksum(&[]).crc32c(), 0);
        assert_eq!(
            h.verify_checksum(b"x"),
            Err(FrameError::BadChecksum {
                expected: 0,
                actual: checksum(b"x")
            })
        );
        // A frame with no payload must carry 0.
        let mut b = h.to_bytes();
        b[36] = 1;
        assert_eq!(
            check(&b, Direction::Request),
            Err(FrameError::BadChecksum {
                expected: 1,
                actual: 0
            })
        );
        assert!(
            FrameError::BadChecksum {
                expected: 1,
                actual: 0
            }
            .to_string()
            .starts_with("payload checksum mismatch")
        );
    }

    #[test]
    fn hello_carries_a_session_nonces_and_a_cluster_name_of_at_most_64_bytes() {
        for dir in [Direction::Request, Direction::Response] {
            let hello = Header::request(Op::Hello, 1, 0, 3, 0);
            // A request starts with the 8-byte session id and its nonce; a reply with its
            // nonce.
            let (hello, session) = match dir {
                Direction::Request => (hello, HELLO_REQUEST_FIXED as u32),
                Direction::Response => (hello.reply(Status::Ok).with_page(4), NONCE_LEN as u32),
            };
            for len in [0, 1, 64] {
                assert_eq!(
                    hello.with_payload_len(session + len).validate(dir),
                    Ok(HEADER_LEN + (session + len) as usize)
                );
            }
            let long = hello.with_payload_len(session + 65).validate(dir);
            assert_eq!(long, Err(FrameError::ClusterTooLong(65)));
            assert!(long.unwrap_err().is_fatal());
        }
        let hello = Header::request(Op::Hello, 1, 0, 3, 0);
        let short = hello.with_payload_len(39).validate(Direction::Request);
        assert_eq!(short, Err(FrameError::ShortHello { len: 39, fixed: 40 }));
        assert!(short.unwrap_err().is_fatal());
        let reply = hello.reply(Status::Ok).with_page(4);
        let short = reply.with_payload_len(31).validate(Direction::Response);
        assert_eq!(short, Err(FrameError::ShortHello { len: 31, fixed: 32 }));
        // A reply's count is the authentication scheme: 0 or 1.
        let scheme = |n| {
            Header::raw(Op::Hello.into(), 1, Status::Ok, 0, 4, n)
                .with_payload_len(32)
                .validate(Direction::Response)
        };
        assert_eq!(scheme(0), Ok(HEADER_LEN + 32));
        assert_eq!(scheme(1), Ok(HEADER_LEN + 32));
        assert_eq!(scheme(2), Err(FrameError::UnknownAuth(2)));
    }

    #[test]
    fn auth_carries_a_proof_each_way() {
        let auth = Header::request(Op::Auth, 2, 0, 0, 0);
        assert_eq!(
            auth.with_payload_len(32).validate(Direction::Request),
            Ok(HEADER_LEN + 32)
        );
        assert!(matches!(
            auth.validate(Direction::Request),
            Err(FrameError::BadLength {
                op: Op::Auth,
                len: 0,
                expected: 32
            })
        ));
        let ok = auth.reply(Status::Ok).with_payload_len(32);
        assert_eq!(ok.validate(Direction::Response), Ok(HEADER_LEN + 32));
        // A refusal carries a message, like any error reply.
        let no = auth.reply(Status::Unauthenticated).with_payload_len(10);
        assert_eq!(no.validate(Direction::Response), Ok(HEADER_LEN + 10));
    }

    #[test]
    fn header_layout_is_as_documented() {
        let payload = [7u8; 8192];
        let h = Header::request(Op::WriteBack, 0x0102_0304_0506_0708, 9, 0x1122, 2)
            .with_checksum(&payload)
            .with_ack(0x0A0B_0C0D);
        let b = h.to_bytes();
        assert_eq!(&b[0..4], b"PGMS");
        assert_eq!(b[4], 5);
        assert_eq!(b[5], 4);
        assert_eq!(&b[6..8], &[0, 0]);
        assert_eq!(&b[8..16], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&b[16..20], &9u32.to_le_bytes());
        assert_eq!(&b[20..24], &2u32.to_le_bytes());
        assert_eq!(&b[24..32], &0x1122u64.to_le_bytes());
        assert_eq!(&b[32..36], &8192u32.to_le_bytes());
        assert_eq!(&b[36..40], &checksum(&payload).to_le_bytes());
        assert_eq!(&b[40..48], &0x0A0B_0C0Du64.to_le_bytes());
    }

    #[test]
    fn run_limits() {
        let req = |op, count| Header::request(op, 1, 1, 0, count);
        for op in [Op::Fetch, Op::Read, Op::WriteBack] {
            assert_eq!(
                req(op, 0).validate(Direction::Request),
                Err(FrameError::BadCount { op, count: 0 })
            );
            assert!(req(op, MAX_RUN_PAGES).validate(Direction::Request).is_ok());
        }
        assert_eq!(
            req(Op::Fetch, MAX_RUN_PAGES + 1).validate(Direction::Request),
            Err(FrameError::BadCount {
                op: Op::Fetch,
                count: 257
            })
        );
        // A WriteBack of 257 pages is caught by its size before its count.
        assert_eq!(
            req(Op::WriteBack, MAX_RUN_PAGES + 1).validate(Direction::Request),
            Err(FrameError::TooLarge(257 * 4096))
        );
        let fetch = req(Op::Fetch, 3);
        assert_eq!(
            fetch.with_payload_len(1).validate(Direction::Request),
            Err(FrameError::BadLength {
                op: Op::Fetch,
                len: 1,
                expected: 0
            })
        );
        let ok = fetch.reply(Status::Ok);
        assert_eq!(
            ok.validate(Direction::Response),
            Err(FrameError::BadLength {
                op: Op::Fetch,
                len: 0,
                expected: 3 * 4096
            })
        );
        assert!(
            ok.with_payload_len(3 * 4096)
                .validate(Direction::Response)
                .is_ok()
        );
        let err = fetch.reply(Status::NotHeld);
        assert!(
            err.with_payload_len(1024)
                .validate(Direction::Response)
                .is_ok()
        );
        assert_eq!(
            err.with_payload_len(1025).validate(Direction::Response),
            Err(FrameError::MessageTooLong(1025))
        );
        let huge = Header::request(Op::Held, 1, 1, 0, 0).with_payload_len(u32::MAX);
        assert_eq!(
            check(&huge.to_bytes(), Direction::Request),
            Err(FrameError::TooLarge(u32::MAX))
        );
    }

    #[test]
    fn requests_must_not_carry_a_status() {
        let reply = Header::request(Op::Held, 1, 1, 0, 0).reply(Status::NotHeld);
        assert_eq!(
            reply.validate(Direction::Request),
            Err(FrameError::StatusInRequest(3))
        );
    }

    #[test]
    fn bad_magic_and_version_are_seen_early() {
        assert_eq!(check(b"PX", Direction::Request), Err(FrameError::BadMagic));
        assert_eq!(
            check(b"GET / HTTP/1.1", Direction::Request),
            Err(FrameError::BadMagic)
        );
        // A version 1 peer is refused from its fifth byte on.
        let v1 = check(b"PGMS\x01", Direction::Request);
        assert_eq!(v1, Err(FrameError::BadVersion(1)));
        assert!(v1.unwrap_err().is_fatal());
        assert_eq!(
            v1.unwrap_err().to_string(),
            "protocol version 1 is not supported; this node speaks version 5"
        );
        // So is version 2, whose Fetch freed pages at once.
        assert_eq!(
            check(b"PGMS\x02", Direction::Request),
            Err(FrameError::BadVersion(2))
        );
        // And version 3, which had no handshake.
        assert_eq!(
            check(b"PGMS\x03", Direction::Request),
            Err(FrameError::BadVersion(3))
        );
        // And version 4, which had no packed payloads.
        assert_eq!(
            check(b"PGMS\x04", Direction::Request),
            Err(FrameError::BadVersion(4))
        );
        assert_eq!(
            check(b"PGMS\x05", Direction::Request),
            Err(FrameError::Incomplete)
        );
        assert_eq!(check(b"", Direction::Response), Err(FrameError::Incomplete));
    }

    #[test]
    fn packed_runs_carry_their_lengths_and_are_smaller_than_plain() {
        let fetch = Header::request(Op::Fetch, 1, 7, 0, 4).with_packed();
        assert_eq!(fetch.op(), Ok(Op::Fetch));
        assert!(fetch.is_packed());
        assert_eq!(fetch.validate(Direction::Request), Ok(HEADER_LEN));
        let reply = |len| fetch.reply(Status::Ok).with_payload_len(len);
        assert_eq!(reply(8).validate(Direction::Response), Ok(HEADER_LEN + 8));
        assert_eq!(
            reply(4 * 4096 - 1).validate(Direction::Response),
            Ok(HEADER_LEN + 4 * 4096 - 1)
        );
        for len in [7, 4 * 4096] {
            let e = reply(len).validate(Direction::Response).unwrap_err();
            assert_eq!(
                e,
                FrameError::BadPackedLength {
                    op: Op::Fetch,
                    count: 4,
                    len
                }
            );
            assert!(e.is_fatal());
        }
        // Sent plain after all: the bit cleared, the plain length.
        let plain = reply(4 * 4096).without_packed();
        assert_eq!(
            plain.validate(Direction::Response),
            Ok(HEADER_LEN + 4 * 4096)
        );
        let wb = Header::request(Op::WriteBack, 2, 7, 0, 2)
            .with_packed()
            .with_payload_len(100);
        assert_eq!(wb.validate(Direction::Request), Ok(HEADER_LEN + 100));
        let held = Header::request(Op::Held, 3, 7, 0, 0).with_packed();
        assert_eq!(
            held.validate(Direction::Request),
            Err(FrameError::PackedOp(Op::Held))
        );
        let hello = Header::request(Op::Hello, 4, 0, 1, 0).with_features(FEATURE_PACKED);
        assert_eq!(hello.features(), FEATURE_PACKED);
        assert_eq!(
            hello.reply(Status::Ok).with_features(0).features(),
            0,
            "a server that accepts nothing says so"
        );
    }

    #[test]
    fn slots_ask_about_1_to_max_slots_pages_and_answer_4_bytes_each() {
        let ask = |count| Header::request(Op::Slots, 1, 7, 0, count).to_bytes();
        assert_eq!(check(&ask(1), Direction::Request), Ok(HEADER_LEN));
        assert_eq!(check(&ask(MAX_SLOTS), Direction::Request), Ok(HEADER_LEN));
        for bad in [0, MAX_SLOTS + 1] {
            assert_eq!(
                check(&ask(bad), Direction::Request),
                Err(FrameError::BadSlotCount(bad))
            );
        }
        let req = Header::request(Op::Slots, 1, 7, 0, 3);
        let reply = req
            .reply(Status::Ok)
            .with_payload_len(12)
            .with_checksum(&[0; 12]);
        let mut frame = reply.to_bytes().to_vec();
        frame.extend_from_slice(&[0; 12]);
        assert_eq!(check(&frame, Direction::Response), Ok(HEADER_LEN + 12));
        let short = req.reply(Status::Ok).with_payload_len(8).to_bytes();
        assert_eq!(
            check(&short, Direction::Response),
            Err(FrameError::BadLength {
                op: Op::Slots,
                len: 8,
                expected: 12
            })
        );
    }

    #[test]
    fn queue_pairs_round_trip_and_numbers_past_24_bits_are_refused() {
        let qp = QueuePair {
            gid: [0xfe, 0x80, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
            lid: 0x1234,
            qpn: 0xab_cdef,
            psn: 0x12_3456,
        };
        let b = qp.to_bytes();
        assert_eq!(b.len(), QUEUE_PAIR_LEN);
        assert_eq!(QueuePair::from_bytes(&b), Ok(qp));
        let mut bad = b;
        bad[21] = 1;
        assert_eq!(
            QueuePair::from_bytes(&bad).unwrap_err().to_string(),
            "RdmaConnect queue pair number or sequence number 0x1abcdef does not fit 24 bits"
        );
        assert!(matches!(
            QueuePair::from_bytes(&b[..25]),
            Err(FrameError::BadLength {
                op: Op::RdmaConnect,
                len: 25,
                expected: 26
            })
        ));
        // A Claim names a run and carries nothing; an RdmaConnect carries one queue pair.
        let claim = Header::request(Op::Claim, 1, 7, 10, 3).to_bytes();
        assert_eq!(check(&claim, Direction::Request), Ok(HEADER_LEN));
        let none = Header::request(Op::Claim, 1, 7, 10, 0).to_bytes();
        assert_eq!(
            check(&none, Direction::Request),
            Err(FrameError::BadCount {
                op: Op::Claim,
                count: 0
            })
        );
        let packed = Header::request(Op::Claim, 1, 7, 10, 3)
            .with_packed()
            .to_bytes();
        assert_eq!(
            check(&packed, Direction::Request),
            Err(FrameError::PackedOp(Op::Claim))
        );
        let bare = Header::request(Op::RdmaConnect, 1, 0, 0, 0).to_bytes();
        assert!(matches!(
            check(&bare, Direction::Request),
            Err(FrameError::BadLength {
                op: Op::RdmaConnect,
                len: 0,
                expected: 26
            })
        ));
    }

    #[test]
    fn unknown_ops_and_statuses() {
        let mut b = Header::request(Op::Held, 1, 1, 0, 0).to_bytes();
        b[5] = 0;
        assert_eq!(check(&b, Direction::Request), Err(FrameError::UnknownOp(0)));
        b[5] = 13;
        assert_eq!(
            check(&b, Direction::Request),
            Err(FrameError::UnknownOp(13))
        );
        // An error reply may echo an op the server does not know.
        let mut msg = [0u8; HEADER_LEN + 8];
        let len = encode_error(&mut msg, 200, 5, Status::Unsupported, format_args!("nope"));
        assert_eq!(check(&msg[..len], Direction::Response), Ok(HEADER_LEN + 4));
        // But a status it does not know is malformed.
        b[5] = Op::Held as u8;
        b[6] = 9;
        assert_eq!(
            check(&b, Direction::Response),
            Err(FrameError::UnknownStatus(9))
        );
        assert!(!FrameError::UnknownOp(8).is_fatal());
        assert!(FrameError::BadMagic.is_fatal());
    }

    #[test]
    fn error_messages_are_cut_on_a_char_boundary() {
        let mut buf = vec![0u8; MAX_FRAME_LEN];
        let long = "é".repeat(1000); // 2000 bytes
        let len = encode_error(&mut buf, 2, 9, Status::NotHeld, format_args!("x{long}y"));
        let (h, msg) = parse(&buf[..len], Direction::Response).unwrap();
        assert_eq!(h.status(), Ok(Status::NotHeld));
        assert_eq!(h.request_id(), 9);
        assert!(msg.len() <= MAX_MESSAGE_LEN && msg.len() >= MAX_MESSAGE_LEN - 1);
        let text = std::str::from_utf8(msg).unwrap();
        assert!(text.starts_with("xé") && !text.ends_with('y'));
    }
}
