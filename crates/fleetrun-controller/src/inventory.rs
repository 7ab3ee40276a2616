//! The controller's view of the inventory: the current revision of the inventory document, kept in
//! the store, merged with the hosts agents have registered.
//!
//! Where the document comes from: the inventory file, or without one the configuration's simple
//! `[[businesses]]`/`[[accounts]]`/`[placement]` sections written as such a document. At start the
//! store's latest revision is current, unless that source changed since it was last imported
//! (its digest is kept with every revision); then the source is imported as a new revision. A
//! reload (SIGHUP, `reload_inventory`) imports the source; the admin API changes the document.
//! Every change is checked as a whole and stored as the next revision in one transaction, or
//! changes nothing.
//!
//! The merged inventory is rebuilt lazily: a registration or a change only marks it stale, and
//! the next request that needs it rebuilds it once.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use fleetrun_inventory::{
    AgentHost, Change, Inventory, InventoryDocument, InventoryFileError, Scalar,
};
use fleetrun_store::{InventoryCommitError, NewInventoryRevision, RevisionInfo, Store, StoreError};
use tokio::sync::Mutex;

use crate::config::Config;

/// Who made a revision that was imported rather than asked for through the API.
const SYSTEM_OPERATOR: &str = "fleetrun-controller";

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
        source: InventoryFileError,
    },
    /// The configuration's inventory sections are inconsistent.
    #[error("configuration: {0}")]
    Config(String),
    /// The store's current revision no longer reads as an inventory.
    #[error("inventory revision {revision} in the store: {source}")]
    Stored {
        revision: i64,
        source: InventoryFileError,
    },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// Another controller stored a revision meanwhile.
    #[error("{0}")]
    Commit(#[from] InventoryCommitError),
}

/// When [`InventoryState::reload`] imports the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reimport {
    /// Only when it changed since it was last imported.
    IfChanged,
    /// Even when unchanged: the API's changes since the last import are replaced by the file.
    Always,
}

/// What a reload left in force.
#[derive(Debug, Clone)]
pub struct Reloaded {
    /// The current revision.
    pub revision: RevisionInfo,
    /// Whether the file was imported as a new revision (false: it was unchanged).
    pub imported: bool,
}

/// A change to the inventory was not made.
#[derive(Debug, thiserror::Error)]
pub enum ChangeRefused {
    /// The change cannot be made, or its result is not a valid inventory; the message says why.
    #[error("{0}")]
    Invalid(String),
    /// The current revision is not the one the caller expected.
    #[error("the inventory is at revision {current}, not {expected}; read it again and retry")]
    Stale { expected: i64, current: i64 },
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// The current revision: its document, and the inventory it describes.
#[derive(Debug)]
struct Current {
    info: RevisionInfo,
    text: String,
    inventory: Arc<Inventory>,
}

#[derive(Debug)]
pub struct InventoryState {
    config: Arc<Config>,
    store: Store,
    current: RwLock<Arc<Current>>,
    /// The current inventory merged with the registered agents; `None` when stale.
    merged: RwLock<Option<Arc<Inventory>>>,
    /// Bumped by every invalidation: a merge that raced one is not kept.
    generation: AtomicU64,
    /// Serializes rebuilds, so a burst of requests rebuilds once.
    rebuild: Mutex<()>,
    /// Serializes changes, so each is made on the revision before it.
    edit: Mutex<()>,
}

/// A stored revision, for the API.
#[derive(Debug, Clone)]
pub struct Revision {
    pub info: RevisionInfo,
    pub text: String,
}

impl InventoryState {
    /// Brings up the current revision: the store's latest, or the source imported when it changed
    /// since it was last imported (or nothing was ever stored).
    pub async fn load(config: &Arc<Config>, store: Store) -> Result<Self, InventoryLoadError> {
        let source = read_source(config)?;
        let digest = digest(&source);
        let latest = store.latest_inventory().await?;
        let current = match latest {
            Some(latest) if latest.info.source_digest == digest => {
                let inventory = Inventory::from_toml(&latest.text).map_err(|source| {
                    InventoryLoadError::Stored {
                        revision: latest.info.revision,
                        source,
                    }
                })?;
                Current {
                    info: latest.info,
                    text: latest.text,
                    inventory: Arc::new(inventory),
                }
            }
            latest => {
                let inventory = check_source(config, &source)?;
                let based_on = latest.as_ref().map(|l| l.info.revision);
                if let Some(latest) = &latest
                    && latest.info.source == "api"
                {
                    tracing::warn!(
                        revision = latest.info.revision,
                        "the inventory source changed since it was last imported: it replaces the changes made through the API (they stay in the history)"
                    );
                }
                commit_import(&store, config, based_on, source, digest, inventory).await?
            }
        };
        tracing::info!(
            revision = current.info.revision,
            source = %current.info.source,
            "inventory loaded"
        );
        Ok(Self {
            config: Arc::clone(config),
            store,
            current: RwLock::new(Arc::new(current)),
            merged: RwLock::new(None),
            generation: AtomicU64::new(0),
            rebuild: Mutex::new(()),
            edit: Mutex::new(()),
        })
    }

