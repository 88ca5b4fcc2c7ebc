//! Keeping this node's lease with the coordinator.
//!
//! The registration grants a lease ([`NodeInfo::lease_ms`]); a node that does not renew it
//! in time is down for the coordinator, which then leaves its endpoint out of
//! `GET /endpoints` and places no new VM on it. A thread of its own renews it every third
//! of its length, each try within that third, so that a slow or lost answer costs one
//! renewal, not the lease. A coordinator that no longer knows the node (it forgot it while
//! the node was unreachable, or restarted without its state) is answered by registering
//! again. Nothing here is on the fault path.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

use pagemesh_api::{NodeId, NodeInfo, RegisterEndpoint, error_chain};

use crate::coordinator::{CoordinatorClient, CoordinatorError};

/// The renewing thread; dropping it stops the thread (at once) and waits for it.
pub struct LeaseKeeper {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl LeaseKeeper {
    /// Renews node `id`'s lease, granted by `info`, until dropped; registers again with
    /// `registration` when the coordinator has forgotten the node. A coordinator that grants
    /// no lease (`lease_ms` 0, an older one) is not renewed with.
    pub fn start(
        client: &CoordinatorClient,
        info: &NodeInfo,
        registration: RegisterEndpoint,
    ) -> Self {
        if info.lease_ms == 0 {
            tracing::debug!("the coordinator grants no lease; nothing to renew");
            return LeaseKeeper {
                stop: None,
                thread: None,
            };
        }
        let (stop, stopped) = mpsc::channel();
        let mut renewer = Renewer {
            every: third(info.lease_ms),
            client: client.clone(),
            id: info.node_id,
            registration,
            failing: false,
        };
        renewer.client = renewer.client.with_patience(1, renewer.every);
        let thread = std::thread::Builder::new()
            .name("lease".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(renewer.every) {
                    if !renewer.renew() {
                        return;
                    }
                }
            })
            .ok();
        if thread.is_none() {
            tracing::warn!(
                "cannot start the lease thread: the coordinator will see this node down"
            );
        }
        LeaseKeeper {
            stop: Some(stop),
            thread,
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A third of a lease of `lease_ms`, at least 50 ms.
fn third(lease_ms: u64) -> Duration {
    Duration::from_millis((lease_ms / 3).max(50))
}

struct Renewer {
    every: Duration,
    client: CoordinatorClient,
    id: NodeId,
    registration: RegisterEndpoint,
    /// The last renewal failed (logged once until one works again).
    failing: bool,
}

impl Renewer {
    /// One renewal; `false` when this node must stop renewing (another took its id).
    fn renew(&mut self) -> bool {
        let id = self.id;
        let renewed = match self.client.renew_lease(id, &self.registration.address) {
            Err(CoordinatorError::Refused { status: 404, .. }) => {
                tracing::warn!(
                    "the coordinator at {} no longer knows node {id}; registering again",
                    self.client.url()
                );
                self.client
                    .register_with_coordinator(id, &self.registration)
            }
            renewed => renewed,
        };
        match renewed {
            Ok(info) => {
                if self.failing {
                    tracing::info!("node {id}'s lease renewed again");
                    self.failing = false;
                }
                self.every = third(info.lease_ms.max(1));
                true
            }
            Err(e @ CoordinatorError::Refused { status: 409, .. }) => {
                tracing::error!("node {id} stops renewing its lease: {}", error_chain(&e));
                false
            }
            Err(e) => {
                if !self.failing {
                    tracing::warn!(
                        "cannot renew node {id}'s lease (trying again every {:?}; the \
                         coordinator calls the node down when the lease runs out): {}",
                        self.every,
                        error_chain(&e)
                    );
                    self.failing = true;
                }
                true
            }
        }
    }
}
