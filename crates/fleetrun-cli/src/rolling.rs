//! Rolling jobs from the command line: `run --batch ... --dry-run` prints the batches the
//! controller would make (`preview_rolling`); `confirm`, `ignore` and `retry` are
//! `operate_step_instance` on the job's step.

use serde_json::{Value, json};

use crate::{
    args::Output,
    commands::{Ctx, print, print_json},
    error::{CliError, exit},
};

/// bk-job's step operation codes.
pub const IGNORE: i64 = 3;
pub const CONFIRM: i64 = 13;
pub const RETRY_FAILED: i64 = 2;
pub const RETRY_ALL: i64 = 8;

/// Prints the batches of a `run` request without submitting it.
pub async fn dry_run(ctx: &Ctx, request: &Value) -> Result<u8, CliError> {
    let mut preview = json!({
        "target_server": request["target_server"],
        "rolling_config": request["rolling_config"],
    });
    for key in ["bk_scope_type", "bk_scope_id"] {
        preview[key] = request[key].clone();
    }
    let data = ctx.client.call("preview_rolling", preview).await?;
    if ctx.output != Output::Text {
        print_json(&data)?;
        return Ok(exit::OK);
    }
    let mut text = format!(
        "{} hosts in {} batches ({}); nothing was run\n",
        data["total_host_size"],
        data["total_batch"],
        data["expression"].as_str().unwrap_or("")
    );
    for batch in data["batch_list"].as_array().into_iter().flatten() {
        let hosts: Vec<String> = batch["host_list"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|h| format!("{} ({})", h["bk_host_id"], h["ip"].as_str().unwrap_or("")))
            .collect();
        text.push_str(&format!(
            "batch {:>3}: {:>5} hosts  {}\n",
            batch["batch"],
            batch["host_size"],
            hosts.join(", ")
        ));
    }
    print(&text)?;
    Ok(exit::OK)
}

/// Sends one step operation to the job's (only) step.
pub async fn operate(ctx: &Ctx, job: i64, code: i64) -> Result<u8, CliError> {
    let query = ctx.client.scoped(json!({"job_instance_id": job}))?;
    let status = ctx.client.call("get_job_instance_status", query).await?;
    let step = status["step_instance_list"][0]["step_instance_id"]
        .as_i64()
        .ok_or_else(|| CliError::usage(format!("job {job} has no step")))?;
    let request = ctx.client.scoped(json!({
        "job_instance_id": job,
        "step_instance_id": step,
        "operation_code": code,
    }))?;
    let data = ctx.client.call("operate_step_instance", request).await?;
    match ctx.output {
        Output::Text => {
            let what = match code {
                CONFIRM => "confirmed: the next batch goes out",
                IGNORE => "failures ignored",
                RETRY_FAILED => "the failed hosts run again",
                RETRY_ALL => "every host runs again",
                _ => "done",
            };
            print(&format!("job {job}: {what}\n"))?;
        }
        _ => print_json(&data)?,
    }
    Ok(exit::OK)
}
