//! HTML made on the server: escaping, the page frame, and the small formatting helpers every page
//! shares. Every value from a user, a host or the inventory goes through [`esc`].

use std::fmt::Write as _;

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};

use fleetrun_api::{HostStatus, JobStatus, ScriptLanguage};

use super::{ASSET_VERSION, Viewer};

/// `text` with `& < > " '` escaped, safe inside element content and quoted attributes.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `text` percent-encoded for a query string value.
pub fn url(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~:".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A whole page: the frame with navigation for `viewer`, `title`, and `body`.
pub fn page(viewer: &Viewer, title: &str, body: &str) -> Response {
    let nav = [
        ("/console/jobs", "Jobs"),
        ("/console/execute", "Quick execute"),
        ("/console/scripts", "Scripts"),
        ("/console/hosts", "Hosts"),
    ];
    let mut links = String::new();
    for (href, name) in nav {
        let _ = write!(links, r#"<a href="{href}">{name}</a>"#);
    }
    let role = match viewer.role {
        super::config::Role::Viewer => "viewer",
        super::config::Role::Operator => "operator",
    };
    let html = format!(
        r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>{title} · fleetrun</title>
<link rel="stylesheet" href="/console/assets/console.css?v={ASSET_VERSION}">
<script src="/console/assets/console.js?v={ASSET_VERSION}" defer></script>
</head><body>
<a class="skip" href="#main">Skip to content</a>
<header><nav aria-label="main"><span class="brand">fleetrun</span>{links}</nav>
<form method="post" action="/console/logout" class="who"><span id="who">{user} ({role})</span>
<input type="hidden" name="csrf" value="{csrf}"><button type="submit" id="logout">Sign out</button></form></header>
<main id="main" tabindex="-1"><h1>{title}</h1>
{body}
</main></body></html>"##,
        title = esc(title),
        user = esc(&viewer.user.name),
        csrf = esc(&viewer.csrf),
    );
    html_response(StatusCode::OK, html)
}

/// A page for someone not signed in (the sign-in form, errors before sign-in).
pub fn bare_page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>{title} · fleetrun</title>
<link rel="stylesheet" href="/console/assets/console.css?v={ASSET_VERSION}">
</head><body><main id="main" class="narrow"><h1>{title}</h1>
{body}
</main></body></html>"#,
        title = esc(title),
    );
    html_response(status, html)
}

pub fn html_response(status: StatusCode, html: String) -> Response {
    let mut response = (status, html).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    secure_headers(headers);
    response
}