    /// The current revision's inventory alone: enough for questions about scopes and accounts.
    pub fn base(&self) -> Arc<Inventory> {
        self.current.read().unwrap().inventory.clone()
    }

    /// The current revision.
    pub fn revision(&self) -> Revision {
        let current = self.current.read().unwrap().clone();
        Revision {
            info: current.info.clone(),
            text: current.text.clone(),
        }
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
        let generation = self.generation.load(Ordering::Acquire);
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
                    address_since: h.address_since,
                })
            })
            .collect();
        let merged = base.with_agents(&agents);
        for refused in &merged.refused {
            tracing::warn!(agent_id = refused.agent_id, reason = ?refused.reason, "agent's host left out of the inventory");
        }
        let merged = Arc::new(merged.inventory);
        // A registration or a change that came while this merge ran has made it stale: it
        // serves this request, and the next one merges again.
        let mut cached = self.merged.write().unwrap();
        if self.generation.load(Ordering::Acquire) == generation {
            *cached = Some(merged.clone());
        }
        Ok(merged)
    }

    /// Marks the merged inventory stale (an agent registered or changed).
    pub fn invalidate(&self) {
        let mut cached = self.merged.write().unwrap();
        self.generation.fetch_add(1, Ordering::AcqRel);
        *cached = None;
    }

    /// Imports the source (the inventory file) as the current revision when it changed since it
    /// was last imported, or always with [`Reimport::Always`]: a reload with an untouched file
    /// keeps the changes made through the API, as a restart does. An invalid file changes nothing.
    pub async fn reload(&self, when: Reimport) -> Result<Reloaded, InventoryLoadError> {
        let _one_change_at_a_time = self.edit.lock().await;
        let source = read_source(&self.config)?;
        let digest = digest(&source);
        let current = self.current.read().unwrap().clone();
        if current.text == source
            || (when == Reimport::IfChanged && current.info.source_digest == digest)
        {
            tracing::info!(
                revision = current.info.revision,
                "inventory reload: the file is unchanged since it was imported"
            );
            return Ok(Reloaded {
                revision: current.info.clone(),
                imported: false,
            });
        }
        let inventory = check_source(&self.config, &source)?;
        let next = commit_import(
            &self.store,
            &self.config,
            Some(current.info.revision),
            source,
            digest,
            inventory,
        )
        .await?;
        let info = next.info.clone();
        self.install(next);
        tracing::info!(source = ?self.config.inventory, revision = info.revision, "inventory reloaded");
        Ok(Reloaded {
            revision: info,
            imported: true,
        })
    }

    /// Makes `changes` on the current document and stores the result as the next revision.
    /// Returns the new revision and the one it replaced.
    pub async fn change(
        &self,
        changes: Vec<Change>,
        expected: Option<i64>,
        operator: &str,
        connected: impl Fn(i64) -> bool,
    ) -> Result<(RevisionInfo, i64), ChangeRefused> {
        let _one_change_at_a_time = self.edit.lock().await;
        let current = self.current.read().unwrap().clone();
        check_expected(&current, expected)?;
        let agents: HashMap<i64, (String, bool)> = self
            .store
            .hosts()
            .await?
            .into_iter()
            .map(|h| (h.bk_host_id, (h.agent_id.clone(), connected(h.bk_host_id))))
            .collect();
        let text = current.text.clone();
        // Parsing, editing and checking a large document is CPU work: off the async workers.
        let (text, inventory, forget_hosts, summary) =
            tokio::task::spawn_blocking(move || edit_document(&text, &changes, &agents))
                .await
                .map_err(|e| {
                    ChangeRefused::Invalid(format!("the change could not be made: {e}"))
                })??;
        self.commit(&current, text, inventory, operator, summary, forget_hosts)
            .await
    }

    /// Replaces the current document with `text`.
    pub async fn replace(
        &self,
        text: String,
        expected: Option<i64>,
        operator: &str,
    ) -> Result<(RevisionInfo, i64), ChangeRefused> {
        let _one_change_at_a_time = self.edit.lock().await;
        let current = self.current.read().unwrap().clone();
        check_expected(&current, expected)?;
        let (text, parsed) = tokio::task::spawn_blocking(move || {
            let parsed = Inventory::from_toml(&text);
            (text, parsed)
        })
        .await
        .map_err(|e| ChangeRefused::Invalid(format!("text could not be read: {e}")))?;
        let inventory = parsed.map_err(|e| ChangeRefused::Invalid(format!("text: {e}")))?;
        let summary = "replaced the whole document".to_owned();
        self.commit(&current, text, inventory, operator, summary, Vec::new())
            .await
    }

    /// Records in the history something done to the fleet that the document does not hold (an
    /// agent revoked): a revision with the current text and `summary`.
    pub async fn note(&self, summary: String, operator: &str) -> Result<i64, ChangeRefused> {
        let _one_change_at_a_time = self.edit.lock().await;
        let current = self.current.read().unwrap().clone();
        let inventory = (*current.inventory).clone();
        let text = current.text.clone();
        let (info, _) = self
            .commit(&current, text, inventory, operator, summary, Vec::new())
            .await?;
        Ok(info.revision)
    }

    /// A kept revision.
    pub async fn stored(&self, revision: i64) -> Result<Option<Revision>, StoreError> {
        Ok(self
            .store
            .inventory_revision(revision)
            .await?
            .map(|r| Revision {
                info: r.info,
                text: r.text,
            }))
    }

    /// The latest revisions, newest first.
    pub async fn history(&self, limit: i64) -> Result<Vec<RevisionInfo>, StoreError> {
        self.store.inventory_history(limit).await
    }

    /// Stores a change made through the API as the revision after `current`, and installs it.
    async fn commit(
        &self,
        current: &Current,
        text: String,
        inventory: Inventory,
        operator: &str,
        summary: String,
        forget_hosts: Vec<i64>,
    ) -> Result<(RevisionInfo, i64), ChangeRefused> {
        let new = NewInventoryRevision {
            based_on: Some(current.info.revision),
            text,
            source: "api".to_owned(),
            source_digest: current.info.source_digest.clone(),
            operator: operator.to_owned(),
            summary,
            created_at: crate::now_ms(),
            forget_hosts,
        };
        let revision = match self.store.commit_inventory(&new).await {
            Ok(revision) => revision,
            Err(InventoryCommitError::Conflict { current: now, .. }) => {
                return Err(ChangeRefused::Stale {
                    expected: current.info.revision,
                    current: now.unwrap_or(0),
                });
            }
            Err(InventoryCommitError::HostOnline(id)) => {
                return Err(ChangeRefused::Invalid(format!(
                    "host {id}'s agent connected meanwhile; stop it before forgetting its host"
                )));
            }
            Err(InventoryCommitError::Store(e)) => return Err(e.into()),
        };
        let info = RevisionInfo {
            revision,
            source: new.source,
            source_digest: new.source_digest,
            operator: new.operator,
            summary: new.summary,
            created_at: new.created_at,
        };
        let previous = current.info.revision;
        self.install(Current {
            info: info.clone(),
            text: new.text,
            inventory: Arc::new(inventory),
        });
        tracing::info!(revision, previous, operator, summary = %info.summary, "inventory changed");
        Ok((info, previous))
    }

    fn install(&self, next: Current) {
        *self.current.write().unwrap() = Arc::new(next);
        self.invalidate();
    }
}

