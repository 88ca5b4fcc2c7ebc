//! What a node tells the coordinator about its RDMA queue pair and memory regions, so that
//! a peer can read its pages with one-sided RDMA READ: the `rdma` field of
//! [`crate::RegisterEndpoint`] and [`crate::Endpoint`].
//!
//! The GID travels as 32 hex digits (the design note's encoding), the rest as numbers. A
//! memory node registers its page store as regions of whole pages, in slot order: slot *s*
//! is in the first region whose slots reach past it ([`RdmaEndpoint::check`] holds the rules
//! a reader relies on).
//!
//! # Slot tags
//!
//! Right after a region's `len` bytes lie its slots' *tags*, [`TAG_BYTES`] each, in slot
//! order, under the same key: the tag of a slot holding page *p* of VM *v* is
//! [`slot_tag`]`(v, p)`, and a free slot's is 0. A memory node writes a slot's page before
//! its tag and clears the tag before the slot is reused; a reader reads a run's pages and
//! then their tags on one queue pair, the first tag READ fenced (it starts once the page
//! READs are done: InfiniBand does not order READs otherwise), and uses the
//! pages only if every tag is the one it expected. A slot map that went stale (a page
//! claimed, released or moved since the reader asked) is then an error, never a wrong page.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Bytes of a page, as in the rest of the API.
const PAGE: u64 = crate::PAGE_SIZE as u64;

/// Queue pair numbers and packet sequence numbers are 24-bit.
pub const MAX_24BIT: u32 = (1 << 24) - 1;

/// Bytes of one slot's tag, little-endian.
pub const TAG_BYTES: u64 = 8;

/// Bits of a tag that hold the page (the VM id has the 24 above them; a VM id above 2^24
/// shares its tags with another VM's, which only makes the check weaker for those two).
const TAG_PAGE_BITS: u32 = 40;

/// The tag of the slot that holds `page` of `vm` (see the module docs); never 0, so a free
/// slot never passes for a page's.
pub fn slot_tag(vm: crate::VmId, page: u64) -> u64 {
    (u64::from(vm) << TAG_PAGE_BITS) | ((page + 1) & ((1 << TAG_PAGE_BITS) - 1))
}

/// Bytes of the tags that follow a region of `len` bytes.
pub fn tags_len(len: u64) -> u64 {
    len / PAGE * TAG_BYTES
}

/// One node's RDMA queue pair and the memory a peer may read.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RdmaEndpoint {
    /// The port's GID, 32 hex digits (RoCE needs it; InfiniBand may route by LID alone).
    #[serde(serialize_with = "gid_to_hex", deserialize_with = "gid_from_hex")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "fe800000000000000202c9fffe000001"))]
    pub gid: [u8; 16],
    /// The port's local identifier (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// Queue pair number (24 bits).
    pub qpn: u32,
    /// First packet sequence number (24 bits).
    pub psn: u32,
    /// The registered memory, in slot order (empty for a node that holds no pages).
    #[serde(default)]
    pub regions: Vec<RdmaRegion>,
}

/// A registered memory region a peer may read: `len` bytes of page slots at `addr` under
/// `rkey`, followed by their tags ([`tags_len`]`(len)` bytes; see the module docs).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RdmaRegion {
    /// Its address in the registering process (what RDMA READ names).
    pub addr: u64,
    /// Its length, whole pages.
    pub len: u64,
    /// The remote key that grants reading it.
    pub rkey: u32,
}

/// Why an [`RdmaEndpoint`] cannot be used.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum RdmaEndpointError {
    /// A queue pair or sequence number past 24 bits.
    #[error("RDMA {what} {value:#x} does not fit 24 bits")]
    Not24Bit {
        /// `qpn` or `psn`.
        what: &'static str,
        /// The value.
        value: u32,
    },
    /// A region that is not whole pages (its address may be anything: RDMA READ names
    /// bytes).
    #[error("RDMA region {index} ({len} bytes at {addr:#x}) is not whole pages")]
    NotPages {
        /// Its place in the list.
        index: usize,
        /// Its address.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// A region (with its tags) that wraps past the end of the address space.
    #[error("RDMA region {index} ({len} bytes at {addr:#x}) wraps past the end of memory")]
    Wraps {
        /// Its place in the list.
        index: usize,
        /// Its address.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// More page slots than a 32-bit slot number reaches.
    #[error("RDMA regions hold {0} pages, more than 32-bit slot numbers reach")]
    TooManySlots(u64),
}

impl RdmaEndpoint {
    /// Whether a reader can use it: 24-bit numbers, regions of whole pages that do not wrap,
    /// at most 2^32 slots in all.
    pub fn check(&self) -> Result<(), RdmaEndpointError> {
        for (what, value) in [("qpn", self.qpn), ("psn", self.psn)] {
            if value > MAX_24BIT {
                return Err(RdmaEndpointError::Not24Bit { what, value });
            }
        }
        let mut slots = 0u64;
        for (index, r) in self.regions.iter().enumerate() {
            let (addr, len) = (r.addr, r.len);
            if len == 0 || !len.is_multiple_of(PAGE) {
                return Err(RdmaEndpointError::NotPages { index, addr, len });
            }
            if addr.checked_add(len + tags_len(len)).is_none() {
                return Err(RdmaEndpointError::Wraps { index, addr, len });
            }
            slots += len / PAGE;
        }
        if slots > u64::from(u32::MAX) + 1 {
            return Err(RdmaEndpointError::TooManySlots(slots));
        }
        Ok(())
    }

    /// The GID as 32 lower-case hex digits.
    pub fn gid_hex(&self) -> String {
        hex::encode(self.gid)
    }
}

fn gid_to_hex<S: Serializer>(gid: &[u8; 16], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(gid))
}

