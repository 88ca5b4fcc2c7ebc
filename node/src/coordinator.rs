//! The coordinator client: register this node's endpoint, discover peers, create and look
//! up VMs.
//!
//! Blocking HTTP (ureq): it runs at start-up and on `Load` requests, never on the fault path.
//! The start-up flow is the one of the original design note:
//!
//! ```text
//! register_with_coordinator    POST /nodes/{id}/endpoint
//! endpoints                    GET /endpoints (peers.rs connects to them)
//! ```
//!
//! An unreachable coordinator is retried with exponential backoff a bounded number of times,
//! then reported with its URL.

use std::time::Duration;

use pagemesh_api::{ApiError, CreateVm, Endpoint, NodeId, NodeInfo, RegisterEndpoint, Vm, VmId};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Errors talking to the coordinator.
#[derive(thiserror::Error, Debug)]
pub enum CoordinatorError {
    /// No answer after every retry.
    #[error(
        "cannot reach the coordinator at {url} after {attempts} attempts; is pagemesh-coordinator running there?"
    )]
    Unreachable {
        /// The URL.
        url: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        #[source]
        source: Box<ureq::Error>,
    },
    /// The coordinator answered with an error.
    #[error("the coordinator refused {what}: {message} (HTTP {status})")]
    Refused {
        /// What was asked.
        what: String,
        /// HTTP status.
        status: u16,
        /// Its message.
        message: String,
    },
    /// The answer was not the expected JSON.
    #[error("the coordinator at {url} sent an unreadable answer")]
    BadAnswer {
        /// The URL.
        url: String,
        /// Cause.
        #[source]
        source: Box<ureq::Error>,
    },
}

/// A client for one coordinator.
#[derive(Clone)]
pub struct CoordinatorClient {
    base: String,
    agent: ureq::Agent,
    attempts: u32,
    first_backoff: Duration,
}

impl CoordinatorClient {
    /// A client for `url` (e.g. `http://127.0.0.1:7070`) that tries each request `attempts`
    /// times, doubling a 200 ms pause between tries.
    pub fn new(url: &str, attempts: u32) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        Self {
            base: url.trim_end_matches('/').to_owned(),
            agent,
            attempts: attempts.max(1),
            first_backoff: Duration::from_millis(200),
        }
    }

    /// The coordinator's URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, CoordinatorError> {
        let url = format!("{}{}", self.base, path);
        let mut pause = self.first_backoff;
        let mut attempt = 0;
        let mut response = loop {
            attempt += 1;
            let sent = match (method, body) {
                ("POST", Some(b)) => self.agent.post(&url).send_json(b),
                ("DELETE", _) => self.agent.delete(&url).call(),
                _ => self.agent.get(&url).call(),
            };
            match sent {
                Ok(r) => break r,
                Err(e) if attempt < self.attempts => {
                    tracing::warn!(
                        "coordinator at {} not reachable ({e}); retrying in {pause:?} ({attempt}/{})",
                        self.base,
                        self.attempts
                    );
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    return Err(CoordinatorError::Unreachable {
                        url: self.base.clone(),
                        attempts: attempt,
                        source: Box::new(e),
                    });
                }
            }
        };
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            let message = response
                .body_mut()
                .read_json::<ApiError>()
                .map(|e| e.error)
                .unwrap_or_else(|_| "no explanation given".to_owned());
            return Err(CoordinatorError::Refused {
                what: format!("{method} {path}"),
                status,
                message,
            });
        }
        response
            .body_mut()
            .read_json::<T>()
            .map_err(|e| CoordinatorError::BadAnswer {
                url,
                source: Box::new(e),
            })
    }

    /// `POST /nodes/{node_id}/endpoint`.
    pub fn register_with_coordinator(
        &self,
        node_id: NodeId,
        registration: &RegisterEndpoint,
    ) -> Result<NodeInfo, CoordinatorError> {
        self.call(
            "POST",
            &format!("/nodes/{node_id}/endpoint"),
            Some(registration),
        )
    }

    /// `GET /endpoints`.
    pub fn endpoints(&self) -> Result<Vec<Endpoint>, CoordinatorError> {
        self.call::<(), _>("GET", "/endpoints", None)
    }

    /// `GET /nodes`.
    pub fn nodes(&self) -> Result<Vec<NodeInfo>, CoordinatorError> {
        self.call::<(), _>("GET", "/nodes", None)
    }

    /// `POST /vms`.
    pub fn create_vm(&self, request: &CreateVm) -> Result<Vm, CoordinatorError> {
        self.call("POST", "/vms", Some(request))
    }

    /// `GET /vms/{id}`.
    pub fn vm(&self, id: VmId) -> Result<Vm, CoordinatorError> {
        self.call::<(), _>("GET", &format!("/vms/{id}"), None)
    }
}
