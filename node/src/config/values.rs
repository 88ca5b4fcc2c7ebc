//! The typed values of the node's settings and their parsers.
//!
//! A value is parsed where it enters, whichever way it comes: a flag, an environment variable
//! and a key of the config file all go through the flag's parser (clap's `value_parser`), so
//! the rest of the node sees sizes, workloads, ranges and durations, never strings. Each
//! error says what was wrong and what is accepted; clap prints it after the flag
//! (`invalid value '12parsecs' for '--mem <SIZE>': unknown size unit …`), the config file
//! loader after the key.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use clap::ValueEnum;
use pagemesh_api::{PAGE_SIZE, Role};
use pagemesh_vmm::guest::{Access, Order, WorkloadError};
use pagemesh_vmm::memory::MAX_RAM;

const PAGE: u64 = PAGE_SIZE as u64;

/// Why a setting's value does not parse.
#[derive(thiserror::Error, Debug, PartialEq, Eq)]
pub enum ValueError {
    /// Not a number with an optional unit.
    #[error("'{0}' is not a size; use e.g. 4096, 64KiB, 256MiB, 1GiB")]
    NotASize(String),
    /// A unit we do not know.
    #[error("unknown size unit '{unit}' in '{given}'; use KiB, MiB, GiB or TiB")]
    SizeUnit {
        /// The unit.
        unit: String,
        /// The whole value.
        given: String,
    },
    /// More than 2^64 bytes.
    #[error("size '{0}' is too large")]
    SizeTooLarge(String),
    /// Guest memory the VMM cannot map.
    #[error("guest memory must be a non-zero multiple of 4 KiB and at most {max}, got {got}")]
    GuestMem {
        /// What was asked for.
        got: ByteSize,
        /// The largest.
        max: ByteSize,
    },
    /// A page cache budget below the minimum or not whole pages.
    #[error(
        "--local-memory must be a multiple of 4 KiB and at least 1 MiB (the page cache needs \
         room for its watermarks and a write-back batch), got {0}"
    )]
    LocalMemory(ByteSize),
    /// A capacity whose pages do not fit the page store's 32-bit count.
    #[error("capacity must be less than 16 TiB, got {0}")]
    Capacity(ByteSize),
    /// A repair rate below a page a second.
    #[error("--repair-rate must be at least 4KiB (a page a second), got {0}")]
    RepairRate(ByteSize),
    /// Not `auto`, `none` or a CPU number.
    #[error("'{0}' is not a CPU; use auto, none or a CPU number (e.g. 0)")]
    NotACpu(String),
    /// Not `OFFSET:LEN`.
    #[error("'{0}' is not OFFSET:LEN (e.g. 0:64MiB, 8MiB:8MiB)")]
    NotARange(String),
    /// One side of `OFFSET:LEN` is not a size.
    #[error("bad {part} in range '{given}': {why}")]
    RangePart {
        /// `offset` or `length`.
        part: &'static str,
        /// The whole range.
        given: String,
        /// What is wrong with that side.
        why: Box<ValueError>,
    },
    /// `LEN` is 0.
    #[error("the range '{0}' is empty; its length must be at least 1 byte")]
    EmptyRange(String),
    /// A workload or access the guest does not have.
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    /// Not a positive, finite number of seconds.
    #[error("'{0}' is not a positive number of seconds")]
    Seconds(String),
    /// Not `HOST:PORT`.
    #[error("'{0}' is not HOST:PORT (e.g. 127.0.0.1:7101, [::1]:0, node1:7101)")]
    HostPort(String),
    /// Not an HTTP URL.
    #[error("'{0}' is not an http:// or https:// URL")]
    Url(String),
    /// Not a tracing filter.
    #[error("'{given}' is not a log filter (e.g. info, pagemesh_server=debug): {why}")]
    LogFilter {
        /// The filter.
        given: String,
        /// What the parser said.
        why: String,
    },
}

/// A number of bytes, written `4096`, `64KiB`, `256MiB`, `1GiB`, `2G` (binary units).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// `n` MiB.
    pub const fn mib(n: u64) -> Self {
        Self(n << 20)
    }

    /// The bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }

    /// Whole 4 KiB pages in it (rounded down).
    pub const fn pages(self) -> u64 {
        self.0 / PAGE
    }
}

impl FromStr for ByteSize {
    type Err = ValueError;