fn gid_from_hex<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 16], D::Error> {
    let text = String::deserialize(d)?;
    let mut gid = [0u8; 16];
    hex::decode_to_slice(text.trim(), &mut gid).map_err(|e| {
        serde::de::Error::custom(format!(
            "RDMA gid '{text}' is not 32 hex digits (16 bytes): {e}"
        ))
    })?;
    Ok(gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> RdmaEndpoint {
        RdmaEndpoint {
            gid: [
                0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x02, 0x02, 0xc9, 0xff, 0xfe, 0, 0, 0x01,
            ],
            lid: 7,
            qpn: 0x11,
            psn: 0xabcdef,
            regions: vec![
                RdmaRegion {
                    addr: 0x7f00_0000_0000,
                    len: 1 << 20,
                    rkey: 0x1234,
                },
                RdmaRegion {
                    addr: 0x7f00_0020_0000,
                    len: 1 << 20,
                    rkey: 0x5678,
                },
            ],
        }
    }

    #[test]
    fn the_gid_travels_as_hex_and_the_rest_as_numbers() {
        let e = endpoint();
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["gid"], "fe800000000000000202c9fffe000001");
        assert_eq!(json["qpn"], 0x11);
        assert_eq!(json["regions"][1]["rkey"], 0x5678);
        assert_eq!(serde_json::from_value::<RdmaEndpoint>(json).unwrap(), e);
        assert_eq!(e.gid_hex(), "fe800000000000000202c9fffe000001");
        assert_eq!(e.check(), Ok(()));
    }

    #[test]
    fn a_gid_that_is_not_16_bytes_of_hex_is_refused_saying_so() {
        for bad in ["fe80", "zz800000000000000202c9fffe000001", ""] {
            let mut json = serde_json::to_value(endpoint()).unwrap();
            json["gid"] = bad.into();
            let e = serde_json::from_value::<RdmaEndpoint>(json).unwrap_err();
            assert!(
                e.to_string().contains("is not 32 hex digits (16 bytes)"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn numbers_past_24_bits_and_regions_of_part_pages_are_refused() {
        let mut e = endpoint();
        e.qpn = 1 << 24;
        assert_eq!(
            e.check().unwrap_err().to_string(),
            "RDMA qpn 0x1000000 does not fit 24 bits"
        );
        let mut e = endpoint();
        e.regions[1].len = 4095;
        assert!(matches!(
            e.check(),
            Err(RdmaEndpointError::NotPages { index: 1, .. })
        ));
        // Any address will do: a page store's chunks need not be page-aligned.
        let mut e = endpoint();
        e.regions[0].addr += 8;
        assert_eq!(e.check(), Ok(()));
        let mut e = endpoint();
        e.regions[0].addr = u64::MAX - 4095;
        e.regions[0].len = 8192;
        assert!(matches!(
            e.check(),
            Err(RdmaEndpointError::Wraps { index: 0, .. })
        ));
        // Its pages end before the end of memory, its tags would not.
        let mut e = endpoint();
        e.regions[0].addr = u64::MAX - 8192;
        e.regions[0].len = 8192;
        assert!(matches!(
            e.check(),
            Err(RdmaEndpointError::Wraps { index: 0, .. })
        ));
        // A node with no regions (a compute node) is fine.
        let mut e = endpoint();
        e.regions.clear();
        assert_eq!(e.check(), Ok(()));
    }

    #[test]
    fn tags_name_the_vm_and_page_and_are_never_those_of_a_free_slot() {
        assert_ne!(slot_tag(0, 0), 0);
        assert_ne!(slot_tag(1, 5), slot_tag(2, 5));
        assert_ne!(slot_tag(1, 5), slot_tag(1, 6));
        assert_eq!(slot_tag(3, 9), (3 << 40) | 10);
        assert_eq!(tags_len(256 * PAGE), 256 * TAG_BYTES);
    }
}
