//! The jobs pages: the list, one job (hosts grouped by status and identical output, live while
//! it runs), one host's log (live tail, download), and the terminate and retry actions.
//!
//! A job of 10,000 hosts is grouped on the server in one pass over its results and the heads of
//! its logs (two queries), and the page lists at most [`HOSTS_PER_PAGE`] hosts: the browser gets
//! a page of a few hundred elements whatever the job's size.

use std::{collections::HashMap, fmt::Write as _, sync::Arc, time::Duration};

use axum::{
    body::Body,
    extract::{Path, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{
        IntoResponse, Redirect, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use base64::Engine as _;
use fleetrun_store::{HostResultRecord, JobFilter, JobRecord};
use serde::Deserialize;
use serde_json::json;

use super::{
    Console, Page, Refusal, Viewer, checked_form,
    html::{self, esc, url},
    page_scope, require_operator, scope_select,
};
use crate::status;

/// Hosts listed on one page of a job.
pub const HOSTS_PER_PAGE: usize = 100;
/// Jobs listed on one page.
const JOBS_PER_PAGE: i64 = 25;
/// How much of each host's log groups hosts by output and is searched.
const HEAD_BYTES: i64 = 64 * 1024;
/// Output shown for a group before "…".
const PREVIEW_CHARS: usize = 2000;

#[derive(Debug, Deserialize, Default)]
pub struct ListQuery {
    scope: Option<String>,
    status: Option<String>,
    name: Option<String>,
    operator: Option<String>,
    from: Option<String>,
    to: Option<String>,
    page: Option<i64>,
}

pub async fn list(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Page {
    let (viewer, _) = console.viewer(&headers)?;
    let shared = &console.shared;
    let (scope_type, scope_id) = page_scope(shared, &viewer, q.scope.as_deref())?;
    let scope = format!("{scope_type}:{scope_id}");
    let text = |v: &Option<String>| {
        v.as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let status: Option<i32> = match text(&q.status) {
        Some(s) => Some(
            s.parse()
                .map_err(|_| Refusal::BadInput(format!("status: {s:?} is not a status number")))?,
        ),
        None => None,
    };
    let time = |field: &str, v: &Option<String>| -> Result<Option<i64>, Refusal> {
        match text(v) {
            Some(t) => html::parse_time(&t).map(Some).ok_or_else(|| {
                Refusal::BadInput(format!(
                    "{field}: {t:?} is not a date and time (YYYY-MM-DDTHH:MM, UTC)"
                ))
            }),
            None => Ok(None),
        }
    };
    let from = time("from", &q.from)?;
    let to = time("to", &q.to)?;
    let page = q.page.unwrap_or(0).clamp(0, 1_000_000);
    let filter = JobFilter {
        bk_scope_type: scope_type.clone(),
        bk_scope_id: scope_id.clone(),
        create_time_start: from.unwrap_or(0),
        create_time_end: to.unwrap_or(i64::MAX),
        operator: text(&q.operator),
        name: text(&q.name),
        status,
        start: page * JOBS_PER_PAGE,
        length: JOBS_PER_PAGE,
        ..Default::default()
    };
    let (total, jobs) = shared.store.list_jobs(&filter).await?;

    let mut body = String::new();
    let statuses = [
        (2, "running"),
        (3, "success"),
        (4, "failed"),
        (1, "pending"),
        (11, "terminated"),
        (9, "abnormal"),
    ];
    let mut options = String::from(r#"<option value="">any</option>"#);
    for (code, name) in statuses {
        let sel = if status == Some(code) {
            " selected"
        } else {
            ""
        };
        let _ = write!(options, r#"<option value="{code}"{sel}>{name}</option>"#);
    }
    let _ = write!(
        body,
        r#"<form method="get" action="/console/jobs" class="filters" role="search">
<label>Scope {scopes}</label>
<label>Status <select name="status" id="status">{options}</select></label>
<label>Name <input name="name" id="name" value="{name}"></label>
<label>Operator <input name="operator" id="operator" value="{operator}"></label>
<label>From (UTC) <input type="datetime-local" name="from" value="{from}"></label>
<label>To (UTC) <input type="datetime-local" name="to" value="{to}"></label>
<button type="submit">Filter</button></form>"#,
        scopes = scope_select(shared, &viewer, &scope),
        name = esc(q.name.as_deref().unwrap_or("")),
        operator = esc(q.operator.as_deref().unwrap_or("")),
        from = esc(q.from.as_deref().unwrap_or("")),
        to = esc(q.to.as_deref().unwrap_or("")),
    );
    if jobs.is_empty() {
        body.push_str(r#"<p class="empty">No jobs match.</p>"#);
    } else {
        body.push_str(r#"<div class="scroll"><table id="jobs"><thead><tr><th>Id</th><th>Name</th><th>Status</th><th>Operator</th><th>Created (UTC)</th><th>Duration</th></tr></thead><tbody>"#);
        for job in &jobs {
            let _ = write!(
                body,
                r#"<tr><td><a href="/console/jobs/{id}">{id}</a></td><td><a href="/console/jobs/{id}">{name}</a></td><td><span class="badge {class}">{status}</span></td><td>{operator}</td><td>{created}</td><td>{duration}</td></tr>"#,
                id = job.job_instance_id,
                name = esc(&job.name),
                class = html::job_class(job.status),
                status = html::job_status(job.status),
                operator = esc(&job.operator),
                created = html::time(Some(job.create_time)),
                duration = job_duration(job).map(html::duration).unwrap_or_default(),
            );
        }
        body.push_str("</tbody></table></div>");
    }
    let base = format!(
        "/console/jobs?scope={}&amp;status={}&amp;name={}&amp;operator={}&amp;from={}&amp;to={}",
        url(&scope),
        status.map(|s| s.to_string()).unwrap_or_default(),
        url(q.name.as_deref().unwrap_or("")),
        url(q.operator.as_deref().unwrap_or("")),
        url(q.from.as_deref().unwrap_or("")),
        url(q.to.as_deref().unwrap_or("")),
    );
    body.push_str(&html::pager(&base, page, JOBS_PER_PAGE, total));
    Ok(html::page(&viewer, "Jobs", &body))
}

fn job_duration(job: &JobRecord) -> Option<i64> {
    let start = job.start_time?;
    let end = job.end_time.unwrap_or_else(crate::now_ms);
    Some((end - start).max(0))
}

/// The job, if the viewer may see it; "no such job" otherwise, whichever it is.
async fn visible_job(console: &Console, viewer: &Viewer, id: i64) -> Result<JobRecord, Refusal> {
    let not_found = || Refusal::NotFound(format!("job {id}: no such job"));
    let job = console.shared.store.job(id).await?.ok_or_else(not_found)?;
    if !viewer.may_see_scope(&job.bk_scope_type, &job.bk_scope_id) {
        return Err(not_found());
    }
    Ok(job)
}

fn step_of(job: &JobRecord) -> Result<&fleetrun_store::StepRecord, Refusal> {
    job.steps
        .first()
        .ok_or_else(|| Refusal::Internal(format!("job {} has no step", job.job_instance_id)))
}

/// Hosts that ended with the same status, exit code and output.
#[derive(Debug)]
pub struct Group {
    /// Stable within the job's page: `<status>-<digest>`.
    pub key: String,
    pub status: i32,
    pub exit_code: Option<i32>,
    /// Indexes into the results.
    pub hosts: Vec<usize>,
    /// The beginning of their common output.
    pub preview: String,
    pub output_bytes: i64,
}

/// Groups a step's results by status, exit code and output: the bad first, then the running
/// and waiting, then the successful; larger groups first within each.
pub fn group_hosts(results: &[HostResultRecord], heads: &HashMap<i64, Vec<u8>>) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    let mut by_key: HashMap<String, usize> = HashMap::new();
    for (i, r) in results.iter().enumerate() {
        let head = heads
            .get(&r.bk_host_id)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(&r.output_bytes.to_le_bytes());
        ctx.update(&r.exit_code.unwrap_or(i32::MIN).to_le_bytes());
        ctx.update(head);
        let digest = ctx.finish();
        let hex = hex::encode(&digest.as_ref()[..8]);
        let key = format!("{}-{hex}", r.status);
        match by_key.get(&key) {
            Some(&g) => groups[g].hosts.push(i),
            None => {
                by_key.insert(key.clone(), groups.len());
                let text = String::from_utf8_lossy(head);
                let mut preview: String = text.chars().take(PREVIEW_CHARS).collect();
                if text.chars().nth(PREVIEW_CHARS).is_some() || r.output_bytes > head.len() as i64 {
                    preview.push('…');
                }
                groups.push(Group {
                    key,
                    status: r.status,
                    exit_code: r.exit_code,
                    hosts: vec![i],
                    preview,
                    output_bytes: r.output_bytes,
                });
            }
        }
    }
    let rank = |status: i32| match html::host_class(status) {
        "bad" => 0,
        "run" => 1,
        "wait" => 2,
        _ => 3,
    };
    groups.sort_by(|a, b| {
        (rank(a.status), std::cmp::Reverse(a.hosts.len()), &a.key).cmp(&(
            rank(b.status),
            std::cmp::Reverse(b.hosts.len()),
            &b.key,
        ))
    });
    groups
}

#[derive(Debug, Deserialize, Default)]
pub struct JobQuery {
    /// An address (or part of one), or text in the hosts' output.
    q: Option<String>,
    /// Only this group's hosts.
    group: Option<String>,
    page: Option<usize>,
    /// Only the live part of the page (for the script's refresh).
    fragment: Option<u8>,
}

pub async fn job(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Query(q): Query<JobQuery>,
) -> Page {
    let (viewer, _) = console.viewer(&headers)?;
    let job = visible_job(&console, &viewer, id).await?;
    let step = step_of(&job)?;
    let store = &console.shared.store;
    let (results, heads) = tokio::try_join!(
        store.host_results(step.step_instance_id),
        store.log_heads(step.step_instance_id, HEAD_BYTES),
    )?;
    let heads: HashMap<i64, Vec<u8>> = heads.into_iter().map(|h| (h.bk_host_id, h.data)).collect();
    let live = render_live(&job, &results, &heads, &q);
    if q.fragment == Some(1) {
        return Ok(html::html_response(StatusCode::OK, live));
    }

    let (script, param) = store
        .step_payload(step.step_instance_id)
        .await?
        .unwrap_or_default();
    let param = if step.is_param_sensitive {
        r#"<span class="masked" id="param">•••••• (sensitive: not shown)</span>"#.to_owned()
    } else if param.is_empty() {
        r#"<span class="muted" id="param">none</span>"#.to_owned()
    } else {
        format!(r#"<code id="param">{}</code>"#, esc(&param))
    };
    let failed = results
        .iter()
        .filter(|r| {
            !status::host::UNFINISHED.contains(&r.status) && !status::host::is_success(r.status)
        })
        .count();
    let mut actions = String::new();
    if viewer.role == super::Role::Operator {
        if !status::job::is_finished(job.status) && job.status != status::job::PENDING {
            let _ = write!(
                actions,
                r#"<form method="post" action="/console/jobs/{id}/terminate"><input type="hidden" name="csrf" value="{csrf}"><button type="submit" class="danger" id="terminate">Terminate</button></form>"#,
                csrf = esc(&viewer.csrf)
            );
        }
        // A file job's stored step is no script: the console has no retry for it.
        let is_script = step.step_type != crate::api::files::STEP_TYPE_FILE;
        if status::job::is_finished(job.status) && failed > 0 && is_script {
            let _ = write!(
                actions,
                r#"<form method="post" action="/console/jobs/{id}/retry"><input type="hidden" name="csrf" value="{csrf}"><button type="submit" id="retry">Retry the {failed} failed host{s}</button></form>"#,
                csrf = esc(&viewer.csrf),
                s = if failed == 1 { "" } else { "s" },
            );
        }
    }
    let body = format!(
        r#"<dl class="facts">
<dt>Status</dt><dd><span class="badge {class}" id="job-status">{status}</span></dd>
<dt>Operator</dt><dd id="operator">{operator}</dd>
<dt>Scope</dt><dd>{scope_type}:{scope_id}</dd>
<dt>Created (UTC)</dt><dd>{created}</dd>
<dt>Duration</dt><dd>{duration}</dd>
<dt>Account</dt><dd>{account}</dd>
<dt>Language</dt><dd>{language}</dd>
<dt>Timeout</dt><dd>{timeout} s</dd>
<dt>Parameters</dt><dd>{param}</dd>
</dl>
<div class="actions">{actions}</div>
<details><summary>Script</summary><pre class="script" id="script">{script}</pre></details>
<form method="get" action="/console/jobs/{id}" class="filters" role="search">
<label>Find hosts by address or output <input name="q" id="q" value="{query}"></label>
<button type="submit">Search</button>{clear}</form>
<section id="live" aria-live="polite" data-job="{id}" data-running="{running}">{live}</section>"#,
        class = html::job_class(job.status),
        status = html::job_status(job.status),
        operator = esc(&job.operator),
        scope_type = esc(&job.bk_scope_type),
        scope_id = esc(&job.bk_scope_id),
        created = html::time(Some(job.create_time)),
        duration = job_duration(&job).map(html::duration).unwrap_or_default(),
        account = esc(&step.account),
        language = html::language(step.script_language),
        timeout = step.timeout,
        script = esc(&String::from_utf8_lossy(&script)),
        query = esc(q.q.as_deref().unwrap_or("")),
        clear = if q.q.is_some() || q.group.is_some() {
            format!(r#" <a href="/console/jobs/{id}">show all</a>"#)
        } else {
            String::new()
        },
        running = u8::from(!status::job::is_finished(job.status)),
    );
    Ok(html::page(
        &viewer,
        &format!("Job {id}: {}", job.name),
        &body,
    ))
}

/// The part of a job's page that changes while it runs: counts, groups, hosts.
fn render_live(
    job: &JobRecord,
    results: &[HostResultRecord],
    heads: &HashMap<i64, Vec<u8>>,
    q: &JobQuery,
) -> String {
    let id = job.job_instance_id;
    let mut out = String::new();
    // Counts per status.
    let mut counts: Vec<(i32, usize)> = Vec::new();
    for r in results {
        match counts.iter_mut().find(|(s, _)| *s == r.status) {
            Some((_, n)) => *n += 1,
            None => counts.push((r.status, 1)),
        }
    }
    counts.sort();
    let _ = write!(
        out,
        r#"<p class="counts" id="counts"><span class="badge {class}" id="live-status">{status}</span> {n} host{s}:"#,
        class = html::job_class(job.status),
        status = html::job_status(job.status),
        n = results.len(),
        s = if results.len() == 1 { "" } else { "s" },
    );
    for (status, n) in &counts {
        let _ = write!(
            out,
            r#" <span class="badge {}">{} {n}</span>"#,
            html::host_class(*status),
            html::host_status(*status)
        );
    }
    out.push_str("</p>");

    let groups = group_hosts(results, heads);
    out.push_str(r#"<h2>Groups</h2><ol class="groups" id="groups">"#);
    for g in &groups {
        let sample: Vec<String> = g
            .hosts
            .iter()
            .take(5)
            .map(|&i| esc(&results[i].ip))
            .collect();
        let more = g.hosts.len().saturating_sub(5);
        let _ = write!(
            out,
            r#"<li class="group"><a class="group-link" href="/console/jobs/{id}?group={key}#hosts"><span class="badge {class}">{status}</span> <strong>{n} host{s}</strong>{exit}</a> <span class="sample">{sample}{more}</span><pre class="preview">{preview}</pre></li>"#,
            key = url(&g.key),
            class = html::host_class(g.status),
            status = html::host_status(g.status),
            n = g.hosts.len(),
            s = if g.hosts.len() == 1 { "" } else { "s" },
            exit = g
                .exit_code
                .map(|c| format!(", exit {c}"))
                .unwrap_or_default(),
            sample = sample.join(", "),
            more = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            },
            preview = if g.output_bytes == 0 && g.preview.is_empty() {
                "(no output)".to_owned()
            } else {
                esc(&g.preview)
            },
        );
    }
    out.push_str("</ol>");

    // The hosts, filtered by group and search, one page of them.
    let group_hosts: Option<&[usize]> = q
        .group
        .as_deref()
        .and_then(|key| groups.iter().find(|g| g.key == key))
        .map(|g| g.hosts.as_slice());
    let needle = q.q.as_deref().map(str::trim).filter(|s| !s.is_empty());
    let mut selected: Vec<usize> = match group_hosts {
        Some(hosts) => hosts.to_vec(),
        None if q.group.is_some() => Vec::new(),
        None => (0..results.len()).collect(),
    };
    if let Some(needle) = needle {
        selected.retain(|&i| {
            let r = &results[i];
            r.ip.contains(needle)
                || heads
                    .get(&r.bk_host_id)
                    .is_some_and(|h| contains(h, needle.as_bytes()))
        });
    }
    selected.sort_by_key(|&i| results[i].bk_host_id);
    let page = q.page.unwrap_or(0).min(selected.len() / HOSTS_PER_PAGE);
    let _ = write!(
        out,
        r#"<h2 id="hosts">Hosts{what}</h2><div class="scroll"><table id="host-table"><thead><tr><th>Host</th><th>Address</th><th>Status</th><th>Exit</th><th>Output</th><th>Time</th></tr></thead><tbody>"#,
        what = match (q.group.is_some(), needle) {
            (_, Some(n)) => format!(" matching {}", esc(n)),
            (true, None) => " of the group".to_owned(),
            _ => String::new(),
        }
    );
    for &i in selected
        .iter()
        .skip(page * HOSTS_PER_PAGE)
        .take(HOSTS_PER_PAGE)
    {
        let r = &results[i];
        let took = match (r.start_time, r.end_time) {
            (Some(s), Some(e)) => html::duration((e - s).max(0)),
            _ => String::new(),
        };
        let _ = write!(
            out,
            r#"<tr><td><a class="host-log" href="/console/jobs/{id}/hosts/{host}">{host}</a></td><td>{cloud}:{ip}</td><td><span class="badge {class}">{status}</span></td><td>{exit}</td><td>{bytes} B</td><td>{took}</td></tr>"#,
            host = r.bk_host_id,
            cloud = r.bk_cloud_id,
            ip = esc(&r.ip),
            class = html::host_class(r.status),
            status = html::host_status(r.status),
            exit = r.exit_code.map(|c| c.to_string()).unwrap_or_default(),
            bytes = r.output_bytes,
        );
    }
    out.push_str("</tbody></table></div>");
    let base = format!(
        "/console/jobs/{id}?q={}&amp;group={}",
        url(needle.unwrap_or("")),
        url(q.group.as_deref().unwrap_or(""))
    );
    out.push_str(&html::pager(
        &base,
        page as i64,
        HOSTS_PER_PAGE as i64,
        selected.len() as i64,
    ));
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// Server-sent events for a job page: `changed` after the store committed something of the job
/// (at most every half second), `ended` once it finished. The page then fetches its live part.
pub async fn events(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Result<Response, Refusal> {
    let (viewer, _) = console.viewer(&headers)?;
    let job = visible_job(&console, &viewer, id).await?;
    let step = step_of(&job)?.step_instance_id;
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(4);
    let shared = console.shared.clone();
    tokio::spawn(async move {
        let watch = shared.store.watch_job(id, step);
        loop {
            match shared.store.job_status(id).await {
                Ok(Some(s)) if status::job::is_finished(s) => {
                    let _ = tx
                        .send(Event::default().event("ended").data(s.to_string()))
                        .await;
                    return;
                }
                Ok(Some(_)) => {}
                _ => return,
            }
            tokio::select! {
                () = watch.changed() => {}
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
                () = shared.shutdown.cancelled() => return,
                () = tx.closed() => return,
            }
            if tx
                .send(Event::default().event("changed").data(""))
                .await
                .is_err()
            {
                return;
            }
            // A job of many hosts commits all the time: the page refreshes twice a second at most.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let stream = EventStream(rx);
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

struct EventStream(tokio::sync::mpsc::Receiver<Event>);

impl futures_core::Stream for EventStream {
    type Item = Result<Event, std::convert::Infallible>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|e| e.map(Ok))
    }
}

async fn host_result(
    console: &Console,
    job: &JobRecord,
    host: i64,
) -> Result<HostResultRecord, Refusal> {
    let step = step_of(job)?;
    console
        .shared
        .store
        .host_results(step.step_instance_id)
        .await?
        .into_iter()
        .find(|r| r.bk_host_id == host)
        .ok_or_else(|| {
            Refusal::NotFound(format!(
                "host {host}: not a host of job {}",
                job.job_instance_id
            ))
        })
}

/// The most of a log one page shows; the rest is in the download.
const PAGE_LOG_BYTES: i64 = 1024 * 1024;

pub async fn host_log(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Path((id, host)): Path<(i64, i64)>,
) -> Page {
    let (viewer, _) = console.viewer(&headers)?;
    let job = visible_job(&console, &viewer, id).await?;
    let result = host_result(&console, &job, host).await?;
    let step = step_of(&job)?.step_instance_id;
    let (log, end) = console
        .shared
        .store
        .log_from(step, host, 0, PAGE_LOG_BYTES)
        .await?;
    let running = status::host::UNFINISHED.contains(&result.status);
    let body = format!(
        r#"<p><a href="/console/jobs/{id}">← job {id}</a></p>
<dl class="facts"><dt>Address</dt><dd>{cloud}:{ip}</dd>
<dt>Status</dt><dd><span class="badge {class}" id="host-status">{status}</span></dd>
<dt>Exit code</dt><dd id="exit-code">{exit}</dd><dt>Output</dt><dd>{bytes} bytes</dd></dl>
<p class="actions"><a class="button" id="download" href="/console/jobs/{id}/hosts/{host}/log?download=1" download>Download the log</a></p>
<pre class="log" id="log" tabindex="0" data-tail="/console/jobs/{id}/hosts/{host}/log" data-from="{end}" data-running="{running}">{log}</pre>{more}"#,
        cloud = result.bk_cloud_id,
        ip = esc(&result.ip),
        class = html::host_class(result.status),
        status = html::host_status(result.status),
        exit = result.exit_code.map(|c| c.to_string()).unwrap_or_default(),
        bytes = result.output_bytes,
        log = esc(&String::from_utf8_lossy(&log)),
        running = u8::from(running),
        more = if end < result.output_bytes && !running {
            r#"<p class="muted">The page shows the first MiB; download the log for the rest.</p>"#
        } else {
            ""
        },
    );
    Ok(html::page(
        &viewer,
        &format!("Job {id}, host {host}: {}", result.ip),
        &body,
    ))
}

#[derive(Debug, Deserialize, Default)]
pub struct LogQuery {
    from: Option<i64>,
    download: Option<u8>,
}

/// A host's log as text: from byte `from` on for a live tail (the reply says where it ended in
/// `X-Log-End` and whether the host finished in `X-Log-Finished`), or whole as a download.
pub async fn log_text(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Path((id, host)): Path<(i64, i64)>,
    Query(q): Query<LogQuery>,
) -> Page {
    let (viewer, _) = console.viewer(&headers)?;
    let job = visible_job(&console, &viewer, id).await?;
    // Read the status before the log: a host seen finished has all its log stored already.
    let result = host_result(&console, &job, host).await?;
    let step = step_of(&job)?.step_instance_id;
    let from = q.from.unwrap_or(0);
    if from < 0 {
        return Err(Refusal::BadInput(format!("from: {from} is negative")));
    }
    let download = q.download == Some(1);
    let limit = if download {
        i64::MAX / 2
    } else {
        PAGE_LOG_BYTES
    };
    let (data, end) = if download {
        (
            console.shared.store.host_log(step, host).await?,
            result.output_bytes,
        )
    } else {
        console
            .shared
            .store
            .log_from(step, host, from, limit)
            .await?
    };
    let mut response = Body::from(data).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(&end.to_string()) {
        h.insert("x-log-end", v);
    }
    let finished = !status::host::UNFINISHED.contains(&result.status);
    h.insert(
        "x-log-finished",
        HeaderValue::from_static(if finished { "1" } else { "0" }),
    );
    if download {
        let name = format!("job-{id}-host-{host}.log");
        if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
            h.insert(header::CONTENT_DISPOSITION, v);
        }
    }
    html::secure_headers(h);
    Ok(response)
}

pub async fn terminate(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    body: Body,
) -> Page {
    let (viewer, _) = checked_form(&console, &headers, body).await?;
    require_operator(&viewer)?;
    let job = visible_job(&console, &viewer, id).await?;
    console
        .call(
            &viewer,
            "operate_job_instance",
            json!({
                "bk_scope_type": job.bk_scope_type,
                "bk_scope_id": job.bk_scope_id,
                "job_instance_id": id,
                "operation_code": 1,
            }),
        )
        .await?;
    Ok(Redirect::to(&format!("/console/jobs/{id}")).into_response())
}

/// Runs the job's script again, as a new job, on the hosts where it failed.
pub async fn retry(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    body: Body,
) -> Page {
    let (viewer, _) = checked_form(&console, &headers, body).await?;
    require_operator(&viewer)?;
    let job = visible_job(&console, &viewer, id).await?;
    if !status::job::is_finished(job.status) {
        return Err(Refusal::BadInput(format!(
            "job {id} is still {}: retry once it has ended",
            html::job_status(job.status)
        )));
    }
    let step = step_of(&job)?;
    if step.step_type == crate::api::files::STEP_TYPE_FILE {
        return Err(Refusal::BadInput(format!(
            "job {id} is a file push: the console retries scripts only; push the files again"
        )));
    }
    let failed: Vec<i64> = console
        .shared
        .store
        .host_results(step.step_instance_id)
        .await?
        .into_iter()
        .filter(|r| {
            !status::host::UNFINISHED.contains(&r.status) && !status::host::is_success(r.status)
        })
        .map(|r| r.bk_host_id)
        .collect();
    if failed.is_empty() {
        return Err(Refusal::BadInput(format!(
            "job {id} has no failed host to retry"
        )));
    }
    let (script, param) = console
        .shared
        .store
        .step_payload(step.step_instance_id)
        .await?
        .ok_or_else(|| Refusal::Internal(format!("job {id}: its step's script is gone")))?;
    let param = if step.is_param_sensitive && !param.is_empty() {
        console
            .shared
            .cipher
            .open(&param, id, step.step_instance_id)
            .map_err(|e| Refusal::Internal(format!("job {id}: its sealed parameter: {e}")))?
    } else {
        param
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let name: String = format!("retry of job {id}: {}", job.name)
        .chars()
        .take(512)
        .collect();
    let mut request = json!({
        "bk_scope_type": job.bk_scope_type,
        "bk_scope_id": job.bk_scope_id,
        "task_name": name,
        "script_content": b64.encode(&script),
        "script_language": step.script_language,
        "account_id": step.account_id,
        "timeout": step.timeout,
        "is_param_sensitive": i32::from(step.is_param_sensitive),
        "target_server": {"host_id_list": failed},
    });
    if !param.is_empty() {
        request["script_param"] = json!(b64.encode(param.as_bytes()));
    }
    let reply = console
        .call(&viewer, "fast_execute_script", request)
        .await?;
    let new_id = reply["job_instance_id"]
        .as_i64()
        .ok_or_else(|| Refusal::Internal("fast_execute_script: no job_instance_id".to_owned()))?;
    Ok(Redirect::to(&format!("/console/jobs/{new_id}")).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(host: i64, status: i32, exit: Option<i32>, bytes: i64) -> HostResultRecord {
        HostResultRecord {
            bk_host_id: host,
            bk_cloud_id: 0,
            ip: format!("10.0.0.{host}"),
            status,
            tag: String::new(),
            exit_code: exit,
            error_code: 0,
            start_time: None,
            end_time: None,
            output_bytes: bytes,
            dropped_bytes: 0,
            dropped_lines: 0,
            survivors: 0,
        }
    }

    #[test]
    fn hosts_group_by_status_exit_and_output_failures_first() {
        let results = vec![
            result(1, 9, Some(0), 3),
            result(2, 9, Some(0), 3),
            result(3, 104, Some(1), 4),
            result(4, 9, Some(0), 3),
            result(5, 9, Some(0), 3),
        ];
        let heads: HashMap<i64, Vec<u8>> = [
            (1, b"ok\n".to_vec()),
            (2, b"ok\n".to_vec()),
            (3, b"bad\n".to_vec()),
            (4, b"ok\n".to_vec()),
            (5, b"ko\n".to_vec()),
        ]
        .into();
        let groups = group_hosts(&results, &heads);
        let shape: Vec<(i32, usize, &str)> = groups
            .iter()
            .map(|g| (g.status, g.hosts.len(), g.preview.as_str()))
            .collect();
        assert_eq!(
            shape,
            vec![(104, 1, "bad\n"), (9, 3, "ok\n"), (9, 1, "ko\n")]
        );
        // Keys are stable from one reading to the next (the page links to them).
        assert_eq!(groups[1].key, group_hosts(&results, &heads)[1].key);
    }

    #[test]
    fn ten_thousand_hosts_group_quickly() {
        let results: Vec<_> = (0..10_000)
            .map(|i| {
                result(
                    i,
                    if i % 10 == 0 { 104 } else { 9 },
                    Some(i32::from(i % 10 == 0)),
                    12,
                )
            })
            .collect();
        let heads: HashMap<i64, Vec<u8>> = (0..10_000)
            .map(|i| (i, format!("host {}\n", i % 3).into_bytes()))
            .collect();
        let started = std::time::Instant::now();
        let groups = group_hosts(&results, &heads);
        assert_eq!(groups.iter().map(|g| g.hosts.len()).sum::<usize>(), 10_000);
        assert!(groups.len() <= 6);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }
}
