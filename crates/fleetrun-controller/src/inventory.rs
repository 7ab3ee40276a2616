//! The controller's view of the inventory: the declarative part (the inventory file, or the
//! configuration's simple `[[businesses]]`/`[[accounts]]`/`[placement]` sections) merged with
//! the hosts agents have registered.
//!
//! The merged inventory is rebuilt lazily: a registration or a reload only marks it stale, and
//! the next request that needs it rebuilds it once.

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
};

use fleetrun_inventory::{
    Account, AccountCategory, AgentHost, AgentPlacement, Business, Inventory, InventoryParts,
    Placement,
};
use fleetrun_store::{Store, StoreError};
use tokio::sync::Mutex;

use crate::config::Config;

/// The inventory could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum InventoryLoadError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is invalid; the message names the line.
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        source: fleetrun_inventory::InventoryFileError,
    },
    /// The configuration's inventory sections are inconsistent.
    #[error("configuration: {0}")]
    Config(#[from] fleetrun_inventory::InventoryError),
    /// The file declares scripts; the library lives in the store.
    #[error("{0}: scripts are managed with create_script and friends, not in the inventory file")]
    Scripts(PathBuf),
}

#[derive(Debug)]
pub struct InventoryState {
    source: Option<PathBuf>,
    config: Config,
    store: Store,
    /// The declarative part.
    base: RwLock<Arc<Inventory>>,
    /// The base merged with the registered agents; `None` when stale.
    merged: RwLock<Option<Arc<Inventory>>>,
    /// Serializes rebuilds, so a burst of requests rebuilds once.
    rebuild: Mutex<()>,
}

impl InventoryState {
    pub fn load(config: &Config, store: Store) -> Result<Self, InventoryLoadError> {
        let base = load_base(config)?;
        Ok(Self {
            source: config.inventory.clone(),
            config: config.clone(),
            store,
            base: RwLock::new(Arc::new(base)),
            merged: RwLock::new(None),
            rebuild: Mutex::new(()),
        })
    }

    /// The declarative part alone: enough for questions about scopes and accounts.
    pub fn base(&self) -> Arc<Inventory> {
        self.base.read().unwrap().clone()
    }

    /// The inventory with every registered agent's host placed in it.
    pub async fn current(&self) -> Result<Arc<Inventory>, StoreError> {
        if let Some(merged) = self.merged.read().unwrap().clone() {
            return Ok(merged);
        }
        let _one_at_a_time = self.rebuild.lock().await;
        if let Some(merged) = self.merged.read().unwrap().clone() {
            return Ok(merged);
        }
        let base = self.base();
        let agents: Vec<AgentHost> = self
            .store
            .hosts()
            .await?
            .into_iter()
            .filter_map(|h| {
                Some(AgentHost {
                    ips: vec![h.ip.parse().ok()?],
                    agent_id: h.agent_id,
                    bk_host_id: h.bk_host_id,
                    bk_cloud_id: h.bk_cloud_id,
                    hostname: h.hostname,
                    os_type: h.os_type,
                })
            })
            .collect();
        let merged = base.with_agents(&agents);
        for refused in &merged.refused {
            tracing::warn!(agent_id = refused.agent_id, reason = ?refused.reason, "agent's host left out of the inventory");
        }
        let merged = Arc::new(merged.inventory);
        *self.merged.write().unwrap() = Some(merged.clone());
        Ok(merged)
    }

    /// Marks the merged inventory stale (an agent registered or changed).
    pub fn invalidate(&self) {
        *self.merged.write().unwrap() = None;
    }

    /// Reads the inventory file again. An invalid file changes nothing.
    pub fn reload(&self) -> Result<(), InventoryLoadError> {
        let base = load_base(&self.config)?;
        *self.base.write().unwrap() = Arc::new(base);
        self.invalidate();
        tracing::info!(source = ?self.source, "inventory reloaded");
        Ok(())
    }
}

fn load_base(config: &Config) -> Result<Inventory, InventoryLoadError> {
    match &config.inventory {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|source| InventoryLoadError::Read {
                    path: path.clone(),
                    source,
                })?;
            let inventory =
                Inventory::from_toml(&text).map_err(|source| InventoryLoadError::File {
                    path: path.clone(),
                    source,
                })?;
            if !inventory.scripts().scripts().is_empty() {
                return Err(InventoryLoadError::Scripts(path.clone()));
            }
            Ok(inventory)
        }
        None => Ok(Inventory::build(parts_from_config(config))?),
    }
}

/// The configuration's simple sections as inventory parts: businesses without topology,
/// accounts usable in every scope, agents placed in a business by id or by default.
fn parts_from_config(config: &Config) -> InventoryParts {
    let in_business = |bk_biz_id: Option<i64>| Placement {
        bk_biz_id,
        ..Placement::default()
    };
    InventoryParts {
        businesses: config
            .businesses
            .iter()
            .map(|b| Business {
                bk_biz_id: b.bk_biz_id,
                name: b.name.clone(),
            })
            .collect(),
        accounts: config
            .accounts
            .iter()
            .map(|a| Account {
                id: a.id,
                alias: a.alias.clone(),
                account: a.account.clone(),
                os_type: "linux".into(),
                category: AccountCategory::System,
                scopes: Vec::new(),
            })
            .collect(),
        agent_placements: config
            .placement
            .agents
            .iter()
            .map(|(agent_id, biz)| AgentPlacement {
                agent_id: agent_id.clone(),
                placement: in_business(Some(*biz)),
            })
            .collect(),
        unlisted_agents: in_business(config.placement.default_bk_biz_id),
        ..InventoryParts::default()
    }
}
