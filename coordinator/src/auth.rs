//! The bearer token every protected route takes when the coordinator has a cluster key.
//!
//! With `--cluster-key-file`, a request to any route that changes the cluster or reveals its
//! nodes, endpoints or VMs must carry `Authorization: Bearer <token>`, where the token is
//! [`Keyring::coordinator_token`] of any key in the file (so a key can be rotated without
//! stopping the cluster). [`require_token`] checks it before the route's extractors run, so an
//! unauthenticated request learns nothing, not even whether its body would have parsed.
//!
//! Open without a token: `GET /healthz` (says only that the process is up, for load
//! balancers and supervisors that hold no key) and `GET /openapi.json` (the API's shape,
//! which is public anyway in this repository; clients need it before they can authenticate).
//! The coordinator has no `/metrics` route: its metrics leave by OTLP push
//! ([`crate::otlp`]), so no scraper needs an open door. If one is added, it belongs behind
//! the token: node counts and capacities describe the cluster.
//!
//! A refusal answers 401 with an [`pagemesh_api::ApiError`] body and
//! `WWW-Authenticate: Bearer`, is logged at warn with the peer's address and the route (never
//! the token sent), and is counted (`pagemesh.coordinator.auth.refusals`, by `reason`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;

use pagemesh_auth::Keyring;

use crate::error::AppError;
use crate::otlp::RequestMetrics;

/// Why a request was refused: [`AppError::Unauthenticated`] answers it with 401.
#[derive(thiserror::Error, Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// No `Authorization: Bearer` header.
    #[error(
        "this coordinator requires `Authorization: Bearer <token>`; the token is derived from \
         the cluster key (give the client --cluster-key-file)"
    )]
    Missing,
    /// A bearer token that no key of the ring made.
    #[error("the bearer token is not valid for this cluster's key; check --cluster-key-file")]
    Rejected,
}

impl AuthError {
    /// A short name for logs and the refusal counter's `reason`.
    pub fn reason(self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Rejected => "rejected",
        }
    }
}

/// What [`require_token`] needs: the keyring (none: every request passes) and the metrics the
/// refusals are counted in.
#[derive(Clone)]
pub(crate) struct Guard {
    pub(crate) keyring: Option<Arc<Keyring>>,
    pub(crate) metrics: Arc<RequestMetrics>,
}

/// Middleware on the protected routes: passes requests with an accepted bearer token (all of
/// them when there is no key), answers the others with 401.
pub(crate) async fn require_token(
    State(guard): State<Guard>,
    req: Request,
    next: Next,
) -> Result<Response, AppError> {
    let Some(keyring) = &guard.keyring else {
        return Ok(next.run(req).await);
    };
    match check(keyring, &req) {
        Ok(()) => Ok(next.run(req).await),
        Err(refusal) => {
            let peer = req
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map_or_else(|| "unknown".to_owned(), |c| c.0.to_string());
            let route = req
                .extensions()
                .get::<MatchedPath>()
                .map_or_else(|| req.uri().path(), MatchedPath::as_str);
            tracing::warn!(
                %peer,
                method = %req.method(),
                route,
                reason = refusal.reason(),
                "refused a request without a valid cluster token"
            );
            guard.metrics.refused(refusal);
            Err(AppError::Unauthenticated(refusal))
        }
    }
}

