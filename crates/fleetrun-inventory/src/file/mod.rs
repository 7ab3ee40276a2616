//! The declarative inventory file (TOML). `examples/inventory.toml` shows every kind of entry.
//!
//! The file is read whole, turned into [`InventoryParts`] and checked as a whole; every error
//! names the line and column of the entry (usually the id or reference) it is about.

mod convert;
mod edit;
mod entries;

pub use edit::{
    AgentHosts, AttributeChanges, Change, ChangeError, ConditionSpec, ConditionValue,
    InventoryDocument, Scalar,
};

use std::ops::Range;

use crate::{
    inventory::{Inventory, InventoryParts},
    problem::Problem,
};

/// The inventory file could not be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InventoryFileError {
    /// Not TOML, or a field is missing, unknown or of the wrong type.
    #[error("line {line}, column {column}: {message}")]
    Syntax {
        line: usize,
        column: usize,
        message: String,
    },
    /// A field whose value makes no sense on its own: a parent that is not `<object>:<id>`, an
    /// operator without the value it needs, a host entry that is neither a host nor a placement.
    #[error("line {line}, column {column}: {message}")]
    Entry {
        line: usize,
        column: usize,
        message: String,
    },
    /// An entry that does not fit the rest of the inventory.
    #[error("line {line}, column {column}: {problem}")]
    Invalid {
        line: usize,
        column: usize,
        problem: Problem,
    },
}

impl InventoryFileError {
    /// The 1-based line the error is about.
    pub fn line(&self) -> usize {
        match self {
            Self::Syntax { line, .. } | Self::Entry { line, .. } | Self::Invalid { line, .. } => {
                *line
            }
        }
    }

    /// The 1-based column (in characters) the error is about.
    pub fn column(&self) -> usize {
        match self {
            Self::Syntax { column, .. }
            | Self::Entry { column, .. }
            | Self::Invalid { column, .. } => *column,
        }
    }
}

impl Inventory {
    /// Reads an inventory file. Hosts listed by `agent_id` are placements waiting for their agent
    /// (see [`Inventory::with_agents`]); the returned inventory holds the file's own hosts.
    pub fn from_toml(text: &str) -> Result<Inventory, InventoryFileError> {
        let (parts, spans) = parts_from_toml(text)?;
        Inventory::build(parts).map_err(|e| {
            let (line, column) = position(text, spans.find(&e.at));
            InventoryFileError::Invalid {
                line,
                column,
                problem: e.problem,
            }
        })
    }
}

/// The parts a file describes, before they are checked as a whole.
fn parts_from_toml(text: &str) -> Result<(InventoryParts, convert::Spans), InventoryFileError> {
    let file: entries::InventoryFile = toml::from_str(text).map_err(|e| {
        let (line, column) = position(text, e.span().unwrap_or(0..0));
        InventoryFileError::Syntax {
            line,
            column,
            message: e.message().trim_end().to_owned(),
        }
    })?;
    convert::convert(file).map_err(|(span, message)| {
        let (line, column) = position(text, span);
        InventoryFileError::Entry {
            line,
            column,
            message,
        }
    })
}

/// 1-based line and column (in characters) of a span's start.
fn position(text: &str, span: Range<usize>) -> (usize, usize) {
    let mut offset = span.start.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}
