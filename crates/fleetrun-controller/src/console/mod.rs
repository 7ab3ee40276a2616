//! The web console: server-rendered pages under `/console` for running, watching and
//! investigating jobs in a browser.
//!
//! Pages are HTML made here, with one small hand-written script for live updates (server-sent
//! events from the store's job watch, then the changed part of the page fetched again) and one
//! stylesheet, both compiled into the binary: nothing to build, no CDN, and every page works
//! without the script, only less live.
//!
//! Users sign in with a name and password from `[console]` (argon2 hashes), or are named by a
//! trusted reverse proxy. Each user sees only the scopes its configuration lists: jobs, logs,
//! scripts and hosts of other businesses are answered as if they did not exist. What a user
//! does (run, terminate, retry, publish) goes through the bk-job API itself, in-process, as the
//! app `console.app` with the user as operator, so every check the API makes applies and every
//! job records who ran it.
//!
//! **Architecture invariant:** every form carries the session's CSRF token, and every POST
//! without it is refused before anything is done.

pub mod config;
mod execute;
mod hosts;
mod html;
mod jobs;
mod library;
mod session;

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use http_body_util::BodyExt as _;
use serde_json::Value;

pub use config::{ConsoleConfig, ConsoleUser, Role};
pub use session::hash_password;

use crate::Shared;
use html::esc;
use session::{LOGIN_COOKIE, SESSION_COOKIE, Sessions};

/// Changes whenever the assets do, so browsers fetch them again.
const ASSET_VERSION: &str = env!("CARGO_PKG_VERSION");
const CSS: &str = include_str!("../../console/console.css");
const JS: &str = include_str!("../../console/console.js");
/// The largest form the console reads (a script of the quick execute page is the big part).
const MAX_FORM: usize = 2 * 1024 * 1024;
/// How long a sign-in waits for one of the password checks allowed at once.
const VERIFICATION_WAIT: Duration = Duration::from_secs(5);

/// The console's state.
#[derive(Debug)]
pub struct Console {
    shared: Arc<Shared>,
    sessions: Sessions,
    throttle: session::Throttle,
    /// Password checks run at once: argon2 costs memory and CPU, and anyone can ask for one.
    verifications: tokio::sync::Semaphore,
    /// The API, called in-process; made on first use (it contains this console's routes too).
    api: OnceLock<Router>,
}

/// The signed-in user of a request.
#[derive(Debug, Clone)]
pub struct Viewer {
    pub user: ConsoleUser,
    pub role: Role,
    /// The session's CSRF token, written into every form.
    pub csrf: String,
}

impl Viewer {
    /// Whether the user may see and act on a scope.
    pub fn may_use(&self, scope: fleetrun_inventory::Scope) -> bool {
        self.user.scopes.allows(scope)
    }

    /// Whether the user may see a stored job's scope (as the job names it).
    pub fn may_see_scope(&self, scope_type: &str, scope_id: &str) -> bool {
        self.user.scopes.allows_text(scope_type, scope_id)
    }

    /// Whether the user may see a host of business `bk_biz_id` (directly, or through a business
    /// set it may use). Unplaced hosts are seen only by users of every scope.
    pub fn may_see_business(
        &self,
        inventory: &fleetrun_inventory::Inventory,
        bk_biz_id: Option<i64>,
    ) -> bool {
        if self.user.scopes.is_unrestricted() {
            return true;
        }
        let Some(biz) = bk_biz_id else { return false };
        self.may_use(fleetrun_inventory::Scope::Biz(biz))
            || inventory.business_sets().iter().any(|set| {
                set.members.contains(&biz)
                    && self.may_use(fleetrun_inventory::Scope::BizSet(set.bk_biz_set_id))
            })
    }

    /// The scopes of the inventory the user may use, businesses first.
    pub fn scopes(&self, inventory: &fleetrun_inventory::Inventory) -> Vec<(String, String)> {
        let mut scopes = Vec::new();
        for biz in inventory.businesses() {
            if self.may_use(fleetrun_inventory::Scope::Biz(biz.bk_biz_id)) {
                scopes.push((format!("biz:{}", biz.bk_biz_id), biz.name.clone()));
            }
        }
        for set in inventory.business_sets() {
            if self.may_use(fleetrun_inventory::Scope::BizSet(set.bk_biz_set_id)) {
                scopes.push((format!("biz_set:{}", set.bk_biz_set_id), set.name.clone()));
            }
        }
        scopes
    }

