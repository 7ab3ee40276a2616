//! `get_step_instance_status`: one step's hosts grouped by status and tag, filtered as bk-job
//! filters them (`batch`, `status`, `tag`, `search_ip`, `keyword` in the log,
//! `max_host_num_per_group`), each host with its rolling batch.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    ApiError,
    auth::Caller,
    params::{Params, lenient},
    query::{asked_count, load_step, results_at},
    reply::{self, HostResult},
};
use crate::Shared;

/// Hosts whose logs a `keyword` search reads, at most: beyond it the search is refused rather
/// than left to read without bound.
const MAX_KEYWORD_HOSTS: usize = 5_000;

/// Log bytes one `keyword` search reads, at most, over all its hosts.
const MAX_KEYWORD_BYTES: usize = 64 << 20;

/// Whether `log` holds `keyword`, counting its bytes into `scanned`: past `budget` the search
/// is refused (it would read without bound, up to every host's whole log).
fn log_matches(
    scanned: &mut usize,
    budget: usize,
    log: &[u8],
    keyword: &str,
) -> Result<bool, ApiError> {
    *scanned = scanned.saturating_add(log.len());
    if *scanned > budget {
        return Err(ApiError::invalid(
            "keyword",
            format!(
                "a log search reads at most {budget} bytes of logs; narrow it with batch, status or search_ip"
            ),
        ));
    }
    Ok(String::from_utf8_lossy(log).contains(keyword))
}

#[derive(Debug, Deserialize)]
struct StepStatusRequest {
    #[serde(deserialize_with = "lenient::int")]
    job_instance_id: i64,
    #[serde(deserialize_with = "lenient::int")]
    step_instance_id: i64,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    execute_count: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    batch: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    max_host_num_per_group: Option<i64>,
    keyword: Option<String>,
    search_ip: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    status: Option<i64>,
    tag: Option<String>,
}

#[derive(Debug, Serialize)]
struct GroupHost {
    #[serde(flatten)]
    result: HostResult,
    status_desc: &'static str,
    /// The host's rolling batch (from 1); 0 in a step that does not roll.
    batch: i32,
}

#[derive(Debug, Serialize)]
struct Group {
    result_type: i32,
    result_type_desc: &'static str,
    tag: String,
    host_size: usize,
    host_result_list: Vec<GroupHost>,
}

#[derive(Debug, Serialize)]
struct StepStatusReply {
    step_instance_id: i64,
    execute_count: i64,
    name: String,
    #[serde(rename = "type")]
    step_type: i32,
    status: i32,
    create_time: i64,
    start_time: Option<i64>,
    end_time: Option<i64>,
    total_time: Option<i64>,
    step_result_group_list: Vec<Group>,
}

/// bk-job's description of a host status (`ExecuteObjectTaskStatusEnum`, English).
pub fn host_status_desc(status: i32) -> &'static str {
    fleetrun_api::HostStatus::from_code(status).description()
}

pub async fn get_step_instance_status(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    let req: StepStatusRequest = params.parse()?;
    let (_, step) = load_step(
        shared,
        caller,
        params,
        req.job_instance_id,
        req.step_instance_id,
    )
    .await?;
    // bk-job: the latest execute_count unless one is asked for.
    let asked = asked_count(&step, req.execute_count)?;
    let execute_count = asked.unwrap_or(reply::retries(step.execute_count));
    if let Some(n) = req.max_host_num_per_group
        && n < 0
    {
        return Err(ApiError::invalid(
            "max_host_num_per_group",
            format!("{n} is negative"),
        ));
    }
    let batches = shared.store.host_batches(step.step_instance_id).await?;
    let mut hosts = results_at(shared, step.step_instance_id, asked).await?;
    // bk-job: no batch (or 0) is every batch.
    if let Some(batch) = req.batch.filter(|b| *b > 0) {
        hosts.retain(|h| {
            batches
                .get(&h.bk_host_id)
                .is_some_and(|b| i64::from(*b) == batch)
        });
    }
    if let Some(ip) = req.search_ip.as_deref().filter(|s| !s.is_empty()) {
        hosts.retain(|h| h.ip.contains(ip));
    }
    if let Some(keyword) = req.keyword.as_deref().filter(|s| !s.is_empty()) {
        if hosts.len() > MAX_KEYWORD_HOSTS {
            return Err(ApiError::invalid(
                "keyword",
                format!(
                    "a log search reads at most {MAX_KEYWORD_HOSTS} hosts' logs; narrow it with batch, status or search_ip"
                ),
            ));
        }
        let mut kept = Vec::with_capacity(hosts.len());
        let mut scanned = 0;
        for host in hosts {
            let log = shared
                .store
                .host_log_at(step.step_instance_id, host.bk_host_id, asked)
                .await?;
            if log_matches(&mut scanned, MAX_KEYWORD_BYTES, &log, keyword)? {
                kept.push(host);
            }
        }
        hosts = kept;
    }
    let mut groups: BTreeMap<(i32, String), Vec<GroupHost>> = BTreeMap::new();
    for host in &hosts {
        groups
            .entry((host.status, host.tag.clone()))
            .or_default()
            .push(GroupHost {
                result: reply::host_result(host),
                status_desc: host_status_desc(host.status),
                batch: batches.get(&host.bk_host_id).copied().unwrap_or(0),
            });
    }
    let limit = req
        .max_host_num_per_group
        .and_then(|n| usize::try_from(n).ok());
    let step_result_group_list = groups
        .into_iter()
        .map(|((status, tag), mut list)| {
            let host_size = list.len();
            // With `status` / `tag`, the other groups keep their counts but not their hosts.
            let chosen = req.status.is_none_or(|s| s == i64::from(status))
                && req.tag.as_deref().is_none_or(|t| t == tag);
            if !chosen {
                list.clear();
            } else if let Some(limit) = limit {
                list.truncate(limit);
            }
            Group {
                result_type: status,
                result_type_desc: host_status_desc(status),
                tag,
                host_size,
                host_result_list: list,
            }
        })
        .collect();
    reply::data(StepStatusReply {
        step_instance_id: step.step_instance_id,
        execute_count,
        name: step.name.clone(),
        step_type: step.step_type,
        status: step.status,
        create_time: step.create_time,
        start_time: step.start_time,
        end_time: step.end_time,
        total_time: reply::total_time(step.start_time, step.end_time),
        step_result_group_list,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keyword_search_stops_at_its_byte_budget() {
        let log = vec![b'a'; 1000];
        let mut scanned = 0;
        // Many hosts' logs, none matching: the search reads until the budget, then refuses.
        let mut read = 0;
        let refused = loop {
            match log_matches(&mut scanned, 4_500, &log, "needle") {
                Ok(found) => {
                    assert!(!found);
                    read += 1;
                }
                Err(e) => break e,
            }
        };
        assert_eq!(read, 4);
        assert_eq!(refused.code, 1_240_003, "{refused:?}");
        assert!(refused.message.starts_with("keyword"), "{refused:?}");
        let mut scanned = 0;
        assert!(log_matches(&mut scanned, 4_500, b"a needle", "needle").unwrap());
    }
}
