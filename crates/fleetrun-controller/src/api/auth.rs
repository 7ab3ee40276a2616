//! Who is calling: bk-job app credentials from the `X-Bkapi-Authorization` header (API gateway
//! style) or from `bk_app_code`/`bk_app_secret`/`bk_username` parameters (ESB style).

use axum::http::HeaderMap;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::{ApiError, error::code, params::Params};
use crate::config::{AppConfig, Scopes};

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub app_code: String,
    /// The operator recorded on jobs.
    pub username: String,
    /// The app's configured scopes.
    scopes: Scopes,
    /// `admin = true`.
    admin: bool,
    /// `public_scripts = true`.
    public_scripts: bool,
}

impl Caller {
    /// Whether the calling app may act on this scope.
    pub fn may_use(&self, scope: fleetrun_inventory::Scope) -> bool {
        self.scopes.allows(scope)
    }

    /// Whether the app may act on every scope: only such an app sees every host.
    pub fn is_unrestricted(&self) -> bool {
        self.scopes.is_unrestricted()
    }

    /// Whether the app was granted administration (`admin = true`), which no scope implies.
    pub fn is_admin(&self) -> bool {
        self.admin
    }

    /// Whether the app was granted changing the public scripts (`public_scripts = true`).
    pub fn may_manage_public_scripts(&self) -> bool {
        self.public_scripts
    }

    /// Whether the app may see a host of business `bk_biz_id` (directly, or through a business
    /// set it may use).
    pub fn may_see_business(
        &self,
        inventory: &fleetrun_inventory::Inventory,
        bk_biz_id: Option<i64>,
    ) -> bool {
        if self.is_unrestricted() {
            return true;
        }
        let Some(biz) = bk_biz_id else { return false };
        self.may_use(fleetrun_inventory::Scope::Biz(biz))
            || inventory.business_sets().iter().any(|set| {
                set.members.contains(&biz)
                    && self.may_use(fleetrun_inventory::Scope::BizSet(set.bk_biz_set_id))
            })
    }
}

#[derive(Deserialize, Default)]
struct Credentials {
    bk_app_code: Option<String>,
    bk_app_secret: Option<String>,
    bk_username: Option<String>,
}

/// The credentials in the `X-Bkapi-Authorization` header, if it is there.
fn header_credentials(headers: &HeaderMap) -> Result<Credentials, ApiError> {
    match headers.get("x-bkapi-authorization") {
        Some(header) => serde_json::from_slice::<Credentials>(header.as_bytes()).map_err(|e| {
            ApiError::new(
                code::GATEWAY_INVALID_ARGS,
                format!("X-Bkapi-Authorization: not a JSON object of credentials: {e}"),
            )
        }),
        None => Ok(Credentials::default()),
    }
}

/// The app code and secret a request carries before its body (in the header, or else in the
/// query string), as [`authenticate`] would read them; `None` when either is missing there.
pub fn head_credentials(
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Option<(String, String)>, ApiError> {
    let creds = header_credentials(headers)?;
    let from_query = |key: &str| {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query?).ok()?;
        pairs.into_iter().find(|(k, _)| k == key).map(|(_, v)| v)
    };
    let code = creds.bk_app_code.or_else(|| from_query("bk_app_code"));
    let secret = creds.bk_app_secret.or_else(|| from_query("bk_app_secret"));
    Ok(code.zip(secret))
}

/// The configured app with this code and secret.
pub fn check_app<'a>(
    apps: &'a [AppConfig],
    app_code: &str,
    secret: &str,
) -> Result<&'a AppConfig, ApiError> {
    // Every configured secret is compared, in constant time, so timing tells nothing about which
    // part of the credentials was wrong.
    let mut matched = None;
    for app in apps {
        let code_ok = app.bk_app_code.as_bytes().ct_eq(app_code.as_bytes());
        let secret_ok = app.bk_app_secret.as_bytes().ct_eq(secret.as_bytes());
        if bool::from(code_ok & secret_ok) {
            matched = Some(app);
        }
    }
    matched.ok_or_else(|| {
        ApiError::new(
            code::GATEWAY_INVALID_ARGS,
            "app authentication failed: unknown bk_app_code or wrong bk_app_secret",
        )
    })
}

pub fn authenticate(
    apps: &[AppConfig],
    headers: &HeaderMap,
    params: &Params,
) -> Result<Caller, ApiError> {
    let mut creds = header_credentials(headers)?;
    let param = |key: &str| params.str(key).map(str::to_owned);
    creds.bk_app_code = creds.bk_app_code.or_else(|| param("bk_app_code"));
    creds.bk_app_secret = creds.bk_app_secret.or_else(|| param("bk_app_secret"));
    creds.bk_username = creds.bk_username.or_else(|| param("bk_username"));

    let (Some(app_code), Some(secret)) = (creds.bk_app_code, creds.bk_app_secret) else {
        return Err(ApiError::new(
            code::GATEWAY_INVALID_ARGS,
            "app authentication failed: bk_app_code and bk_app_secret are required",
        ));
    };
    let app = check_app(apps, &app_code, &secret)?;
    let username = creds
        .bk_username
        .filter(|u| !u.is_empty())
        .ok_or_else(|| ApiError::missing("bk_username"))?;
    // The operator is written to the log and shown back to every reader of the job: a control
    // character there could only forge log lines or terminal output.
    if username.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "bk_username",
            "must not contain control characters",
        ));
    }
    Ok(Caller {
        app_code,
        username,
        scopes: app.scopes.clone(),
        admin: app.admin,
        public_scripts: app.public_scripts,
    })
}
