//! The pagemesh coordinator: knows the clusters, where each node's page server listens, and
//! the VMs with the placement of their pages; serves all of it as JSON over HTTP
//! (`docs/coordinator.md`). The wire types are [`pagemesh_api`]'s.
//!
//! | module | what it is |
//! |---|---|
//! | this file | [`app`] (the routes), [`serve`], [`AppState`] |
//! | `routes` | the handlers: `routes/{clusters,nodes,vms}.rs` |
//! | `extract` | `Json` and `Path` extractors that reject with [`AppError`] |
//! | `error` | [`AppError`] and the status and [`pagemesh_api::ApiError`] body of each failure |
//! | `auth` | the bearer token the protected routes take when there is a cluster key |
//! | `openapi` | `GET /openapi.json`, generated from the handlers' annotations and the wire types |
//! | `registry` | the records and the rules for changing them ([`RegistryError`], [`Stored`]) |
//! | `store` | the [`Store`] seam; [`EmbeddedStore`] keeps the registry in memory and, optionally, a JSON file |
//! | [`otlp`] | OpenTelemetry metrics export (OTLP/HTTP) and the request-duration middleware |

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod auth;
mod error;
mod extract;
mod openapi;
pub mod otlp;
mod registry;
mod routes;
mod store;

use std::sync::Arc;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, put};
use tokio::net::TcpListener;

use pagemesh_auth::Keyring;

pub use auth::AuthError;
pub use error::AppError;
pub use registry::{Lease, RegistryError, Stored};
pub use store::{EmbeddedStore, EtcdStore, Store, StoreError};

/// The largest request body the coordinator reads, in bytes; a larger one is answered 413.
/// The largest real body (`POST /vms` with an explicit placement of many ranges) is a few KiB.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// What every handler shares: the store, the cluster key (if any), and the request figures
/// [`otlp`] exports.
#[derive(Clone)]
pub struct AppState {
    store: Arc<dyn Store>,
    keyring: Option<Arc<Keyring>>,
    requests: Arc<otlp::RequestMetrics>,
    leases: Leases,
}

/// How long nodes' leases last, and when a node that stopped renewing is forgotten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leases {
    /// Length of a lease: a node that does not renew within it is down.
    pub ttl: Duration,
    /// A node down this long is forgotten (as if it had left).
    pub forget_after: Duration,
}

impl Default for Leases {
    fn default() -> Self {
        Leases {
            ttl: DEFAULT_LEASE,
            forget_after: DEFAULT_FORGET_AFTER,
        }
    }
}

/// Length of a node's lease unless `--lease-secs` says otherwise.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);
/// How long a down node stays listed unless `--forget-after-secs` says otherwise.
pub const DEFAULT_FORGET_AFTER: Duration = Duration::from_secs(600);

impl AppState {
    /// State kept in `store`.
    pub fn new(store: impl Store + 'static) -> Self {
        AppState {
            store: Arc::new(store),
            keyring: None,
            requests: Arc::default(),
            leases: Leases::default(),
        }
    }

    /// Grants leases of `leases.ttl` and forgets nodes down for `leases.forget_after`.
    pub fn with_leases(mut self, leases: Leases) -> Self {
        self.leases = leases;
        self
    }

