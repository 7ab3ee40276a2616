//! From file entries to [`InventoryParts`], remembering where each id and reference was written.

use std::{collections::BTreeMap, collections::HashMap, net::IpAddr, ops::Range};

use toml::Spanned;

use super::entries::{
    Attributes, CategoryName, ConditionEntry, ConditionValue, HostEntry, InventoryFile, ObjectName,
    OpName, PlacementEntry,
};
use crate::{
    agents::{AgentPlacement, PinnedAddress, Placement},
    group::{Condition, DynamicGroup, ObjectKind, Op},
    inventory::InventoryParts,
    model::{
        Account, AccountCategory, AccountRecord, BIZ, Business, BusinessSet, Host, MODULE, Parent,
        SET, Scope, TopoNode, Value,
    },
    problem::{Field, Item, Location},
};

/// A value that makes no sense on its own: where, and why.
pub(super) type Shape = (Range<usize>, String);

/// Where each entry's fields were written.
#[derive(Debug, Default)]
pub struct Spans(HashMap<Location, Range<usize>>);

impl Spans {
    fn note(&mut self, item: Item, index: usize, field: Field, span: Range<usize>) {
        self.0.insert(Location { item, index, field }, span);
    }

    /// The span of a location, or else of its entry's id, or else the start of the file.
    pub(super) fn find(&self, at: &Location) -> Range<usize> {
        let id = Location {
            field: Field::Id,
            ..at.clone()
        };
        self.0
            .get(at)
            .or_else(|| self.0.get(&id))
            .cloned()
            .unwrap_or(0..0)
    }
}

pub(super) fn convert(file: InventoryFile) -> Result<(InventoryParts, Spans), Shape> {
    let mut parts = InventoryParts::default();
    let mut spans = Spans::default();

    if let Some(script) = file.script.first() {
        return Err((
            script.span(),
            "scripts are managed with create_script and friends, not in the inventory file".into(),
        ));
    }

    for (i, entry) in file.business.into_iter().enumerate() {
        spans.note(Item::Business, i, Field::Id, entry.bk_biz_id.span());
        parts.businesses.push(Business {
            bk_biz_id: entry.bk_biz_id.into_inner(),
            name: entry.name,
        });
    }
    for (i, entry) in file.business_set.into_iter().enumerate() {
        spans.note(Item::BusinessSet, i, Field::Id, entry.bk_biz_set_id.span());
        for (j, member) in entry.members.iter().enumerate() {
            spans.note(Item::BusinessSet, i, Field::Member(j), member.span());
        }
        parts.business_sets.push(BusinessSet {
            bk_biz_set_id: entry.bk_biz_set_id.into_inner(),
            name: entry.name,
            members: entry.members.into_iter().map(Spanned::into_inner).collect(),
        });
    }

    if let Some(level) = file
        .level
        .iter()
        .find(|l| [SET, MODULE].contains(&l.bk_obj_id.get_ref().as_str()))
    {
        return Err((
            level.bk_obj_id.span(),
            "sets and modules are [[set]] and [[module]] entries, not custom levels".to_owned(),
        ));
    }
    let levels = file.level.into_iter().map(|l| {
        let obj = l.bk_obj_id.span();
        (
            l.bk_obj_id.into_inner(),
            Some(obj),
            l.bk_inst_id,
            l.name,
            l.parent,
            l.attributes,
        )
    });
    let sets = file.set.into_iter().map(|n| {
        (
            SET.to_owned(),
            None,
            n.bk_inst_id,
            n.name,
            n.parent,
            n.attributes,
        )
    });
    let modules = file.module.into_iter().map(|n| {
        (
            MODULE.to_owned(),
            None,
            n.bk_inst_id,
            n.name,
            n.parent,
            n.attributes,
        )
    });
    for (i, (bk_obj_id, obj_span, inst, name, parent, attributes)) in
        levels.chain(sets).chain(modules).enumerate()
    {
        if let Some(span) = obj_span {
            spans.note(Item::TopoNode, i, Field::ObjectId, span);
        }
        spans.note(Item::TopoNode, i, Field::Id, inst.span());
        spans.note(Item::TopoNode, i, Field::Parent, parent.span());
        parts.topology.push(TopoNode {
            bk_obj_id,
            bk_inst_id: inst.into_inner(),
            name,
            parent: parse_parent(&parent)?,
            attributes: attributes_of(attributes, &mut spans, Item::TopoNode, i),
        });
    }

    for entry in file.host {
        let entry_span = entry.span();
        let entry = entry.into_inner();
        match (&entry.bk_host_id, &entry.agent_id) {
            (None, None) => {
                return Err((
                    entry_span,
                    "a host needs bk_host_id, or agent_id to place an agent's host".to_owned(),
                ));
            }
            (Some(_), Some(agent)) => {
                return Err((
                    agent.span(),
                    "give bk_host_id for a host of the file or agent_id for an agent's host, not both"
                        .to_owned(),
                ));
            }
            (Some(_), None) => declared_host(entry, &mut parts, &mut spans),
            (None, Some(_)) => agent_placement(entry, &mut parts, &mut spans)?,
        }
    }
    if let Some(entry) = file.unlisted_agents {
        spans.note(Item::UnlistedAgents, 0, Field::Id, entry.span());
        parts.unlisted_agents = placement(entry.into_inner(), &mut spans, Item::UnlistedAgents, 0);
    }

    for (i, entry) in file.dynamic_group.into_iter().enumerate() {
        spans.note(Item::DynamicGroup, i, Field::Id, entry.id.span());
        spans.note(
            Item::DynamicGroup,
            i,
            Field::Business,
            entry.bk_biz_id.span(),
        );
        let mut conditions = Vec::new();
        for (j, condition) in entry.condition.into_iter().enumerate() {
            spans.note(
                Item::DynamicGroup,
                i,
                Field::Condition(j),
                condition.op.span(),
            );
            conditions.push(condition_of(condition)?);
        }
        parts.dynamic_groups.push(DynamicGroup {
            id: entry.id.into_inner(),
            bk_biz_id: entry.bk_biz_id.into_inner(),
            name: entry.name,
            object: object_kind(entry.object),
            conditions,
        });
    }

    for (i, entry) in file.account.into_iter().enumerate() {
        spans.note(Item::Account, i, Field::Id, entry.id.span());
        spans.note(Item::Account, i, Field::Alias, entry.alias.span());
        let mut scopes = Vec::new();
        for (j, scope) in entry.scopes.iter().enumerate() {
            spans.note(Item::Account, i, Field::Scope(j), scope.span());
            scopes.push(parse_scope(scope)?);
        }
        parts.accounts.push(Account {
            id: entry.id.into_inner(),
            alias: entry.alias.into_inner(),
            account: entry.account,
            os_type: entry.os_type,
            category: match entry.category {
                CategoryName::System => AccountCategory::System,
                CategoryName::Database => AccountCategory::Database,
            },
            scopes,
            description: entry.description,
            record: AccountRecord {
                creator: entry.creator,
                create_time: entry.create_time,
                last_modify_user: entry.last_modify_user,
                last_modify_time: entry.last_modify_time,
            },
        });
    }

    Ok((parts, spans))
}

