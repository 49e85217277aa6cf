//! The admin API's one error shape, `{"error": {"code", "message",
//! "field"}}`, its status codes, and the extractors that turn bad input
//! into it (never into axum's plain-text rejections, never into a 500).

use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::admin::AdminError;
use crate::rules::RuleErrors;

/// The body of every error response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// bad_request, unauthorized, forbidden, not_found, conflict,
    /// payload_too_large, invalid_rules, too_many_requests, internal.
    pub code: String,
    pub message: String,
    /// The input field at fault (a JSON path, a query parameter, a header).
    pub field: Option<String>,
    /// For `invalid_rules`: every problem, as `sluice rules validate` says it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problems: Option<Vec<RuleProblem>>,
}

/// One problem in a rule set: `text` is `FILE: path: message`, exactly the
/// line `sluice rules validate` prints.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RuleProblem {
    pub file: String,
    pub path: String,
    pub message: String,
    pub text: String,
}

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    detail: ErrorDetail,
    retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            detail: ErrorDetail {
                code: code.to_owned(),
                message: message.into(),
                field: None,
                problems: None,
            },
            retry_after_s: None,
        }
    }

    pub fn with_field(mut self, field: impl Into<String>) -> ApiError {
        self.detail.field = Some(field.into());
        self
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn bad_request(field: &str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message).with_field(field)
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).with_field("authorization")
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "conflict", message)
    }

    pub fn too_many_failures(retry_after_s: u64) -> ApiError {
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_requests",
            "too many failed sign-ins from this address; try again later",
        );
        e.retry_after_s = Some(retry_after_s.max(1));
        e
    }

    pub fn invalid_rules(errors: &RuleErrors) -> ApiError {
        let mut e = ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_rules",
            errors.to_string(),
        )
        .with_field("yaml");
        e.detail.problems = Some(
            errors
                .0
                .iter()
                .map(|p| RuleProblem {
                    file: p.file.clone(),
                    path: p.path.clone(),
                    message: p.message.clone(),
                    text: p.to_string(),
                })
                .collect(),
        );
        e
    }

    pub fn internal() -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error (logged)",
        )
    }
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> ApiError {
        match &e {
            AdminError::NoSuchTenant(_)
            | AdminError::NoSuchPlan(_)
            | AdminError::NoSuchToken(_)
            | AdminError::NoSuchWebhook(_) => ApiError::not_found(e.to_string()),
            AdminError::InvalidUrl(_) => ApiError::bad_request("url", e.to_string()),
            AdminError::TenantExists(_) | AdminError::PlanExists(_) => {
                ApiError::conflict(e.to_string()).with_field("name")
            }
            AdminError::StaleVersion { .. } => ApiError::conflict(e.to_string()).with_field("version"),
            AdminError::Invalid(errors) => ApiError::invalid_rules(errors),
            AdminError::InvalidMonth => ApiError::bad_request("month", e.to_string()),
            AdminError::Database(sqlx::Error::Database(d))
                // Input the handlers let through but a constraint refuses:
                // check, not-null, string too long, invalid text.
                if matches!(d.code().as_deref(), Some("23514" | "23502" | "22001" | "22P02")) =>
            {
                ApiError::bad_request("body", format!("refused by the database: {}", d.message()))
            }
            _ => {
                tracing::error!(error = %e, "admin API: internal error");
                ApiError::internal()
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(ErrorBody { error: self.detail })).into_response();
        if let Some(s) = self.retry_after_s {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"sluice-admin\""),
            );
        }
        response
    }
}

// === Extractors ===

/// A JSON body; a bad one is a 400 naming the field (its JSON path), an
/// oversized one a 413.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(body_rejection)?;
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        match serde_path_to_error::deserialize(&mut de) {
            Ok(value) => Ok(JsonBody(value)),
            Err(e) => {
                // Not JSON at all, or no particular field: the body.
                let path = e.path().to_string();
                let whole = e.inner().is_syntax() || e.inner().is_eof();
                let field = match path.as_str() {
                    _ if whole => "body".to_owned(),
                    "." | "?" => "body".to_owned(),
                    _ => path,
                };
                Err(ApiError::bad_request(&field, e.into_inner().to_string()))
            }
        }
    }
}

fn body_rejection(e: BytesRejection) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is over {} bytes", super::MAX_BODY_BYTES),
        )
        .with_field("body")
    } else {
        ApiError::bad_request("body", e.body_text())
    }
}

/// Path parameters; undecodable ones are a 400.
pub struct PathParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for PathParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(t)| PathParams(t))
            .map_err(|e: PathRejection| ApiError::bad_request("path", e.body_text()))
    }
}

/// Query parameters as strings, each parsed (and named when bad) by the
/// handler through [`QueryParams`]' methods.
pub struct QueryParams(pub std::collections::HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for QueryParams {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::from_request_parts(parts, state)
            .await
            .map(|Query(q)| QueryParams(q))
            .map_err(|e: QueryRejection| ApiError::bad_request("query", e.body_text()))
    }
}