    fn from_str(given: &str) -> Result<Self, Self::Err> {
        let s = given.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| ValueError::NotASize(given.to_owned()))?;
        let shift = match unit.trim() {
            "" | "B" => 0,
            "K" | "KiB" | "k" => 10,
            "M" | "MiB" => 20,
            "G" | "GiB" => 30,
            "T" | "TiB" => 40,
            other => {
                return Err(ValueError::SizeUnit {
                    unit: other.to_owned(),
                    given: given.to_owned(),
                });
            }
        };
        n.checked_mul(1 << shift)
            .map(Self)
            .ok_or_else(|| ValueError::SizeTooLarge(given.to_owned()))
    }
}

/// The largest binary unit that divides the size exactly: `256 MiB`, `4097 B`.
impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
            if n != 0 && n.trailing_zeros() >= shift {
                return write!(f, "{} {unit}", n >> shift);
            }
        }
        write!(f, "{n} B")
    }
}

/// `--mem`: a size the VMM can map as guest RAM (a non-zero multiple of 4 KiB, at most
/// [`MAX_RAM`]).
pub fn guest_mem(s: &str) -> Result<ByteSize, ValueError> {
    let size: ByteSize = s.parse()?;
    if size.0 == 0 || !size.0.is_multiple_of(PAGE) || size.0 > MAX_RAM {
        return Err(ValueError::GuestMem {
            got: size,
            max: ByteSize(MAX_RAM),
        });
    }
    Ok(size)
}

/// `--capacity`: a size whose pages the page store can count (fewer than 2^32).
pub fn capacity(s: &str) -> Result<ByteSize, ValueError> {
    let size: ByteSize = s.parse()?;
    if size.pages() > u64::from(u32::MAX) {
        return Err(ValueError::Capacity(size));
    }
    Ok(size)
}

/// `--repair-rate`: bytes a second, at least a page.
pub fn repair_rate(s: &str) -> Result<ByteSize, ValueError> {
    let size: ByteSize = s.parse()?;
    if size.0 < PAGE {
        return Err(ValueError::RepairRate(size));
    }
    Ok(size)
}

/// `--local-memory`: a page cache budget, a whole number of pages of at least 1 MiB.
pub fn local_memory(s: &str) -> Result<ByteSize, ValueError> {
    let size: ByteSize = s.parse()?;
    if size.0 < MIN_LOCAL_MEMORY || !size.0.is_multiple_of(PAGE) {
        return Err(ValueError::LocalMemory(size));
    }
    Ok(size)
}

/// The smallest `--local-memory`: the pager's minimum budget.
pub const MIN_LOCAL_MEMORY: u64 = pagemesh_pager::cache::MIN_BUDGET_PAGES * PAGE;

/// `--range OFFSET:LEN`: a part of guest RAM, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    /// Where it starts.
    pub offset: ByteSize,
    /// Its length, at least 1 byte; `offset + len` fits in 64 bits.
    pub len: ByteSize,
}

impl ByteRange {
    /// The pages the range touches: its first page and how many.
    pub fn pages(self) -> (u64, u64) {
        let first = self.offset.0 / PAGE;
        // Checked when parsed: offset + len does not overflow.
        let end = (self.offset.0 + self.len.0).div_ceil(PAGE);
        (first, end - first)
    }
}

impl FromStr for ByteRange {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (offset, len) = s
            .split_once(':')
            .ok_or_else(|| ValueError::NotARange(s.to_owned()))?;
        let side = |part, text: &str| {
            text.parse::<ByteSize>()
                .map_err(|why| ValueError::RangePart {
                    part,
                    given: s.to_owned(),
                    why: Box::new(why),
                })
        };
        let (offset, len) = (side("offset", offset)?, side("length", len)?);
        if len.0 == 0 {
            return Err(ValueError::EmptyRange(s.to_owned()));
        }
        if offset.0.checked_add(len.0).is_none() {
            return Err(ValueError::SizeTooLarge(s.to_owned()));
        }
        Ok(Self { offset, len })
    }
}

/// `--workload`: what the built-in guest does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkloadArg {
    /// `verify`: read every word of every page and check it against the pattern.
    Verify,
    /// `seq`, `random` or `stride:K`: visit the pages in this order, doing `--access` to each.
    Visit(Order),
}

