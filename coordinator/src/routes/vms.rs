//! `/vms`: VM definitions and the placement of their pages.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};

use pagemesh_api::{CreateVm, IDEMPOTENCY_KEY, RepairReport, Vm, VmId};

use pagemesh_api::ApiError;

use super::created_or_ok;
use crate::AppState;
use crate::error::AppError;
use crate::extract::{AppJson, AppPath};
use crate::registry::RegistryError;

/// `POST /vms`: 201 with the VM, its id and its resolved placement; 200 with the VM an
/// `Idempotency-Key` seen before created.
#[utoipa::path(
    post,
    path = "/vms",
    params(("Idempotency-Key" = Option<String>, Header, description = "A retried request with the same key gets the VM the first one created")),
    request_body = CreateVm,
    responses(
        (status = 201, description = "Created and placed", body = Vm),
        (status = 200, description = "The VM this key created before", body = Vm),
        (status = "default", description = "Any failure, with what to do where it helps", body = ApiError)
    )
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    AppJson(req): AppJson<CreateVm>,
) -> Result<(StatusCode, AppJson<Vm>), AppError> {
    let key = match headers.get(IDEMPOTENCY_KEY) {
        None => None,
        Some(value) => Some(value.to_str().map_err(|_| {
            RegistryError::BadIdempotencyKey(String::from_utf8_lossy(value.as_bytes()).into())
        })?),
    };
    let stored = state.store.create_vm(req, key, crate::now_ms())?;
    let vm = stored.value;
    if stored.created {
        tracing::info!(
            vm = vm.id,
            compute_node = vm.compute_node,
            mem_bytes = vm.mem_bytes,
            memory_nodes = ?vm.placement.nodes(),
            "created VM"
        );
    } else {
        tracing::info!(
            vm = vm.id,
            key,
            "VM requested again with the same idempotency key"
        );
    }
    Ok((created_or_ok(stored.created), AppJson(vm)))
}

/// `GET /vms`, sorted by id.
#[utoipa::path(
    get,
    path = "/vms",
    responses(
        (status = 200, description = "Every VM, by id", body = Vec<Vm>),
        (status = "default", description = "Any failure, with what to do where it helps", body = ApiError)
    )
)]
pub(crate) async fn list(State(state): State<AppState>) -> Result<AppJson<Vec<Vm>>, AppError> {
    Ok(AppJson(state.store.vms()?))
}

/// `GET /vms/{vm_id}`.
#[utoipa::path(
    get,
    path = "/vms/{vm_id}",
    params(("vm_id" = u32, Path, description = "VM id", example = 1)),
    responses(
        (status = 200, description = "The VM", body = Vm),
        (status = "default", description = "Any failure, with what to do where it helps", body = ApiError)
    )
)]
pub(crate) async fn get(
    State(state): State<AppState>,
    AppPath(id): AppPath<VmId>,
) -> Result<AppJson<Vm>, AppError> {
    Ok(AppJson(state.store.vm(id)?))
}

/// `DELETE /vms/{vm_id}`: 204.
#[utoipa::path(
    delete,
    path = "/vms/{vm_id}",
    params(("vm_id" = u32, Path, description = "VM id", example = 1)),
    responses(
        (status = 204, description = "Deleted"),
        (status = "default", description = "Any failure, with what to do where it helps", body = ApiError)
    )
)]
pub(crate) async fn delete(
    State(state): State<AppState>,
    AppPath(id): AppPath<VmId>,
) -> Result<StatusCode, AppError> {
    state.store.delete_vm(id)?;
    tracing::info!(vm = id, "deleted VM");
    Ok(StatusCode::NO_CONTENT)
}

