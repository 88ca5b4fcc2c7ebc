//! The pagemesh node: wires the crates below into a `pagemesh-node` process. A compute node
//! runs a KVM guest whose memory lives on other nodes; a memory node serves the pages it
//! holds to its peers; a node can be both.
//!
//! The node is the top of a graph of library crates, each usable alone
//! (`docs/architecture.md` draws it):
//!
//! | crate | what it is |
//! |---|---|
//! | `pagemesh-api` | the JSON types every program shares, placement arithmetic, the page pattern |
//! | `pagemesh-protocol` | the binary page protocol: frames, codec, limits |
//! | `pagemesh-transport` | the page-source seam, its TCP client and in-process source |
//! | `pagemesh-server` | a memory node's page server and page store |
//! | `pagemesh-pager` | userfaultfd, the page directory, the fault handler, stats |
//! | `pagemesh-vmm` | the KVM machines: the built-in test guest and a Linux kernel |
//! | `pagemesh-probes` | the eBPF probe loader (kernel-side fault timings, page heat) |
//!
//! This crate's modules:
//!
//! | module | what it is |
//! |---|---|
//! | [`lifecycle`] | one lifecycle for every guest: pager, vCPU threads, stop, tear-down |
//! | [`compute`] | running the built-in guest's workload on pager-served memory |
//! | [`linux_guest`] | booting a Linux kernel on pager-served memory |
//! | [`coordinator`] | the coordinator client (register, discover, VMs) |
//! | [`lease`] | the thread that renews this node's lease with the coordinator |
//! | [`config`] | the settings, typed: flags, environment and the TOML config file |
//! | [`define`] | the VM a compute node defines: size, content, placement, workload |
//! | [`peers`] | a compute node's connections to its VM's memory nodes |
//! | [`probes`] | loading the eBPF probes for a guest |
//! | [`rdma`] | the RDMA device: a memory node's registered store, a compute node's readers |
//! | [`signals`] | the stop signals the main thread waits for |
//! | [`summary`] | a run's summary, printed and as JSON |
//! | [`working_set`] | a recorded working set: the file `--record-working-set` writes and `--replay-working-set` reads |
//! | [`error`] | the node's error |
//! | [`service`] | what a node process does, role by role: the wiring |
//! | [`admin`] | the admin HTTP endpoint: `/stats`, `/metrics`, `/healthz` |
//! | [`metrics`] | the metric catalog, the series of a snapshot, and their Prometheus text exposition |
//! | [`otlp`] | OpenTelemetry metrics export (OTLP/HTTP) of the same figures |

pub mod admin;
pub mod compute;
pub mod config;
pub mod coordinator;
pub mod define;
pub mod error;
pub mod lease;
pub mod lifecycle;
pub mod linux_guest;
pub mod metrics;
pub mod otlp;
pub mod peers;
pub mod probes;
pub mod rdma;
pub mod repair;
pub mod service;
pub mod signals;
pub mod summary;
pub mod working_set;

pub use error::NodeError;