    fn is_operator(&self) -> bool {
        self.role == Role::Operator
    }
}

/// Why a console request was not served.
#[derive(Debug)]
pub enum Refusal {
    /// Not signed in: to the sign-in page.
    SignIn,
    /// 403 with a message (a missing CSRF token, a viewer asking to act).
    Forbidden(String),
    /// 404: no such thing, or one the user may not see (the same answer).
    NotFound(String),
    /// 400 naming the field.
    BadInput(String),
    /// The API refused an action: its code and message.
    Api(i64, String),
    /// The store failed: 500 without details (they are logged).
    Internal(String),
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (status, title, message) = match self {
            Refusal::SignIn => {
                let mut response = Redirect::to("/console/login").into_response();
                html::secure_headers(response.headers_mut());
                return response;
            }
            Refusal::Forbidden(m) => (StatusCode::FORBIDDEN, "Not allowed", m),
            Refusal::NotFound(m) => (StatusCode::NOT_FOUND, "Not found", m),
            Refusal::BadInput(m) => (StatusCode::BAD_REQUEST, "Invalid input", m),
            Refusal::Api(code, m) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "Refused",
                format!("{m} (code {code})"),
            ),
            Refusal::Internal(m) => {
                tracing::error!("console: {}", m.escape_debug());
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Internal error",
                    "the controller could not read its database; see its log".to_owned(),
                )
            }
        };
        html::bare_page(
            status,
            title,
            &format!(
                r#"<p class="error" role="alert">{}</p><p><a href="/console/jobs">Back to jobs</a></p>"#,
                esc(&message)
            ),
        )
    }
}

impl From<fleetrun_store::StoreError> for Refusal {
    fn from(e: fleetrun_store::StoreError) -> Self {
        Refusal::Internal(e.to_string())
    }
}

type Page = Result<Response, Refusal>;

/// The console's routes, mounted into the API's router.
pub fn router<S: Clone + Send + Sync + 'static>(shared: Arc<Shared>) -> Router<S> {
    let console = Arc::new(Console {
        sessions: Sessions::new(
            Duration::from_secs(shared.config.console.session_secs),
            Duration::from_secs(shared.config.console.idle_secs),
        ),
        shared,
        throttle: session::Throttle::default(),
        verifications: tokio::sync::Semaphore::new(2),
        api: OnceLock::new(),
    });
    Router::new()
        .route("/console", get(|| async { Redirect::to("/console/jobs") }))
        .route("/console/", get(|| async { Redirect::to("/console/jobs") }))
        .route("/console/login", get(login_form).post(login))
        .route("/console/logout", post(logout))
        .route(
            "/console/assets/console.css",
            get(|| asset(CSS, "text/css")),
        )
        .route(
            "/console/assets/console.js",
            get(|| asset(JS, "text/javascript")),
        )
        .route("/console/jobs", get(jobs::list))
        .route("/console/jobs/{id}", get(jobs::job))
        .route("/console/jobs/{id}/events", get(jobs::events))
        .route("/console/jobs/{id}/hosts/{host}", get(jobs::host_log))
        .route("/console/jobs/{id}/hosts/{host}/log", get(jobs::log_text))
        .route("/console/jobs/{id}/terminate", post(jobs::terminate))
        .route("/console/jobs/{id}/retry", post(jobs::retry))
        .route("/console/execute", get(execute::form).post(execute::submit))
        .route("/console/scripts", get(library::list))
        .route("/console/scripts/{id}", get(library::script))
        .route("/console/scripts/{id}/diff", get(library::diff))
        .route(
            "/console/scripts/{id}/versions/{version}/{action}",
            post(library::change_version),
        )
        .route("/console/hosts", get(hosts::list))
        .route("/console/topology", get(hosts::topology))
        .with_state(console)
}