fn declared_host(entry: HostEntry, parts: &mut InventoryParts, spans: &mut Spans) {
    let i = parts.hosts.len();
    let id = entry.bk_host_id.expect("checked by the caller");
    spans.note(Item::Host, i, Field::Id, id.span());
    if let Some(ips) = &entry.ips {
        spans.note(Item::Host, i, Field::Address, ips.span());
    }
    let place = placement(
        PlacementEntry {
            bk_biz_id: entry.bk_biz_id,
            modules: entry.modules,
            attributes: entry.attributes,
        },
        spans,
        Item::Host,
        i,
    );
    parts.hosts.push(Host {
        bk_host_id: id.into_inner(),
        bk_cloud_id: entry.bk_cloud_id.map_or(0, Spanned::into_inner),
        ips: entry.ips.map(Spanned::into_inner).unwrap_or_default(),
        hostname: entry.hostname.map(Spanned::into_inner).unwrap_or_default(),
        os_type: entry
            .os_type
            .map_or_else(|| "linux".to_owned(), Spanned::into_inner),
        agent_id: None,
        bk_biz_id: place.bk_biz_id,
        modules: place.modules,
        attributes: place.attributes,
    });
}

fn agent_placement(
    entry: HostEntry,
    parts: &mut InventoryParts,
    spans: &mut Spans,
) -> Result<(), Shape> {
    let reported = [
        ("hostname", entry.hostname.as_ref().map(Spanned::span)),
        ("os_type", entry.os_type.as_ref().map(Spanned::span)),
    ];
    if let Some((field, Some(span))) = reported.into_iter().find(|(_, span)| span.is_some()) {
        return Err((
            span,
            format!(
                "{field} is what the agent reports; an agent_id entry places its host and may pin its address (ips, bk_cloud_id)"
            ),
        ));
    }
    let address = match (entry.ips, entry.bk_cloud_id) {
        (None, None) => None,
        (None, Some(cloud)) => {
            return Err((
                cloud.span(),
                "bk_cloud_id pins an agent's address together with ips".to_owned(),
            ));
        }
        (Some(ips), cloud) => {
            if ips.get_ref().is_empty() {
                return Err((ips.span(), "ips pins no address: it is empty".to_owned()));
            }
            Some(PinnedAddress {
                bk_cloud_id: cloud.map_or(0, Spanned::into_inner),
                ips: ips.into_inner().iter().map(IpAddr::to_canonical).collect(),
            })
        }
    };
    let i = parts.agent_placements.len();
    let agent = entry.agent_id.expect("checked by the caller");
    spans.note(Item::AgentPlacement, i, Field::Id, agent.span());
    spans.note(Item::AgentPlacement, i, Field::Agent, agent.span());
    let placement = placement(
        PlacementEntry {
            bk_biz_id: entry.bk_biz_id,
            modules: entry.modules,
            attributes: entry.attributes,
        },
        spans,
        Item::AgentPlacement,
        i,
    );
    parts.agent_placements.push(AgentPlacement {
        agent_id: agent.into_inner(),
        placement,
        address,
    });
    Ok(())
}

