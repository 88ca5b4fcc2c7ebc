//! The node's settings: command-line flags, two environment variables and an optional TOML
//! file, parsed into typed values before anything starts.
//!
//! | module | what it is |
//! |---|---|
//! | [`values`] | the typed values (sizes, workloads, ranges, placements, …) and their parsers |
//! | [`file`] | the TOML file (`--config FILE`), whose keys become the flags' defaults |
//!
//! A setting's value is the first of: the command line; its environment variable
//! (`PAGEMESH_COORDINATOR`, `PAGEMESH_LOG`, `PAGEMESH_CLUSTER_KEY_FILE`); the config file, where every flag has a key of
//! the same name with `-` as `_` (`--pin-cpu 1` is `pin_cpu = 1`); the built-in default.
//!
//! [`Settings`] holds what every node uses and the telemetry settings; [`MemoryOptions`],
//! [`ComputeOptions`] and [`LinuxOptions`] hold what one kind of node uses. `--help` lists
//! them under those headings.

pub mod file;
pub mod values;

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory, FromArgMatches, Parser};
use pagemesh_api::{NodeId, Role};
use pagemesh_pager::directory::MAX_NODE_ID;
use pagemesh_vmm::linux::MAX_LINUX_RAM;

pub use self::file::FileError;
use self::values::{
    AccessArg, AdminArg, BackingArg, ByteRange, ByteSize, CompressArg, ContentArg, EvictionArg,
    PinArg, PlacementArg, RoleArg, TransportArg, WorkloadArg,
};

/// The longest --fault-poll-us: 100 ms.
pub const MAX_FAULT_POLL_US: u64 = 100_000;