impl WorkloadArg {
    /// The guest's visit order and per-page access, given `--access`.
    pub fn order_and_access(self, access: AccessArg) -> (Order, Access) {
        match self {
            WorkloadArg::Verify => (Order::Seq, Access::Verify),
            WorkloadArg::Visit(order) => (order, access.into()),
        }
    }
}

impl FromStr for WorkloadArg {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "verify" {
            return Ok(WorkloadArg::Verify);
        }
        Ok(WorkloadArg::Visit(s.parse()?))
    }
}

impl fmt::Display for WorkloadArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkloadArg::Verify => f.write_str("verify"),
            WorkloadArg::Visit(Order::Seq) => f.write_str("seq"),
            WorkloadArg::Visit(Order::Random) => f.write_str("random"),
            WorkloadArg::Visit(Order::Stride(k)) => write!(f, "stride:{k}"),
            WorkloadArg::Visit(Order::Zipf { milli }) => {
                write!(f, "zipf:{}", f64::from(*milli) / 1000.0)
            }
            WorkloadArg::Visit(Order::Hotset {
                hot_pct,
                access_pct,
            }) => write!(f, "hotset:{hot_pct}:{access_pct}"),
            WorkloadArg::Visit(Order::Mixed) => f.write_str("mixed"),
        }
    }
}

/// `--access`: what `seq`, `random` and `stride:K` do to each page.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessArg {
    /// Read its first word.
    Read,
    /// Write its first word.
    Write,
    /// Read its first word, add one, write it back.
    Rmw,
    /// Read every word and check it against the pattern.
    Verify,
}

impl From<AccessArg> for Access {
    fn from(a: AccessArg) -> Self {
        match a {
            AccessArg::Read => Access::Read,
            AccessArg::Write => Access::Write,
            AccessArg::Rmw => Access::Rmw,
            AccessArg::Verify => Access::Verify,
        }
    }
}

/// `--role`: what the node does.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoleArg {
    /// Runs a guest; fetches the pages it faults on.
    Compute,
    /// Holds pages for other nodes and serves them.
    Memory,
    /// Both.
    Both,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Compute => Role::Compute,
            RoleArg::Memory => Role::Memory,
            RoleArg::Both => Role::Both,
        }
    }
}

/// `--backing`: where a compute node's guest pages come from.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackingArg {
    /// Memory nodes over the network, through the coordinator.
    Remote,
    /// userfaultfd, pages copied from a buffer in this process (benchmark floor, no cluster).
    UffdLocal,
    /// No userfaultfd: the kernel zero-fills (benchmark floor, no cluster).
    DemandZero,
}

/// `--eviction`: the page cache's replacement policy.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvictionArg {
    /// CLOCK through a staging area (pages touched again come back without a transfer).
    Clock,
    /// First in, first out.
    Fifo,
}

impl From<EvictionArg> for pagemesh_pager::Policy {
    fn from(e: EvictionArg) -> Self {
        match e {
            EvictionArg::Clock => pagemesh_pager::Policy::Clock,
            EvictionArg::Fifo => pagemesh_pager::Policy::Fifo,
        }
    }
}

/// `--placement`: how the VM's pages are spread over the memory nodes.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlacementArg {
    /// Round-robin, one page at a time.
    Interleave,
    /// One contiguous range per node, in the order of --memory-nodes (else by id), equal sizes.
    Ranges,
    /// One contiguous range per node, sized by each node's capacity.
    Weighted,
}

/// `--content`: what the memory nodes load before the guest runs.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentArg {
    /// The deterministic test pattern (seeded by --seed).
    Pattern,
    /// Nothing: every page starts never-written and is zero-filled locally on first touch.
    Zero,
    /// The file given by --image.
    Image,
}

/// `--compress`: whether runs of pages travel packed.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressArg {
    /// Packed where it measures faster.
    Auto,
    /// Always packed (where the peer agrees).
    On,
    /// Never packed.
    Off,
}

impl From<CompressArg> for pagemesh_transport::compress::Compression {
    fn from(c: CompressArg) -> Self {
        match c {
            CompressArg::Auto => Self::Auto,
            CompressArg::On => Self::On,
            CompressArg::Off => Self::Off,
        }
    }
}

/// `--transport`: what page traffic travels over.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportArg {
    /// RDMA where this host has a device and the build has the RDMA transport, else TCP
    /// (with one warning saying why).
    Auto,
    /// TCP.
    Tcp,
    /// RDMA, or fail at start.
    Rdma,
    /// One-sided reads of a memory node's process on this host, standing in for RDMA where
    /// there is no device: for testing the RDMA data path (docs/rdma.md), never for use.
    #[value(hide = true)]
    RdmaEmulated,
}

