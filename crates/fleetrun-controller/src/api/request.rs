//! What every API request begins and ends with, whichever handler serves it (bk-job's and
//! fleetrun's APIs, their v4 forms, `stream_job`, a local file upload): a request id, an `api`
//! span in which every line of the request is logged (the caller's app and operator recorded in
//! it once authenticated), the log line of how it ended, and the id in the reply's
//! `x-request-id` header and envelope.
//!
//! `ApiRequest`, `Params` and `Caller` are not axum extractors, nor is this a tower layer: an
//! extractor runs before the handler's span exists and answers its own rejections, so a refused
//! credential or body would be logged outside the request's span and without bk-job's envelope;
//! `Params` and `Caller` come out of `intake` in an order an extractor cannot hold (credentials
//! from the head or the body's first bytes within a shared budget, then a turn among
//! `http_max_requests` kept until the reply is made, then the rest of the body); and the request
//! is served on a task of its own so that a client that goes away cannot leave a change out of
//! the audit trail. Each form answers in its own way (v3's envelope, v4's HTTP statuses, a
//! stream's headers), so the outcome is logged where the reply is made, with `log_outcome`.

use std::future::Future;

use axum::{
    http::{HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use serde_json::Value;
use tracing::{Instrument, Span};

use super::{ApiError, error::code};

/// The envelope's code of a success.
const SUCCESS: i64 = 0;

/// One API request being served: its id and its span.
pub(super) struct ApiRequest {
    id: String,
    span: Span,
}

impl ApiRequest {
    /// A new request to the API named `api`, with a fresh id. The name may be the client's
    /// text, logged before the request is authenticated: it is recorded escaped (`?`), so a
    /// newline in it cannot start a forged log line.
    pub(super) fn begin(api: &str) -> Self {
        let id = new_request_id();
        let span = tracing::info_span!(
            "api",
            request_id = %id,
            api = ?api,
            app = tracing::field::Empty,
            operator = tracing::field::Empty,
        );
        Self { id, span }
    }

    /// The request's id, as its reply carries it.
    pub(super) fn id(&self) -> &str {
        &self.id
    }

    /// The request's span, for work that goes on after the reply (a stream's task).
    pub(super) fn span(&self) -> &Span {
        &self.span
    }

    /// Runs `work` in the request's span.
    pub(super) async fn run<F: Future>(&self, work: F) -> F::Output {
        work.instrument(self.span.clone()).await
    }

    /// Logs, in the request's span, how the request ended.
    pub(super) fn log_outcome<T>(&self, result: &Result<T, ApiError>) {
        self.span.in_scope(|| log_result(result));
    }

    /// Logs how the request ended and answers it with bk-job's envelope.
    pub(super) fn answer(&self, result: Result<Value, ApiError>) -> Response {
        self.log_outcome(&result);
        envelope(&self.id, result)
    }
}

/// Logs how a request ended. Messages quote what clients sent, so they are escaped: a line in
/// the log is one line the controller wrote.
fn log_result<T>(result: &Result<T, ApiError>) {
    match result {
        Ok(_) => tracing::info!("ok"),
        Err(e) if e.code == code::INTERNAL && e.http_status.is_success() => {
            tracing::error!(code = e.code, "{}", e.recorded_message().escape_debug())
        }
        Err(e) => tracing::info!(
            code = e.code,
            "refused: {}",
            e.recorded_message().escape_debug()
        ),
    }
}

pub(super) fn new_request_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Sets the reply's `x-request-id` header to the request's id.
pub(super) fn tag(response: &mut Response, request_id: &str) {
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
}

/// bk-job's reply envelope. The gateway names the request `job_request_id`; `request_id` is
/// the name ESB-era clients read, so both carry it.
#[derive(serde::Serialize)]
struct Envelope<'a> {
    result: bool,
    code: i64,
    message: &'a str,
    data: Value,
    permission: Option<&'a Value>,
    request_id: &'a str,
    job_request_id: &'a str,
}

pub(super) fn envelope(request_id: &str, result: Result<Value, ApiError>) -> Response {
    let (status, body) = match &result {
        Ok(data) => (
            StatusCode::OK,
            Envelope {
                result: true,
                code: SUCCESS,
                message: "success",
                data: data.clone(),
                permission: None,
                request_id,
                job_request_id: request_id,
            },
        ),
        Err(e) => (
            e.http_status,
            Envelope {
                result: false,
                code: e.code,
                message: &e.message,
                data: Value::Null,
                permission: e.permission.as_ref(),
                request_id,
                job_request_id: request_id,
            },
        ),
    };
    let mut response = (status, axum::Json(body)).into_response();
    tag(&mut response, request_id);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_of(response: Response) -> Value {
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn a_refusal_is_answered_with_the_requests_id_and_its_http_status() {
        let request = ApiRequest::begin("fast_execute_script");
        assert_eq!(request.id().len(), 32);
        let refusal = ApiError::invalid("timeout", "0 is outside [1, 86400]")
            .with_http_status(StatusCode::PAYLOAD_TOO_LARGE);
        let response = request.answer(Err(refusal));
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(response.headers()["x-request-id"], request.id());
        let body = body_of(response).await;
        assert_eq!(body["result"], false);
        assert_eq!(body["data"], Value::Null);
        assert!(
            body["message"].as_str().unwrap().contains("timeout"),
            "{body}"
        );
        assert_eq!(body["request_id"], request.id());
        assert_eq!(body["job_request_id"], request.id());
    }

    #[tokio::test]
    async fn a_success_is_answered_in_the_envelope() {
        let request = ApiRequest::begin("stream_job");
        let response = request.answer(Ok(serde_json::json!({"job_instance_id": 7})));
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-request-id"], request.id());
        let body = body_of(response).await;
        assert_eq!(body["result"], true);
        assert_eq!(body["code"], SUCCESS);
        assert_eq!(body["message"], "success");
        assert_eq!(body["data"]["job_instance_id"], 7);
        assert_eq!(body["request_id"], request.id());
    }

    #[test]
    fn every_request_gets_an_id_of_its_own() {
        assert_ne!(
            ApiRequest::begin("get_job_instance_list").id(),
            ApiRequest::begin("get_job_instance_list").id()
        );
    }
}