/// Errors reading the configuration, and settings that do not go together.
#[derive(thiserror::Error, Debug)]
pub enum ConfigError {
    /// The command line (or an environment variable) is invalid, or asks for help.
    #[error(transparent)]
    Args(#[from] clap::Error),
    /// The config file is unreadable or invalid.
    #[error(transparent)]
    File(#[from] FileError),
    /// A required setting is missing.
    #[error("{0} is required (as a flag or in the config file)")]
    Missing(&'static str),
    /// A setting has a bad value, or does not go with another.
    #[error("invalid {what}: {why}")]
    Invalid {
        /// The setting.
        what: &'static str,
        /// Why.
        why: String,
    },
}

/// Most vCPUs a Linux guest can have.
pub const MAX_VCPUS: u8 = 32;

const TELEMETRY: &str = "Telemetry";

/// pagemesh-node: runs KVM guests whose memory lives on other nodes, and serves pages.
///
/// A memory node (`--role memory`) registers with the coordinator and serves the pages it
/// holds until it is stopped (Ctrl-C or SIGTERM). A compute node (`--role compute`) defines a
/// VM with the coordinator, has the memory nodes load its pages, runs a built-in workload
/// (`--workload`) or boots a Linux kernel (`--kernel`) on userfaultfd-served memory, prints a
/// summary and exits: 0 when the guest saw exactly the expected memory, 1 otherwise, 2 for
/// bad settings.
///
/// Every flag can also be given in a TOML file (`--config FILE`) under its name with `_` for
/// `-`; the command line and the environment win over the file.
#[derive(Parser, Debug, Clone)]
#[command(version, about, long_about)]
pub struct Settings {
    /// TOML file of settings: keys are the long flags with `_` for `-` (`pin_cpu = 1`);
    /// the command line and the environment override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// This node's id in the cluster, 0 to 16777215 (the page directory stores 24 bits).
    #[arg(long, value_parser = clap::value_parser!(NodeId).range(..=i64::from(MAX_NODE_ID)))]
    pub id: Option<NodeId>,

    /// What this node does [default: compute with --workload or --kernel, memory otherwise].
    #[arg(long, value_enum)]
    pub role: Option<RoleArg>,

    /// Coordinator URL, http:// or https://, or several comma-separated (coordinators sharing
    /// an etcd store: each request goes to the one that last answered, then the others in
    /// turn); required, except by a compute node with --backing uffd-local or demand-zero.
    #[arg(
        long,
        value_name = "URLS",
        env = "PAGEMESH_COORDINATOR",
        value_parser = values::http_urls
    )]
    pub coordinator: Option<String>,

    /// Times to try each coordinator request before giving up; the pause between tries starts
    /// at 200 ms and doubles, up to 5 s.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 5,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub coordinator_attempts: u32,

    /// Cluster to join (it must exist on the coordinator); peers of other clusters are refused
    /// at the handshake [default: none].
    #[arg(long, value_name = "NAME")]
    pub cluster: Option<String>,

    /// File holding the cluster's shared key (one key per line, at least 32 bytes; the first
    /// proves, every line is accepted, so a key can be rotated). Peers must prove they hold it
    /// before any page moves, and the coordinator's API takes a token derived from it; the
    /// file must be private (chmod 600). Without it the node warns and talks to anyone who
    /// reaches it: for loopback demos only (docs/security.md).
    #[arg(long, value_name = "FILE", env = "PAGEMESH_CLUSTER_KEY_FILE")]
    pub cluster_key_file: Option<PathBuf>,

    /// The directory VM images live in. A memory node loads an image (`"content": {"kind":
    /// "image"}`) only from beneath it: a path outside it, with `..`, or through a symlink
    /// that leads out of it is refused, and without --image-dir no image is loaded at all. A
    /// compute node writes a Linux guest's boot image here for the memory nodes to load (the
    /// temporary directory without it).
    #[arg(long, value_name = "DIR", env = "PAGEMESH_IMAGE_DIR")]
    pub image_dir: Option<PathBuf>,

    /// This node's TLS certificate chain (PEM), signed by the cluster's CA. With --tls-key and
    /// --tls-ca, page traffic is TLS 1.3 with both sides authenticated: the page server
    /// accepts only clients with a certificate of the CA, and this node dials its peers over
    /// TLS, checking theirs (docs/security.md). The cluster key still applies inside.
    #[arg(long, value_name = "FILE", env = "PAGEMESH_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// What page traffic travels over: `auto` uses RDMA where this host has an RDMA device
    /// and the build has the RDMA transport, and TCP otherwise, saying why once; `tcp`;
    /// `rdma` fails at start where RDMA cannot be had. A build without `--features rdma`
    /// has no RDMA transport. With RDMA, a memory node registers its page store with the
    /// device and a compute node reads pages with one-sided RDMA READ; claims, write-backs
    /// and control stay on TCP, and a peer without RDMA is reached over TCP (docs/rdma.md).
    #[arg(long, value_enum, default_value_t = TransportArg::Auto)]
    pub transport: TransportArg,

    /// Whether runs of pages travel packed: each page that shrinks compressed with LZ4, an
    /// all-zero page as a flag with no bytes, the rest raw. `auto` packs where it measures
    /// faster on the link (a slow link, compressible pages: it times packed against plain
    /// requests every few thousand), `on` always, `off` never. Both ends must agree: a node
    /// with `off` neither offers nor accepts it, and runs then travel plain.
    #[arg(long, value_enum, default_value_t = CompressArg::Auto)]
    pub compress: CompressArg,

    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", env = "PAGEMESH_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// The cluster's CA certificate(s) (PEM), which peers' certificates must chain to.
    #[arg(long, value_name = "FILE", env = "PAGEMESH_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// Address the page server listens on (port 0: any free port). Every node serves pages;
    /// a compute-only node's server holds none.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:0",
        value_parser = values::host_port
    )]
    pub listen: String,

    /// Address peers should use to reach this node's page server, when it differs from the
    /// one it listens on (e.g. listening on 0.0.0.0) [default: the address --listen bound].
    #[arg(long, value_name = "ADDR", value_parser = values::host_port)]
    pub advertise: Option<String>,

    /// Take over the registration of a node with the same id registered at another address
    /// (a node restarted on a new port). Without it such a registration is refused.
    #[arg(long)]
    pub replace: bool,

    /// Log filter (tracing `EnvFilter` syntax, e.g. `info`, `pagemesh_server=debug,info`).
    #[arg(
        long,
        value_name = "FILTER",
        env = "PAGEMESH_LOG",
        default_value = "info",
        value_parser = values::log_filter
    )]
    pub log: String,

    /// What a node that holds pages for others uses.
    #[command(flatten)]
    pub memory: MemoryOptions,

    /// What a node that runs a guest uses.
    #[command(flatten)]
    pub compute: ComputeOptions,

    /// What a compute node booting a Linux kernel uses.
    #[command(flatten)]
    pub linux: LinuxOptions,

    /// Address of the admin HTTP endpoint (`/stats`, `/metrics`, `/healthz`), registered with
    /// the coordinator, or `off`.
    #[arg(
        long,
        value_name = "ADDR|off",
        default_value = "127.0.0.1:0",
        help_heading = TELEMETRY
    )]
    pub admin: AdminArg,

    /// Export metrics over OTLP/HTTP (protobuf) to this collector URL (`/v1/metrics` is
    /// appended), or `off` [default: $OTEL_EXPORTER_OTLP_METRICS_ENDPOINT as is, else
    /// $OTEL_EXPORTER_OTLP_ENDPOINT; unset: no export].
    #[arg(
        long,
        value_name = "URL|off",
        value_parser = values::otlp_endpoint,
        help_heading = TELEMETRY
    )]
    pub otlp_endpoint: Option<String>,

    /// Seconds between OTLP exports [default: $OTEL_METRIC_EXPORT_INTERVAL ms, or 10].
    #[arg(
        long,
        value_name = "SECS",
        value_parser = values::seconds_f64,
        help_heading = TELEMETRY
    )]
    pub otlp_interval: Option<f64>,
}

/// Settings of a node that holds pages for others (`--role memory` or `both`).
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Memory node (--role memory or both)")]
pub struct MemoryOptions {
    /// Guest memory this node offers to hold for others (less than 16 TiB).
    #[arg(
        long,
        value_name = "SIZE",
        default_value = "1GiB",
        value_parser = values::capacity
    )]
    pub capacity: ByteSize,

    /// Microseconds a page connection's thread polls for the next request after answering
    /// one, before it sleeps; 0 never polls. The poller yields to any other thread ready to
    /// run, so it only uses CPU nobody else wants, and spares a compute node that faults back
    /// to back a wake-up of this node's CPU per fault (expensive where idle CPUs halt into a
    /// hypervisor; see docs/benchmarks.md).
    #[arg(long, value_name = "MICROS", default_value_t = default_serve_spin_us())]
    pub serve_spin_us: u64,

    /// Most page connections open at once; a client past it gets an error frame and is
    /// closed. A connection that has not finished its handshake within 5 s is closed, so idle
    /// strangers cannot hold the slots for long.
    #[arg(
        long,
        value_name = "N",
        default_value_t = pagemesh_server::DEFAULT_MAX_CONNECTIONS,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    pub max_connections: usize,

    /// Seconds an authenticated page connection may send nothing before it is closed (0:
    /// never). Its client reconnects when it next needs this node, so this only reaps the
    /// connections of clients that went away without closing them.
    #[arg(long, value_name = "SECS", default_value_t = pagemesh_server::DEFAULT_IDLE_TIMEOUT.as_secs())]
    pub idle_timeout: u64,

    /// Most bytes a second this node copies when it repairs the copies a dead memory node
    /// held (e.g. 64MiB): for links a repair would otherwise fill, at the price of a longer
    /// time with fewer copies (on a 2-core host the guests' fault latency during a repair
    /// was not measurably better paced; docs/benchmarks.md) [default: no limit].
    #[arg(long, value_name = "SIZE", value_parser = values::repair_rate)]
    pub repair_rate: Option<ByteSize>,
}