/// Whether this build has the RDMA transport (the cargo feature `rdma`).
pub const RDMA_BUILT: bool = cfg!(feature = "rdma");

/// What `--transport` comes to on a host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransportChoice {
    /// TCP, as asked.
    Tcp,
    /// TCP, because `auto` could not have RDMA: why, for the one warning.
    TcpInstead(String),
    /// Try RDMA (the device may still fail to open: [`TransportArg::unavailable`]).
    Rdma,
    /// RDMA's data path over emulated one-sided reads (`rdma-emulated`).
    Emulated,
}

impl TransportArg {
    /// Whether page traffic can go as asked on a host with RDMA `devices` by a build
    /// with the RDMA transport or not (`built`, [`RDMA_BUILT`]); `Err` for `rdma` where it
    /// cannot be had.
    pub fn resolve(self, devices: &[String], built: bool) -> Result<TransportChoice, String> {
        match self {
            TransportArg::Tcp => return Ok(TransportChoice::Tcp),
            TransportArg::RdmaEmulated => return Ok(TransportChoice::Emulated),
            TransportArg::Auto | TransportArg::Rdma => {}
        }
        let why = match (devices, built) {
            ([], _) => format!(
                "this host has no RDMA device ({} is missing or empty: no RDMA driver, or no \
                 soft-RoCE rdma_rxe link)",
                pagemesh_transport::rdma::SYSFS_DIR
            ),
            (found, false) => format!(
                "this build of pagemesh-node has no RDMA transport (RDMA device {} found; \
                 build it with --features rdma)",
                found.join(", ")
            ),
            (_, true) => return Ok(TransportChoice::Rdma),
        };
        self.unavailable(why)
    }

    /// What to do when RDMA cannot be had, for `why`: TCP with a warning for `auto`, an
    /// error for `rdma`.
    pub fn unavailable(self, why: String) -> Result<TransportChoice, String> {
        match self {
            TransportArg::Tcp | TransportArg::RdmaEmulated => Ok(TransportChoice::Tcp),
            TransportArg::Auto => Ok(TransportChoice::TcpInstead(format!(
                "{why}: page traffic goes over TCP"
            ))),
            TransportArg::Rdma => Err(format!("{why}; use --transport tcp or auto")),
        }
    }
}

/// `--pin-cpu`: where vCPU 0 and the fault handler run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinArg {
    /// Both on the CPU the VM starts on, for a VM of one vCPU; a VM of more is not pinned.
    Auto,
    /// Wherever the scheduler puts them.
    None,
    /// Both on this CPU.
    Cpu(usize),
}

impl PinArg {
    /// The CPU to pin vCPU 0 to, for a VM of `vcpus` vCPUs, asking `current` (the CPU
    /// this thread runs on) for `auto`.
    pub fn resolve(self, vcpus: u8, current: impl FnOnce() -> Option<usize>) -> Option<usize> {
        match self {
            PinArg::Auto if vcpus == 1 => current(),
            PinArg::Auto | PinArg::None => None,
            PinArg::Cpu(c) => Some(c),
        }
    }
}

impl FromStr for PinArg {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "auto" => Ok(PinArg::Auto),
            "none" | "off" => Ok(PinArg::None),
            n => n
                .parse()
                .map(PinArg::Cpu)
                .map_err(|_| ValueError::NotACpu(n.to_owned())),
        }
    }
}

/// `--admin`: where the admin endpoint listens, or nowhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminArg {
    /// `off` (or `none`): no admin endpoint.
    Off,
    /// `HOST:PORT` to listen on.
    Listen(String),
}

impl FromStr for AdminArg {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "off" | "none" => Ok(AdminArg::Off),
            addr => host_port(addr).map(AdminArg::Listen),
        }
    }
}

/// `HOST:PORT`, where HOST is a name, an IPv4 address or a bracketed IPv6 address.
pub fn host_port(s: &str) -> Result<String, ValueError> {
    let s = s.trim();
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(s.to_owned()),
        _ => Err(ValueError::HostPort(s.to_owned())),
    }
}

