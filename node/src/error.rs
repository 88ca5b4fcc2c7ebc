//! The error of a node run, with every cause it can have.

use pagemesh_api::NodeId;
use pagemesh_transport::TransportError;

use crate::config::ConfigError;
use crate::coordinator::CoordinatorError;

/// Errors of a node run.
#[derive(thiserror::Error, Debug)]
pub enum NodeError {
    /// Bad settings.
    #[error("bad configuration")]
    Config(#[from] ConfigError),
    /// The cluster key file cannot be used.
    #[error("cannot use the cluster key")]
    Key(#[from] pagemesh_auth::KeyError),
    /// Bad workload.
    #[error("bad workload")]
    Workload(#[from] pagemesh_vmm::guest::WorkloadError),
    /// The `--image` file could not be opened.
    #[error("cannot open the image {}", .0.display())]
    Image(std::path::PathBuf, #[source] std::io::Error),
    /// The TLS files could not be loaded.
    #[error(transparent)]
    Tls(#[from] pagemesh_transport::tls::TlsError),
    /// `--image-dir` is not a directory that can be opened.
    #[error("cannot use --image-dir {}: it must be an existing directory", .0.display())]
    ImageDir(std::path::PathBuf, #[source] std::io::Error),
    /// The page server could not listen.
    #[error("cannot listen on {0}")]
    Listen(String, #[source] std::io::Error),
    /// The page server could not start.
    #[error("cannot start the page server")]
    Server(#[from] pagemesh_server::ServerError),
    /// The coordinator could not be used.
    #[error(transparent)]
    Coordinator(#[from] CoordinatorError),
    /// Connecting to a peer failed.
    #[error("cannot connect to peer node {node}")]
    Connect {
        /// Peer.
        node: NodeId,
        /// Cause.
        #[source]
        source: TransportError,
    },
    /// A memory node could not load or report the VM's pages.
    #[error("memory node {node} could not {what} VM {vm}")]
    Peer {
        /// Node.
        node: NodeId,
        /// What.
        what: &'static str,
        /// VM.
        vm: u32,
        /// Cause.
        #[source]
        source: TransportError,
    },
    /// The Linux guest's VM failed.
    #[error("the Linux guest failed")]
    Linux(#[from] pagemesh_vmm::VcpuError),
    /// The guest run failed.
    #[error("guest run failed")]
    Compute(#[from] crate::lifecycle::ComputeError),
    /// Writing the summary failed.
    #[error("cannot write the summary to {0}")]
    Summary(String, #[source] std::io::Error),
    /// The admin endpoint could not start.
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
    /// A working set cannot be recorded or replayed.
    #[error(transparent)]
    WorkingSet(#[from] crate::working_set::WorkingSetError),
    /// Waiting for a stop signal failed.
    #[error("cannot wait for signals")]
    Signals(#[source] std::io::Error),
}
