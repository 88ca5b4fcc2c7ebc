//! `GET /openapi.json`: the API as an OpenAPI 3.1 document, generated from the handlers'
//! `#[utoipa::path]` annotations and the wire types' `ToSchema` (`pagemesh-api`'s `openapi`
//! feature), so it cannot drift from the routes. The tests fuzz a real coordinator from it
//! (`tests/coordinator_schema.rs`).

use std::sync::Arc;

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::OpenApi;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};

use crate::routes;

/// The name of the bearer scheme in `components.securitySchemes`.
const BEARER: &str = "bearer";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "pagemesh coordinator",
        description = "Discovery and placement for a pagemesh cluster: its nodes, where their \
                       page servers listen, and the VMs with the placement of their pages. \
                       Every error is an ApiError body (docs/coordinator.md)."
    ),
    paths(
        routes::healthz,
        routes::clusters::create,
        routes::clusters::get,
        routes::nodes::register,
        routes::nodes::renew,
        routes::nodes::list,
        routes::nodes::get,
        routes::nodes::deregister,
        routes::nodes::endpoints,
        routes::vms::create,
        routes::vms::list,
        routes::vms::get,
        routes::vms::delete,
        routes::vms::repair,
    )
)]
struct Doc;

/// The document as JSON. With `keyed`, every operation requires the bearer token, except
/// the two that say otherwise (`/healthz`, and `/openapi.json`, which is not in the document).
pub(crate) fn document(keyed: bool) -> String {
    let mut doc = Doc::openapi();
    if keyed {
        let components = doc.components.get_or_insert_with(Default::default);
        let mut scheme = Http::new(HttpAuthScheme::Bearer);
        scheme.description = Some(
            "The token of the cluster key: `pagemesh-coordinator --cluster-key-file FILE \
             --print-token` prints it (docs/security.md)"
                .to_owned(),
        );
        components
            .security_schemes
            .insert(BEARER.to_owned(), SecurityScheme::Http(scheme).into());
        doc.security = Some(vec![SecurityRequirement::new::<_, _, &str>(BEARER, [])]);
    }
    doc.to_json().expect("the OpenAPI document serializes")
}

/// Serves the document built once at start.
pub(crate) async fn serve(document: Arc<String>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        document.as_str().to_owned(),
    )
}
