//! The node's configuration: command-line flags, optionally preceded by a TOML file.
//!
//! Every flag has a TOML key of the same name with `-` as `_` (`--pin-cpu 1` is
//! `pin_cpu = 1`). Flags given on the command line win over the file.

use std::path::{Path, PathBuf};

use clap::{Parser, ValueEnum};
use pagemesh_api::{NodeId, Role};
use serde::Deserialize;

/// Errors reading the configuration.
#[derive(thiserror::Error, Debug)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The config file is not valid TOML for these settings.
    #[error("config file {0} is invalid")]
    Parse(PathBuf, #[source] Box<toml::de::Error>),
    /// A required setting is missing.
    #[error("{0} is required (as a flag or in the config file)")]
    Missing(&'static str),
    /// A setting has a bad value.
    #[error("invalid {what}: {why}")]
    Invalid {
        /// The setting.
        what: &'static str,
        /// Why.
        why: String,
    },
}

/// The node's role on the command line.
#[derive(ValueEnum, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
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

/// Where a compute node's guest pages come from.
#[derive(ValueEnum, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum BackingArg {
    /// Memory nodes over the network.
    Remote,
    /// userfaultfd, pages copied from a local buffer (benchmark floor).
    UffdLocal,
    /// Plain memory, zero-filled by the kernel (benchmark floor).
    DemandZero,
}

/// Placement policies on the command line.
#[derive(ValueEnum, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PlacementArg {
    /// Round-robin, one page at a time, over the memory nodes.
    Interleave,
    /// One contiguous range per memory node, in node-id order, equal sizes.
    Ranges,
    /// One contiguous range per memory node, sized by each node's capacity.
    Weighted,
}