/// An `http://` or `https://` URL.
pub fn http_url(s: &str) -> Result<String, ValueError> {
    let s = s.trim();
    match s.split_once("://") {
        Some(("http" | "https", rest)) if !rest.is_empty() => Ok(s.to_owned()),
        _ => Err(ValueError::Url(s.to_owned())),
    }
}

/// `--coordinator`: one `http://` or `https://` URL, or several comma-separated
/// (coordinators sharing an etcd store, tried in turn).
pub fn http_urls(s: &str) -> Result<String, ValueError> {
    let urls = s.split(',').map(http_url).collect::<Result<Vec<_>, _>>()?;
    Ok(urls.join(","))
}

/// `--otlp-endpoint`: an `http://` or `https://` URL, or `off` (or `none`).
pub fn otlp_endpoint(s: &str) -> Result<String, ValueError> {
    match s.trim() {
        off @ ("off" | "none") => Ok(off.to_owned()),
        url => http_url(url),
    }
}

/// A positive, finite number of seconds, e.g. `5`, `0.5`.
pub fn seconds(s: &str) -> Result<Duration, ValueError> {
    s.trim()
        .parse::<f64>()
        .ok()
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| ValueError::Seconds(s.to_owned()))
}

/// [`seconds`], as the number of seconds given, for settings read as `f64` further on.
pub fn seconds_f64(s: &str) -> Result<f64, ValueError> {
    seconds(s).map(|d| d.as_secs_f64())
}