fn default_serve_spin_us() -> u64 {
    u64::try_from(pagemesh_server::DEFAULT_SERVER_SPIN.as_micros()).unwrap_or(u64::MAX)
}

/// Settings of a node that runs a guest (`--role compute` or `both`).
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Compute node (--role compute or both)")]
pub struct ComputeOptions {
    /// Built-in guest workload: `verify` (read every word of every page and check it against
    /// the pattern), or `seq`, `random` (a pseudo-random permutation) or `stride:K` (every
    /// K-th page, then the next offset), each doing --access to every page, or `zipf:S`
    /// (skewed: page of rank r drawn with probability ~ 1/r^S, e.g. zipf:0.99) or `hotset:H:P`
    /// (P% of the accesses to H% of the pages, e.g. hotset:10:90), doing --access to each of
    /// --accesses pages, which repeat (fixed sequences, the same on every run), or `mixed`
    /// (every page once: the first half in order interleaved with the second half in random
    /// order: a stream beside demand faults). A compute node
    /// with neither --workload nor --kernel runs no guest: it registers and serves until
    /// stopped [default with --backing uffd-local or demand-zero: verify].
    #[arg(long, value_name = "WORKLOAD", value_parser = clap::value_parser!(WorkloadArg))]
    pub workload: Option<WorkloadArg>,

    /// What the workload does to each page it visits (the `verify` workload reads every word
    /// whatever this says).
    #[arg(long, value_enum, default_value_t = AccessArg::Read)]
    pub access: AccessArg,

    /// Accesses of a `zipf:S` or `hotset:H:P` workload, at most 67108864 [default: four per
    /// page of the range].
    #[arg(long, value_name = "N")]
    pub accesses: Option<u64>,

    /// The part of guest RAM the workload visits, as OFFSET:LEN sizes (e.g. 0:64MiB): every
    /// page those bytes touch [default: all of guest RAM].
    #[arg(long, value_name = "OFFSET:LEN", value_parser = clap::value_parser!(ByteRange))]
    pub range: Option<ByteRange>,

    /// Guest RAM: a multiple of 4 KiB, at most 63 GiB (3 GiB for a Linux guest)
    /// [default: 256MiB; 64MiB with --backing uffd-local or demand-zero].
    #[arg(long, value_name = "SIZE", value_parser = values::guest_mem)]
    pub mem: Option<ByteSize>,

    /// How the VM's pages are spread over the memory nodes.
    #[arg(long, value_enum, default_value_t = PlacementArg::Interleave)]
    pub placement: PlacementArg,

    /// Copies of each page, on distinct memory nodes (1 to 4): a fetch goes to the first
    /// that answers, so the guest runs on when a memory node dies or its link is cut (each
    /// memory node holds its pages and a copy of the ones before it in the placement).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(pagemesh_api::MAX_REPLICAS)))]
    pub replicas: u32,

    /// Memory nodes to place pages on, comma-separated ids [default: every memory node of
    /// this node's cluster registered with the coordinator].
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    pub memory_nodes: Option<Vec<NodeId>>,

    /// What the memory nodes load before the guest runs (--image implies `image`).
    #[arg(long, value_enum, default_value_t = ContentArg::Pattern)]
    pub content: ContentArg,

    /// Guest memory image to load onto the memory nodes (page i is the 4 KiB at offset
    /// i*4096; pages past its end start zero); implies --content image. The path must be
    /// readable by the memory nodes.
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,

    /// Seed of the test pattern (--content pattern) [default: taken from the clock, different
    /// every run, so that a page left over from another run fails verification].
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,

    /// Where the guest's pages come from: `remote` (memory nodes, through the coordinator),
    /// or, to benchmark a built-in workload without a cluster, `uffd-local` (userfaultfd,
    /// pages copied from a buffer in this process) or `demand-zero` (no userfaultfd: the
    /// kernel zero-fills).
    #[arg(long, value_enum, default_value_t = BackingArg::Remote)]
    pub backing: BackingArg,