/// pagemesh-node: runs KVM guests whose memory lives on other nodes, and serves pages.
///
/// A memory node (`--role memory`) registers with the coordinator and serves the pages it
/// holds until it is stopped (Ctrl-C or SIGTERM). A compute node (`--role compute`) defines a
/// VM with the coordinator, has the memory nodes load its pages, runs the built-in guest
/// workload on userfaultfd-served memory, prints a summary and exits: 0 when the guest saw
/// exactly the expected memory, 1 otherwise.
#[derive(Parser, Deserialize, Default, Debug, Clone)]
#[command(version, about, long_about)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// TOML file with any of these settings (flags override it).
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// This node's id in the cluster (0 .. 16777215).
    #[arg(long)]
    pub id: Option<NodeId>,

    /// Coordinator URL.
    #[arg(long, value_name = "URL", env = "PAGEMESH_COORDINATOR")]
    pub coordinator: Option<String>,

    /// Address the page server listens on [default: 127.0.0.1:0, an ephemeral port].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,

    /// Address peers should use to reach this node's page server, when it differs from
    /// the listening address (e.g. listening on 0.0.0.0).
    #[arg(long, value_name = "ADDR")]
    pub advertise: Option<String>,

    /// What this node does.
    #[arg(long, value_enum)]
    pub role: Option<RoleArg>,

    /// Guest memory this node offers to hold for others (memory role), e.g. 512MiB.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    #[serde(default, deserialize_with = "de_size")]
    pub capacity: Option<u64>,

    /// Cluster to join (must exist on the coordinator).
    #[arg(long)]
    pub cluster: Option<String>,

    /// Times to try reaching the coordinator before giving up (backoff doubles from 200 ms).
    #[arg(long, value_name = "N")]
    pub coordinator_attempts: Option<u32>,

    /// Seconds a peer may fail before it is declared dead [default: 5]: a request waits this
    /// long for its reply, and a failed connection is re-dialled (1 ms, doubling to 100 ms
    /// between attempts) and the request asked again for this long before the VM stops.
    #[arg(long, value_name = "SECS")]
    pub peer_timeout: Option<f64>,

    /// Memory role: microseconds a page connection's thread polls for the next request after
    /// answering one, before it sleeps; 0 never polls [default: 200]. The poller yields to any
    /// other thread ready to run, so it only uses CPU nobody else wants, and spares a compute
    /// node that faults back to back a wake-up of this node's CPU per fault (expensive where
    /// idle CPUs halt into a hypervisor; see docs/benchmarks.md).
    #[arg(long, value_name = "MICROS")]
    pub serve_spin_us: Option<u64>,

    /// Compute role: guest RAM, e.g. 256MiB [default: 256MiB].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    #[serde(default, deserialize_with = "de_size")]
    pub mem: Option<u64>,

    /// Compute role: how the VM's pages are spread over the memory nodes [default: interleave].
    #[arg(long, value_enum)]
    pub placement: Option<PlacementArg>,

    /// Compute role: memory nodes to place pages on (comma-separated ids) [default: all].
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    pub memory_nodes: Option<Vec<NodeId>>,

    /// Compute role: what the memory nodes load: `pattern` (the deterministic test pattern),
    /// `zero` (nothing: every page starts never-written), or `image` (see --image)
    /// [default: pattern].
    #[arg(long, value_name = "KIND")]
    pub content: Option<String>,

    /// Compute role: guest memory image to load onto the memory nodes (page i is the 4 KiB at
    /// offset i*4096); implies --content image. The path must be readable by the memory nodes.
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,

    /// Compute role: pattern seed [default: the VM id].
    #[arg(long)]
    pub seed: Option<u64>,

    /// Compute role: guest workload: `verify` (read and check every word of every page),
    /// `seq`, `random` (a permutation), or `stride:K`.
    #[arg(long, value_name = "WORKLOAD")]
    pub workload: Option<String>,

    /// Compute role: per-page access of seq/random/stride: read, write or rmw [default: read].
    #[arg(long, value_name = "ACCESS")]
    pub access: Option<String>,

    /// Compute role: pages the workload covers, as OFFSET:LENGTH sizes (e.g. 0:64MiB)
    /// [default: all of guest RAM].
    #[arg(long, value_name = "OFFSET:LEN")]
    pub range: Option<String>,

    /// Compute role: pin the vCPU and the fault handler to this CPU (fastest here: a fault
    /// handler woken on the vCPU's own CPU avoids a cross-CPU wake-up).
    #[arg(long, value_name = "CPU")]
    pub pin_cpu: Option<usize>,

    /// Compute role: where pages come from: `remote` (memory nodes, through the coordinator),
    /// or, for benchmarking without a cluster, `uffd-local` (userfaultfd, pages copied from a
    /// buffer in this process) or `demand-zero` (no userfaultfd: the kernel zero-fills)
    /// [default: remote].
    #[arg(long, value_enum)]
    pub backing: Option<BackingArg>,

    /// Address of the admin HTTP endpoint (`/stats`, `/metrics`, `/healthz`), or `off`
    /// [default: 127.0.0.1:0, an ephemeral port, registered with the coordinator].
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<String>,

    /// Export metrics over OTLP/HTTP (protobuf) to this collector URL (`/v1/metrics` is
    /// appended), or `off` [default: $OTEL_EXPORTER_OTLP_ENDPOINT; unset: no export].
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,

    /// Seconds between OTLP exports [default: $OTEL_METRIC_EXPORT_INTERVAL ms, or 10].
    #[arg(long, value_name = "SECS")]
    pub otlp_interval: Option<f64>,

    /// Compute role: after the guest finishes, keep the node (and its admin endpoint) up
    /// until Ctrl-C or SIGTERM, so that its final figures can still be read.
    #[arg(long)]
    #[serde(default)]
    pub hold: bool,

    /// Take over the registration of a node with the same id registered at another address
    /// (a node restarted on a new port). Without it such a registration is refused.
    #[arg(long)]
    #[serde(default)]
    pub replace: bool,

    /// Compute role: boot this Linux kernel (a bzImage, or an ELF vmlinux) instead of running
    /// a built-in workload. Its memory is placed on the memory nodes like any guest's.
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,

    /// Compute role, with --kernel: initial ramdisk (an uncompressed cpio is fastest).
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,

    /// Compute role, with --kernel: kernel command line [default: a serial console and the
    /// settings that get a stock kernel furthest under software-assisted KVM; see
    /// docs/linux-guest.md].
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,

    /// Compute role, with --kernel: vCPUs (1 so far).
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u32>,

    /// Compute role, with --kernel: copy the guest's serial console to stdout (it always
    /// goes to the log).
    #[arg(long)]
    #[serde(default)]
    pub console: bool,

    /// Compute role: do not load the eBPF probes (they load by default when the node has
    /// the privileges; without them the node warns once and runs on).
    #[arg(long)]
    #[serde(default)]
    pub no_ebpf: bool,

    /// Compute role: write the run summary as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Compute role: keep the VM's remaining pages on the memory nodes after the run
    /// (by default they are released).
    #[arg(long)]
    #[serde(default)]
    pub keep_vm: bool,

    /// Log filter (tracing `EnvFilter` syntax, e.g. `info`, `pagemesh_server=debug`).
    #[arg(long, value_name = "FILTER", env = "PAGEMESH_LOG")]
    pub log: Option<String>,
}