/// `PUT /vms/{vm_id}/repair`: a surviving memory node's progress in making again the copies
/// a retired node held; 200 with the VM as it is now.
#[utoipa::path(
    put,
    path = "/vms/{vm_id}/repair",
    params(("vm_id" = u32, Path, description = "VM id", example = 1)),
    request_body = RepairReport,
    responses(
        (status = 200, description = "Recorded", body = Vm),
        (status = "default", description = "Any failure, with what to do where it helps", body = ApiError)
    )
)]
pub(crate) async fn repair(
    State(state): State<AppState>,
    AppPath(id): AppPath<VmId>,
    AppJson(report): AppJson<RepairReport>,
) -> Result<AppJson<Vm>, AppError> {
    let vm = state.store.report_repair(id, report)?;
    if report.done {
        tracing::info!(
            vm = id,
            node = report.node,
            copied = report.copied,
            claimed = report.claimed,
            "memory node repaired its copies"
        );
        if vm.repaired() {
            tracing::info!(
                vm = id,
                replicas = vm.replicas,
                survivors = ?vm.survivors(),
                "VM repaired: every page has its copies again"
            );
        }
    }
    Ok(AppJson(vm))
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::body::Body;
    use axum::http::{Request, StatusCode, header};
    use serde_json::{Value, json};

    use pagemesh_api::{Content, PageRange, Placement, Vm};

    use crate::tests::{api_error, call, parse, register, send, test_app};

    /// An app with compute node 1, memory nodes 2 (1 MiB) and 3 (3 MiB), and both-node 4 (0).
    async fn cluster_app() -> Router {
        let app = test_app();
        register(&app, 1, "compute", 0).await;
        register(&app, 3, "memory", 3 << 20).await;
        register(&app, 2, "memory", 1 << 20).await;
        register(&app, 4, "both", 0).await;
        app
    }

    async fn create(app: &Router, mem_bytes: u64, placement: Value) -> (StatusCode, String) {
        let body = json!({"compute_node": 1, "mem_bytes": mem_bytes, "placement": placement});
        call(app, "POST", "/vms", Some(body)).await
    }

    #[tokio::test]
    async fn interleave_over_all_memory_nodes_by_default() {
        let app = cluster_app().await;
        let (status, reply) = create(&app, 1 << 20, json!({"policy": "interleave"})).await;
        assert_eq!(status, StatusCode::CREATED);
        let vm: Vm = parse(&reply);
        assert_eq!(vm.id, 1);
        assert_eq!(vm.compute_node, 1);
        assert_eq!(vm.content, Content::Zero);
        assert_eq!(
            vm.placement,
            Placement::interleave(vec![2, 3, 4], 1, 256).unwrap()
        );

        let listed = json!({"policy": "interleave", "nodes": [3, 2], "granule_pages": 4});
        let (status, reply) = create(&app, 8 * 4096, listed).await;
        assert_eq!(status, StatusCode::CREATED);
        let vm: Vm = parse(&reply);
        assert_eq!(vm.id, 2);
        assert_eq!(
            vm.placement,
            Placement::interleave(vec![3, 2], 4, 8).unwrap()
        );
    }

    #[tokio::test]
    async fn weighted_by_capacity_and_explicit_ranges() {
        let app = cluster_app().await;
        let weighted = json!({"policy": "weighted", "nodes": [2, 3]});
        let (status, reply) = create(&app, 400 * 4096, weighted).await;
        assert_eq!(status, StatusCode::CREATED);
        let vm: Vm = parse(&reply);
        assert_eq!(vm.placement.count_of(2), 100);
        assert_eq!(vm.placement.count_of(3), 300);

        let ranges = json!({"policy": "ranges", "ranges": [
            {"start": 2, "pages": 2, "node": 3},
            {"start": 0, "pages": 2, "node": 2},
        ]});
        let (status, reply) = create(&app, 4 * 4096, ranges).await;
        assert_eq!(status, StatusCode::CREATED);
        let expected = Placement::ranges(
            vec![
                PageRange {
                    start: 0,
                    pages: 2,
                    node: 2,
                },
                PageRange {
                    start: 2,
                    pages: 2,
                    node: 3,
                },
            ],
            4,
        )
        .unwrap();
        assert_eq!(parse::<Vm>(&reply).placement, expected);
    }

    #[tokio::test]
    async fn bad_memory_sizes() {
        let app = cluster_app().await;
        for mem_bytes in [0, 4095, 4097] {
            let (status, reply) = create(&app, mem_bytes, json!({"policy": "interleave"})).await;
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert_eq!(
                api_error(&reply),
                format!("mem_bytes must be a non-zero multiple of 4096, got {mem_bytes}")
            );
        }
    }

    #[tokio::test]
    async fn compute_node_must_be_registered_and_compute() {
        let app = cluster_app().await;
        let placement = json!({"policy": "interleave"});
        let body = json!({"compute_node": 9, "mem_bytes": 4096, "placement": placement});
        let (status, reply) = call(&app, "POST", "/vms", Some(body)).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(api_error(&reply), "unknown node 9");

        let body = json!({"compute_node": 2, "mem_bytes": 4096, "placement": placement});
        let (status, reply) = call(&app, "POST", "/vms", Some(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            api_error(&reply),
            "node 2 has role memory and runs no guests; pick a compute node"
        );
    }

    #[tokio::test]
    async fn placement_errors() {
        let app = cluster_app().await;
        let cases = [
            (
                json!({"policy": "interleave", "nodes": [2, 9]}),
                StatusCode::NOT_FOUND,
                "unknown node 9",
            ),
            (
                json!({"policy": "weighted", "nodes": [1]}),
                StatusCode::BAD_REQUEST,
                "node 1 has role compute and holds no pages; place pages on memory nodes",
            ),
            (
                json!({"policy": "interleave", "nodes": [2, 3, 2]}),
                StatusCode::BAD_REQUEST,
                "node 2 is listed twice",
            ),
            (
                json!({"policy": "interleave", "granule_pages": 0}),
                StatusCode::BAD_REQUEST,
                "granule_pages must be at least 1",
            ),
            (
                json!({"policy": "weighted", "nodes": [4]}),
                StatusCode::BAD_REQUEST,
                "the memory nodes offer no capacity to weigh by",
            ),
            (
                json!({"policy": "ranges", "ranges": [{"start": 0, "pages": 1, "node": 2}]}),
                StatusCode::BAD_REQUEST,
                "ranges must cover pages 0..2 exactly once; page 1 is not covered",
            ),
            (
                json!({"policy": "ranges", "ranges": [{"start": 0, "pages": 2, "node": 7}]}),
                StatusCode::NOT_FOUND,
                "unknown node 7",
            ),
        ];
        for (placement, status, message) in cases {
            let (got, reply) = create(&app, 2 * 4096, placement.clone()).await;
            assert_eq!(
                (got, api_error(&reply).as_str()),
                (status, message),
                "{placement}"
            );
        }

        let (status, reply) = call(&app, "GET", "/vms", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(parse::<Vec<Vm>>(&reply), []);
    }

    #[tokio::test]
    async fn no_memory_nodes_and_relative_images() {
        let app = test_app();
        register(&app, 1, "compute", 0).await;
        let (status, reply) = create(&app, 4096, json!({"policy": "interleave"})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            api_error(&reply),
            "no memory nodes to place pages on; start a node with --role memory first"
        );

        register(&app, 2, "memory", 0).await;
        let body = json!({
            "compute_node": 1, "mem_bytes": 4096, "placement": {"policy": "interleave"},
            "content": {"kind": "image", "path": "guest.img"},
        });
        let (status, reply) = call(&app, "POST", "/vms", Some(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            api_error(&reply),
            "image path \"guest.img\" must be absolute"
        );
    }

    /// `POST /vms` of `body` with `Idempotency-Key: key`.
    async fn create_with_key(app: &Router, key: &str, body: &Value) -> (StatusCode, String) {
        let request = Request::builder()
            .method("POST")
            .uri("/vms")
            .header(header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", key)
            .body(Body::from(body.to_string()))
            .unwrap();
        send(app, request).await
    }

    #[tokio::test]
    async fn a_repeated_idempotency_key_creates_one_vm() {
        let app = cluster_app().await;
        let body =
            json!({"compute_node": 1, "mem_bytes": 8192, "placement": {"policy": "interleave"}});
        let (status, reply) = create_with_key(&app, "3f2a9c", &body).await;
        assert_eq!(status, StatusCode::CREATED);
        let first: Vm = parse(&reply);
        // The answer was lost; the client sends the same request with the same key.
        let (status, reply) = create_with_key(&app, "3f2a9c", &body).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(parse::<Vm>(&reply), first);
        let (_, reply) = call(&app, "GET", "/vms", None).await;
        assert_eq!(parse::<Vec<Vm>>(&reply), [first]);

        // Another key, or none, is another VM.
        let (status, reply) = create_with_key(&app, "77e1", &body).await;
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(parse::<Vm>(&reply).id, 2);
        let (_, reply) = call(&app, "POST", "/vms", Some(body.clone())).await;
        assert_eq!(parse::<Vm>(&reply).id, 3);

        let bigger =
            json!({"compute_node": 1, "mem_bytes": 4096, "placement": {"policy": "interleave"}});
        let (status, reply) = create_with_key(&app, "3f2a9c", &bigger).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            api_error(&reply),
            "idempotency key \"3f2a9c\" was sent before for another VM (1); send a new key for \
             a new VM"
        );
        for bad in ["", "two words", &"x".repeat(65)] {
            let (status, reply) = create_with_key(&app, bad, &body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad:?}");
            assert!(api_error(&reply).ends_with("use 1 to 64 visible ASCII characters"));
        }

        call(&app, "DELETE", "/vms/1", None).await;
        let (status, reply) = create_with_key(&app, "3f2a9c", &body).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(
            api_error(&reply),
            "idempotency key \"3f2a9c\" created VM 1, which has been deleted since"
        );
        let (_, reply) = call(&app, "GET", "/vms", None).await;
        assert_eq!(parse::<Vec<Vm>>(&reply).len(), 2);
    }

    #[tokio::test]
    async fn get_list_delete() {
        let app = cluster_app().await;
        let content = json!({"kind": "pattern", "seed": 7});
        let body = json!({
            "compute_node": 4, "mem_bytes": 4096, "placement": {"policy": "interleave"},
            "content": content,
        });
        let (_, reply) = call(&app, "POST", "/vms", Some(body.clone())).await;
        let first: Vm = parse(&reply);
        assert_eq!(first.content, Content::Pattern { seed: 7 });
        let (_, reply) = call(&app, "POST", "/vms", Some(body)).await;
        let second: Vm = parse(&reply);

        let (status, reply) = call(&app, "GET", "/vms/1", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(parse::<Vm>(&reply), first);
        let (_, reply) = call(&app, "GET", "/vms", None).await;
        assert_eq!(parse::<Vec<Vm>>(&reply), [first, second.clone()]);

        let (status, reply) = call(&app, "DELETE", "/vms/1", None).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert_eq!(reply, "");
        let (status, reply) = call(&app, "DELETE", "/vms/1", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(api_error(&reply), "unknown VM 1");
        let (status, reply) = call(&app, "GET", "/vms/1", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(api_error(&reply), "unknown VM 1");
        let (_, reply) = call(&app, "GET", "/vms", None).await;
        assert_eq!(parse::<Vec<Vm>>(&reply), [second]);

        // Ids are not reused.
        let body =
            json!({"compute_node": 1, "mem_bytes": 4096, "placement": {"policy": "interleave"}});
        let (_, reply) = call(&app, "POST", "/vms", Some(body)).await;
        assert_eq!(parse::<Vm>(&reply).id, 3);
    }
}
