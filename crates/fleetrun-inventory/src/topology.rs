//! The topology tree of every business: checks on it, and the indexes resolution walks
//! (node by object and instance id, node to business, node to the modules below it).

use std::collections::{HashMap, HashSet};

use rustc_hash::FxHashMap;

use crate::{
    group::ObjectKind,
    inventory::InventoryParts,
    model::{BIZ, MODULE, Parent, SET, TopoNode},
    problem::{Field, InventoryError, Item, Location, Problem},
    validate::{check_attributes, node_name, parent_phrase},
};

/// Nodes with their indexes. Node positions are `u32` to keep the per-module lists small.
#[derive(Debug, Clone, Default)]
pub(crate) struct Topology {
    pub(crate) nodes: Vec<TopoNode>,
    /// Object id, then instance id, to position.
    index: FxHashMap<String, FxHashMap<i64, u32>>,
    /// The business each node belongs to.
    pub(crate) business: Vec<i64>,
    /// For every node, the modules at or below it.
    pub(crate) modules_below: Vec<Vec<u32>>,
    /// For modules, the set they sit in.
    pub(crate) set_of: Vec<Option<u32>>,
    /// Business to its modules.
    pub(crate) modules_of: FxHashMap<i64, Vec<u32>>,
}

impl Topology {
    /// Indexes nodes that [`validate`] accepted.
    pub(crate) fn build(nodes: Vec<TopoNode>) -> Self {
        let mut index: FxHashMap<String, FxHashMap<i64, u32>> = FxHashMap::default();
        for (i, node) in nodes.iter().enumerate() {
            index
                .entry(node.bk_obj_id.clone())
                .or_default()
                .insert(node.bk_inst_id, i as u32);
        }
        let lookup = |obj: &str, inst: i64| index.get(obj).and_then(|m| m.get(&inst)).copied();
        let parent: Vec<Option<u32>> = nodes
            .iter()
            .map(|node| match &node.parent {
                Parent::Business(_) => None,
                Parent::Node {
                    bk_obj_id,
                    bk_inst_id,
                } => lookup(bk_obj_id, *bk_inst_id),
            })
            .collect();
        let business: Vec<i64> = (0..nodes.len())
            .map(|mut i| {
                loop {
                    match (&nodes[i].parent, parent[i]) {
                        (Parent::Business(id), _) => break *id,
                        (_, Some(p)) => i = p as usize,
                        (_, None) => unreachable!("validated parent"),
                    }
                }
            })
            .collect();
        let mut modules_below = vec![Vec::new(); nodes.len()];
        let mut set_of = vec![None; nodes.len()];
        let mut modules_of: FxHashMap<i64, Vec<u32>> = FxHashMap::default();
        for (m, node) in nodes.iter().enumerate() {
            if !node.is_module() {
                continue;
            }
            set_of[m] = parent[m];
            modules_of.entry(business[m]).or_default().push(m as u32);
            let mut at = Some(m as u32);
            while let Some(n) = at {
                modules_below[n as usize].push(m as u32);
                at = parent[n as usize];
            }
        }
        Self {
            nodes,
            index,
            business,
            modules_below,
            set_of,
            modules_of,
        }
    }

    pub(crate) fn find(&self, bk_obj_id: &str, bk_inst_id: i64) -> Option<u32> {
        self.index.get(bk_obj_id)?.get(&bk_inst_id).copied()
    }

    pub(crate) fn module(&self, bk_inst_id: i64) -> Option<u32> {
        self.find(MODULE, bk_inst_id)
    }
}

/// Checks the topology of `parts`; returns each module's business.
pub(crate) fn validate(
    parts: &InventoryParts,
    businesses: &HashSet<i64>,
) -> Result<HashMap<i64, i64>, InventoryError> {
    let nodes = &parts.topology;
    let at = |index, field| {
        move |problem| InventoryError {
            at: Location {
                item: Item::TopoNode,
                index,
                field,
            },
            problem,
        }
    };
    let mut index: HashMap<(&str, i64), usize> = HashMap::new();
    for (i, node) in nodes.iter().enumerate() {
        let obj = node.bk_obj_id.as_str();
        let well_formed = !obj.is_empty()
            && obj != BIZ
            && obj != "host"
            && obj
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !well_formed {
            return Err(at(i, Field::ObjectId)(Problem::BadObjectId(obj.to_owned())));
        }
        if index.insert((obj, node.bk_inst_id), i).is_some() {
            return Err(at(i, Field::Id)(Problem::DuplicateNode(node_name(
                obj,
                node.bk_inst_id,
            ))));
        }
    }

    // Parents first, so the walk below only meets cycles among custom levels.
    let mut parent = vec![None; nodes.len()];
    for (i, node) in nodes.iter().enumerate() {
        let parent_obj = match &node.parent {
            Parent::Business(id) => {
                if !businesses.contains(id) {
                    return Err(at(i, Field::Parent)(Problem::UnknownBusiness(*id)));
                }
                BIZ
            }
            Parent::Node {
                bk_obj_id,
                bk_inst_id,
            } => {
                let p = index
                    .get(&(bk_obj_id.as_str(), *bk_inst_id))
                    .ok_or_else(|| {
                        at(i, Field::Parent)(Problem::UnknownParent(node.parent.clone()))
                    })?;
                parent[i] = Some(*p);
                bk_obj_id.as_str()
            }
        };
        let allowed = match (node.bk_obj_id.as_str(), parent_obj) {
            (_, MODULE) => false,
            (MODULE, parent) => parent == SET,
            (_, SET) => false,
            _ => true,
        };
        if !allowed {
            return Err(at(i, Field::Parent)(Problem::Misplaced {
                child: node.bk_obj_id.clone(),
                parent: parent_phrase(parent_obj),
            }));
        }
    }

    let mut business: Vec<Option<i64>> = vec![None; nodes.len()];
    let mut visiting = vec![false; nodes.len()];
    for start in 0..nodes.len() {
        let mut path = Vec::new();
        let mut i = start;
        let found = loop {
            if let Some(b) = business[i] {
                break b;
            }
            if visiting[i] {
                let node = &nodes[i];
                return Err(at(i, Field::Parent)(Problem::Cycle(node_name(
                    &node.bk_obj_id,
                    node.bk_inst_id,
                ))));
            }
            visiting[i] = true;
            path.push(i);
            match (&nodes[i].parent, parent[i]) {
                (Parent::Business(id), _) => break *id,
                (_, Some(p)) => i = p,
                (_, None) => unreachable!("parents checked above"),
            }
        };
        for i in path {
            business[i] = Some(found);
        }
    }

    for (i, node) in nodes.iter().enumerate() {
        let object = if node.is_module() {
            ObjectKind::Module
        } else {
            ObjectKind::Set
        };
        check_attributes(&node.attributes, object)
            .map_err(|(name, problem)| at(i, Field::Attribute(name))(problem))?;
    }

    Ok(nodes
        .iter()
        .zip(business)
        .filter(|(node, _)| node.is_module())
        .map(|(node, b)| (node.bk_inst_id, b.unwrap_or_default()))
        .collect())
}