/// A tracing `EnvFilter` (`info`, `pagemesh_server=debug,info`).
pub fn log_filter(s: &str) -> Result<String, ValueError> {
    tracing_subscriber::EnvFilter::try_new(s)
        .map(|_| s.to_owned())
        .map_err(|e| ValueError::LogFilter {
            given: s.to_owned(),
            why: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err<T: fmt::Debug>(r: Result<T, ValueError>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn pin_is_auto_none_or_a_cpu_and_auto_pins_one_vcpu_only() {
        assert_eq!("auto".parse::<PinArg>().unwrap(), PinArg::Auto);
        assert_eq!(" none".parse::<PinArg>().unwrap(), PinArg::None);
        assert_eq!("off".parse::<PinArg>().unwrap(), PinArg::None);
        assert_eq!("3".parse::<PinArg>().unwrap(), PinArg::Cpu(3));
        assert!(err("first".parse::<PinArg>()).contains("use auto, none or a CPU number"));
        assert_eq!(PinArg::Auto.resolve(1, || Some(1)), Some(1));
        assert_eq!(PinArg::Auto.resolve(2, || Some(1)), None);
        assert_eq!(PinArg::Auto.resolve(1, || None), None);
        assert_eq!(PinArg::None.resolve(1, || Some(1)), None);
        assert_eq!(PinArg::Cpu(0).resolve(4, || Some(1)), Some(0));
    }

    #[test]
    fn transport_falls_back_to_tcp_with_a_reason_and_rdma_is_refused_without_it() {
        use TransportChoice::*;
        let none: Vec<String> = Vec::new();
        for built in [false, true] {
            assert_eq!(TransportArg::Tcp.resolve(&none, built), Ok(Tcp));
            let Ok(TcpInstead(auto)) = TransportArg::Auto.resolve(&none, built) else {
                panic!("auto without a device")
            };
            assert!(auto.starts_with("this host has no RDMA device"), "{auto}");
            assert!(auto.ends_with(": page traffic goes over TCP"), "{auto}");
            let rdma = TransportArg::Rdma.resolve(&none, built).unwrap_err();
            assert!(rdma.ends_with("; use --transport tcp or auto"), "{rdma}");
        }
        let found = vec!["rxe0".to_owned()];
        let rdma = TransportArg::Rdma.resolve(&found, false).unwrap_err();
        assert!(
            rdma.contains(
                "no RDMA transport (RDMA device rxe0 found; build it with --features rdma)"
            ),
            "{rdma}"
        );
        assert!(matches!(
            TransportArg::Auto.resolve(&found, false),
            Ok(TcpInstead(_))
        ));
        assert_eq!(TransportArg::Auto.resolve(&found, true), Ok(Rdma));
        assert_eq!(TransportArg::Rdma.resolve(&found, true), Ok(Rdma));
        assert_eq!(TransportArg::Tcp.resolve(&found, true), Ok(Tcp));
        assert_eq!(
            TransportArg::RdmaEmulated.resolve(&none, false),
            Ok(Emulated)
        );
        // The device found but not opened.
        let why = "cannot open rxe0".to_owned();
        assert!(
            matches!(TransportArg::Auto.unavailable(why.clone()), Ok(TcpInstead(w)) if w.starts_with(&why))
        );
        assert!(TransportArg::Rdma.unavailable(why).is_err());
    }

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!("4096".parse(), Ok(ByteSize(4096)));
        assert_eq!("256MiB".parse(), Ok(ByteSize::mib(256)));
        assert_eq!("1GiB".parse(), Ok(ByteSize(1 << 30)));
        assert_eq!("2G".parse(), Ok(ByteSize(2 << 30)));
        assert_eq!("64 KiB".parse(), Ok(ByteSize(64 << 10)));
        assert_eq!(
            err("12 parsecs".parse::<ByteSize>()),
            "unknown size unit 'parsecs' in '12 parsecs'; use KiB, MiB, GiB or TiB"
        );
        assert_eq!(
            err("MiB".parse::<ByteSize>()),
            "'MiB' is not a size; use e.g. 4096, 64KiB, 256MiB, 1GiB"
        );
        assert_eq!(
            err("99999999999999TiB".parse::<ByteSize>()),
            "size '99999999999999TiB' is too large"
        );
    }

    #[test]
    fn sizes_display_in_the_largest_exact_unit_and_read_back() {
        for (n, text) in [
            (0, "0 B"),
            (4097, "4097 B"),
            (64 << 10, "64 KiB"),
            (256 << 20, "256 MiB"),
            (63 << 30, "63 GiB"),
            (3 << 40, "3 TiB"),
        ] {
            assert_eq!(ByteSize(n).to_string(), text);
            assert_eq!(text.parse(), Ok(ByteSize(n)));
        }
    }

    #[test]
    fn guest_memory_is_whole_pages_the_vmm_can_map() {
        assert_eq!(guest_mem("256MiB"), Ok(ByteSize::mib(256)));
        assert_eq!(guest_mem("63GiB"), Ok(ByteSize(MAX_RAM)));
        for bad in ["0", "1000", "64GiB"] {
            let e = err(guest_mem(bad));
            assert!(e.contains("multiple of 4 KiB and at most 63 GiB"), "{e}");
        }
        assert_eq!(
            err(guest_mem("1000")),
            "guest memory must be a non-zero multiple of 4 KiB and at most 63 GiB, got 1000 B"
        );
        assert!(err(guest_mem("lots")).contains("is not a size"));
    }

    #[test]
    fn capacity_fits_the_page_store() {
        assert_eq!(capacity("8GiB"), Ok(ByteSize(8 << 30)));
        assert_eq!(
            err(capacity("16TiB")),
            "capacity must be less than 16 TiB, got 16 TiB"
        );
    }

    #[test]
    fn ranges_parse_and_cover_the_pages_they_touch() {
        let r: ByteRange = "8MiB:8MiB".parse().unwrap();
        assert_eq!(r.pages(), (2048, 2048));
        assert_eq!("0:64MiB".parse::<ByteRange>().unwrap().pages(), (0, 16384));
        // 6000..6001 lies in page 1; 4000..4200 straddles pages 0 and 1.
        assert_eq!("6000:1".parse::<ByteRange>().unwrap().pages(), (1, 1));
        assert_eq!("4000:200".parse::<ByteRange>().unwrap().pages(), (0, 2));
        assert_eq!(
            err("64MiB".parse::<ByteRange>()),
            "'64MiB' is not OFFSET:LEN (e.g. 0:64MiB, 8MiB:8MiB)"
        );
        assert_eq!(
            err("0:12parsecs".parse::<ByteRange>()),
            "bad length in range '0:12parsecs': unknown size unit 'parsecs' in '12parsecs'; \
             use KiB, MiB, GiB or TiB"
        );
        assert_eq!(
            err("x:1".parse::<ByteRange>()),
            "bad offset in range 'x:1': 'x' is not a size; use e.g. 4096, 64KiB, 256MiB, 1GiB"
        );
        assert_eq!(
            err("4096:0".parse::<ByteRange>()),
            "the range '4096:0' is empty; its length must be at least 1 byte"
        );
        assert!(err("16000000TiB:16000000TiB".parse::<ByteRange>()).contains("too large"));
    }

    #[test]
    fn workloads_parse_to_an_order_and_an_access() {
        assert_eq!("verify".parse(), Ok(WorkloadArg::Verify));
        assert_eq!("seq".parse(), Ok(WorkloadArg::Visit(Order::Seq)));
        assert_eq!("random".parse(), Ok(WorkloadArg::Visit(Order::Random)));
        assert_eq!("stride:8".parse(), Ok(WorkloadArg::Visit(Order::Stride(8))));
        for w in ["verify", "seq", "random", "stride:8"] {
            assert_eq!(w.parse::<WorkloadArg>().unwrap().to_string(), w);
        }
        assert_eq!(
            WorkloadArg::Verify.order_and_access(AccessArg::Write),
            (Order::Seq, Access::Verify)
        );
        assert_eq!(
            WorkloadArg::Visit(Order::Random).order_and_access(AccessArg::Rmw),
            (Order::Random, Access::Rmw)
        );
        assert_eq!(
            err("zigzag".parse::<WorkloadArg>()),
            "unknown workload 'zigzag'; expected seq, random, stride:K, zipf:S (e.g. zipf:0.99), hotset:H:P (e.g. hotset:10:90), mixed or verify"
        );
        assert_eq!(
            "zipf:0.99".parse::<WorkloadArg>(),
            Ok(WorkloadArg::Visit(Order::Zipf { milli: 990 }))
        );
        assert_eq!(
            "hotset:10:90".parse::<WorkloadArg>(),
            Ok(WorkloadArg::Visit(Order::Hotset {
                hot_pct: 10,
                access_pct: 90
            }))
        );
        assert_eq!(
            WorkloadArg::Visit(Order::Zipf { milli: 990 }).to_string(),
            "zipf:0.99"
        );
        for bad in ["zipf:x", "zipf:0.9999", "zipf:-1"] {
            assert!(
                err(bad.parse::<WorkloadArg>()).starts_with("zipf exponent must be"),
                "{bad}"
            );
        }
        for bad in ["hotset:10", "hotset:0:50", "hotset:10:101"] {
            assert!(
                err(bad.parse::<WorkloadArg>()).starts_with("hotset wants H:P"),
                "{bad}"
            );
        }
        assert_eq!(
            err("stride:0".parse::<WorkloadArg>()),
            "stride must be a whole number of pages >= 1, got '0'"
        );
    }

    #[test]
    fn addresses_and_urls_are_checked() {
        assert_eq!("off".parse(), Ok(AdminArg::Off));
        assert_eq!("none".parse(), Ok(AdminArg::Off));
        assert_eq!(
            "0.0.0.0:9101".parse(),
            Ok(AdminArg::Listen("0.0.0.0:9101".into()))
        );
        assert_eq!(host_port("[::1]:0"), Ok("[::1]:0".into()));
        assert_eq!(host_port("node1:7101"), Ok("node1:7101".into()));
        for bad in ["7101", ":7101", "host:port", "host:70000"] {
            assert_eq!(
                err(host_port(bad)),
                format!("'{bad}' is not HOST:PORT (e.g. 127.0.0.1:7101, [::1]:0, node1:7101)")
            );
        }
        assert_eq!(
            http_url("https://c:7070/"),
            Ok("https://c:7070/".to_owned())
        );
        assert_eq!(
            err(http_url("127.0.0.1:7070")),
            "'127.0.0.1:7070' is not an http:// or https:// URL"
        );
        assert_eq!(otlp_endpoint("off"), Ok("off".to_owned()));
        assert!(otlp_endpoint("ftp://x").is_err());
    }

    #[test]
    fn durations_are_positive_seconds() {
        assert_eq!(seconds("5"), Ok(Duration::from_secs(5)));
        assert_eq!(seconds("0.25"), Ok(Duration::from_millis(250)));
        assert_eq!(seconds_f64("1.5"), Ok(1.5));
        for bad in ["0", "-1", "inf", "NaN", "soon"] {
            assert_eq!(
                err(seconds(bad)),
                format!("'{bad}' is not a positive number of seconds")
            );
        }
    }

    #[test]
    fn log_filters_are_checked() {
        assert_eq!(log_filter("info"), Ok("info".to_owned()));
        assert_eq!(
            log_filter("pagemesh_server=debug,info"),
            Ok("pagemesh_server=debug,info".to_owned())
        );
        assert!(
            err(log_filter("pagemesh=loud")).starts_with("'pagemesh=loud' is not a log filter")
        );
    }
}
