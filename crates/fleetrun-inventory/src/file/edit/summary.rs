//! One line per change for the revision history.

use std::fmt::Write as _;

use super::Change;

impl Change {
    /// A short description for the revision history: the operation and what it is about.
    pub fn summary(&self) -> String {
        match self {
            Change::CreateBusiness { bk_biz_id, .. } => format!("create_business {bk_biz_id}"),
            Change::UpdateBusiness { bk_biz_id, .. } => format!("update_business {bk_biz_id}"),
            Change::DeleteBusiness { bk_biz_id } => format!("delete_business {bk_biz_id}"),
            Change::CreateBusinessSet { bk_biz_set_id, .. } => {
                format!("create_business_set {bk_biz_set_id}")
            }
            Change::UpdateBusinessSet { bk_biz_set_id, .. } => {
                format!("update_business_set {bk_biz_set_id}")
            }
            Change::DeleteBusinessSet { bk_biz_set_id } => {
                format!("delete_business_set {bk_biz_set_id}")
            }
            Change::CreateNode {
                bk_obj_id,
                bk_inst_id,
                ..
            } => format!("create_node {bk_obj_id}:{bk_inst_id}"),
            Change::UpdateNode {
                bk_obj_id,
                bk_inst_id,
                ..
            } => format!("update_node {bk_obj_id}:{bk_inst_id}"),
            Change::DeleteNode {
                bk_obj_id,
                bk_inst_id,
            } => format!("delete_node {bk_obj_id}:{bk_inst_id}"),
            Change::CreateHost { bk_host_id, .. } => format!("create_host {bk_host_id}"),
            Change::UpdateHost { bk_host_id, .. } => format!("update_host {bk_host_id}"),
            Change::MoveHosts {
                bk_host_ids,
                agent_ids,
                bk_biz_id,
                modules,
            } => {
                let mut s = String::from("move_hosts ");
                let names: Vec<String> = bk_host_ids
                    .iter()
                    .map(i64::to_string)
                    .chain(agent_ids.iter().map(|a| format!("agent {a}")))
                    .collect();
                if names.len() <= 5 {
                    s.push_str(&names.join(","));
                } else {
                    let _ = write!(s, "{} hosts", names.len());
                }
                match bk_biz_id {
                    Some(biz) => {
                        let _ = write!(s, " to business {biz}");
                        if !modules.is_empty() {
                            let modules: Vec<String> = modules.iter().map(i64::to_string).collect();
                            let _ = write!(s, " modules {}", modules.join(","));
                        }
                    }
                    None => s.push_str(" to the unassigned pool"),
                }
                s
            }
            Change::DeleteHost { bk_host_id } => format!("delete_host {bk_host_id}"),
            Change::PlaceAgent {
                agent_id,
                bk_biz_id,
                modules,
                ..
            } => {
                let mut s = format!("place_agent {agent_id} in business {bk_biz_id}");
                if !modules.is_empty() {
                    let modules: Vec<String> = modules.iter().map(i64::to_string).collect();
                    let _ = write!(s, " modules {}", modules.join(","));
                }
                s
            }
            Change::SetUnlistedAgents { bk_biz_id, .. } => match bk_biz_id {
                Some(Some(biz)) => format!("set_unlisted_agents business {biz}"),
                Some(None) => "set_unlisted_agents unassigned".to_owned(),
                None => "set_unlisted_agents".to_owned(),
            },
            Change::CreateDynamicGroup { id, .. } => format!("create_dynamic_group {id}"),
            Change::UpdateDynamicGroup { id, .. } => format!("update_dynamic_group {id}"),
            Change::DeleteDynamicGroup { id } => format!("delete_dynamic_group {id}"),
            Change::CreateAccount { id, .. } => format!("create_account {id}"),
            Change::UpdateAccount { id, .. } => format!("update_account {id}"),
            Change::DeleteAccount { id } => format!("delete_account {id}"),
            Change::DescribeAccount { id, .. } => format!("describe_account {id}"),
        }
    }
}