    /// Seconds a memory node may fail before it is declared dead: connecting and each
    /// reply wait at most this long, and a failed connection is re-dialled (1 ms, doubling to
    /// 100 ms between attempts) and the request asked again for this long before the VM
    /// stops.
    #[arg(
        long,
        value_name = "SECS",
        default_value = "5",
        value_parser = values::seconds
    )]
    pub peer_timeout: Duration,

    /// Keep at most this much of the VM's memory on this node: a page cache over the memory
    /// nodes, which keep every page's copy. Clean pages leave for nothing, dirty ones are
    /// written back first, by a background reclaimer; at least 1MiB. Recorded in the VM's
    /// definition [default: unlimited: fetched pages move here for good].
    #[arg(long, value_name = "SIZE", value_parser = values::local_memory)]
    pub local_memory: Option<ByteSize>,

    /// How the page cache (--local-memory) picks pages to evict: `clock` passes the oldest
    /// pages through a staging area from which a page touched again comes back without a
    /// transfer; `fifo` drops them in the order they came.
    #[arg(long, value_enum, default_value_t = EvictionArg::Clock)]
    pub eviction: EvictionArg,

    /// Prefetch: follow the guest's sequential and strided fault streams (the majority
    /// trend of recent fault deltas, several streams at once) and bring their next pages in
    /// ahead of it, on connections of their own, so demand faults never wait behind them.
    /// Random access prefetches nothing. Under --local-memory prefetch only takes frames
    /// above the reclaimer's low watermark.
    #[arg(long)]
    pub prefetch: bool,

    /// Write the pages the guest faulted on, each once in the order of its first fault, to
    /// this file (JSON) when the run ends, for --replay-working-set on later runs of the same
    /// VM (give the built-in guest a --seed to run it again). Record without --prefetch: pages
    /// brought in ahead of a fault are not faulted on.
    #[arg(long, value_name = "FILE", conflicts_with = "replay_working_set")]
    pub record_working_set: Option<PathBuf>,

    /// Bring the pages of a working set recorded by --record-working-set in from the start of
    /// the run, in their recorded order, on the prefetcher's connections (demand faults go
    /// first, on their own). The file must be of a VM of the same size and content (the
    /// same --seed or --image); another VM's is refused.
    #[arg(long, value_name = "FILE")]
    pub replay_working_set: Option<PathBuf>,

    /// Back guest RAM with 2 MiB huge pages from the host's hugetlb pool (reserve them
    /// first, as root: `echo N > /proc/sys/vm/nr_hugepages`): a fault fetches and installs a
    /// whole 2 MiB page, in batched runs, and interleaved placement deals out 2 MiB at a time.
    /// --mem must be a multiple of 2 MiB; not with --local-memory, --prefetch or
    /// --replay-working-set yet. (Transparent huge pages cannot do this: userfaultfd resolves
    /// anonymous memory 4 KiB at a time.)
    #[arg(long)]
    pub huge_pages: bool,

    /// Fault handler threads, each on its own connections to the memory nodes, reading the
    /// same userfaultfd: the faults of several vCPUs are served at once (1 to 16; one under
    /// --local-memory) [default: one per vCPU (--vcpus)].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=16))]
    pub fault_handlers: Option<u8>,

    /// Where vCPU 0 and the fault handler run: `auto` pins both to the CPU the VM starts on
    /// (a VM of one vCPU; one of more is left to the scheduler), a CPU number pins both to
    /// that CPU, `none` leaves them to the scheduler. One CPU is fastest: a fault wakes the
    /// handler, and the install the vCPU, on the CPU they already share, where a wake-up
    /// across CPUs waits for an idle CPU to come out of halt (docs/benchmarks.md, "The
    /// random-fault path").
    #[arg(long, value_name = "auto|none|CPU", default_value = "auto")]
    pub pin_cpu: PinArg,

    /// Pin the fault handler to this CPU instead of vCPU 0's (e.g. a CPU of its own, with
    /// --fault-poll-us) [default: vCPU 0's, see --pin-cpu].
    #[arg(long, value_name = "CPU")]
    pub handler_cpu: Option<usize>,

    /// After each fault, the fault handler polls the userfaultfd for this long (non-blocking
    /// reads) before it sleeps until the next: a fault that comes meanwhile needs no
    /// wake-up of the handler, at the cost of a CPU kept busy for that long after each
    /// fault (0: the handler sleeps right away). Pays only where the handler has a CPU of its
    /// own (--handler-cpu).
    #[arg(long, value_name = "US", default_value_t = 0)]
    pub fault_poll_us: u64,

    /// Install a fetched page without waking the vCPU (`UFFDIO_COPY_MODE_DONTWAKE`) and
    /// wake it (`UFFDIO_WAKE`) once the fault's bookkeeping is done, rather than in the
    /// install itself: one system call more per fault, the vCPU woken by a handler that has
    /// nothing left to do. Without --local-memory and --huge-pages only.
    #[arg(long)]
    pub wake_separately: bool,

    /// When the guest stops (its end, or a stop signal), write its whole RAM to this file
    /// before the pager stops: pages still on memory nodes are fetched for it, so the file
    /// is the guest's memory as it was (a RAM image for `--image`; its fetches count in
    /// the run's faults).
    #[arg(long, value_name = "FILE")]
    pub dump_ram: Option<PathBuf>,

    /// Write the run summary as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Keep the VM's remaining pages on the memory nodes after the run (by default they are
    /// released).
    #[arg(long)]
    pub keep_vm: bool,

    /// After a built-in workload finishes, keep the node (and its admin endpoint) up until
    /// Ctrl-C or SIGTERM, so that its final figures can still be read (a node that also holds
    /// memory always stays up).
    #[arg(long)]
    pub hold: bool,

    /// Do not load the eBPF probes (they load by default when the node has the privileges;
    /// without them the node warns once and runs on).
    #[arg(long)]
    pub no_ebpf: bool,
}

impl ComputeOptions {
    /// Guest RAM: `--mem`, else 256 MiB, or 64 MiB for the benchmark backings.
    pub fn mem(&self) -> ByteSize {
        self.mem.unwrap_or(match self.backing {
            BackingArg::Remote => ByteSize::mib(256),
            BackingArg::UffdLocal | BackingArg::DemandZero => ByteSize::mib(64),
        })
    }
}

