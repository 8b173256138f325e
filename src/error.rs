//! Errors classified once, at the edge, by who is at fault; each becomes an RFC 9457
//! `application/problem+json` response with a stable machine tag.

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

use crate::guard::{DecodeError, VerdictReport};

/// Everything the guard itself answers instead of the upstream.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// Request body over `server.max_body_bytes`.
    #[error("request body exceeds {limit} bytes")]
    BodyTooLarge {
        /// The limit.
        limit: usize,
    },
    /// The image could not be decoded, or is too large once decoded.
    #[error(transparent)]
    Image(#[from] DecodeError),
    /// The request does not have the shape the route's request adapter expects.
    #[error("{0}")]
    BadRequest(String),
    /// No route matches the path.
    #[error("no route for {0}")]
    NoRoute(String),
    /// The upstream could not be reached.
    #[error("upstream unreachable: {0}")]
    UpstreamUnreachable(String),
    /// The upstream did not answer in time.
    #[error("upstream did not answer within {0} ms")]
    UpstreamTimeout(u64),
    /// Reject mode, fail closed: the upstream answer could not be read, so nothing can be vouched for.
    #[error("cannot read the prediction from the upstream answer: {0}")]
    UpstreamUnreadable(String),
    /// Reject mode: the prediction was made on an out-of-distribution image.
    #[error("out-of-distribution input")]
    Rejected(Box<VerdictReport>),
    /// Reject mode, fail closed: no verdict within the wait budget.
    #[error("no verdict within the wait budget")]
    VerdictUnavailable(Box<VerdictReport>),
}

impl GuardError {
    /// HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            GuardError::BodyTooLarge { .. } | GuardError::Image(DecodeError::TooLarge { .. }) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            GuardError::Image(DecodeError::Invalid(_)) | GuardError::BadRequest(_) => {
                StatusCode::BAD_REQUEST
            }
            GuardError::NoRoute(_) => StatusCode::NOT_FOUND,
            GuardError::UpstreamUnreachable(_) | GuardError::UpstreamUnreadable(_) => {
                StatusCode::BAD_GATEWAY
            }
            GuardError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            GuardError::Rejected(_) => StatusCode::UNPROCESSABLE_ENTITY,
            GuardError::VerdictUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Stable tag for bodies, metrics and span status.
    pub fn tag(&self) -> &'static str {
        match self {
            GuardError::BodyTooLarge { .. } => "body-too-large",
            GuardError::Image(DecodeError::TooLarge { .. }) => "image-too-large",
            GuardError::Image(DecodeError::Invalid(_)) => "bad-image",
            GuardError::BadRequest(_) => "bad-request",
            GuardError::NoRoute(_) => "no-route",
            GuardError::UpstreamUnreachable(_) => "upstream-unreachable",
            GuardError::UpstreamTimeout(_) => "upstream-timeout",
            GuardError::UpstreamUnreadable(_) => "upstream-unreadable",
            GuardError::Rejected(_) => "ood",
            GuardError::VerdictUnavailable(_) => "verdict-unavailable",
        }
    }
}

impl IntoResponse for GuardError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut body = serde_json::json!({
            "type": format!("urn:diffguard:problem:{}", self.tag()),
            "title": status.canonical_reason().unwrap_or("error"),
            "status": status.as_u16(),
            "detail": self.to_string(),
        });
        if let GuardError::Rejected(r) | GuardError::VerdictUnavailable(r) = &self {
            body["diffguard"] = serde_json::to_value(r).unwrap_or_default();
        }
        let mut resp = Response::new(Body::from(body.to_string()));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        resp
    }
}
