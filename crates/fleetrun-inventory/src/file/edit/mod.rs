//! Changes to an inventory document, made on its text so that comments and layout survive.
//!
//! A [`Change`] is one step of an administrator's edit (create a set, move hosts, …).
//! [`InventoryDocument::apply`] makes it on the document and refuses what cannot be made on its
//! own terms (an id that exists already, a business that something still refers to); whether the
//! result fits together as a whole is then decided by [`Inventory::from_toml`] on the new text,
//! exactly as for a file an operator wrote.
//!
//! [`Inventory::from_toml`]: crate::Inventory::from_toml
//!
//! The types a change is read into are in `input`, their one-line descriptions in `summary`,
//! the making of each change in `apply`, the lookups and the checks of what still refers to an
//! entry in `references`, and the reading and writing of TOML values in `tables`.

mod apply;
mod input;
mod references;
mod summary;
mod tables;
#[cfg(test)]
mod tests;

pub use input::{AttributeChanges, Change, ConditionSpec, ConditionValue, Scalar};

use toml_edit::DocumentMut;

/// Why a change cannot be made; the message names the field or the entry in the way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ChangeError(pub String);

fn refuse<T>(message: impl Into<String>) -> Result<T, ChangeError> {
    Err(ChangeError(message.into()))
}

/// What the document cannot know about hosts: which host ids belong to registered agents.
pub trait AgentHosts {
    /// The agent whose host has this id, if an agent's.
    fn agent_of(&self, bk_host_id: i64) -> Option<String>;
}

impl<F: Fn(i64) -> Option<String>> AgentHosts for F {
    fn agent_of(&self, bk_host_id: i64) -> Option<String> {
        self(bk_host_id)
    }
}

/// An inventory file's text, open for changes.
#[derive(Debug, Clone)]
pub struct InventoryDocument {
    doc: DocumentMut,
}

impl InventoryDocument {
    /// Opens a document. Only TOML syntax is checked here; the meaning is checked by
    /// [`Inventory::from_toml`](crate::Inventory::from_toml) once the changes are made.
    pub fn parse(text: &str) -> Result<Self, ChangeError> {
        let doc: DocumentMut = text
            .parse()
            .map_err(|e: toml_edit::TomlError| ChangeError(e.to_string()))?;
        Ok(Self { doc })
    }

    /// The document's text.
    pub fn text(&self) -> String {
        self.doc.to_string()
    }
}
