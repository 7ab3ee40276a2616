//! Checks that the parts of an inventory fit together before any index is built: ids are unique,
//! every reference resolves, sets and modules sit where CMDB allows them, and no level sits under
//! itself. The first problem found is reported, with the entry (and field) it is about so the
//! inventory file can point at its line.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::{
    agents::Placement,
    group::{ObjectKind, Op, builtin_fields},
    inventory::InventoryParts,
    model::{BIZ, MODULE, SET, Scope, Value},
    problem::{Field, InventoryError, Item, Location, Problem},
};

fn at(item: Item, index: usize, field: Field) -> impl FnOnce(Problem) -> InventoryError {
    move |problem| InventoryError {
        at: Location { item, index, field },
        problem,
    }
}

fn check(ok: bool, problem: impl FnOnce() -> Problem) -> Result<(), Problem> {
    if ok { Ok(()) } else { Err(problem()) }
}

/// The first problem with `parts`, if any.
pub(crate) fn validate(parts: &InventoryParts) -> Result<(), InventoryError> {
    let mut businesses = HashSet::new();
    for (i, business) in parts.businesses.iter().enumerate() {
        check(businesses.insert(business.bk_biz_id), || {
            Problem::DuplicateBusiness(business.bk_biz_id)
        })
        .map_err(at(Item::Business, i, Field::Id))?;
    }
    let mut business_sets = HashSet::new();
    for (i, set) in parts.business_sets.iter().enumerate() {
        check(business_sets.insert(set.bk_biz_set_id), || {
            Problem::DuplicateBusinessSet(set.bk_biz_set_id)
        })
        .map_err(at(Item::BusinessSet, i, Field::Id))?;
        let mut members = HashSet::new();
        for (j, &member) in set.members.iter().enumerate() {
            check(businesses.contains(&member), || {
                Problem::UnknownBusiness(member)
            })
            .and_then(|()| check(members.insert(member), || Problem::RepeatedMember(member)))
            .map_err(at(Item::BusinessSet, i, Field::Member(j)))?;
        }
    }
    let module_business = crate::topology::validate(parts, &businesses)?;
    let known = Known {
        businesses: &businesses,
        business_sets: &business_sets,
        module_business: &module_business,
    };

    let mut hosts = HashSet::new();
    let mut agents = HashSet::new();
    for (i, host) in parts.hosts.iter().enumerate() {
        let at = |field| at(Item::Host, i, field);
        check(hosts.insert(host.bk_host_id), || {
            Problem::DuplicateHost(host.bk_host_id)
        })
        .map_err(at(Field::Id))?;
        check(!host.ips.is_empty(), || Problem::NoAddress).map_err(at(Field::Address))?;
        if let Some(agent_id) = &host.agent_id {
            check(agents.insert(agent_id.as_str()), || {
                Problem::DuplicateAgent(agent_id.clone())
            })
            .map_err(at(Field::Agent))?;
        }
        known.check_placement(
            Item::Host,
            i,
            host.bk_biz_id,
            &host.modules,
            &host.attributes,
        )?;
    }
    for (i, placed) in parts.agent_placements.iter().enumerate() {
        check(!placed.agent_id.is_empty(), || Problem::EmptyId)
            .and_then(|()| {
                check(agents.insert(placed.agent_id.as_str()), || {
                    Problem::DuplicateAgent(placed.agent_id.clone())
                })
            })
            .map_err(at(Item::AgentPlacement, i, Field::Agent))?;
        known.check(Item::AgentPlacement, i, &placed.placement)?;
    }
    known.check(Item::UnlistedAgents, 0, &parts.unlisted_agents)?;

    let mut groups = HashSet::new();
    for (i, group) in parts.dynamic_groups.iter().enumerate() {
        let at = |field| at(Item::DynamicGroup, i, field);
        check(!group.id.is_empty(), || Problem::EmptyId)
            .and_then(|()| {
                check(groups.insert(group.id.as_str()), || {
                    Problem::DuplicateGroup(group.id.clone())
                })
            })
            .map_err(at(Field::Id))?;
        check(businesses.contains(&group.bk_biz_id), || {
            Problem::UnknownBusiness(group.bk_biz_id)
        })
        .map_err(at(Field::Business))?;
        for (j, condition) in group.conditions.iter().enumerate() {
            if let Op::Range { min, max } = condition.op {
                match (min, max) {
                    (None, None) => Err(Problem::EmptyRange),
                    (Some(min), Some(max)) if min > max => Err(Problem::InvertedRange { min, max }),
                    _ => Ok(()),
                }
                .map_err(at(Field::Condition(j)))?;
            }
        }
    }

    let mut accounts = HashSet::new();
    for (i, account) in parts.accounts.iter().enumerate() {
        let at = |field| at(Item::Account, i, field);
        check(accounts.insert(account.id), || {
            Problem::DuplicateAccount(account.id)
        })
        .map_err(at(Field::Id))?;
        for (j, scope) in account.scopes.iter().enumerate() {
            known.check_scope(scope).map_err(at(Field::Scope(j)))?;
        }
        let overlapping = parts.accounts[..i].iter().find(|other| {
            other.alias == account.alias
                && other.category == account.category
                && other.scopes.iter().any(|s| account.scopes.contains(s))
        });
        if let Some(other) = overlapping {
            return Err(at(Field::Alias)(Problem::DuplicateAlias {
                alias: account.alias.clone(),
                other: other.id,
            }));
        }
    }

    Ok(())
}

