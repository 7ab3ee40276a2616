//! bk-job error codes and the error every API returns.

use axum::http::StatusCode;
use serde_json::Value;

/// bk-job's codes, named: the backend's from `ErrorCode.java`, the API gateway's (16xxxxx) where
/// bk-job leaves a check to the gateway.
pub mod code {
    /// PERMISSION_DENIED: the app may not act on the scope (or resource).
    pub const NO_PERMISSION: i64 = 1_238_001;
    /// The gateway's INVALID_ARGS, which it answers for missing or wrong app or user credentials.
    pub const GATEWAY_INVALID_ARGS: i64 = 1_640_001;
    /// The gateway's API_NOT_FOUND: no API at this method and path.
    pub const GATEWAY_API_NOT_FOUND: i64 = 1_640_401;
    /// INTERNAL_ERROR.
    pub const INTERNAL: i64 = 1_240_002;
    /// BAD_REQUEST: a field failed validation.
    pub const BAD_REQUEST: i64 = 1_240_003;
    /// ILLEGAL_PARAM: the request is invalid as a whole (an unknown operation, a time range too long).
    pub const ILLEGAL_PARAM: i64 = 1_241_002;
    /// UNSUPPORTED_OPERATION: the operation does not fit the resource's state.
    pub const UNSUPPORTED_OPERATION: i64 = 1_241_003;
    /// MISSING_PARAM_WITH_PARAM_NAME.
    pub const MISSING_PARAM: i64 = 1_241_004;
    /// ILLEGAL_PARAM_WITH_PARAM_NAME: bk-job's code for an unknown `script_language`.
    pub const BAD_SCRIPT_LANGUAGE: i64 = 1_241_005;
    /// MISSING_OR_ILLEGAL_PARAM_WITH_PARAM_NAME.
    pub const MISSING_OR_ILLEGAL_PARAM: i64 = 1_241_007;
    /// MISSING_OR_ILLEGAL_PARAM_WITH_PARAM_NAME, as the log APIs answer too many hosts.
    pub const TOO_MANY_LOG_HOSTS: i64 = MISSING_OR_ILLEGAL_PARAM;
    /// NOT_SUPPORT_FEATURE: a bk-job feature fleetrun does not carry out.
    pub const NOT_SUPPORTED: i64 = 1_241_011;
    /// UNSUPPORTED_OPERATION_REPEAT_START_JOB.
    pub const REPEAT_START_JOB: i64 = 1_241_015;
    /// SCRIPT_NOT_EXIST.
    pub const SCRIPT_NOT_FOUND: i64 = 1_243_001;
    /// DELETE_ONLINE_SCRIPT_FAIL: an online script version cannot be deleted.
    pub const DELETE_ONLINE_SCRIPT: i64 = 1_243_005;
    /// ACCOUNT_ALIAS_EXIST.
    pub const ACCOUNT_ALIAS_EXISTS: i64 = 1_243_007;
    /// SCRIPT_VERSION_NAME_EXIST.
    pub const SCRIPT_VERSION_EXISTS: i64 = 1_243_036;
    /// SCRIPT_NOT_EXECUTABLE_STATUS.
    pub const SCRIPT_NOT_RUNNABLE: i64 = 1_244_018;
    /// ACCOUNT_NO_PERMISSION: the account may not be used in the scope.
    pub const ACCOUNT_NOT_ALLOWED: i64 = 1_244_004;
    /// ACCOUNT_NOT_EXIST.
    pub const ACCOUNT_NOT_FOUND: i64 = 1_244_003;
    /// TASK_INSTANCE_NOT_EXIST.
    pub const JOB_NOT_FOUND: i64 = 1_244_006;
    /// TASK_INSTANCE_NOT_EXIST, also what bk-job answers for a step of another job.
    pub const STEP_NOT_FOUND: i64 = JOB_NOT_FOUND;
    /// DANGEROUS_SCRIPT_FORBIDDEN_EXECUTION: an intercepting dangerous rule matched the script.
    pub const DANGEROUS_SCRIPT: i64 = 1_244_019;
    /// DANGEROUS_RUlE_EXIST: a rule with the expression and languages exists.
    pub const DANGEROUS_RULE_EXISTS: i64 = 1_243_056;
    /// No rule has the id (bk-job fails internally there): MISSING_OR_ILLEGAL_PARAM naming `id`.
    pub const DANGEROUS_RULE_NOT_FOUND: i64 = MISSING_OR_ILLEGAL_PARAM;
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
    /// What the log and the audit trail record instead of `message`, when the message carries
    /// what the caller sent (a refused script's lines) and must not be kept.
    pub recorded: Option<String>,
}

impl ApiError {
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            permission: None,
            http_status: StatusCode::OK,
            recorded: None,
        }
    }

    /// Records `recorded` in the log and the audit trail instead of the message.
    pub fn recorded_as(mut self, recorded: impl Into<String>) -> Self {
        self.recorded = Some(recorded.into());
        self
    }

    /// What the log and the audit trail keep of the refusal.
    pub fn recorded_message(&self) -> &str {
        self.recorded.as_deref().unwrap_or(&self.message)
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
