//! Just enough of a BTF reader to find where a kernel struct keeps a member: the probes
//! read `struct kvm_page_fault::gfn` through a pointer that a raw tracepoint hands them, at
//! an offset that differs between kernels, so the loader looks it up in the running
//! kernel's BTF (`/sys/kernel/btf/vmlinux`, then the modules' split BTF beside it) and passes
//! it to the probes. aya parses BTF too, but does not expose struct members.
//!
//! Format: `Documentation/bpf/btf.rst` (a header, a type section of `btf_type` records each
//! followed by kind-specific data, a string section).

use std::path::Path;

/// Errors reading BTF.
#[derive(thiserror::Error, Debug)]
pub enum BtfError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The BTF file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not BTF this reader understands.
    #[error("{0} is not valid BTF")]
    Invalid(String),
    /// No BTF of the kernel has the struct with that member.
    #[error("the kernel's BTF has no member `{member}` in struct {ty}")]
    NotFound {
        /// The struct.
        ty: &'static str,
        /// The member.
        member: &'static str,
    },
}

const MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_STRUCT: u32 = 4;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

/// A struct member: byte offset and size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// Offset from the start of the struct, bytes.
    pub offset: u32,
    /// Size of the member's integer type after typedefs and qualifiers, bytes (0 when it
    /// is not an integer).
    pub int_size: u32,
}

/// One parsed BTF blob: its types (as offsets into the type section) and strings.
struct Blob<'a> {
    types: &'a [u8],
    strings: &'a [u8],
    /// Offsets of each type record in `types`; type id `first_id + i` is `records[i]`.
    records: Vec<usize>,
    /// Id of the first type (1 for vmlinux; for a module's split BTF, one past vmlinux's).
    first_id: u32,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

impl<'a> Blob<'a> {
    fn parse(data: &'a [u8], first_id: u32) -> Option<Self> {
        if u16::from_ne_bytes(data.get(0..2)?.try_into().ok()?) != MAGIC {
            return None;
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let types = data.get(hdr_len + type_off..hdr_len + type_off + type_len)?;
        let strings = data.get(hdr_len + str_off..hdr_len + str_off + str_len)?;
        let mut records = Vec::new();
        let mut at = 0;
        while at < types.len() {
            records.push(at);
            let info = u32_at(types, at + 4)?;
            let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            let extra = match kind {
                1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
                3 => 12,                      // ARRAY
                4 | 5 | 15 | 19 => 12 * vlen, // STRUCT, UNION, DATASEC, ENUM64
                6 | 13 => 8 * vlen,           // ENUM, FUNC_PROTO
                2 | 7..=12 | 16 | 18 => 0,
                _ => return None,
            };
            at += 12 + extra;
        }
        Some(Self {
            types,
            strings,
            records,
            first_id,
        })
    }

    fn record(&self, id: u32) -> Option<usize> {
        self.records
            .get(usize::try_from(id.checked_sub(self.first_id)?).ok()?)
            .copied()
    }

    fn next_id(&self) -> u32 {
        self.first_id + u32::try_from(self.records.len()).unwrap_or(u32::MAX)
    }
}

/// vmlinux's BTF and at most one module's, which continues vmlinux's type ids and strings.
struct Kernel<'a> {
    base: &'a Blob<'a>,
    split: Option<Blob<'a>>,
}

impl Kernel<'_> {
    fn string(&self, off: u32) -> Option<&[u8]> {
        let off = off as usize;
        let (strings, off) = match &self.split {
            Some(split) if off >= self.base.strings.len() => {
                (split.strings, off - self.base.strings.len())
            }
            _ => (self.base.strings, off),
        };
        let s = strings.get(off..)?;
        Some(&s[..s.iter().position(|&c| c == 0)?])
    }

    /// `(types, offset of the record)` of type `id`.
    fn record(&self, id: u32) -> Option<(&[u8], usize)> {
        if let Some(at) = self.base.record(id) {
            return Some((self.base.types, at));
        }
        let split = self.split.as_ref()?;
        Some((split.types, split.record(id)?))
    }

    /// Size of type `id` if it is an integer, after typedefs and qualifiers.
    fn int_size(&self, mut id: u32) -> u32 {
        for _ in 0..16 {
            let Some((types, at)) = self.record(id) else {
                return 0;
            };
            let (info, next) = (u32_at(types, at + 4), u32_at(types, at + 8));
            let (Some(info), Some(next)) = (info, next) else {
                return 0;
            };
            match (info >> 24) & 0x1f {
                KIND_INT => return next,
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = next
                }
                _ => return 0,
            }
        }
        0
    }

    /// `member` of struct `ty`, looked up in the module's types (vmlinux's without a module).
    fn find(&self, ty: &str, member: &str) -> Option<Member> {
        let blob = self.split.as_ref().unwrap_or(self.base);
        for &at in &blob.records {
            let types = blob.types;
            let info = u32_at(types, at + 4)?;
            if (info >> 24) & 0x1f != KIND_STRUCT
                || self.string(u32_at(types, at)?)? != ty.as_bytes()
            {
                continue;
            }
            let kind_flag = info >> 31 == 1;
            for m in 0..(info & 0xffff) as usize {
                let m = at + 12 + 12 * m;
                if self.string(u32_at(types, m)?)? != member.as_bytes() {
                    continue;
                }
                let bits = u32_at(types, m + 8)?;
                let bit_offset = if kind_flag { bits & 0x00ff_ffff } else { bits };
                if bit_offset % 8 != 0 {
                    return None; // a bitfield: not something a probe can load
                }
                return Some(Member {
                    offset: bit_offset / 8,
                    int_size: self.int_size(u32_at(types, m + 4)?),
                });
            }
        }
        None
    }
}