async fn asset(text: &'static str, kind: &'static str) -> Response {
    let mut response = text.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=86400"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

impl Console {
    fn user(&self, name: &str) -> Option<&ConsoleUser> {
        self.shared
            .config
            .console
            .users
            .iter()
            .find(|u| u.name == name)
    }

    /// The signed-in user of a request: its session cookie, or the trusted proxy's header.
    fn viewer(&self, headers: &HeaderMap) -> Result<(Viewer, Option<String>), Refusal> {
        let config = &self.shared.config.console;
        if !config.enabled() {
            return Err(Refusal::NotFound(
                "the console is not configured ([console] users)".to_owned(),
            ));
        }
        if let Some(token) = session::cookie(headers, SESSION_COOKIE)
            && let Some(session) = self.sessions.touch(token)
        {
            let Some(user) = self.user(&session.user) else {
                self.sessions.end_user(&session.user);
                return Err(Refusal::SignIn);
            };
            return Ok((
                Viewer {
                    role: user.role,
                    user: user.clone(),
                    csrf: session.csrf,
                },
                Some(token.to_owned()),
            ));
        }
        if let (Some(name_header), Some(secret)) =
            (&config.trusted_proxy_header, &config.trusted_proxy_secret)
        {
            let sent = headers
                .get("x-fleetrun-proxy-secret")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if session::same_token(sent, secret)
                && let Some(name) = headers
                    .get(name_header.as_str())
                    .and_then(|v| v.to_str().ok())
                && let Some(user) = self.user(name)
            {
                // The proxy signs every request; its users still need a CSRF token, stable
                // per user and secret so that forms work across requests.
                let csrf = proxy_csrf(secret, &user.name);
                return Ok((
                    Viewer {
                        role: user.role,
                        user: user.clone(),
                        csrf,
                    },
                    None,
                ));
            }
        }
        Err(Refusal::SignIn)
    }

    /// The API's router, for in-process calls.
    fn api(&self) -> Router {
        self.api
            .get_or_init(|| crate::api::router(self.shared.clone()))
            .clone()
    }

    /// Calls a bk-job API in-process as the console's app, with `viewer` as the operator;
    /// returns its `data`, or its code and message.
    async fn call(&self, viewer: &Viewer, api: &str, mut body: Value) -> Result<Value, Refusal> {
        let config = &self.shared.config.console;
        let app_code = config.app.as_deref().unwrap_or_default();
        let apps = self.shared.apps.current();
        let app = apps
            .iter()
            .find(|a| a.bk_app_code == app_code)
            .ok_or_else(|| Refusal::Internal(format!("console.app {app_code:?} is not an app")))?;
        body["bk_app_code"] = Value::from(app.bk_app_code.clone());
        body["bk_app_secret"] = Value::from(app.bk_app_secret.clone());
        body["bk_username"] = Value::from(viewer.user.name.clone());
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("/api/v3/{api}/"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .map_err(|e| Refusal::Internal(e.to_string()))?;
        let service = hyper_util::service::TowerToHyperService::new(self.api());
        let response = hyper::service::Service::call(&service, request)
            .await
            .map_err(|e: std::convert::Infallible| Refusal::Internal(e.to_string()))?;
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| Refusal::Internal(e.to_string()))?
            .to_bytes();
        let reply: Value = serde_json::from_slice(&bytes)
            .map_err(|e| Refusal::Internal(format!("{api}: reply is not JSON: {e}")))?;
        if reply["result"].as_bool() == Some(true) {
            Ok(reply["data"].clone())
        } else {
            Err(Refusal::Api(
                reply["code"].as_i64().unwrap_or(-1),
                reply["message"].as_str().unwrap_or("refused").to_owned(),
            ))
        }
    }
}

fn proxy_csrf(secret: &str, user: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = ring::hmac::sign(&key, format!("console csrf {user}").as_bytes());
    base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        tag.as_ref(),
    )
}

/// A form's fields, as sent.
#[derive(Debug, Default)]
pub struct Form(Vec<(String, String)>);

impl Form {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The field, trimmed, or `None` when absent or blank.
    pub fn text(&self, key: &str) -> Option<&str> {
        self.get(key).map(str::trim).filter(|v| !v.is_empty())
    }