macro_rules! merge {
    ($cli:ident, $file:ident, $($field:ident),*) => {
        $( if $cli.$field.is_none() { $cli.$field = $file.$field.take(); } )*
    };
}

impl Settings {
    /// Parses the command line and merges in the config file, if one is named.
    pub fn load() -> Result<Self, ConfigError> {
        Self::parse().with_file()
    }

    /// Merges in the config file named by `--config`.
    pub fn with_file(mut self) -> Result<Self, ConfigError> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let mut file = Self::from_file(&path)?;
        merge!(
            self,
            file,
            id,
            coordinator,
            listen,
            advertise,
            role,
            capacity,
            cluster,
            coordinator_attempts,
            peer_timeout,
            serve_spin_us,
            mem,
            placement,
            memory_nodes,
            content,
            image,
            seed,
            workload,
            access,
            range,
            pin_cpu,
            backing,
            otlp_endpoint,
            otlp_interval,
            json,
            log,
            admin,
            kernel,
            initrd,
            cmdline,
            vcpus
        );
        self.keep_vm |= file.keep_vm;
        self.replace |= file.replace;
        self.hold |= file.hold;
        self.console |= file.console;
        self.no_ebpf |= file.no_ebpf;
        Ok(self)
    }

    fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_owned(), e))?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse(path.to_owned(), Box::new(e)))
    }
}

/// Parses sizes like `4096`, `64KiB`, `256MiB`, `1GiB`, `2G` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size; use e.g. 4096, 64KiB, 256MiB, 1GiB"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit '{other}' in '{s}'; use KiB, MiB, GiB or TiB"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

fn de_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Option::<Size>::deserialize(d)? {
        None => Ok(None),
        Some(Size::Bytes(b)) => Ok(Some(b)),
        Some(Size::Text(t)) => parse_size(&t).map(Some).map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999999TiB").is_err());
    }

    #[test]
    fn file_settings_fill_gaps_and_flags_win() {
        let dir = std::env::temp_dir().join(format!("pagemesh-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("node.toml");
        std::fs::write(
            &path,
            "id = 3\nrole = \"memory\"\ncapacity = \"512MiB\"\ncoordinator = \"http://file\"\n",
        )
        .unwrap();
        let cli = Settings::parse_from([
            "pagemesh-node",
            "--config",
            path.to_str().unwrap(),
            "--coordinator",
            "http://flag",
        ])
        .with_file()
        .unwrap();
        assert_eq!(cli.id, Some(3));
        assert_eq!(cli.role, Some(RoleArg::Memory));
        assert_eq!(cli.capacity, Some(512 << 20));
        assert_eq!(cli.coordinator.as_deref(), Some("http://flag"));

        std::fs::write(&path, "idd = 3\n").unwrap();
        let err = Settings::parse_from(["pagemesh-node", "--config", path.to_str().unwrap()])
            .with_file()
            .unwrap_err();
        assert!(matches!(err, ConfigError::Parse(..)), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
