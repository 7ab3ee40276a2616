//! What the store's integration tests share. The crate's own `test_job` is `#[cfg(test)]`, and
//! so out of an integration test's reach.

use fleetrun_store::{NewHostResult, NewJob, NewStep};

/// A job in `status` whose one shell step runs `script` on hosts 1 to `hosts`, each waiting, at
/// an address made of its id (host 1 at 10.0.0.1).
pub fn job_on_hosts(name: &str, status: i32, script: &[u8], hosts: i64) -> NewJob {
    NewJob {
        name: name.into(),
        operator: "o".into(),
        app_code: "a".into(),
        bk_scope_type: "biz".into(),
        bk_scope_id: "2".into(),
        status,
        job_type: 1,
        launch_mode: 2,
        callback_url: None,
        create_time: 0,
        step: NewStep {
            name: "s".into(),
            step_type: 1,
            script_language: 1,
            script_content: script.to_vec(),
            script_param: String::new(),
            is_param_sensitive: false,
            timeout: 60,
            account_id: 1,
            account: "root".into(),
        },
        hosts: (1..=hosts)
            .map(|id| NewHostResult {
                bk_host_id: id,
                bk_cloud_id: 0,
                ip: format!("10.{}.{}.{}", id / 65_536, (id / 256) % 256, id % 256),
                status: 5,
            })
            .collect(),
    }
}