fn placement(entry: PlacementEntry, spans: &mut Spans, item: Item, i: usize) -> Placement {
    if let Some(biz) = &entry.bk_biz_id {
        spans.note(item, i, Field::Business, biz.span());
    }
    for (j, module) in entry.modules.iter().enumerate() {
        spans.note(item, i, Field::Module(j), module.span());
    }
    Placement {
        bk_biz_id: entry.bk_biz_id.map(Spanned::into_inner),
        modules: entry.modules.into_iter().map(Spanned::into_inner).collect(),
        attributes: attributes_of(entry.attributes, spans, item, i),
    }
}

fn attributes_of(
    attributes: Attributes,
    spans: &mut Spans,
    item: Item,
    i: usize,
) -> BTreeMap<String, Value> {
    attributes
        .into_iter()
        .map(|(name, value)| {
            spans.note(
                item,
                i,
                Field::Attribute(name.get_ref().clone()),
                name.span(),
            );
            (name.into_inner(), value.0)
        })
        .collect()
}

fn parse_parent(parent: &Spanned<String>) -> Result<Parent, Shape> {
    let parsed = parent
        .get_ref()
        .split_once(':')
        .and_then(|(obj, id)| Some((obj, id.parse::<i64>().ok()?)));
    match parsed {
        Some((BIZ, id)) => Ok(Parent::Business(id)),
        Some((obj, id)) if !obj.is_empty() => Ok(Parent::Node {
            bk_obj_id: obj.to_owned(),
            bk_inst_id: id,
        }),
        _ => Err((
            parent.span(),
            "parent must be \"biz:<id>\" or \"<object>:<id>\", e.g. \"set:10\"".to_owned(),
        )),
    }
}

fn parse_scope(scope: &Spanned<String>) -> Result<Scope, Shape> {
    scope
        .get_ref()
        .parse()
        .map_err(|e| (scope.span(), format!("scope: {e}")))
}

fn object_kind(object: ObjectName) -> ObjectKind {
    match object {
        ObjectName::Host => ObjectKind::Host,
        ObjectName::Set => ObjectKind::Set,
        ObjectName::Module => ObjectKind::Module,
    }
}

fn condition_of(entry: ConditionEntry) -> Result<Condition, Shape> {
    let op_span = entry.op.span();
    let value_span = entry.value.as_ref().map_or(op_span.clone(), Spanned::span);
    let value = entry.value.map(Spanned::into_inner);
    let name = match entry.op.get_ref() {
        OpName::Equal => "equal",
        OpName::NotEqual => "not_equal",
        OpName::In => "in",
        OpName::NotIn => "not_in",
        OpName::Contains => "contains",
        OpName::Range => "range",
    };
    let bounds = entry.min.is_some() || entry.max.is_some();
    if bounds && !matches!(entry.op.get_ref(), OpName::Range) {
        return Err((
            op_span,
            format!("{name} takes a value; min and max are for range"),
        ));
    }
    let op = match (entry.op.into_inner(), value) {
        (OpName::Equal, Some(ConditionValue::One(v))) => Op::Equal(v),
        (OpName::NotEqual, Some(ConditionValue::One(v))) => Op::NotEqual(v),
        (OpName::In, Some(ConditionValue::Many(vs))) => Op::In(vs),
        (OpName::NotIn, Some(ConditionValue::Many(vs))) => Op::NotIn(vs),
        (OpName::Contains, Some(ConditionValue::One(Value::Text(s)))) => Op::Contains(s),
        (OpName::Range, None) => Op::Range {
            min: entry.min,
            max: entry.max,
        },
        (OpName::Equal | OpName::NotEqual, _) => {
            return Err((value_span, format!("{name} needs one value")));
        }
        (OpName::In | OpName::NotIn, _) => {
            return Err((value_span, format!("{name} needs a list of values")));
        }
        (OpName::Contains, _) => {
            return Err((value_span, "contains needs a text value".to_owned()));
        }
        (OpName::Range, Some(_)) => {
            return Err((value_span, "range takes min and max, not value".to_owned()));
        }
    };
    Ok(Condition {
        object: object_kind(entry.object),
        field: entry.field.into_inner(),
        op,
    })
}