/// Headers on every console reply: no framing, no sniffing, only the console's own scripts and
/// styles, nothing cached (pages show jobs and logs).
pub fn secure_headers(headers: &mut axum::http::HeaderMap) {
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS` UTC; empty for none.
pub fn time(ms: Option<i64>) -> String {
    let Some(ms) = ms.filter(|ms| *ms > 0) else {
        return String::new();
    };
    let secs = ms.div_euclid(1000);
    let (days, rest) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// `YYYY-MM-DDTHH:MM` (an `<input type="datetime-local">`, read as UTC) as Unix milliseconds.
pub fn parse_time(text: &str) -> Option<i64> {
    let (date, clock) = text.split_once('T').unwrap_or((text, "00:00"));
    let mut date = date.splitn(3, '-').map(str::parse::<i64>);
    let (y, m, d) = (date.next()?.ok()?, date.next()?.ok()?, date.next()?.ok()?);
    let mut clock = clock.splitn(3, ':').map(|p| p.parse::<i64>());
    let (h, min) = (clock.next()?.ok()?, clock.next()?.ok()?);
    let s = clock.next().and_then(Result::ok).unwrap_or(0);
    if !(1970..=9999).contains(&y)
        || !(1..=12).contains(&m)
        || !(1..=31).contains(&d)
        || !(0..24).contains(&h)
        || !(0..60).contains(&min)
        || !(0..60).contains(&s)
    {
        return None;
    }
    Some(((days_from_civil(y, m, d) * 86400) + h * 3600 + min * 60 + s) * 1000)
}

/// A duration in milliseconds, in words an operator reads at a glance.
pub fn duration(ms: i64) -> String {
    match ms {
        ms if ms < 1000 => format!("{ms} ms"),
        ms if ms < 60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        ms if ms < 3_600_000 => format!("{} min {} s", ms / 60_000, ms % 60_000 / 1000),
        ms => format!("{} h {} min", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

// Howard Hinnant's algorithms for the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A job or step status in words.
pub fn job_status(status: i32) -> &'static str {
    match JobStatus::from_code(status) {
        JobStatus::Pending => "pending",
        JobStatus::Running => "running",
        JobStatus::Success => "success",
        JobStatus::Failed => "failed",
        JobStatus::Skipped => "skipped",
        JobStatus::IgnoreError => "ignored error",
        JobStatus::WaitingUser => "waiting for user",
        JobStatus::Terminated | JobStatus::TerminateSuccess => "terminated",
        JobStatus::Abnormal => "abnormal",
        JobStatus::Terminating => "terminating",
        _ => "other",
    }
}

/// A host status in words.
pub fn host_status(status: i32) -> &'static str {
    match HostStatus::from_code(status) {
        HostStatus::Unknown | HostStatus::Waiting => "waiting",
        HostStatus::Running => "running",
        HostStatus::LastSuccess | HostStatus::Success => "success",
        HostStatus::ScriptFailed => "script failed",
        HostStatus::ScriptTimeout => "script timeout",
        HostStatus::NonZeroExit => "non-zero exit",
        HostStatus::AgentTimeout => "agent timeout",
        HostStatus::FileLogTimeout => "file log timeout",
        HostStatus::FileTimeout => "file task timeout",
        HostStatus::AgentAbnormal => "agent abnormal",
        HostStatus::UserNotExist => "user does not exist",
        HostStatus::AgentTaskError => "agent task error",
        HostStatus::TerminateSuccess => "terminated",
        _ => "other",
    }
}

/// The CSS class of a status badge: ok, bad, run or wait.
pub fn job_class(status: i32) -> &'static str {
    match JobStatus::from_code(status) {
        JobStatus::Success => "ok",
        JobStatus::Pending | JobStatus::WaitingUser => "wait",
        JobStatus::Running | JobStatus::Terminating => "run",
        _ => "bad",
    }
}

pub fn host_class(status: i32) -> &'static str {
    match HostStatus::from_code(status) {
        HostStatus::LastSuccess | HostStatus::Success => "ok",
        HostStatus::Unknown | HostStatus::Waiting => "wait",
        HostStatus::Running => "run",
        _ => "bad",
    }
}

/// A script language's name; SQL and unknown numbers are "other", as no job runs them.
pub fn language(code: i32) -> &'static str {
    match ScriptLanguage::from_code(code) {
        language if language.runs_on_hosts() => language.name().unwrap_or("other"),
        _ => "other",
    }
}

/// Links to the pages of a paginated list: `base` already holds the other parameters.
pub fn pager(base: &str, page: i64, per_page: i64, total: i64) -> String {
    let pages = ((total + per_page - 1) / per_page).max(1);
    let mut out = format!(
        r#"<nav class="pager" aria-label="pages"><span>page {} of {pages} ({total})</span>"#,
        page + 1
    );
    if page > 0 {
        let _ = write!(
            out,
            r#" <a rel="prev" href="{base}&amp;page={}">previous</a>"#,
            page - 1
        );
    }
    if page + 1 < pages {
        let _ = write!(
            out,
            r#" <a rel="next" href="{base}&amp;page={}">next</a>"#,
            page + 1
        );
    }
    out.push_str("</nav>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_in_values_is_escaped() {
        assert_eq!(
            esc(r#"<script>alert("x")</script>&'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;"
        );
        assert_eq!(url("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }

    #[test]
    fn times_round_trip_through_the_calendar() {
        assert_eq!(time(Some(0)), "");
        assert_eq!(time(Some(1_700_000_000_000)), "2023-11-14 22:13:20");
        assert_eq!(parse_time("2023-11-14T22:13:20"), Some(1_700_000_000_000));
        assert_eq!(parse_time("2024-02-29T00:00"), Some(1_709_164_800_000));
        assert_eq!(parse_time("2024-13-01T00:00"), None);
        assert_eq!(parse_time("yesterday"), None);
        assert_eq!(duration(1500), "1.5 s");
        assert_eq!(duration(61_000), "1 min 1 s");
    }
}
