//! The coordinator client: register this node's endpoint, discover peers, create and look
//! up VMs, leave the cluster.
//!
//! Blocking HTTP (ureq): it runs at start-up, on `Load` requests and at exit, never on the
//! fault path. The start-up flow is the one of the original design note:
//!
//! ```text
//! register_with_coordinator    POST /nodes/{id}/endpoint
//! renew_lease                  PUT /nodes/{id}/lease, every third of the lease (lease.rs)
//! endpoints                    GET /endpoints (peers.rs connects to each peer)
//! ...
//! deregister                   DELETE /nodes/{id}?address=...   (the run is over)
//! ```
//!
//! An unreachable coordinator is retried with exponential backoff a bounded number of times,
//! then reported with its URL. Only requests that are safe to repeat are retried: a request
//! whose answer was lost may have been carried out. Reads, the registration (the same
//! endpoint again is a refresh) and `POST /vms` with an idempotency key (the coordinator
//! answers a key it has seen with the VM that key created) are.

use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pagemesh_api::{
    ApiError, CreateVm, Endpoint, IDEMPOTENCY_KEY, NodeId, NodeInfo, RegisterEndpoint, RenewLease,
    RepairReport, Vm, VmId,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use ureq::Body;
use ureq::http::Response;

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

/// A client for a cluster's coordinators: one URL, or several (coordinators sharing an
/// etcd store) tried in turn, the one that last answered first.
#[derive(Clone)]
pub struct CoordinatorClient {
    bases: Arc<[String]>,
    /// The index in `bases` of the coordinator that last answered (shared by clones: the
    /// lease keeper's failover is the service's too).
    current: Arc<AtomicUsize>,
    agent: ureq::Agent,
    attempts: u32,
    first_backoff: Duration,
    /// `Authorization` of every request, when the cluster has a key.
    authorization: Option<String>,
}

impl CoordinatorClient {
    /// A client for `url` (e.g. `http://127.0.0.1:7070`, or several comma-separated) that
    /// tries each request `attempts` times, doubling a 200 ms pause between tries; each try
    /// goes to every coordinator in turn until one answers.
    pub fn new(url: &str, attempts: u32) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        Self {
            bases: Some(
                url.split(',')
                    .map(|u| u.trim().trim_end_matches('/').to_owned())
                    .filter(|u| !u.is_empty())
                    .collect::<Vec<_>>(),
            )
            .filter(|b| !b.is_empty())
            // Nothing but commas: the request fails naming it.
            .unwrap_or_else(|| vec![url.to_owned()])
            .into(),
            current: Arc::default(),
            agent,
            attempts: attempts.max(1),
            first_backoff: Duration::from_millis(200),
            authorization: None,
        }
    }

    /// Sends `keyring`'s coordinator token with every request, as a keyed coordinator
    /// requires (`docs/coordinator.md`, "Authentication").
    pub fn with_keyring(mut self, keyring: &pagemesh_auth::Keyring) -> Self {
        self.authorization = Some(format!("Bearer {}", keyring.coordinator_token()));
        self
    }

    /// The same client, trying each request `attempts` times, each within `timeout`.
    pub fn with_patience(mut self, attempts: u32, timeout: Duration) -> Self {
        self.attempts = attempts.max(1);
        self.agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .build()
            .into();
        self
    }

    /// `request` with the token, if there is one.
    fn authorize<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.authorization {
            Some(value) => request.header("authorization", value),
            None => request,
        }
    }

    /// The URL of the coordinator that last answered (the first one before any did).
    pub fn url(&self) -> &str {
        let at = self.current.load(Ordering::Relaxed);
        self.bases
            .get(at)
            .or(self.bases.first())
            .map_or("", String::as_str)
    }

    /// Every coordinator's URL, comma-separated.
    fn urls(&self) -> String {
        self.bases.join(",")
    }

    /// `method path` with `body` as JSON, retried while the coordinator cannot be reached;
    /// the answer as a `T`.
    fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, CoordinatorError> {
        let response = self.send(method, path, self.attempts, |url| match (method, body) {
            ("POST", Some(b)) => self.authorize(self.agent.post(url)).send_json(b),
            _ => self.authorize(self.agent.get(url)).call(),
        })?;
        read_json(format!("{}{path}", self.url()), response)
    }

    /// Sends what `request` sends to `{coordinator}{path}` (the URL it is given), up to
    /// `attempts` rounds while no coordinator can be reached, doubling a pause between
    /// rounds; each round tries every coordinator in turn from the one that last answered,
    /// and passes over one that answers 503 (its store failed) while another is left. A
    /// non-2xx answer is an error. `request` must be safe to repeat (see the module's
    /// documentation).
    fn send(
        &self,
        method: &str,
        path: &str,
        attempts: u32,
        request: impl Fn(&str) -> Result<Response<Body>, ureq::Error>,
    ) -> Result<Response<Body>, CoordinatorError> {
        let mut pause = self.first_backoff;
        let mut attempt = 0;
        let n = self.bases.len().max(1);
        let mut response = 'found: loop {
            attempt += 1;
            let first = self.current.load(Ordering::Relaxed);
            let mut last = None;
            let mut unavailable = None;
            for k in 0..n {
                let at = (first + k) % n;
                let Some(base) = self.bases.get(at) else {
                    break;
                };
                match request(&format!("{base}{path}")) {
                    Ok(r) if r.status().as_u16() == 503 && k + 1 < n => {
                        tracing::warn!(
                            "coordinator at {base} cannot serve {method} {path} (HTTP 503); trying the next"
                        );
                        unavailable.get_or_insert(r);
                    }
                    Ok(r) => {
                        if at != first {
                            tracing::info!("coordinator at {base} answers; using it");
                        }
                        self.current.store(at, Ordering::Relaxed);
                        break 'found r;
                    }
                    Err(e) => {
                        if n > 1 {
                            tracing::warn!("coordinator at {base} not reachable ({e})");
                        }
                        last = Some(e);
                    }
                }
            }
            if let Some(r) = unavailable {
                break r;
            }
            let e = last.expect("every coordinator failed");
            if attempt < attempts {
                tracing::warn!(
                    "coordinator at {} not reachable ({e}); retrying in {pause:?} ({attempt}/{attempts})",
                    self.urls(),
                );
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(5));
            } else {
                return Err(CoordinatorError::Unreachable {
                    url: self.urls(),
                    attempts: attempt,
                    source: Box::new(e),
                });
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
        Ok(response)
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

    /// `PUT /nodes/{node_id}/lease`: this node, whose page server is at `address`, is alive.
    pub fn renew_lease(
        &self,
        node_id: NodeId,
        address: &str,
    ) -> Result<NodeInfo, CoordinatorError> {
        let path = format!("/nodes/{node_id}/lease");
        let body = RenewLease {
            address: address.to_owned(),
        };
        let response = self.send("PUT", &path, self.attempts, |url| {
            self.authorize(self.agent.put(url)).send_json(&body)
        })?;
        read_json(format!("{}{path}", self.url()), response)
    }

    /// `DELETE /nodes/{node_id}?address=...`: this node, whose page server is at `address`,
    /// leaves the cluster. A node the coordinator does not know has nothing to leave.
    ///
    /// Tried once, within two seconds: a node that stops does not wait for a coordinator
    /// that is gone.
    pub fn deregister(&self, node_id: NodeId, address: &str) -> Result<(), CoordinatorError> {
        let path = format!("/nodes/{node_id}");
        let sent = self.send("DELETE", &path, 1, |url| {
            self.authorize(self.agent.delete(url))
                .query("address", address)
                .config()
                .timeout_global(Some(Duration::from_secs(2)))
                .build()
                .call()
        });
        match sent {
            Err(CoordinatorError::Refused { status: 404, .. }) => {
                tracing::debug!("the coordinator did not know node {node_id}");
                Ok(())
            }
            sent => sent.map(drop),
        }
    }

    /// `GET /endpoints`.
    pub fn endpoints(&self) -> Result<Vec<Endpoint>, CoordinatorError> {
        self.call::<(), _>("GET", "/endpoints", None)
    }

    /// `GET /nodes`.
    pub fn nodes(&self) -> Result<Vec<NodeInfo>, CoordinatorError> {
        self.call::<(), _>("GET", "/nodes", None)
    }

    /// `POST /vms`, with an idempotency key of its own that every retry repeats, so that a
    /// retry after a lost answer gets the VM the first try created rather than a second one.
    pub fn create_vm(&self, request: &CreateVm) -> Result<Vm, CoordinatorError> {
        let key = idempotency_key();
        let response = self.send("POST", "/vms", self.attempts, |url| {
            self.authorize(self.agent.post(url))
                .header(IDEMPOTENCY_KEY, &key)
                .send_json(request)
        })?;
        read_json(format!("{}/vms", self.url()), response)
    }

    /// `DELETE /vms/{id}`: the run is over and its pages released. A VM the coordinator does
    /// not know is as good as deleted. Tried once, within two seconds, like
    /// [`CoordinatorClient::deregister`].
    pub fn delete_vm(&self, id: VmId) -> Result<(), CoordinatorError> {
        let path = format!("/vms/{id}");
        let sent = self.send("DELETE", &path, 1, |url| {
            self.authorize(self.agent.delete(url))
                .config()
                .timeout_global(Some(Duration::from_secs(2)))
                .build()
                .call()
        });
        match sent {
            Err(CoordinatorError::Refused { status: 404, .. }) => Ok(()),
            sent => sent.map(drop),
        }
    }

    /// `GET /vms/{id}`.
    pub fn vm(&self, id: VmId) -> Result<Vm, CoordinatorError> {
        self.call::<(), _>("GET", &format!("/vms/{id}"), None)
    }

    /// `GET /vms`.
    pub fn vms(&self) -> Result<Vec<Vm>, CoordinatorError> {
        self.call::<(), _>("GET", "/vms", None)
    }

    /// `PUT /vms/{id}/repair`: this memory node's progress in repairing VM `id`. Safe to
    /// repeat (the last report stands).
    pub fn report_repair(&self, id: VmId, report: &RepairReport) -> Result<Vm, CoordinatorError> {
        let path = format!("/vms/{id}/repair");
        let response = self.send("PUT", &path, self.attempts, |url| {
            self.authorize(self.agent.put(url)).send_json(report)
        })?;
        read_json(format!("{}{path}", self.url()), response)
    }
}