/// Whether `req` carries a bearer token `keyring` accepts.
fn check(keyring: &Keyring, req: &Request) -> Result<(), AuthError> {
    let value = req
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or(AuthError::Missing)?;
    let value = value.to_str().map_err(|_| AuthError::Rejected)?;
    // RFC 7235: the scheme is case-insensitive; RFC 6750: one space, then the token.
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::Rejected)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Missing);
    }
    if keyring.accepts_token(token.trim()) {
        Ok(())
    } else {
        Err(AuthError::Rejected)
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode, header};
    use serde_json::json;

    use pagemesh_auth::Keyring;

    use crate::tests::{api_error, parse, send};
    use crate::{AppState, app};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn keyed_app() -> (axum::Router, String) {
        let keyring = Keyring::from_secret(SECRET);
        let token = keyring.coordinator_token();
        (app(AppState::in_memory().with_keyring(keyring)), token)
    }

    /// Every protected route, with a body that works once authenticated, in an order in
    /// which each succeeds: (method, path, body, status with the token).
    fn protected() -> Vec<(
        &'static str,
        &'static str,
        Option<serde_json::Value>,
        StatusCode,
    )> {
        let memory = json!({"transport": "tcp", "address": "127.0.0.1:7002", "role": "memory"});
        let compute = json!({"transport": "tcp", "address": "127.0.0.1:7001", "role": "compute"});
        let vm =
            json!({"compute_node": 1, "mem_bytes": 8192, "placement": {"policy": "interleave"}});
        let cluster = json!({"name": "c", "nodes": 2, "memory_mb": 64});
        vec![
            ("POST", "/clusters", Some(cluster), StatusCode::CREATED),
            ("GET", "/clusters/c", None, StatusCode::OK),
            (
                "POST",
                "/nodes/2/endpoint",
                Some(memory),
                StatusCode::CREATED,
            ),
            (
                "POST",
                "/nodes/1/endpoint",
                Some(compute),
                StatusCode::CREATED,
            ),
            ("GET", "/nodes", None, StatusCode::OK),
            ("GET", "/nodes/2", None, StatusCode::OK),
            ("GET", "/endpoints", None, StatusCode::OK),
            ("POST", "/vms", Some(vm), StatusCode::CREATED),
            ("GET", "/vms", None, StatusCode::OK),
            ("GET", "/vms/1", None, StatusCode::OK),
            ("DELETE", "/vms/1", None, StatusCode::NO_CONTENT),
            ("DELETE", "/nodes/2", None, StatusCode::NO_CONTENT),
        ]
    }

    fn request(
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
        authorization: Option<&str>,
    ) -> Request<Body> {
        let mut r = Request::builder().method(method).uri(path);
        if let Some(a) = authorization {
            r = r.header(header::AUTHORIZATION, a);
        }
        match body {
            Some(b) => r
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(b.to_string())),
            None => r.body(Body::empty()),
        }
        .unwrap()
    }

    #[tokio::test]
    async fn protected_routes_need_the_token_and_work_with_it() {
        let (app, token) = keyed_app();
        let other = Keyring::from_secret(b"another key, another cluster.....").coordinator_token();
        let refused = [
            None,
            Some("Basic dXNlcjpwYXNz".to_owned()),
            Some("Bearer".to_owned()),
            Some(format!("Bearer {other}")),
            Some(format!("Bearer {}", &token[..63])),
        ];
        let bearer = format!("Bearer {token}");
        for (method, path, body, ok) in protected() {
            for auth in &refused {
                let response = app
                    .clone()
                    .oneshot_raw(request(method, path, body.as_ref(), auth.as_deref()))
                    .await;
                assert_eq!(
                    response.0,
                    StatusCode::UNAUTHORIZED,
                    "{method} {path} {auth:?}"
                );
                let challenge = response.1.unwrap_or_default();
                assert!(
                    challenge.starts_with("Bearer "),
                    "{method} {path}: {challenge}"
                );
                let error = api_error(&response.2);
                assert!(
                    error.contains("Bearer") || error.contains("bearer"),
                    "{method} {path}: {error}"
                );
            }
            let (status, reply) =
                send(&app, request(method, path, body.as_ref(), Some(&bearer))).await;
            assert_eq!(status, ok, "{method} {path}: {reply}");
        }
        // The scheme's case does not matter (RFC 7235).
        let lower = format!("bearer {token}");
        let (status, reply) = send(&app, request("GET", "/nodes", None, Some(&lower))).await;
        assert_eq!(status, StatusCode::OK, "{reply}");
        assert_eq!(parse::<Vec<pagemesh_api::NodeInfo>>(&reply).len(), 1);
    }

    #[tokio::test]
    async fn the_token_is_checked_before_the_body_is_read() {
        let (app, token) = keyed_app();
        let garbage = "x".repeat(crate::MAX_BODY_BYTES * 2);
        let post = |auth: Option<String>| {
            let mut r = Request::builder()
                .method("POST")
                .uri("/clusters")
                .header(header::CONTENT_TYPE, "application/json");
            if let Some(a) = auth {
                r = r.header(header::AUTHORIZATION, a);
            }
            r.body(Body::from(garbage.clone())).unwrap()
        };
        let (status, body) = send(&app, post(None)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        api_error(&body);
        let (status, body) = send(&app, post(Some(format!("Bearer {token}")))).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
        assert_eq!(
            api_error(&body),
            format!(
                "the request body is larger than {} bytes",
                crate::MAX_BODY_BYTES
            )
        );
    }

    #[tokio::test]
    async fn health_and_the_api_document_are_open() {
        let (app, _) = keyed_app();
        let (status, body) = send(&app, request("GET", "/healthz", None, None)).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
        let (status, body) = send(&app, request("GET", "/openapi.json", None, None)).await;
        assert_eq!(status, StatusCode::OK);
        let doc: serde_json::Value = parse(&body);
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        assert_eq!(doc["security"], json!([{"bearer": []}]));
        // An unknown route is a 404 whether or not the token is sent: it reveals nothing.
        let (status, body) = send(&app, request("GET", "/nope", None, None)).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(api_error(&body), "no route for GET /nope");
    }

    #[tokio::test]
    async fn the_rotated_out_key_is_accepted_while_it_is_in_the_file() {
        let dir = std::env::temp_dir().join(format!("pagemesh-coord-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cluster.key");
        let new = "n".repeat(40);
        let old = "o".repeat(40);
        std::fs::write(&path, format!("{new}\n{old}\n")).unwrap();
        let private = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600);
        std::fs::set_permissions(&path, private).unwrap();
        let app = app(AppState::in_memory().with_keyring(Keyring::load(&path).unwrap()));
        for secret in [&new, &old] {
            let token = Keyring::from_secret(secret.as_bytes()).coordinator_token();
            let bearer = format!("Bearer {token}");
            let (status, _) = send(&app, request("GET", "/vms", None, Some(&bearer))).await;
            assert_eq!(status, StatusCode::OK);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn without_a_key_nothing_is_asked() {
        let app = app(AppState::in_memory());
        let (status, _) = send(&app, request("GET", "/nodes", None, None)).await;
        assert_eq!(status, StatusCode::OK);
        let (_, body) = send(&app, request("GET", "/openapi.json", None, None)).await;
        let doc: serde_json::Value = parse(&body);
        assert!(doc.get("security").is_none(), "{doc}");
    }

    /// `oneshot` giving the status, the `WWW-Authenticate` header and the body.
    trait OneshotRaw {
        async fn oneshot_raw(self, request: Request<Body>) -> (StatusCode, Option<String>, String);
    }

    impl OneshotRaw for axum::Router {
        async fn oneshot_raw(self, request: Request<Body>) -> (StatusCode, Option<String>, String) {
            use http_body_util::BodyExt;
            use tower::ServiceExt;
            let response = self.oneshot(request).await.unwrap();
            let status = response.status();
            let challenge = response
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .map(|v| v.to_str().unwrap().to_owned());
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            (
                status,
                challenge,
                String::from_utf8(bytes.to_vec()).unwrap(),
            )
        }
    }
}