/// Makes `changes` on the document `text`: the new text, the inventory it describes, the agents'
/// hosts to forget with it, and a summary for the history. `agents` maps each registered
/// agent's host id to its agent and whether it is connected now.
#[allow(clippy::type_complexity)]
fn edit_document(
    text: &str,
    changes: &[Change],
    agents: &HashMap<i64, (String, bool)>,
) -> Result<(String, Inventory, Vec<i64>, String), ChangeRefused> {
    let agent_of = |id: i64| agents.get(&id).map(|(agent, _)| agent.clone());
    let mut doc = InventoryDocument::parse(text)
        .map_err(|e| ChangeRefused::Invalid(format!("the current document: {e}")))?;
    let mut forget_hosts = Vec::new();
    for (i, change) in changes.iter().enumerate() {
        let refused = |why: String| {
            ChangeRefused::Invalid(format!("changes[{i}] ({}): {why}", change.summary()))
        };
        // Deleting a host of the document never touches an agent's registration, even one
        // whose id collides with it.
        let agents_host = match change {
            Change::DeleteHost { bk_host_id } if !doc.has_host(*bk_host_id) => {
                agents.get(bk_host_id).map(|agent| (*bk_host_id, agent))
            }
            _ => None,
        };
        if let Some((_, (agent, true))) = agents_host {
            return Err(refused(format!(
                "agent {agent:?} is connected; stop it (or revoke its certificate) before forgetting its host"
            )));
        }
        doc.apply(change, &agent_of)
            .map_err(|e| refused(e.to_string()))?;
        if let Some((bk_host_id, _)) = agents_host {
            forget_hosts.push(bk_host_id);
        }
    }
    let text = doc.text();
    let inventory = check_document(&text)?;
    Ok((text, inventory, forget_hosts, summarize(changes)))
}

