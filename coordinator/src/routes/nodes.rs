//! `/nodes` and `/endpoints`: where each node's page server listens, and what the node does.

use axum::extract::State;
use axum::http::StatusCode;

use pagemesh_api::{Endpoint, NodeId, NodeInfo, RegisterEndpoint, RenewLease};

use pagemesh_api::ApiError;

use super::created_or_ok;
use crate::error::AppError;
use crate::extract::{AppJson, AppPath, AppQuery};
use crate::{AppState, now_ms};

/// `POST /nodes/{node_id}/endpoint`: 201 for a new node, 200 for a known one.
#[utoipa::path(
    post,
    path = "/nodes/{node_id}/endpoint",
    params(("node_id" = u32, Path, description = "Node id", example = 1)),
    request_body = RegisterEndpoint,
    responses(
        (status = 201, description = "A new node", body = NodeInfo),
        (status = 200, description = "A known node, refreshed", body = NodeInfo),
        (status = "default", description = "Any failure, with what to do where it helps", body = ApiError)
    )
)]
pub(crate) async fn register(
    State(state): State<AppState>,
    AppPath(id): AppPath<NodeId>,
    AppJson(req): AppJson<RegisterEndpoint>,
) -> Result<(StatusCode, AppJson<NodeInfo>), AppError> {
    let stored = state.store.register_endpoint(id, req, state.lease())?;
    let node = stored.value;
    tracing::info!(
        node = node.node_id,
        role = %node.role,
        transport = ?node.endpoint.transport,
        address = %node.endpoint.address,
        capacity_bytes = node.capacity_bytes,
        cluster = node.cluster.as_deref().unwrap_or("-"),
        new = stored.created,
        "registered node endpoint"
    );
    Ok((created_or_ok(stored.created), AppJson(node)))
}

/// `GET /nodes`, sorted by id.
#[utoipa::path(
    get,
    path = "/nodes",
    responses(
        (status = 200, description = "Every registered node, by id", body = Vec<NodeInfo>),
        (status = "default", description = "Any failure, with what to do where it helps", body = ApiError)
    )
)]
pub(crate) async fn list(
    State(state): State<AppState>,
) -> Result<AppJson<Vec<NodeInfo>>, AppError> {
    Ok(AppJson(as_of_now(state.store.nodes()?)))
}

/// `GET /nodes/{node_id}`.
#[utoipa::path(
    get,
    path = "/nodes/{node_id}",
    params(("node_id" = u32, Path, description = "Node id", example = 1)),
    responses(
        (status = 200, description = "The node", body = NodeInfo),
        (status = "default", description = "Any failure, with what to do where it helps", body = ApiError)
    )
)]
pub(crate) async fn get(
    State(state): State<AppState>,
    AppPath(id): AppPath<NodeId>,
) -> Result<AppJson<NodeInfo>, AppError> {
    let node = as_of_now(vec![state.store.node(id)?]);
    Ok(AppJson(
        node.into_iter().next().expect("one node in, one out"),
    ))
}

/// `PUT /nodes/{node_id}/lease`: 200 with the renewed lease; 404 for a node the coordinator
/// does not know (it forgot it, or it restarted without its state): register again.
#[utoipa::path(
    put,
    path = "/nodes/{node_id}/lease",
    params(("node_id" = u32, Path, description = "Node id", example = 1)),
    request_body = RenewLease,
    responses(
        (status = 200, description = "The lease, renewed", body = NodeInfo),
        (status = "default", description = "Any failure, with what to do where it helps", body = ApiError)
    )
)]
pub(crate) async fn renew(
    State(state): State<AppState>,
    AppPath(id): AppPath<NodeId>,
    AppJson(req): AppJson<RenewLease>,
) -> Result<AppJson<NodeInfo>, AppError> {
    // A node that was down is up again with this; the lease watch logs it.
    Ok(AppJson(state.store.renew_lease(
        id,
        &req.address,
        state.lease(),
    )?))
}