    /// A lease granted now.
    fn lease(&self) -> Lease {
        Lease {
            now_ms: now_ms(),
            ttl_ms: u64::try_from(self.leases.ttl.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// Requires a bearer token made from a key of `keyring` on every route but `GET /healthz`
    /// and `GET /openapi.json` (`docs/coordinator.md`, "Authentication").
    pub fn with_keyring(mut self, keyring: Keyring) -> Self {
        self.keyring = Some(Arc::new(keyring));
        self
    }

    /// Whether requests must carry the cluster's bearer token.
    pub fn is_keyed(&self) -> bool {
        self.keyring.is_some()
    }

    /// State kept in memory only.
    pub fn in_memory() -> Self {
        AppState::new(EmbeddedStore::in_memory())
    }
}

/// The coordinator's HTTP API. Every failure, including a malformed body, an oversized one, a
/// missing token and an unknown route, is answered with an [`pagemesh_api::ApiError`] body.
pub fn app(state: AppState) -> Router {
    let guard = auth::Guard {
        keyring: state.keyring.clone(),
        metrics: state.requests.clone(),
    };
    // `route_layer`: the token is checked only on a route that matched, so an unknown path is
    // a 404 with or without it, and the check runs before any extractor reads the body.
    let protected = Router::new()
        .route("/clusters", post(routes::clusters::create))
        .route("/clusters/{name}", get(routes::clusters::get))
        .route("/nodes", get(routes::nodes::list))
        .route(
            "/nodes/{node_id}",
            get(routes::nodes::get).delete(routes::nodes::deregister),
        )
        .route("/nodes/{node_id}/endpoint", post(routes::nodes::register))
        .route("/nodes/{node_id}/lease", put(routes::nodes::renew))
        .route("/endpoints", get(routes::nodes::endpoints))
        .route("/vms", get(routes::vms::list).post(routes::vms::create))
        .route(
            "/vms/{vm_id}",
            get(routes::vms::get).delete(routes::vms::delete),
        )
        .route("/vms/{vm_id}/repair", put(routes::vms::repair))
        .route_layer(axum::middleware::from_fn_with_state(
            guard,
            auth::require_token,
        ));
    let document = Arc::new(openapi::document(state.is_keyed()));
    Router::new()
        .route("/healthz", get(routes::healthz))
        .route(
            "/openapi.json",
            get(move || openapi::serve(Arc::clone(&document))),
        )
        .merge(protected)
        .fallback(routes::no_route)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            state.requests.clone(),
            otlp::track,
        ))
        .with_state(state)
}

/// Serves [`app`] on `listener` until `shutdown` completes, then lets requests in flight
/// finish and returns.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let watch = tokio::spawn(watch_leases(state.clone()));
    // The peer's address, for the log line of a refused request.
    let served = axum::serve(
        listener,
        app(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await;
    watch.abort();
    served
}

/// Every few seconds: logs each node whose lease has run out (once, until it is up again)
/// and forgets those down for [`Leases::forget_after`].
async fn watch_leases(state: AppState) {
    let every = (state.leases.ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let after_ms = u64::try_from(state.leases.forget_after.as_millis()).unwrap_or(u64::MAX);
    let mut down = std::collections::BTreeSet::new();
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let now = now_ms();
        let nodes = match state.store.nodes() {
            Ok(nodes) => nodes,
            Err(e) => {
                tracing::warn!("cannot read the nodes to check their leases: {e}");
                continue;
            }
        };
        for n in &nodes {
            if n.lease_current(now) {
                if down.remove(&n.node_id) {
                    tracing::info!(node = n.node_id, "node is up again (it renewed its lease)");
                }
            } else if down.insert(n.node_id) {
                tracing::warn!(
                    node = n.node_id,
                    role = %n.role,
                    address = %n.endpoint.address,
                    "node is down: its lease ran out {} ms ago",
                    now - n.lease_expires_ms
                );
                if n.role.serves_memory() {
                    retire(&state, n.node_id);
                }
            }
        }
        match state.store.forget_down(now, after_ms) {
            Ok(gone) => {
                for n in gone {
                    down.remove(&n.node_id);
                    tracing::info!(
                        node = n.node_id,
                        "forgot node: down for {} s",
                        state.leases.forget_after.as_secs()
                    );
                }
            }
            Err(e) => tracing::warn!("cannot forget nodes that are down: {e}"),
        }
    }
}

/// Memory node `node` is down: the VMs with copies on it retire it, and their surviving
/// memory nodes (which read `GET /vms`) make its copies again. A node that comes back up
/// stays retired for those VMs: its copies may be stale.
fn retire(state: &AppState, node: pagemesh_api::NodeId) {
    match state.store.retire(node) {
        Ok(vms) => {
            for vm in vms {
                let survivors = vm.survivors();
                if survivors.len() < vm.replicas as usize {
                    tracing::warn!(
                        vm = vm.id,
                        node,
                        ?survivors,
                        "VM lost a memory node and has fewer left than its {} copies; the \
                         survivors copy what they can",
                        vm.replicas
                    );
                } else {
                    tracing::warn!(
                        vm = vm.id,
                        node,
                        ?survivors,
                        "VM lost a memory node; repairing its {} copies on the survivors",
                        vm.replicas
                    );
                }
            }
        }
        Err(e) => tracing::warn!(node, "cannot retire a node that is down: {e}"),
    }
}

/// Milliseconds since the Unix epoch; 0 if the clock is before it.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::path::PathBuf;

    use axum::body::Body;
    use axum::http::{Request, StatusCode, header};
    use http_body_util::BodyExt;
    use serde::de::DeserializeOwned;
    use serde_json::{Value, json};
    use tower::ServiceExt;

    use pagemesh_api::{ApiError, Cluster, NodeInfo, Vm};

    use super::*;

    /// An app with an empty in-memory store.
    pub(crate) fn test_app() -> Router {
        app(AppState::in_memory())
    }

    /// Sends one request, with `body` as JSON when given; the status and the body as text.
    pub(crate) async fn call(
        app: &Router,
        method: &str,
        uri: &str,
        body: Option<Value>,
    ) -> (StatusCode, String) {
        let request = Request::builder().method(method).uri(uri);
        let request = match body {
            Some(json) => request
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(json.to_string())),
            None => request.body(Body::empty()),
        };
        send(app, request.unwrap()).await
    }

