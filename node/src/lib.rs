//! The pagemesh node: runs KVM guests whose memory lives on other nodes, and serves the
//! pages it holds to its peers.
//!
//! | module | what it is |
//! |---|---|
//! | [`pattern`] | the deterministic page pattern loaded by memory nodes and checked by guests |
//! | [`transport`] | the page protocol, the [`transport::PageSource`] seam, TCP |
//! | [`server`] | the page server and page store of a memory node |
//! | [`vm`] | the KVM VM, its memory and the built-in workload guest |
//! | [`pager`] | userfaultfd, the page directory, the fault handler, stats |
//! | [`compute`] | running a guest on pager-served memory |
//! | [`linux_guest`] | booting a Linux kernel on pager-served memory |
//! | [`coordinator`] | the coordinator client (register, discover, VMs) |
//! | [`config`] | flags and the TOML config file |
//! | [`service`] | what a node process does, role by role |
//! | [`admin`] | the admin HTTP endpoint: `/stats`, `/metrics`, `/healthz` |
//! | [`metrics`] | Prometheus text exposition |
//! | [`otlp`] | OpenTelemetry metrics export (OTLP/HTTP) of the same figures |

pub mod admin;
pub mod compute;
pub mod config;
pub mod coordinator;
pub mod ebpf;
pub mod linux_guest;
pub mod metrics;
pub mod otlp;
pub mod pager;
pub mod pattern;
pub mod server;
pub mod service;
pub mod transport;
pub mod vm;