fn check_expected(current: &Current, expected: Option<i64>) -> Result<(), ChangeRefused> {
    match expected {
        Some(expected) if expected != current.info.revision => Err(ChangeRefused::Stale {
            expected,
            current: current.info.revision,
        }),
        _ => Ok(()),
    }
}

/// Checks a changed document as a whole, naming the problem and where it sits in the result.
fn check_document(text: &str) -> Result<Inventory, ChangeRefused> {
    Inventory::from_toml(text).map_err(|e| {
        let line = text
            .lines()
            .nth(e.line().saturating_sub(1))
            .unwrap_or("")
            .trim();
        let what = match &e {
            InventoryFileError::Invalid { problem, .. } => problem.to_string(),
            InventoryFileError::Syntax { message, .. }
            | InventoryFileError::Entry { message, .. } => message.clone(),
        };
        ChangeRefused::Invalid(format!(
            "the inventory would not be valid: {what} (at `{line}`, line {} of the result)",
            e.line()
        ))
    })
}

fn summarize(changes: &[Change]) -> String {
    const SHOWN: usize = 5;
    let mut parts: Vec<String> = changes.iter().take(SHOWN).map(Change::summary).collect();
    if changes.len() > SHOWN {
        parts.push(format!("and {} more", changes.len() - SHOWN));
    }
    if parts.is_empty() {
        "no change".to_owned()
    } else {
        parts.join("; ")
    }
}

async fn commit_import(
    store: &Store,
    config: &Config,
    based_on: Option<i64>,
    text: String,
    digest: String,
    inventory: Inventory,
) -> Result<Current, InventoryLoadError> {
    let source = if config.inventory.is_some() {
        "file"
    } else {
        "config"
    };
    let summary = match &config.inventory {
        Some(path) => format!("imported {}", path.display()),
        None => "imported the configuration's inventory sections".to_owned(),
    };
    let new = NewInventoryRevision {
        based_on,
        text,
        source: source.to_owned(),
        source_digest: digest,
        operator: SYSTEM_OPERATOR.to_owned(),
        summary,
        created_at: crate::now_ms(),
        forget_hosts: Vec::new(),
    };
    let revision = store.commit_inventory(&new).await?;
    Ok(Current {
        info: RevisionInfo {
            revision,
            source: new.source,
            source_digest: new.source_digest,
            operator: new.operator,
            summary: new.summary,
            created_at: new.created_at,
        },
        text: new.text,
        inventory: Arc::new(inventory),
    })
}

/// Checks the inventory the configuration describes (its file, or its own sections) without
/// touching the store: what [`InventoryState::load`] would refuse when it imports it.
pub fn check(config: &Config) -> Result<Inventory, InventoryLoadError> {
    let source = read_source(config)?;
    check_source(config, &source)
}

/// The source document: the inventory file's text, or the configuration's sections as one.
fn read_source(config: &Config) -> Result<String, InventoryLoadError> {
    match &config.inventory {
        Some(path) => std::fs::read_to_string(path).map_err(|source| InventoryLoadError::Read {
            path: path.clone(),
            source,
        }),
        None => document_from_config(config),
    }
}

