//! [`AppError`]: every way a request fails, and the [`ApiError`] answer each one becomes.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};

use pagemesh_api::ApiError;

use crate::auth::AuthError;
use crate::registry::RegistryError;
use crate::store::StoreError;

/// Why a request failed. Answers with its status and an [`ApiError`] body; internal failures
/// are logged in full and answered with a generic message.
#[derive(thiserror::Error, Debug)]
pub enum AppError {
    /// The request breaks a rule of the registry.
    #[error(transparent)]
    Refused(#[from] RegistryError),
    /// No bearer token the cluster key accepts (the coordinator has one).
    #[error(transparent)]
    Unauthenticated(#[from] AuthError),
    /// The body is larger than [`crate::MAX_BODY_BYTES`].
    #[error("the request body is larger than {limit} bytes")]
    TooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// The body is not the JSON the route expects.
    #[error(transparent)]
    Json(#[from] JsonRejection),
    /// A path parameter does not parse (`/vms/abc`).
    #[error(transparent)]
    Path(#[from] PathRejection),
    /// The query string does not parse.
    #[error(transparent)]
    Query(#[from] QueryRejection),
    /// No route has this path.
    #[error("no route for {method} {path}")]
    NoRoute {
        /// Request method.
        method: Method,
        /// Request path.
        path: String,
    },
    /// The route exists but not with this method.
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed {
        /// Request method.
        method: Method,
        /// Request path.
        path: String,
    },
    /// The store failed; the client cannot fix this.
    #[error("the store failed")]
    Store(#[source] StoreError),
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Refused(e) => AppError::Refused(e),
            e => AppError::Store(e),
        }
    }
}

impl AppError {
    /// The HTTP status of the answer.
    pub fn status(&self) -> StatusCode {
        match self {
            AppError::Refused(e) => match e {
                RegistryError::UnknownCluster(_)
                | RegistryError::UnknownNode(_)
                | RegistryError::UnknownVm(_) => StatusCode::NOT_FOUND,
                RegistryError::ClusterExists { .. }
                | RegistryError::EndpointConflict { .. }
                | RegistryError::NotAtAddress { .. }
                | RegistryError::NodeDown { .. }
                | RegistryError::NotASurvivor { .. }
                | RegistryError::KeyOfDeletedVm { .. } => StatusCode::CONFLICT,
                RegistryError::KeyReused { .. } => StatusCode::UNPROCESSABLE_ENTITY,
                RegistryError::VmIdsExhausted => StatusCode::SERVICE_UNAVAILABLE,
                RegistryError::BadClusterName(_)
                | RegistryError::BadAddress { .. }
                | RegistryError::BadRdma(_)
                | RegistryError::NotMemoryNode { .. }
                | RegistryError::OtherCluster { .. }
                | RegistryError::NotComputeNode { .. }
                | RegistryError::BadMemSize(_)
                | RegistryError::RelativeImage(_)
                | RegistryError::Placement(_)
                | RegistryError::Replicas(_)
                | RegistryError::BadRepairReport { .. }
                | RegistryError::BadIdempotencyKey(_) => StatusCode::BAD_REQUEST,
            },
            AppError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            AppError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            // axum answers 415 here; this API keeps every body problem a 400 or 422.
            AppError::Json(JsonRejection::MissingJsonContentType(_)) => StatusCode::BAD_REQUEST,
            AppError::Json(e) => e.status(),
            AppError::Path(e) => e.status(),
            AppError::Query(e) => e.status(),
            AppError::NoRoute { .. } => StatusCode::NOT_FOUND,
            AppError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            // The shared store is unreachable or busy: another coordinator, or a retry, may
            // do better.
            AppError::Store(StoreError::Etcd { .. } | StoreError::Contended { .. }) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            AppError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        let error = if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %pagemesh_api::error_chain(&self), "request failed");
            "internal error; the coordinator's log has the details".to_owned()
        } else if status == StatusCode::SERVICE_UNAVAILABLE {
            tracing::warn!(error = %pagemesh_api::error_chain(&self), "request failed");
            self.to_string()
        } else {
            tracing::debug!(%status, error = %self, "request refused");
            self.to_string()
        };
        let mut response = (status, axum::Json(ApiError { error })).into_response();
        if status == StatusCode::UNAUTHORIZED {
            // RFC 6750 §3: a 401 names the scheme the client should use.
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"pagemesh-coordinator\""),
            );
        }
        response
    }
}