/// The body of a 2xx answer from `url` as a `T`.
fn read_json<T: DeserializeOwned>(
    url: String,
    mut response: Response<Body>,
) -> Result<T, CoordinatorError> {
    response
        .body_mut()
        .read_json::<T>()
        .map_err(|e| CoordinatorError::BadAnswer {
            url,
            source: Box::new(e),
        })
}

/// A fresh idempotency key: 128 bits as 32 hex digits.
///
/// Keys must be unique, not secret. Each `RandomState` hashes with other keys (random per
/// thread, from the OS, then stepped), so two keys, of this process or another, differ but
/// with negligible probability; the time and the process id are mixed in for good measure.
fn idempotency_key() -> String {
    let word = || {
        let mut hasher = RandomState::new().build_hasher();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        hasher.write_u128(now);
        hasher.write_u32(std::process::id());
        hasher.finish()
    };
    format!("{:016x}{:016x}", word(), word())
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::sync::mpsc;

    use pagemesh_api::{Content, Placement, PlacementRequest};

    use super::*;

    /// What the fake coordinator saw of one request.
    #[derive(Debug)]
    struct Seen {
        line: String,
        key: Option<String>,
    }

    /// A fake coordinator answering the requests it accepts, in turn, with `answers`: a status
    /// line and a body, or `None` to close the connection without an answer (a lost reply).
    fn coordinator(answers: Vec<Option<(&'static str, String)>>) -> (String, mpsc::Receiver<Seen>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for (answer, stream) in answers.into_iter().zip(listener.incoming()) {
                let mut stream = stream.unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let (mut key, mut length) = (None, 0);
                loop {
                    let mut header = String::new();
                    reader.read_line(&mut header).unwrap();
                    let Some((name, value)) = header.trim_end().split_once(": ") else {
                        break;
                    };
                    match name.to_ascii_lowercase().as_str() {
                        IDEMPOTENCY_KEY => key = Some(value.to_owned()),
                        "content-length" => length = value.parse().unwrap(),
                        _ => {}
                    }
                }
                reader.read_exact(&mut vec![0; length]).unwrap();
                let line = line.trim_end().to_owned();
                tx.send(Seen { line, key }).unwrap();
                if let Some((status, body)) = answer {
                    write!(
                        stream,
                        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .unwrap();
                }
            }
        });
        (url, rx)
    }

    fn client(url: &str) -> CoordinatorClient {
        let mut client = CoordinatorClient::new(url, 3);
        client.first_backoff = Duration::from_millis(10);
        client
    }

    fn vm() -> Vm {
        Vm {
            id: 4,
            compute_node: 0,
            mem_bytes: 8192,
            placement: Placement::interleave(vec![1], 1, 2).unwrap(),
            content: Content::Zero,
            local_memory_bytes: None,
            replicas: 1,
            retired: Vec::new(),
            repairs: Vec::new(),
        }
    }

    fn create_vm() -> CreateVm {
        CreateVm {
            compute_node: 0,
            mem_bytes: 8192,
            placement: PlacementRequest::Weighted { nodes: vec![] },
            content: Content::Zero,
            local_memory_bytes: None,
            replicas: 1,
        }
    }

    #[test]
    fn a_vm_request_whose_answer_is_lost_is_retried_with_its_key() {
        let created = serde_json::to_string(&vm()).unwrap();
        let (url, seen) = coordinator(vec![None, Some(("201 Created", created))]);
        let got = client(&url).create_vm(&create_vm()).unwrap();
        assert_eq!(got, vm());
        let seen: Vec<Seen> = seen.try_iter().collect();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(
            seen.iter().all(|s| s.line == "POST /vms HTTP/1.1"),
            "{seen:?}"
        );
        let key = seen[0].key.as_deref().expect("a key");
        assert_eq!(key.len(), 32);
        assert!(key.bytes().all(|b| b.is_ascii_hexdigit()), "{key}");
        assert_eq!(
            seen[1].key.as_deref(),
            Some(key),
            "the retry repeats the key"
        );
    }

    #[test]
    fn each_vm_request_has_a_key_of_its_own() {
        let created = serde_json::to_string(&vm()).unwrap();
        let answer = || Some(("201 Created", created.clone()));
        let (url, seen) = coordinator(vec![answer(), answer()]);
        let client = client(&url);
        client.create_vm(&create_vm()).unwrap();
        client.create_vm(&create_vm()).unwrap();
        let keys: Vec<String> = seen.try_iter().filter_map(|s| s.key).collect();
        assert_eq!(keys.len(), 2);
        assert_ne!(keys[0], keys[1]);
    }

    #[test]
    fn leaving_names_the_address_and_a_forgotten_node_has_left() {
        let refused = r#"{"error":"node 3 is registered at tcp://h:2, not at h:1"}"#.to_owned();
        let (url, seen) = coordinator(vec![
            Some(("204 No Content", String::new())),
            Some(("404 Not Found", r#"{"error":"unknown node 3"}"#.into())),
            Some(("409 Conflict", refused)),
        ]);
        let client = client(&url);
        client.deregister(3, "h:1").unwrap();
        client.deregister(3, "h:1").unwrap();
        let err = client.deregister(3, "h:1").unwrap_err();
        assert_eq!(
            err.to_string(),
            "the coordinator refused DELETE /nodes/3: node 3 is registered at tcp://h:2, not at \
             h:1 (HTTP 409)"
        );
        let lines: Vec<String> = seen.try_iter().map(|s| s.line).collect();
        assert_eq!(lines, ["DELETE /nodes/3?address=h%3A1 HTTP/1.1"; 3]);
    }

    #[test]
    fn with_several_coordinators_a_dead_one_or_one_without_its_store_is_passed_over() {
        let dead = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let created = serde_json::to_string(&vm()).unwrap();
        let busy = r#"{"error":"etcd at http://e:2379: cannot write the registry"}"#.to_owned();
        let (busy_url, _) = coordinator(vec![Some(("503 Service Unavailable", busy))]);
        let (live, seen) = coordinator(vec![
            Some(("201 Created", created.clone())),
            Some(("201 Created", created)),
        ]);
        let several = client(&format!("http://{dead},{busy_url},{live}"));
        assert_eq!(several.url(), format!("http://{dead}"));
        assert_eq!(several.create_vm(&create_vm()).unwrap(), vm());
        assert_eq!(several.url(), live, "the one that answered comes first now");
        several.create_vm(&create_vm()).unwrap();
        assert_eq!(seen.try_iter().count(), 2);
        // None answers: the error names them all.
        let err = client(&format!("http://{dead},http://{dead}"))
            .deregister(3, "h:1")
            .unwrap_err();
        assert!(
            err.to_string().starts_with(&format!(
                "cannot reach the coordinator at http://{dead},http://{dead}"
            )),
            "{err}"
        );
    }

    #[test]
    fn leaving_is_tried_once() {
        // Bound and dropped: nothing listens there now.
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = client(&format!("http://{addr}"))
            .deregister(3, "h:1")
            .unwrap_err();
        assert!(
            matches!(err, CoordinatorError::Unreachable { attempts: 1, .. }),
            "{err:?}"
        );
    }
}