/// Checks the source document as a whole.
fn check_source(config: &Config, text: &str) -> Result<Inventory, InventoryLoadError> {
    match &config.inventory {
        Some(path) => Inventory::from_toml(text).map_err(|source| InventoryLoadError::File {
            path: path.clone(),
            source,
        }),
        None => Inventory::from_toml(text).map_err(|e| {
            InventoryLoadError::Config(match e {
                InventoryFileError::Invalid { problem, .. } => problem.to_string(),
                other => other.to_string(),
            })
        }),
    }
}

/// The configuration's simple sections as an inventory document: businesses without topology,
/// accounts usable in the scopes they list, agents placed in a business by id or by default.
fn document_from_config(config: &Config) -> Result<String, InventoryLoadError> {
    let header = "# The inventory described by the controller's configuration \
                  (businesses, accounts, placement).\n";
    let mut changes = Vec::new();
    for b in &config.businesses {
        changes.push(Change::CreateBusiness {
            bk_biz_id: b.bk_biz_id,
            name: b.name.clone(),
        });
    }
    for a in &config.accounts {
        changes.push(Change::CreateAccount {
            id: a.id,
            alias: a.alias.clone(),
            account: a.account.clone(),
            os_type: None,
            category: None,
            scopes: a.scopes.listed().iter().map(ToString::to_string).collect(),
        });
    }
    for (agent_id, biz) in &config.placement.agents {
        changes.push(Change::MoveHosts {
            bk_host_ids: Vec::new(),
            agent_ids: vec![agent_id.clone()],
            bk_biz_id: Some(*biz),
            modules: Vec::new(),
        });
    }
    if let Some(biz) = config.placement.default_bk_biz_id {
        changes.push(Change::SetUnlistedAgents {
            bk_biz_id: Some(Some(biz)),
            modules: None,
            attributes: std::collections::BTreeMap::<String, Option<Scalar>>::new(),
        });
    }
    let mut doc =
        InventoryDocument::parse(header).map_err(|e| InventoryLoadError::Config(e.to_string()))?;
    let no_agents = |_: i64| None;
    for change in &changes {
        doc.apply(change, &no_agents)
            .map_err(|e| InventoryLoadError::Config(e.to_string()))?;
    }
    Ok(doc.text())
}

/// Hex SHA-256 of a source text.
fn digest(text: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "[[business]]\nbk_biz_id = 2\nname = \"shop\"\n\n\
                       [[host]]\nbk_host_id = 5\nips = [\"10.0.0.5\"]\nbk_biz_id = 2\n";

    fn delete(id: i64) -> Vec<Change> {
        vec![Change::DeleteHost { bk_host_id: id }]
    }

    #[test]
    fn deleting_a_document_host_leaves_an_agent_with_the_same_id_alone() {
        // Agent "a" got id 5 too (the controller refuses it while the document's host 5 exists).
        let agents = HashMap::from([(5, ("a".to_owned(), true)), (6, ("b".to_owned(), false))]);
        let (text, _, forget, _) = edit_document(DOC, &delete(5), &agents).unwrap();
        assert!(!text.contains("bk_host_id = 5"), "{text}");
        assert!(forget.is_empty());
        // An agent's own host is forgotten when its agent is away, refused while connected.
        let (_, _, forget, _) = edit_document(DOC, &delete(6), &agents).unwrap();
        assert_eq!(forget, [6]);
        let agents = HashMap::from([(6, ("b".to_owned(), true))]);
        let Err(ChangeRefused::Invalid(why)) = edit_document(DOC, &delete(6), &agents) else {
            panic!("a connected agent's host was forgotten");
        };
        assert!(why.contains("agent \"b\" is connected"), "{why}");
    }

    #[test]
    fn a_document_declaring_scripts_is_refused_at_the_script_line() {
        let text = format!("{DOC}\n[[script]]\nid = \"s\"\nname = \"a\"\n");
        let Err(ChangeRefused::Invalid(why)) = check_document(&text) else {
            panic!("a document with scripts was accepted");
        };
        assert!(why.contains("line 10"), "{why}");
        assert!(
            why.contains("scripts are managed with create_script"),
            "{why}"
        );
    }
}
