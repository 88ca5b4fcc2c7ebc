//! The HTTP handlers, a file per resource; [`crate::app`] puts them on their routes.

pub(crate) mod clusters;
pub(crate) mod nodes;
pub(crate) mod vms;

use axum::http::{Method, StatusCode, Uri};

use crate::error::AppError;

/// `GET /healthz`: the process is up and serving.
#[utoipa::path(
    get,
    path = "/healthz",
    security(()),
    responses(
        (status = 200, description = "The process is up", body = String, content_type = "text/plain")
    )
)]
pub(crate) async fn healthz() -> &'static str {
    "ok"
}

/// Any path no route matches.
pub(crate) async fn no_route(method: Method, uri: Uri) -> AppError {
    AppError::NoRoute {
        method,
        path: uri.path().to_owned(),
    }
}

/// A known path with a method it does not take.
pub(crate) async fn method_not_allowed(method: Method, uri: Uri) -> AppError {
    AppError::MethodNotAllowed {
        method,
        path: uri.path().to_owned(),
    }
}

/// 201 for a record that is new, 200 for one that existed.
fn created_or_ok(created: bool) -> StatusCode {
    if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    }
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;

    use crate::tests::{api_error, call, test_app};

    #[tokio::test]
    async fn healthz_answers_ok() {
        let app = test_app();
        let (status, body) = call(&app, "GET", "/healthz", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "ok");
    }

    #[tokio::test]
    async fn unknown_routes_and_methods_answer_api_errors() {
        let app = test_app();
        let (status, body) = call(&app, "GET", "/nope", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(api_error(&body), "no route for GET /nope");

        let (status, body) = call(&app, "DELETE", "/healthz", None).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(api_error(&body), "DELETE is not allowed on /healthz");
    }
}
