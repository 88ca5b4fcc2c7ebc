//! The pagemesh node: runs KVM guests whose memory lives on other nodes, and serves the
//! pages it holds to its peers.
//!
//! | module | what it is |
//! |---|---|
//! | [`pattern`] | the deterministic page pattern loaded by memory nodes and checked by guests |
//! | [`transport`] | the page protocol, the [`transport::PageSource`] seam, TCP |
//! | [`server`] | the page server and page store of a memory node |

pub mod compute;
pub mod config;
pub mod coordinator;
pub mod pager;
pub mod pattern;
pub mod server;
pub mod service;
pub mod transport;
pub mod vm;