/// What later entries may refer to.
struct Known<'a> {
    businesses: &'a HashSet<i64>,
    business_sets: &'a HashSet<i64>,
    /// Module `bk_inst_id` to its business.
    module_business: &'a HashMap<i64, i64>,
}

impl Known<'_> {
    fn check(&self, item: Item, index: usize, placement: &Placement) -> Result<(), InventoryError> {
        self.check_placement(
            item,
            index,
            placement.bk_biz_id,
            &placement.modules,
            &placement.attributes,
        )
    }

    fn check_placement(
        &self,
        item: Item,
        index: usize,
        bk_biz_id: Option<i64>,
        modules: &[i64],
        attributes: &BTreeMap<String, Value>,
    ) -> Result<(), InventoryError> {
        if let Some(biz) = bk_biz_id {
            check(self.businesses.contains(&biz), || {
                Problem::UnknownBusiness(biz)
            })
            .map_err(at(item, index, Field::Business))?;
        }
        let mut seen = HashSet::new();
        for (j, &module) in modules.iter().enumerate() {
            let owner = self.module_business.get(&module).copied();
            match (bk_biz_id, owner) {
                (_, None) => Err(Problem::UnknownModule(module)),
                (None, Some(_)) => Err(Problem::ModulesWithoutBusiness),
                (Some(biz), Some(owner)) if owner != biz => Err(Problem::ForeignModule {
                    module,
                    owner,
                    bk_biz_id: biz,
                }),
                _ => check(seen.insert(module), || Problem::RepeatedModule(module)),
            }
            .map_err(at(item, index, Field::Module(j)))?;
        }
        check_attributes(attributes, ObjectKind::Host)
            .map_err(|(name, problem)| at(item, index, Field::Attribute(name))(problem))
    }

    fn check_scope(&self, scope: &Scope) -> Result<(), Problem> {
        match *scope {
            Scope::Biz(id) => check(self.businesses.contains(&id), || {
                Problem::UnknownBusiness(id)
            }),
            Scope::BizSet(id) => check(self.business_sets.contains(&id), || {
                Problem::UnknownBusinessSet(id)
            }),
        }
    }
}

/// Refuses attributes that a built-in field of `object` would hide.
pub(crate) fn check_attributes(
    attributes: &BTreeMap<String, Value>,
    object: ObjectKind,
) -> Result<(), (String, Problem)> {
    let reserved = builtin_fields(object);
    match attributes.keys().find(|k| reserved.contains(&k.as_str())) {
        Some(name) => Err((name.clone(), Problem::ReservedAttribute(name.clone()))),
        None => Ok(()),
    }
}

/// How a problem names a node.
pub(crate) fn node_name(bk_obj_id: &str, bk_inst_id: i64) -> String {
    format!("{bk_obj_id}:{bk_inst_id}")
}

/// How [`Problem::Misplaced`] names a parent.
pub(crate) fn parent_phrase(bk_obj_id: &str) -> String {
    match bk_obj_id {
        BIZ => "the business".to_owned(),
        MODULE => "a module".to_owned(),
        SET => "a set".to_owned(),
        level => format!("a {level}"),
    }
}