    pub fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The sign-in form's limit: a name, a password and a token. Read before anyone is known, so
/// an anonymous client may not make the controller hold more.
const MAX_LOGIN_FORM: usize = 4 * 1024;

/// Reads a form POST (`application/x-www-form-urlencoded`), at most `limit` bytes, within the
/// API's body timeout (`limits.http_body_timeout_secs`), so a client trickling a body cannot
/// hold a connection for ever.
async fn read_form(console: &Console, body: Body, limit: usize) -> Result<Form, Refusal> {
    let limited = http_body_util::Limited::new(body, limit);
    let wait = Duration::from_secs(console.shared.config.limits.http_body_timeout_secs);
    let bytes: Bytes = tokio::time::timeout(wait, limited.collect())
        .await
        .map_err(|_| Refusal::BadInput(format!("the form did not arrive within {wait:?}")))?
        .map_err(|_| Refusal::BadInput(format!("the form is larger than {limit} bytes")))?
        .to_bytes();
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(&bytes)
        .map(Form)
        .map_err(|e| Refusal::BadInput(format!("the form is not URL-encoded: {e}")))
}

/// The signed-in user of a form POST, with its fields, once the form's CSRF token matched the
/// session's. Nothing a form asks for is done before this.
async fn checked_form(
    console: &Console,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Viewer, Form), Refusal> {
    let (viewer, _) = console.viewer(headers)?;
    let form = read_form(console, body, MAX_FORM).await?;
    let sent = form.get("csrf").unwrap_or("");
    if !session::same_token(sent, &viewer.csrf) {
        return Err(Refusal::Forbidden(
            "csrf: the form's token is missing or stale; reload the page and try again".to_owned(),
        ));
    }
    Ok((viewer, form))
}

/// Refuses a viewer where an operator is needed.
fn require_operator(viewer: &Viewer) -> Result<(), Refusal> {
    if viewer.is_operator() {
        Ok(())
    } else {
        Err(Refusal::Forbidden(format!(
            "{} is a viewer: running, terminating and publishing need the operator role",
            viewer.user.name
        )))
    }
}

/// A `biz:<id>` or `biz_set:<id>` the viewer may use, checked against the inventory.
fn checked_scope(
    shared: &Shared,
    viewer: &Viewer,
    text: &str,
) -> Result<(String, String), Refusal> {
    let scope: fleetrun_inventory::Scope = text.parse().map_err(|_| {
        Refusal::BadInput(format!("scope: {text:?} is not biz:<id> or biz_set:<id>"))
    })?;
    let (kind, id) = match scope {
        fleetrun_inventory::Scope::Biz(id) => ("biz", id),
        fleetrun_inventory::Scope::BizSet(id) => ("biz_set", id),
    };
    if !viewer.may_use(scope) || !shared.inventory.base().has_scope(&scope) {
        return Err(Refusal::NotFound(format!("scope: no scope {text}")));
    }
    Ok((kind.to_owned(), id.to_string()))
}

/// The scope a page is about: the one asked for, else the viewer's first.
fn page_scope(
    shared: &Shared,
    viewer: &Viewer,
    asked: Option<&str>,
) -> Result<(String, String), Refusal> {
    match asked.filter(|s| !s.is_empty()) {
        Some(text) => checked_scope(shared, viewer, text),
        None => {
            let scopes = viewer.scopes(&shared.inventory.base());
            let (first, _) = scopes.first().ok_or_else(|| {
                Refusal::NotFound("none of your scopes is in the inventory".to_owned())
            })?;
            checked_scope(shared, viewer, first)
        }
    }
}

/// A `<select name="scope">` of the viewer's scopes.
fn scope_select(shared: &Shared, viewer: &Viewer, selected: &str) -> String {
    let mut out = String::from(r#"<select name="scope" id="scope">"#);
    for (value, name) in viewer.scopes(&shared.inventory.base()) {
        let sel = if value == selected { " selected" } else { "" };
        out.push_str(&format!(
            r#"<option value="{v}"{sel}>{n} ({v})</option>"#,
            v = esc(&value),
            n = esc(&name)
        ));
    }
    out.push_str("</select>");
    out
}

async fn login_form(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    login_page(&console, &headers, None)
}

fn login_page(console: &Console, headers: &HeaderMap, error: Option<&str>) -> Response {
    if !console.shared.config.console.enabled() {
        return Refusal::NotFound("the console is not configured ([console] users)".to_owned())
            .into_response();
    }
    if error.is_none() && console.viewer(headers).is_ok() {
        return Redirect::to("/console/jobs").into_response();
    }
    let token = session::random_token();
    let error = error
        .map(|e| {
            format!(
                r#"<p class="error" role="alert" id="login-error">{}</p>"#,
                esc(e)
            )
        })
        .unwrap_or_default();
    let status = if error.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::UNAUTHORIZED
    };
    let mut response = html::bare_page(
        status,
        "Sign in",
        &format!(
            r#"{error}<form method="post" action="/console/login" class="stack">
<input type="hidden" name="csrf" value="{token}">
<label>User <input name="user" id="user" autocomplete="username" required autofocus></label>
<label>Password <input name="password" id="password" type="password" autocomplete="current-password" required></label>
<button type="submit" id="sign-in">Sign in</button></form>"#
        ),
    );
    if let Ok(cookie) = HeaderValue::from_str(&session::set_cookie(
        LOGIN_COOKIE,
        &token,
        3600,
        console.shared.config.console.secure_cookies,
    )) {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    response
}

async fn login(State(console): State<Arc<Console>>, headers: HeaderMap, body: Body) -> Response {
    if !console.shared.config.console.enabled() {
        return Refusal::NotFound("the console is not configured ([console] users)".to_owned())
            .into_response();
    }
    let form = match read_form(&console, body, MAX_LOGIN_FORM).await {
        Ok(form) => form,
        Err(refusal) => return refusal.into_response(),
    };
    // No session yet: the form's token must match the cookie set with the form (a page of
    // another site can post a form but cannot read or set this cookie).
    let cookie = session::cookie(&headers, LOGIN_COOKIE).unwrap_or("");
    if !session::same_token(form.get("csrf").unwrap_or(""), cookie) {
        return Refusal::Forbidden(
            "csrf: the sign-in form's token is missing or stale; reload the page".to_owned(),
        )
        .into_response();
    }
    let name = form.get("user").unwrap_or("").to_owned();
    let password = form.get("password").unwrap_or("").to_owned();
    if let Err(wait) = console.throttle.attempt(&name) {
        tracing::warn!(user = ?name, "console sign-in refused: too many failures");
        let mut response = login_page(
            &console,
            &headers,
            Some(&format!(
                "Too many failed sign-ins for this user: try again in {} s.",
                wait.as_secs() + 1
            )),
        );
        *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        return response;
    }
    let hash = console
        .user(&name)
        .and_then(|u| u.password_hash.clone())
        .unwrap_or_else(|| session::decoy_hash().to_owned());
    let known = console
        .user(&name)
        .is_some_and(|u| u.password_hash.is_some());
    // argon2 takes tens of milliseconds of CPU: off the async workers, a few at a time.
    let matched = {
        // A queue of sign-ins behind the few checks allowed at once is refused, not left
        // holding its connection.
        let Ok(Ok(_turn)) =
            tokio::time::timeout(VERIFICATION_WAIT, console.verifications.acquire()).await
        else {
            let mut response = login_page(
                &console,
                &headers,
                Some("Too many sign-ins at once: try again shortly."),
            );
            *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            return response;
        };
        tokio::task::spawn_blocking(move || session::verify_password(&hash, &password))
            .await
            .unwrap_or(false)
    };
    if !(known && matched) {
        tracing::info!(user = ?name, "console sign-in refused");
        return login_page(&console, &headers, Some("Wrong user name or password."));
    }
    console.throttle.succeeded(&name);
    tracing::info!(user = ?name, "console sign-in");
    let token = console.sessions.start(&name);
    let mut response = Redirect::to("/console/jobs").into_response();
    let secure = console.shared.config.console.secure_cookies;
    let headers = response.headers_mut();
    for cookie in [
        session::set_cookie(
            SESSION_COOKIE,
            &token,
            console.shared.config.console.session_secs,
            secure,
        ),
        session::set_cookie(LOGIN_COOKIE, "", 0, secure),
    ] {
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            headers.append(header::SET_COOKIE, value);
        }
    }
    html::secure_headers(headers);
    response
}

async fn logout(State(console): State<Arc<Console>>, headers: HeaderMap, body: Body) -> Page {
    let (viewer, _) = checked_form(&console, &headers, body).await?;
    if let Some(token) = session::cookie(&headers, SESSION_COOKIE) {
        console.sessions.end(token);
    }
    tracing::info!(user = ?viewer.user.name, "console sign-out");
    let mut response = html::bare_page(
        StatusCode::OK,
        "Signed out",
        r#"<p id="signed-out">You are signed out.</p><p><a href="/console/login">Sign in again</a></p>"#,
    );
    if let Ok(value) = HeaderValue::from_str(&session::set_cookie(
        SESSION_COOKIE,
        "",
        0,
        console.shared.config.console.secure_cookies,
    )) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    Ok(response)
}
