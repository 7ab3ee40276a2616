//! bk-job error codes and the error every API returns.

use axum::http::StatusCode;
use serde_json::Value;

/// bk-job's codes, named.
pub mod code {
    pub const NO_PERMISSION: i64 = 1_238_001;
    pub const API_USER_NO_ACCESS: i64 = 1_239_002;
    pub const API_UNSUPPORTED: i64 = 1_239_003;
    pub const INTERNAL: i64 = 1_240_002;
    pub const BAD_REQUEST: i64 = 1_240_003;
    pub const MISSING_PARAM: i64 = 1_241_004;
    pub const BAD_SCRIPT_LANGUAGE: i64 = 1_241_005;
    pub const TOO_MANY_LOG_HOSTS: i64 = 1_241_007;
    pub const SCRIPT_NOT_FOUND: i64 = 1_243_001;
    pub const SCRIPT_NOT_RUNNABLE: i64 = 1_244_018;
    pub const JOB_NOT_FOUND: i64 = 1_244_006;
    pub const STEP_NOT_FOUND: i64 = 1_244_007;
    pub const HOST_NOT_FOUND: i64 = 1_244_030;
    /// bk-job's DB_ERROR: the database is unusable.
    pub const DATABASE_UNWRITABLE: i64 = 1_252_001;
}

/// A refused or failed request: bk-job code, a message naming the field, and for permission
/// errors the `permission` object.
#[derive(Debug)]
pub struct ApiError {
    pub code: i64,
    pub message: String,
    pub permission: Option<Value>,
    /// 200 like every bk-job reply, except where the HTTP layer refuses the request itself.
    pub http_status: StatusCode,
}

impl ApiError {
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            permission: None,
            http_status: StatusCode::OK,
        }
    }

    pub fn with_http_status(mut self, status: StatusCode) -> Self {
        self.http_status = status;
        self
    }

    /// A field failed validation (1240003).
    pub fn invalid(field: &str, why: impl std::fmt::Display) -> Self {
        Self::new(code::BAD_REQUEST, format!("{field}: {why}"))
    }

    /// A required field is missing (1241004).
    pub fn missing(field: &str) -> Self {
        Self::new(code::MISSING_PARAM, format!("{field} is required"))
    }

    /// Something failed on our side; the details go to the log, not to the client.
    pub fn internal(context: &str, error: impl std::fmt::Display) -> Self {
        tracing::error!("{context}: {error}");
        Self::new(code::INTERNAL, format!("internal error: {context}"))
    }
}

impl From<fleetrun_store::StoreError> for ApiError {
    fn from(e: fleetrun_store::StoreError) -> Self {
        if e.is_write_failure() {
            tracing::error!("store: {e}");
            return Self::new(
                code::DATABASE_UNWRITABLE,
                format!("the controller cannot write to its database: {e}"),
            );
        }
        Self::internal("store", e)
    }
}