/// The query of `DELETE /nodes/{node_id}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Leave {
    /// Remove the node only if it is registered at this page-server address.
    address: Option<String>,
}

/// `DELETE /nodes/{node_id}[?address=host:port]`: the node left the cluster; 204.
#[utoipa::path(
    delete,
    path = "/nodes/{node_id}",
    params(
        ("node_id" = u32, Path, description = "Node id", example = 1),
        ("address" = Option<String>, Query, description = "Remove the node only if it is registered at this page-server address")
    ),
    responses(
        (status = 204, description = "The node left the cluster"),
        (status = "default", description = "Any failure, with what to do where it helps", body = ApiError)
    )
)]
pub(crate) async fn deregister(
    State(state): State<AppState>,
    AppPath(id): AppPath<NodeId>,
    AppQuery(leave): AppQuery<Leave>,
) -> Result<StatusCode, AppError> {
    let node = state.store.deregister(id, leave.address.as_deref())?;
    tracing::info!(
        node = node.node_id,
        role = %node.role,
        address = %node.endpoint.address,
        cluster = node.cluster.as_deref().unwrap_or("-"),
        "node left the cluster"
    );
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /endpoints`, sorted by node id.
#[utoipa::path(
    get,
    path = "/endpoints",
    responses(
        (status = 200, description = "Every page server, by node id", body = Vec<Endpoint>),
        (status = "default", description = "Any failure, with what to do where it helps", body = ApiError)
    )
)]
pub(crate) async fn endpoints(
    State(state): State<AppState>,
) -> Result<AppJson<Vec<Endpoint>>, AppError> {
    let nodes = as_of_now(state.store.nodes()?);
    Ok(AppJson(
        nodes
            .into_iter()
            .filter(|n| n.up)
            .map(|n| n.endpoint)
            .collect(),
    ))
}

/// `nodes` as of now: each one `up` if its lease is current.
fn as_of_now(mut nodes: Vec<NodeInfo>) -> Vec<NodeInfo> {
    let now = now_ms();
    for n in &mut nodes {
        n.up = n.lease_current(now);
    }
    nodes
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use serde_json::json;

    use pagemesh_api::{Cluster, Endpoint, NodeInfo, Role, TransportKind};

    use crate::tests::{api_error, call, parse, register, test_app};

    #[tokio::test]
    async fn register_new_then_same_endpoint_refreshes() {
        let app = test_app();
        let body = json!({"transport": "tcp", "address": "127.0.0.1:7001", "role": "memory"});
        let (status, reply) = call(&app, "POST", "/nodes/1/endpoint", Some(body)).await;
        assert_eq!(status, StatusCode::CREATED);
        let first: NodeInfo = parse(&reply);
        assert_eq!(first.node_id, 1);
        assert_eq!(first.role, Role::Memory);
        assert_eq!(first.capacity_bytes, 0);
        assert_eq!(
            first.endpoint,
            Endpoint {
                node_id: 1,
                transport: TransportKind::Tcp,
                address: "127.0.0.1:7001".into(),
                rdma: None,
            }
        );
        assert!(first.registered_at_ms > 0);

        let again = json!({
            "transport": "tcp", "address": "127.0.0.1:7001", "role": "both",
            "capacity_bytes": 4096,
        });
        let (status, reply) = call(&app, "POST", "/nodes/1/endpoint", Some(again)).await;
        assert_eq!(status, StatusCode::OK);
        let second: NodeInfo = parse(&reply);
        assert_eq!(second.role, Role::Both);
        assert_eq!(second.capacity_bytes, 4096);
        assert!(second.registered_at_ms >= first.registered_at_ms);

        let (status, reply) = call(&app, "GET", "/nodes/1", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(parse::<NodeInfo>(&reply), second);
    }

    #[tokio::test]
    async fn conflicting_endpoint_needs_replace() {
        let app = test_app();
        register(&app, 2, "memory", 0).await;
        let other = json!({"transport": "tcp", "address": "10.0.0.9:7002", "role": "memory"});
        let (status, reply) = call(&app, "POST", "/nodes/2/endpoint", Some(other)).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(
            api_error(&reply),
            "node 2 is already registered at tcp://127.0.0.1:7002; stop that node, or register \
             with \"replace\": true to take its place"
        );

        let replace = json!({
            "transport": "tcp", "address": "10.0.0.9:7002", "role": "memory", "replace": true,
        });
        let (status, reply) = call(&app, "POST", "/nodes/2/endpoint", Some(replace)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(parse::<NodeInfo>(&reply).endpoint.address, "10.0.0.9:7002");
    }

    #[tokio::test]
    async fn cluster_must_exist_and_lists_its_nodes() {
        let app = test_app();
        let body = json!({
            "transport": "tcp", "address": "127.0.0.1:7001", "role": "memory", "cluster": "c",
        });
        let (status, reply) = call(&app, "POST", "/nodes/1/endpoint", Some(body.clone())).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(api_error(&reply), "unknown cluster 'c'");
        let (_, reply) = call(&app, "GET", "/nodes", None).await;
        assert_eq!(parse::<Vec<NodeInfo>>(&reply), []);

        let cluster = json!({"name": "c", "nodes": 2, "memory_mb": 64});
        call(&app, "POST", "/clusters", Some(cluster)).await;
        let (status, reply) = call(&app, "POST", "/nodes/1/endpoint", Some(body)).await;
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(parse::<NodeInfo>(&reply).cluster.as_deref(), Some("c"));
        let (_, reply) = call(&app, "GET", "/clusters/c", None).await;
        assert_eq!(parse::<Cluster>(&reply).registered, [1]);
    }

    #[tokio::test]
    async fn a_node_that_leaves_is_no_longer_listed() {
        let app = test_app();
        let cluster = json!({"name": "c", "nodes": 2, "memory_mb": 64});
        call(&app, "POST", "/clusters", Some(cluster)).await;
        let body = json!({
            "transport": "tcp", "address": "127.0.0.1:7001", "role": "compute", "cluster": "c",
        });
        call(&app, "POST", "/nodes/1/endpoint", Some(body)).await;
        register(&app, 2, "memory", 0).await;

        // A node that another took the place of cannot remove its successor.
        let (status, reply) = call(&app, "DELETE", "/nodes/1?address=127.0.0.1:7009", None).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(
            api_error(&reply),
            "node 1 is registered at tcp://127.0.0.1:7001, not at 127.0.0.1:7009; another node \
             has taken its place"
        );

        let (status, reply) = call(&app, "DELETE", "/nodes/1?address=127.0.0.1:7001", None).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert_eq!(reply, "");
        let (_, reply) = call(&app, "GET", "/nodes", None).await;
        let ids: Vec<u32> = parse::<Vec<NodeInfo>>(&reply)
            .iter()
            .map(|n| n.node_id)
            .collect();
        assert_eq!(ids, [2]);
        let (_, reply) = call(&app, "GET", "/clusters/c", None).await;
        assert_eq!(parse::<Cluster>(&reply).registered, [] as [u32; 0]);

        let (status, reply) = call(&app, "DELETE", "/nodes/1", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(api_error(&reply), "unknown node 1");
        let (status, reply) = call(&app, "DELETE", "/nodes/2?port=1", None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            api_error(&reply),
            "Failed to deserialize query string: port: unknown field `port`, expected `address`"
        );
        let (status, _) = call(&app, "DELETE", "/nodes/2", None).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (_, reply) = call(&app, "GET", "/endpoints", None).await;
        assert_eq!(parse::<Vec<Endpoint>>(&reply), []);

        // It may come back.
        register(&app, 2, "memory", 0).await;
        let (status, _) = call(&app, "GET", "/nodes/2", None).await;
        assert_eq!(status, StatusCode::OK);
    }

    /// A node's RDMA endpoint is kept and listed as registered, GID in hex; one a peer
    /// could not use is refused saying why.
    #[tokio::test]
    async fn an_rdma_endpoint_is_listed_as_registered_and_a_bad_one_refused() {
        let app = test_app();
        let rdma = json!({
            "gid": "fe800000000000000202c9fffe000001", "lid": 3, "qpn": 17, "psn": 4660,
            "regions": [{"addr": 140_737_488_355_328u64, "len": 1_048_576, "rkey": 99}]
        });
        let body = json!({"transport": "rdma", "address": "127.0.0.1:7001", "role": "memory",
                          "rdma": rdma});
        let (status, _) = call(&app, "POST", "/nodes/1/endpoint", Some(body)).await;
        assert_eq!(status, StatusCode::CREATED);
        let (status, reply) = call(&app, "GET", "/endpoints", None).await;
        assert_eq!(status, StatusCode::OK);
        let listed: serde_json::Value = parse(&reply);
        assert_eq!(listed[0]["rdma"], rdma, "{listed:#}");
        for (field, value, says) in [
            (
                "qpn",
                json!(1 << 24),
                "bad RDMA endpoint: RDMA qpn 0x1000000 does not fit 24 bits",
            ),
            (
                "regions",
                json!([{"addr": 4096, "len": 100, "rkey": 1}]),
                "bad RDMA endpoint: RDMA region 0 (100 bytes at 0x1000) is not whole pages",
            ),
        ] {
            let mut bad = rdma.clone();
            bad[field] = value;
            let body = json!({"transport": "rdma", "address": "127.0.0.1:7002",
                              "role": "memory", "rdma": bad});
            let (status, reply) = call(&app, "POST", "/nodes/2/endpoint", Some(body)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{field}");
            assert_eq!(api_error(&reply), says);
        }
    }

    #[tokio::test]
    async fn bad_addresses_are_refused() {
        let app = test_app();
        for (address, reason) in [
            ("127.0.0.1", "the port is missing"),
            ("127.0.0.1:x", "the port must be a number from 1 to 65535"),
            ("127.0.0.1:0", "port 0 cannot be connected to"),
            (
                "no such host:1",
                "the host must be an IP address, [IPv6] address or host name",
            ),
        ] {
            let body = json!({"transport": "tcp", "address": address, "role": "memory"});
            let (status, reply) = call(&app, "POST", "/nodes/1/endpoint", Some(body)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{address}");
            assert_eq!(
                api_error(&reply),
                format!("address {address:?} is not host:port: {reason}")
            );
        }
    }

    #[tokio::test]
    async fn lists_are_sorted_and_unknown_nodes_are_404() {
        let app = test_app();
        for id in [3, 1, 2] {
            register(&app, id, "memory", 0).await;
        }
        let (status, reply) = call(&app, "GET", "/nodes", None).await;
        assert_eq!(status, StatusCode::OK);
        let ids: Vec<u32> = parse::<Vec<NodeInfo>>(&reply)
            .iter()
            .map(|n| n.node_id)
            .collect();
        assert_eq!(ids, [1, 2, 3]);

        let (status, reply) = call(&app, "GET", "/endpoints", None).await;
        assert_eq!(status, StatusCode::OK);
        let endpoints: Vec<Endpoint> = parse(&reply);
        let addresses: Vec<&str> = endpoints.iter().map(|e| e.address.as_str()).collect();
        assert_eq!(
            addresses,
            ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]
        );

        let (status, reply) = call(&app, "GET", "/nodes/9", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(api_error(&reply), "unknown node 9");

        let (status, reply) = call(&app, "GET", "/nodes/minus-one", None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(api_error(&reply).contains("Cannot parse"), "{reply}");
    }
}
