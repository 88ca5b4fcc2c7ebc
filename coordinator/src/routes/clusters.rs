//! `/clusters`: named groups of nodes.

use axum::extract::State;
use axum::http::StatusCode;

use pagemesh_api::{Cluster, CreateCluster};

use pagemesh_api::ApiError;

use super::created_or_ok;
use crate::AppState;
use crate::error::AppError;
use crate::extract::{AppJson, AppPath};

/// `POST /clusters`: 201 when created, 200 when it exists with the same parameters.
#[utoipa::path(
    post,
    path = "/clusters",
    request_body = CreateCluster,
    responses(
        (status = 201, description = "Created", body = Cluster),
        (status = 200, description = "It exists with the same parameters", body = Cluster),
        (status = "default", description = "Any failure, with what to do where it helps", body = ApiError)
    )
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    AppJson(req): AppJson<CreateCluster>,
) -> Result<(StatusCode, AppJson<Cluster>), AppError> {
    let stored = state.store.create_cluster(req)?;
    let cluster = stored.value;
    if stored.created {
        tracing::info!(
            cluster = %cluster.name,
            nodes = cluster.nodes,
            memory_mb = cluster.memory_mb,
            "created cluster"
        );
    }
    Ok((created_or_ok(stored.created), AppJson(cluster)))
}

/// `GET /clusters/{name}`.
#[utoipa::path(
    get,
    path = "/clusters/{name}",
    params(("name" = String, Path, description = "Cluster name", example = "demo")),
    responses(
        (status = 200, description = "The cluster", body = Cluster),
        (status = "default", description = "Any failure, with what to do where it helps", body = ApiError)
    )
)]
pub(crate) async fn get(
    State(state): State<AppState>,
    AppPath(name): AppPath<String>,
) -> Result<AppJson<Cluster>, AppError> {
    Ok(AppJson(state.store.cluster(&name)?))
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use serde_json::json;

    use pagemesh_api::Cluster;

    use crate::tests::{api_error, call, parse, test_app};

    #[tokio::test]
    async fn create_get_and_conflict() {
        let app = test_app();
        let demo = json!({"name": "demo", "nodes": 3, "memory_mb": 512});
        let (status, body) = call(&app, "POST", "/clusters", Some(demo.clone())).await;
        assert_eq!(status, StatusCode::CREATED);
        let created: Cluster = parse(&body);
        assert_eq!(
            created,
            Cluster {
                name: "demo".into(),
                nodes: 3,
                memory_mb: 512,
                registered: vec![],
            }
        );

        let (status, body) = call(&app, "POST", "/clusters", Some(demo)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(parse::<Cluster>(&body), created);

        let other = json!({"name": "demo", "nodes": 4, "memory_mb": 512});
        let (status, body) = call(&app, "POST", "/clusters", Some(other)).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(
            api_error(&body),
            "cluster 'demo' already exists with nodes=3 and memory_mb=512; pick another name"
        );

        let (status, body) = call(&app, "GET", "/clusters/demo", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(parse::<Cluster>(&body), created);
    }

    #[tokio::test]
    async fn unknown_cluster_and_bad_name() {
        let app = test_app();
        let (status, body) = call(&app, "GET", "/clusters/x", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(api_error(&body), "unknown cluster 'x'");

        let bad = json!({"name": "a/b", "nodes": 1, "memory_mb": 1});
        let (status, body) = call(&app, "POST", "/clusters", Some(bad)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(api_error(&body).starts_with("cluster name \"a/b\" is not valid"));
    }
}
