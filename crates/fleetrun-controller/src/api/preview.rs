//! `preview_rolling` (fleetrun's): the batches a `rolling_config` would make of a
//! `target_server`, resolved as `fast_execute_script` resolves it, without running anything.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{ApiError, auth::Caller, params::Params, reply, scope};
use crate::{Shared, rolling::RollingConfig};

#[derive(Debug, Deserialize)]
struct PreviewRequest {
    target_server: Option<super::execute::TargetServer>,
    rolling_config: Option<Value>,
}

#[derive(Debug, Serialize)]
struct PreviewHost {
    bk_host_id: i64,
    bk_cloud_id: i64,
    ip: String,
}

#[derive(Debug, Serialize)]
struct PreviewBatch {
    batch: usize,
    host_size: usize,
    host_list: Vec<PreviewHost>,
}

#[derive(Debug, Serialize)]
struct PreviewReply {
    expression: String,
    total_host_size: usize,
    total_batch: usize,
    batch_list: Vec<PreviewBatch>,
}

pub async fn preview_rolling(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    let req: PreviewRequest = params.parse()?;
    let scope = scope::resolve(shared, caller, params)?;
    let config = RollingConfig::from_json(
        req.rolling_config
            .as_ref()
            .filter(|v| !v.is_null())
            .ok_or_else(|| ApiError::missing("rolling_config"))?,
    )?;
    let wanted = super::execute::wanted_targets(req.target_server)?;
    let inventory = shared.inventory.current().await?;
    let chosen = super::execute::resolve_wanted(caller, &inventory, &scope, &wanted)?;
    let hosts: Vec<PreviewHost> = chosen
        .iter()
        .map(|h| PreviewHost {
            bk_host_id: h.bk_host_id,
            bk_cloud_id: h.bk_cloud_id,
            ip: h.ip.to_canonical().to_string(),
        })
        .collect();
    let indexes: Vec<usize> = (0..hosts.len()).collect();
    let batches = config.batches(&indexes)?;
    let mut hosts: Vec<Option<PreviewHost>> = hosts.into_iter().map(Some).collect();
    let batch_list: Vec<PreviewBatch> = batches
        .iter()
        .enumerate()
        .map(|(i, batch)| PreviewBatch {
            batch: i + 1,
            host_size: batch.len(),
            host_list: batch.iter().filter_map(|&h| hosts[h].take()).collect(),
        })
        .collect();
    reply::data(PreviewReply {
        expression: config.expression,
        total_host_size: indexes.len(),
        total_batch: batch_list.len(),
        batch_list,
    })
}