/// Settings of a compute node that boots a Linux kernel (`--kernel`).
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Linux guest (compute node with --kernel)")]
pub struct LinuxOptions {
    /// Boot this Linux kernel (a bzImage, or an ELF vmlinux) instead of running a built-in
    /// workload. Its memory is placed on the memory nodes like any guest's.
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,

    /// Initial ramdisk (an uncompressed cpio is fastest).
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,

    /// Kernel command line [default: a serial console and the settings that get a stock
    /// kernel furthest under software-assisted KVM; see docs/linux-guest.md].
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,

    /// vCPUs, 1 to 32, each on a thread of its own, with a fault handler each by default
    /// (--fault-handlers). The built-in guest (--workload) also takes 1 to 8: its vCPUs share
    /// the workload's pages out between them, each doing its own consecutive part (seq,
    /// random, stride:K and verify only).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        value_parser = clap::value_parser!(u8).range(1..=i64::from(MAX_VCPUS))
    )]
    pub vcpus: u8,

    /// Copy the guest's serial console to stdout (it always goes to the log).
    #[arg(long)]
    pub console: bool,
}

impl Settings {
    /// The settings of this process's command line, environment and config file. Bad flags
    /// and `--help` end the process as clap does (usage on stderr, exit code 2; help on
    /// stdout, 0); a bad config file is an error.
    pub fn load() -> Result<Self, ConfigError> {
        Self::try_load_from(std::env::args_os()).map_err(|e| match e {
            ConfigError::Args(e) => e.exit(),
            e => e,
        })
    }

    /// The settings of command line `args` (the program's name first), the environment and
    /// the config file `--config` names, if any.
    pub fn try_load_from<I, T>(args: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let cmd = Self::command();
        // Parsed once without the file, to find it (and to refuse bad flags and answer
        // --help without reading it), then again with the file's settings as defaults.
        let matches = cmd.clone().try_get_matches_from(&args)?;
        let settings = match matches.get_one::<PathBuf>("config") {
            None => Self::from_arg_matches(&matches)?,
            Some(path) => {
                let matches = file::layer(cmd, path)?.try_get_matches_from(&args)?;
                Self::from_arg_matches(&matches)?
            }
        };
        settings.check()?;
        Ok(settings)
    }

    /// Refuses settings that do not go together, before the node starts anything
    /// ([`Settings::try_load_from`] and [`crate::service::run`] call it).
    pub fn check(&self) -> Result<(), ConfigError> {
        if !Role::from(self.role()).computes() {
            return Ok(());
        }
        let c = &self.compute;
        if c.content == ContentArg::Image && c.image.is_none() {
            return Err(ConfigError::Missing("--image (for --content image)"));
        }
        let mem = c.mem();
        if let Some(range) = c.range {
            let (first, pages) = range.pages();
            if first + pages > mem.pages() {
                return Err(ConfigError::Invalid {
                    what: "--range",
                    why: format!(
                        "it ends at {}, past the end of guest RAM (--mem {mem})",
                        ByteSize(range.offset.bytes() + range.len.bytes())
                    ),
                });
            }
        }
        if c.huge_pages {
            let with = [
                (c.local_memory.is_some(), "--local-memory"),
                (c.prefetch, "--prefetch"),
                (c.replay_working_set.is_some(), "--replay-working-set"),
                (c.backing == BackingArg::DemandZero, "--backing demand-zero"),
            ];
            if let Some((_, other)) = with.iter().find(|(on, _)| *on) {
                return Err(ConfigError::Invalid {
                    what: "--huge-pages",
                    why: format!("2 MiB huge pages do not work with {other} yet"),
                });
            }
            if !mem.bytes().is_multiple_of(2 << 20) {
                return Err(ConfigError::Invalid {
                    what: "--huge-pages",
                    why: format!("--mem must be a multiple of 2MiB, got {mem}"),
                });
            }
            if c.placement != PlacementArg::Interleave {
                // The directory has an entry per huge page: one home for all of it.
                return Err(ConfigError::Invalid {
                    what: "--huge-pages",
                    why: "2 MiB huge pages are placed whole, by --placement interleave (512 \
                          pages at a time); weighted and ranges would split them between nodes"
                        .into(),
                });
            }
        }
        if c.wake_separately {
            let with = [
                (c.local_memory.is_some(), "--local-memory"),
                (c.huge_pages, "--huge-pages"),
            ];
            if let Some((_, other)) = with.iter().find(|(on, _)| *on) {
                return Err(ConfigError::Invalid {
                    what: "--wake-separately",
                    why: format!("a separate wake-up does not work with {other} yet"),
                });
            }
        }
        if c.fault_poll_us > MAX_FAULT_POLL_US {
            return Err(ConfigError::Invalid {
                what: "--fault-poll-us",
                why: format!(
                    "at most {MAX_FAULT_POLL_US} µs (a handler that never sleeps keeps a CPU \
                     busy while the guest does anything else), got {}",
                    c.fault_poll_us
                ),
            });
        }
        if c.local_memory.is_some() && c.backing != BackingArg::Remote {
            return Err(ConfigError::Invalid {
                what: "--local-memory",
                why: "a local memory budget needs remote memory (--backing remote)".into(),
            });
        }
        if self.linux.kernel.is_some() {
            if c.backing != BackingArg::Remote {
                return Err(ConfigError::Invalid {
                    what: "--backing",
                    why: "a Linux guest (--kernel) runs on remote memory only".into(),
                });
            }
            if mem.bytes() > MAX_LINUX_RAM {
                return Err(ConfigError::Invalid {
                    what: "--mem",
                    why: format!(
                        "a Linux guest can have at most {} here, got {mem}",
                        ByteSize(MAX_LINUX_RAM)
                    ),
                });
            }
        }
        Ok(())
    }

