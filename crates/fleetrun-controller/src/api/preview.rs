//! `preview_rolling` (fleetrun's): the batches a `rolling_config` would make of a
//! `target_server`, resolved as `fast_execute_script` resolves it, without running anything.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    ApiError,
    auth::Caller,
    params::{Params, lenient},
    reply, scope,
};
use crate::{Shared, rolling::RollingConfig};

#[derive(Debug, Deserialize)]
struct PreviewRequest {
    target_server: Option<TargetServer>,
    rolling_config: Option<Value>,
}

#[derive(Debug, Deserialize, Default)]
struct TargetServer {
    #[serde(default, deserialize_with = "lenient::opt_int_list")]
    host_id_list: Option<Vec<i64>>,
    ip_list: Option<Vec<IpTarget>>,
    dynamic_group_list: Option<Vec<GroupTarget>>,
    topo_node_list: Option<Vec<TopoTarget>>,
}

#[derive(Debug, Deserialize)]
struct GroupTarget {
    #[serde(deserialize_with = "lenient::text")]
    id: String,
}

#[derive(Debug, Deserialize)]
struct TopoTarget {
    #[serde(deserialize_with = "lenient::int")]
    id: i64,
    node_type: String,
}

#[derive(Debug, Deserialize)]
struct IpTarget {
    #[serde(deserialize_with = "lenient::int")]
    bk_cloud_id: i64,
    ip: String,
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
    let targets = req
        .target_server
        .ok_or_else(|| ApiError::missing("target_server"))?;
    let host_ids = targets.host_id_list.filter(|l| !l.is_empty());
    let ips = match (&host_ids, targets.ip_list.filter(|l| !l.is_empty())) {
        (None, Some(ips)) => {
            for target in &ips {
                if target.ip.parse::<std::net::IpAddr>().is_err() {
                    return Err(ApiError::invalid(
                        "target_server.ip_list",
                        format!("{:?} is not an IP address", target.ip),
                    ));
                }
            }
            Some(ips.into_iter().map(|t| (t.bk_cloud_id, t.ip)).collect())
        }
        _ => None,
    };
    let wanted = fleetrun_inventory::Targets {
        host_ids,
        ips,
        topo_nodes: targets
            .topo_node_list
            .unwrap_or_default()
            .into_iter()
            .map(|n| (n.node_type, n.id))
            .collect(),
        dynamic_groups: targets
            .dynamic_group_list
            .unwrap_or_default()
            .into_iter()
            .map(|g| g.id)
            .collect(),
    };
    let inventory = shared.inventory.current().await?;
    scope::refuse_unseen_hosts(caller, &inventory, &wanted)?;
    let chosen = inventory
        .resolve(&scope.inventory, &wanted)
        .map_err(|e| ApiError::new(i64::from(e.code()), format!("target_server: {e}")))?
        .hosts;
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