    /// Sends `request` as is.
    pub(crate) async fn send(app: &Router, request: Request<Body>) -> (StatusCode, String) {
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    /// `body` as a `T`, or a panic showing it.
    pub(crate) fn parse<T: DeserializeOwned>(body: &str) -> T {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
    }

    /// The message of an [`ApiError`] body; panics if `body` is not one.
    pub(crate) fn api_error(body: &str) -> String {
        parse::<ApiError>(body).error
    }

    /// Registers node `id` with `role` and `capacity_bytes` at 127.0.0.1:(7000 + id).
    pub(crate) async fn register(app: &Router, id: u32, role: &str, capacity_bytes: u64) {
        let body = json!({
            "transport": "tcp",
            "address": format!("127.0.0.1:{}", 7000 + id),
            "role": role,
            "capacity_bytes": capacity_bytes,
        });
        let (status, reply) = call(app, "POST", &format!("/nodes/{id}/endpoint"), Some(body)).await;
        assert!(status.is_success(), "{status}: {reply}");
    }

    /// A path in the temporary directory, unique to this process and `name`; removed first.
    pub(crate) fn temp_state(name: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "pagemesh-coordinator-{}-{name}.json",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        path
    }

    fn raw_post(uri: &str, content_type: Option<&str>, body: &str) -> Request<Body> {
        let mut request = Request::builder().method("POST").uri(uri);
        if let Some(content_type) = content_type {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        request.body(Body::from(body.to_owned())).unwrap()
    }

    #[tokio::test]
    async fn malformed_bodies_answer_api_errors() {
        let app = test_app();
        let json = Some("application/json");
        let cases = [
            (
                raw_post("/clusters", json, "{\"name\": "),
                StatusCode::BAD_REQUEST,
                "Failed to parse the request body as JSON",
            ),
            (
                raw_post("/clusters", None, r#"{"name":"a","nodes":1,"memory_mb":1}"#),
                StatusCode::BAD_REQUEST,
                "Expected request with `Content-Type: application/json`",
            ),
            (
                raw_post("/clusters", Some("text/plain"), "{}"),
                StatusCode::BAD_REQUEST,
                "Expected request with `Content-Type: application/json`",
            ),
            (
                raw_post("/clusters", json, r#"{"name":"a"}"#),
                StatusCode::UNPROCESSABLE_ENTITY,
                "missing field `nodes`",
            ),
            (
                raw_post("/nodes/1/endpoint", json, r#"{"transport":"udp"}"#),
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown variant `udp`",
            ),
            (
                raw_post("/vms", json, r#"{"compute_node":1,"mem_bytes":-1}"#),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid value",
            ),
        ];
        for (request, status, message) in cases {
            let (got, body) = send(&app, request).await;
            assert_eq!(got, status, "{body}");
            let error = api_error(&body);
            assert!(error.contains(message), "{error:?} lacks {message:?}");
        }
    }

    #[tokio::test]
    async fn state_survives_a_restart() {
        let path = temp_state("restart");
        let app1 = app(AppState::new(EmbeddedStore::open(&path).unwrap()));
        let cluster = json!({"name": "demo", "nodes": 2, "memory_mb": 64});
        call(&app1, "POST", "/clusters", Some(cluster)).await;
        let node = json!({
            "transport": "tcp", "address": "127.0.0.1:7001", "role": "both", "cluster": "demo",
        });
        call(&app1, "POST", "/nodes/1/endpoint", Some(node)).await;
        let memory = json!({
            "transport": "tcp", "address": "127.0.0.1:7002", "role": "memory", "cluster": "demo",
        });
        call(&app1, "POST", "/nodes/2/endpoint", Some(memory)).await;
        let vm =
            json!({"compute_node": 1, "mem_bytes": 8192, "placement": {"policy": "interleave"}});
        let (status, _) = call(&app1, "POST", "/vms", Some(vm.clone())).await;
        assert_eq!(status, StatusCode::CREATED);
        let snapshot = |app: Router| async move {
            let (_, cluster) = call(&app, "GET", "/clusters/demo", None).await;
            let (_, nodes) = call(&app, "GET", "/nodes", None).await;
            let (_, vms) = call(&app, "GET", "/vms", None).await;
            (
                parse::<Cluster>(&cluster),
                parse::<Vec<NodeInfo>>(&nodes),
                parse::<Vec<Vm>>(&vms),
            )
        };
        let before = snapshot(app1.clone()).await;
        assert_eq!(before.0.registered, [1, 2]);
        drop(app1);

        let app2 = app(AppState::new(EmbeddedStore::open(&path).unwrap()));
        assert_eq!(snapshot(app2.clone()).await, before);
        let (_, reply) = call(&app2, "POST", "/vms", Some(vm)).await;
        assert_eq!(parse::<Vm>(&reply).id, 2);
        std::fs::remove_file(&path).unwrap();
    }

    #[tokio::test]
    async fn a_corrupt_state_file_is_a_startup_error() {
        let path = temp_state("corrupt-start");
        std::fs::write(&path, "{\"format\": 1, \"clusters\": [").unwrap();
        let err = EmbeddedStore::open(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "state file {} is not valid coordinator state; repair it or move it away",
                path.display()
            )
        );
        std::fs::remove_file(&path).unwrap();
    }

    /// One request over a real socket, as raw HTTP/1.1, then a graceful shutdown.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_http_on_a_socket_and_shuts_down() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, AppState::in_memory(), async {
            let _ = stopped.await;
        }));

        let answer = tokio::task::spawn_blocking(move || {
            let mut stream = std::net::TcpStream::connect(addr).unwrap();
            let body = r#"{"name":"sock","nodes":1,"memory_mb":8}"#;
            write!(
                stream,
                "POST /clusters HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).unwrap();
            answer
        })
        .await
        .unwrap();
        assert!(answer.starts_with("HTTP/1.1 201 Created\r\n"), "{answer}");
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("content-type: application/json")
        );
        let (_, body) = answer.split_once("\r\n\r\n").unwrap();
        assert_eq!(
            parse::<Cluster>(body),
            Cluster {
                name: "sock".into(),
                nodes: 1,
                memory_mb: 8,
                registered: vec![],
            }
        );

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