    /// The TLS identity of `--tls-cert`, `--tls-key` and `--tls-ca`: none without them, an
    /// error naming the missing one when only some are given.
    pub fn tls(&self) -> Result<Option<pagemesh_transport::tls::Tls>, crate::NodeError> {
        let files = match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (None, None, None) => return Ok(None),
            (Some(cert), Some(key), Some(ca)) => pagemesh_transport::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            },
            (cert, key, _) => {
                let missing = if cert.is_none() {
                    "--tls-cert"
                } else if key.is_none() {
                    "--tls-key"
                } else {
                    "--tls-ca"
                };
                return Err(ConfigError::Invalid {
                    what: missing,
                    why: "TLS needs all three of --tls-cert, --tls-key and --tls-ca".into(),
                }
                .into());
            }
        };
        pagemesh_transport::tls::Tls::load(&files)
            .map(Some)
            .map_err(crate::NodeError::Tls)
    }

    /// The cluster key of `--cluster-key-file`, if one is given.
    pub fn keyring(&self) -> Result<Option<pagemesh_auth::Keyring>, pagemesh_auth::KeyError> {
        self.cluster_key_file
            .as_deref()
            .map(pagemesh_auth::Keyring::load)
            .transpose()
    }

    /// The role: `--role`, else compute when there is a guest to run, memory otherwise.
    pub fn role(&self) -> RoleArg {
        self.role.unwrap_or(
            if self.compute.workload.is_some() || self.linux.kernel.is_some() {
                RoleArg::Compute
            } else {
                RoleArg::Memory
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;
    use pagemesh_vmm::guest::Order;

    use super::*;

    /// A config file in a directory of its own, removed when dropped.
    struct TomlFile(PathBuf);

    impl TomlFile {
        fn new(name: &str, text: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("pagemesh-config-{}-{name}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("node.toml");
            std::fs::write(&path, text).unwrap();
            Self(path)
        }

        fn path(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }

    impl Drop for TomlFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(self.0.parent().unwrap());
        }
    }

    fn load(args: &[&str]) -> Result<Settings, ConfigError> {
        Settings::try_load_from(std::iter::once("pagemesh-node").chain(args.iter().copied()))
    }

    fn load_err(args: &[&str]) -> String {
        match load(args).unwrap_err() {
            ConfigError::Args(e) => e.render().to_string(),
            e => pagemesh_api::error_chain(&e),
        }
    }

    #[test]
    fn the_command_is_well_formed() {
        Settings::command().debug_assert();
    }

    #[test]
    fn defaults_are_typed() {
        let s = load(&["--id", "3"]).unwrap();
        assert_eq!(s.id, Some(3));
        assert_eq!(s.role(), RoleArg::Memory);
        assert_eq!(s.coordinator_attempts, 5);
        assert_eq!(s.listen, "127.0.0.1:0");
        assert_eq!(s.admin, AdminArg::Listen("127.0.0.1:0".into()));
        assert_eq!(s.memory.capacity, ByteSize(1 << 30));
        assert_eq!(s.memory.repair_rate, None);
        assert_eq!(
            Duration::from_micros(s.memory.serve_spin_us),
            pagemesh_server::DEFAULT_SERVER_SPIN
        );
        assert_eq!(s.compute.peer_timeout, pagemesh_transport::DEFAULT_TIMEOUT);
        assert_eq!(s.compute.access, AccessArg::Read);
        assert_eq!(s.compute.placement, PlacementArg::Interleave);
        assert_eq!(s.compute.content, ContentArg::Pattern);
        assert_eq!(s.compute.backing, BackingArg::Remote);
        assert_eq!(s.compute.mem, None);
        assert_eq!(s.linux.vcpus, 1);
        assert!(!s.compute.hold && !s.replace);
        assert_eq!(s.compute.pin_cpu, PinArg::Auto);
        assert_eq!(s.compute.handler_cpu, None);
        assert_eq!(s.compute.fault_poll_us, 0);
        assert!(!s.compute.wake_separately);
    }

    #[test]
    fn flags_parse_to_typed_values() {
        let s = load(&[
            "--workload",
            "stride:8",
            "--access",
            "rmw",
            "--range",
            "8MiB:8MiB",
            "--mem",
            "512MiB",
            "--memory-nodes",
            "1,2",
            "--placement",
            "weighted",
            "--peer-timeout",
            "0.5",
            "--admin",
            "off",
        ])
        .unwrap();
        assert_eq!(s.role(), RoleArg::Compute);
        assert_eq!(
            s.compute.workload,
            Some(WorkloadArg::Visit(Order::Stride(8)))
        );
        assert_eq!(s.compute.access, AccessArg::Rmw);
        assert_eq!(s.compute.range.unwrap().pages(), (2048, 2048));
        assert_eq!(s.compute.mem, Some(ByteSize::mib(512)));
        assert_eq!(s.compute.memory_nodes, Some(vec![1, 2]));
        assert_eq!(s.compute.placement, PlacementArg::Weighted);
        assert_eq!(s.compute.peer_timeout, Duration::from_millis(500));
        assert_eq!(s.admin, AdminArg::Off);
    }

    #[test]
    fn bad_flags_are_refused_saying_what_is_accepted() {
        for (args, needle) in [
            (
                &["--mem", "12parsecs"][..],
                "invalid value '12parsecs' for '--mem <SIZE>': unknown size unit 'parsecs'",
            ),
            (&["--mem", "1000"], "non-zero multiple of 4 KiB"),
            (
                &["--workload", "zigzag"],
                "unknown workload 'zigzag'; expected seq, random, stride:K, zipf:S (e.g. zipf:0.99), hotset:H:P (e.g. hotset:10:90), mixed or verify",
            ),
            (
                &["--access", "poke"],
                "[possible values: read, write, rmw, verify]",
            ),
            (
                &["--local-memory", "512KiB"],
                "--local-memory must be a multiple of 4 KiB and at least 1 MiB",
            ),
            (&["--range", "64MiB"], "'64MiB' is not OFFSET:LEN"),
            (
                &["--placement", "random"],
                "[possible values: interleave, ranges, weighted]",
            ),
            (
                &["--content", "ones"],
                "[possible values: pattern, zero, image]",
            ),
            (
                &["--backing", "local"],
                "[possible values: remote, uffd-local, demand-zero]",
            ),
            (&["--id", "16777216"], "16777216 is not in 0..=16777215"),
            (&["--vcpus", "0"], "0 is not in 1..=32"),
            (&["--vcpus", "33"], "33 is not in 1..=32"),
            (
                &["--peer-timeout", "0"],
                "'0' is not a positive number of seconds",
            ),
            (
                &["--coordinator", "c:7070"],
                "is not an http:// or https:// URL",
            ),
            (&["--listen", "7101"], "'7101' is not HOST:PORT"),
            (&["--coordinator-attempts", "0"], "0 is not in 1.."),
        ] {
            let e = load_err(args);
            assert!(e.contains(needle), "{args:?}: expected '{needle}' in:\n{e}");
        }
    }

    #[test]
    fn settings_that_do_not_go_together_are_refused() {
        for (args, needle) in [
            (
                &[
                    "--workload",
                    "seq",
                    "--huge-pages",
                    "--placement",
                    "weighted",
                ][..],
                "2 MiB huge pages are placed whole, by --placement interleave",
            ),
            (
                &["--workload", "seq", "--range", "256MiB:4KiB"][..],
                "invalid --range: it ends at 262148 KiB, past the end of guest RAM (--mem 256 MiB)",
            ),
            (
                &[
                    "--workload",
                    "seq",
                    "--backing",
                    "uffd-local",
                    "--range",
                    "60MiB:8MiB",
                ],
                "past the end of guest RAM (--mem 64 MiB)",
            ),
            (
                &["--kernel", "vmlinuz", "--mem", "4GiB"],
                "invalid --mem: a Linux guest can have at most 3 GiB here, got 4 GiB",
            ),
            (
                &["--kernel", "vmlinuz", "--backing", "demand-zero"],
                "invalid --backing: a Linux guest (--kernel) runs on remote memory only",
            ),
            (
                &["--role", "compute", "--content", "image"],
                "--image (for --content image) is required",
            ),
            (
                &[
                    "--workload",
                    "seq",
                    "--wake-separately",
                    "--local-memory",
                    "8MiB",
                ],
                "invalid --wake-separately: a separate wake-up does not work with --local-memory yet",
            ),
            (
                &["--workload", "seq", "--fault-poll-us", "200000"],
                "invalid --fault-poll-us: at most 100000 µs",
            ),
            (
                &["--workload", "seq", "--pin-cpu", "first"],
                "'first' is not a CPU; use auto, none or a CPU number",
            ),
        ] {
            let e = load_err(args);
            assert!(e.contains(needle), "{args:?}: expected '{needle}' in:\n{e}");
        }
        // A memory node has no guest to check.
        assert!(load(&["--role", "memory", "--content", "image"]).is_ok());
        assert!(load(&["--workload", "seq", "--range", "252MiB:4MiB"]).is_ok());
    }

    #[test]
    fn a_flag_beats_the_file_which_beats_the_default() {
        let f = TomlFile::new(
            "layers",
            "id = 3\nrole = \"memory\"\ncapacity = \"512MiB\"\ncoordinator = \"http://file\"\n\
             peer_timeout = 2.5\nserve_spin_us = 0\nmemory_nodes = [1, 2]\nhold = true\n\
             workload = \"stride:4\"\nvcpus = 4\n",
        );
        let s = load(&[
            "--config",
            f.path(),
            "--coordinator",
            "http://flag",
            "--vcpus",
            "2",
        ])
        .unwrap();
        assert_eq!(s.id, Some(3));
        assert_eq!(s.role, Some(RoleArg::Memory));
        assert_eq!(s.memory.capacity, ByteSize::mib(512));
        assert_eq!(s.memory.serve_spin_us, 0);
        assert_eq!(s.coordinator.as_deref(), Some("http://flag"));
        assert_eq!(s.compute.peer_timeout, Duration::from_millis(2500));
        assert_eq!(s.compute.memory_nodes, Some(vec![1, 2]));
        assert_eq!(
            s.compute.workload,
            Some(WorkloadArg::Visit(Order::Stride(4)))
        );
        assert!(s.compute.hold);
        assert_eq!(s.linux.vcpus, 2);
        // Not in the file: the built-in default.
        assert_eq!(s.coordinator_attempts, 5);
        assert_eq!(s.compute.placement, PlacementArg::Interleave);
        // A list may also be written as on the command line.
        let f = TomlFile::new("list", "memory_nodes = \"4,5\"\n");
        let s = load(&["--config", f.path()]).unwrap();
        assert_eq!(s.compute.memory_nodes, Some(vec![4, 5]));
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let f = TomlFile::new("unknown", "id = 3\nidd = 3\n");
        let e = load_err(&["--config", f.path()]);
        assert!(e.contains("unknown key 'idd'"), "{e}");
        assert!(e.contains(f.path()), "{e}");
        let f = TomlFile::new("kebab", "pin-cpu = 1\n");
        let e = load_err(&["--config", f.path()]);
        assert!(
            e.contains("unknown key 'pin-cpu' (did you mean 'pin_cpu'?"),
            "{e}"
        );
        for key in ["config = \"x.toml\"", "help = true", "version = true"] {
            let f = TomlFile::new("reserved", key);
            let e = load_err(&["--config", f.path()]);
            assert!(e.contains("unknown key"), "{key}: {e}");
        }
    }

    #[test]
    fn bad_file_values_are_refused_naming_the_key() {
        for (text, needle) in [
            (
                "mem = \"12parsecs\"",
                "bad value for 'mem': unknown size unit 'parsecs' in '12parsecs'",
            ),
            (
                "workload = \"zigzag\"",
                "bad value for 'workload': unknown workload 'zigzag'",
            ),
            (
                "placement = \"random\"",
                "bad value for 'placement': 'random' is not one of interleave, ranges, weighted",
            ),
            ("vcpus = 64", "bad value for 'vcpus': 64 is not in 1..=32"),
            (
                "hold = \"yes\"",
                "bad value for 'hold': expected true or false",
            ),
            (
                "id = [1, 2]",
                "bad value for 'id': expected one value, not a list",
            ),
            (
                "range = \"0\"",
                "bad value for 'range': '0' is not OFFSET:LEN",
            ),
            (
                "peer_timeout = -1",
                "'-1' is not a positive number of seconds",
            ),
        ] {
            let f = TomlFile::new("bad-value", text);
            let e = load_err(&["--config", f.path()]);
            assert!(e.contains(needle), "{text}: expected '{needle}' in:\n{e}");
            assert!(e.contains("config file"), "{e}");
        }
        // A value the command line replaces is still checked: the file is wrong either way.
        let f = TomlFile::new("overridden", "mem = \"lots\"");
        assert!(load(&["--config", f.path(), "--mem", "64MiB"]).is_err());
        // Not TOML, or not there.
        let f = TomlFile::new("not-toml", "id = ");
        assert!(load_err(&["--config", f.path()]).contains("is not valid TOML"));
        let e = load_err(&["--config", "/nonexistent.toml"]);
        assert!(
            e.contains("cannot read config file /nonexistent.toml"),
            "{e}"
        );
    }

    #[test]
    fn help_says_what_the_code_does() {
        let mut cmd = Settings::command();
        let help = cmd.render_long_help().to_string();
        let flag = |name: &str| {
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_long() == Some(name))
                .unwrap_or_else(|| panic!("--{name}"));
            arg.get_long_help()
                .or(arg.get_help())
                .map(ToString::to_string)
                .unwrap_or_default()
        };
        let seed = flag("seed");
        assert!(!seed.contains("VM id"), "{seed}");
        assert!(seed.contains("from the clock"), "{seed}");
        assert!(flag("vcpus").contains("1 to 32"));
        assert!(!flag("vcpus").contains("so far"));
        assert!(flag("peer-timeout").contains("re-dialled"));
        // clap shows the defaults it applies.
        for shown in [
            "[default: 5]",
            "[default: 1GiB]",
            "[default: 200]",
            "[default: interleave]",
            "[default: read]",
            "[default: 127.0.0.1:0]",
            "[env: PAGEMESH_COORDINATOR=]",
        ] {
            assert!(help.contains(shown), "{shown} missing from:\n{help}");
        }
        // Options are grouped by the role that uses them.
        let headings: Vec<_> = [
            "Options:",
            "Memory node (--role memory or both):",
            "Compute node (--role compute or both):",
            "Linux guest (compute node with --kernel):",
            "Telemetry:",
        ]
        .iter()
        .map(|h| {
            help.find(h)
                .unwrap_or_else(|| panic!("{h} missing from:\n{help}"))
        })
        .collect();
        assert!(headings.is_sorted(), "{help}");
        let section = |flag: &str| headings.iter().rposition(|&h| help.find(flag).unwrap() > h);
        assert_eq!(section("--id <ID>"), Some(0));
        assert_eq!(section("--capacity <SIZE>"), Some(1));
        assert_eq!(section("--workload <WORKLOAD>"), Some(2));
        assert_eq!(section("--vcpus <N>"), Some(3));
        assert_eq!(section("--otlp-endpoint <URL|off>"), Some(4));
    }

    #[test]
    fn a_repair_rate_is_a_size_a_second_of_a_page_at_least() {
        let s = load(&["--role", "memory", "--repair-rate", "64MiB"]).unwrap();
        assert_eq!(s.memory.repair_rate, Some(ByteSize::mib(64)));
        let e = load_err(&["--role", "memory", "--repair-rate", "100"]);
        assert!(
            e.contains("--repair-rate must be at least 4KiB (a page a second), got 100 B"),
            "{e}"
        );
    }

    #[test]
    fn help_and_version_are_not_errors_of_ours() {
        for flag in ["--help", "--version"] {
            match load(&[flag]) {
                Err(ConfigError::Args(e)) => assert!(
                    matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion),
                    "{e}"
                ),
                other => panic!("{flag}: {other:?}"),
            }
        }
    }
}