fn read(path: &Path) -> Result<Vec<u8>, BtfError> {
    std::fs::read(path).map_err(|source| BtfError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Where struct `ty` keeps `member` in the running kernel: vmlinux's BTF first, then each
/// module's (`dir` is normally `/sys/kernel/btf`).
pub fn member(dir: &Path, ty: &'static str, member: &'static str) -> Result<Member, BtfError> {
    let vmlinux_path = dir.join("vmlinux");
    let vmlinux = read(&vmlinux_path)?;
    let base = Blob::parse(&vmlinux, 1)
        .ok_or_else(|| BtfError::Invalid(vmlinux_path.display().to_string()))?;
    let kernel = Kernel {
        base: &base,
        split: None,
    };
    if let Some(found) = kernel.find(ty, member) {
        return Ok(found);
    }
    let first_id = base.next_id();
    let mut modules: Vec<_> = std::fs::read_dir(dir)
        .map_err(|source| BtfError::Read {
            path: dir.display().to_string(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n != "vmlinux"))
        .collect();
    modules.sort();
    for path in modules {
        let Ok(data) = read(&path) else { continue };
        let Some(split) = Blob::parse(&data, first_id) else {
            continue;
        };
        let module = Kernel {
            base: &base,
            split: Some(split),
        };
        if let Some(found) = module.find(ty, member) {
            return Ok(found);
        }
    }
    Err(BtfError::NotFound { ty, member })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob with `int` (4 bytes), `typedef int myint`, and
    /// `struct s { int a; myint b; }` with `b` at byte 8.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0myint\0s\0a\0b\0";
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_ne_bytes());
            }
        };
        push(&[1, KIND_INT << 24, 4, 32]); // [1] int
        push(&[5, KIND_TYPEDEF << 24, 1]); // [2] myint -> int
        push(&[11, KIND_STRUCT << 24 | 2, 16]); // [3] struct s, 2 members
        push(&[13, 1, 0]); // a: int at bit 0
        push(&[15, 2, 64]); // b: myint at bit 64
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_ne_bytes());
        out.extend_from_slice(&[1, 0]);
        let (tl, sl) = (types.len() as u32, strings.len() as u32);
        for w in [24u32, 0, tl, tl, sl] {
            out.extend_from_slice(&w.to_ne_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(strings);
        out
    }

    /// A fresh directory for one test's fake `/sys/kernel/btf`.
    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("pagemesh-btf-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn finds_a_member_through_typedefs() {
        let dir = scratch("typedefs");
        std::fs::write(dir.join("vmlinux"), blob()).unwrap();
        let m = member(&dir, "s", "b").unwrap();
        assert_eq!(
            m,
            Member {
                offset: 8,
                int_size: 4
            }
        );
        assert!(matches!(
            member(&dir, "s", "c"),
            Err(BtfError::NotFound { .. })
        ));
    }

    #[test]
    fn rejects_what_is_not_btf() {
        let dir = scratch("invalid");
        std::fs::write(dir.join("vmlinux"), b"not btf at all, no").unwrap();
        assert!(matches!(member(&dir, "s", "b"), Err(BtfError::Invalid(_))));
        let mut truncated = blob();
        truncated.truncate(40);
        std::fs::write(dir.join("vmlinux"), truncated).unwrap();
        assert!(matches!(member(&dir, "s", "b"), Err(BtfError::Invalid(_))));
    }

    /// The running kernel's own BTF (every host this project supports has it).
    #[test]
    fn reads_this_kernels_btf() {
        let dir = Path::new("/sys/kernel/btf");
        // Stable for decades: `struct list_head { next, prev }`.
        let m = member(dir, "list_head", "prev").unwrap();
        assert_eq!(m.offset, 8);
        assert_eq!(m.int_size, 0, "a pointer, not an integer");
        let m = member(dir, "task_struct", "pid").unwrap();
        assert_eq!(m.int_size, 4);
    }
}
