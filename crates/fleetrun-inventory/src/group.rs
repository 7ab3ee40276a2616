//! Dynamic groups: saved host queries, evaluated whenever a job names them.
//!
//! Conditions are ANDed. A field may hold several values (a host's addresses); a condition holds
//! when any of them satisfies its operator, so `not_equal` on `bk_host_innerip` holds for a host
//! that has at least one other address. A field the object does not have (an attribute it lacks)
//! satisfies no operator, `not_equal` and `not_in` included.
//!
//! Set and module conditions follow CMDB's host search: a host matches them when one of its
//! modules satisfies every module condition and sits in a set that satisfies every set condition.
//! (For a single condition this is "any of the host's modules, or their sets, matches".)

use std::{fmt, net::IpAddr};

use crate::model::{Host, TopoNode, Value};

/// A saved host query in one business (CMDB's dynamic group).
#[derive(Debug, Clone, PartialEq)]
pub struct DynamicGroup {
    pub id: String,
    pub bk_biz_id: i64,
    pub name: String,
    /// CMDB's `bk_obj_id` of the group. Set and module groups still select hosts here.
    pub object: ObjectKind,
    pub conditions: Vec<Condition>,
}

/// The CMDB objects a condition can test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    Host,
    Set,
    Module,
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectKind::Host => "host",
            ObjectKind::Set => "set",
            ObjectKind::Module => "module",
        })
    }
}

/// One test on a field of a host, of its modules, or of their sets.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub object: ObjectKind,
    /// A built-in field (see [`builtin_fields`]) or an attribute name.
    pub field: String,
    pub op: Op,
}

/// How a condition compares. Numbers compare by value whether written as integers or floats;
/// text compares exactly; addresses (`bk_host_innerip`) compare as addresses.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Equal(Value),
    NotEqual(Value),
    In(Vec<Value>),
    NotIn(Vec<Value>),
    /// The field's text contains this.
    Contains(String),
    /// A number within `[min, max]`; a missing bound is open.
    Range {
        min: Option<f64>,
        max: Option<f64>,
    },
}

/// The built-in fields of an object; any other field name is an attribute.
pub fn builtin_fields(object: ObjectKind) -> &'static [&'static str] {
    match object {
        ObjectKind::Host => &[
            "bk_host_id",
            "bk_cloud_id",
            "bk_host_innerip",
            "bk_host_name",
            "bk_os_type",
        ],
        ObjectKind::Set => &["bk_inst_id", "bk_inst_name", "bk_set_id", "bk_set_name"],
        ObjectKind::Module => &[
            "bk_inst_id",
            "bk_inst_name",
            "bk_module_id",
            "bk_module_name",
        ],
    }
}

/// A field's value, borrowed from the host or node that holds it.
#[derive(Debug, Clone, Copy)]
enum Field<'a> {
    Integer(i64),
    Text(&'a str),
    Ip(IpAddr),
    Value(&'a Value),
}

impl Op {
    fn holds(&self, field: Field<'_>) -> bool {
        match self {
            Op::Equal(v) => equal(v, field),
            Op::NotEqual(v) => !equal(v, field),
            Op::In(vs) => vs.iter().any(|v| equal(v, field)),
            Op::NotIn(vs) => !vs.iter().any(|v| equal(v, field)),
            Op::Contains(part) => match field {
                Field::Text(s) => s.contains(part.as_str()),
                Field::Value(Value::Text(s)) => s.contains(part.as_str()),
                Field::Ip(ip) => ip.to_string().contains(part.as_str()),
                _ => false,
            },
            Op::Range { min, max } => {
                let number = match field {
                    Field::Integer(n) => n as f64,
                    Field::Value(v) => match v.as_number() {
                        Some(x) => x,
                        None => return false,
                    },
                    Field::Text(_) | Field::Ip(_) => return false,
                };
                min.is_none_or(|min| number >= min) && max.is_none_or(|max| number <= max)
            }
        }
    }
}

fn equal(wanted: &Value, field: Field<'_>) -> bool {
    match (wanted, field) {
        (Value::Integer(a), Field::Integer(b)) => *a == b,
        (Value::Integer(a), Field::Value(Value::Integer(b))) => a == b,
        (Value::Text(a), Field::Text(b)) => a == b,
        (Value::Text(a), Field::Value(Value::Text(b))) => a == b,
        (Value::Text(a), Field::Ip(ip)) => {
            a.parse::<IpAddr>().is_ok_and(|a| a.to_canonical() == ip)
        }
        (Value::Bool(a), Field::Value(Value::Bool(b))) => a == b,
        (a, Field::Integer(b)) => a.as_number() == Some(b as f64),
        (a, Field::Value(b)) => match (a.as_number(), b.as_number()) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        },
        _ => false,
    }
}

/// A host condition with its field looked up once, for testing many hosts.
#[derive(Debug)]
pub(crate) struct HostTest<'c> {
    field: HostField<'c>,
    op: &'c Op,
}

#[derive(Debug)]
enum HostField<'c> {
    Id,
    Cloud,
    InnerIp,
    Name,
    OsType,
    Attribute(&'c str),
}

impl<'c> HostTest<'c> {
    pub(crate) fn new(condition: &'c Condition) -> Self {
        let field = match condition.field.as_str() {
            "bk_host_id" => HostField::Id,
            "bk_cloud_id" => HostField::Cloud,
            "bk_host_innerip" => HostField::InnerIp,
            "bk_host_name" => HostField::Name,
            "bk_os_type" => HostField::OsType,
            attribute => HostField::Attribute(attribute),
        };
        Self {
            field,
            op: &condition.op,
        }
    }

    pub(crate) fn holds(&self, host: &Host) -> bool {
        match self.field {
            HostField::Id => self.op.holds(Field::Integer(host.bk_host_id)),
            HostField::Cloud => self.op.holds(Field::Integer(host.bk_cloud_id)),
            HostField::InnerIp => host.ips.iter().any(|ip| self.op.holds(Field::Ip(*ip))),
            HostField::Name => self.op.holds(Field::Text(&host.hostname)),
            HostField::OsType => self.op.holds(Field::Text(&host.os_type)),
            HostField::Attribute(name) => host
                .attributes
                .get(name)
                .is_some_and(|v| self.op.holds(Field::Value(v))),
        }
    }
}

impl Condition {
    /// Whether a host satisfies this host condition (`object` must be [`ObjectKind::Host`]).
    pub fn holds_for_host(&self, host: &Host) -> bool {
        HostTest::new(self).holds(host)
    }

    /// Whether a set or module satisfies this set or module condition.
    pub fn holds_for_node(&self, node: &TopoNode) -> bool {
        let id = matches!(
            (self.object, self.field.as_str()),
            (_, "bk_inst_id")
                | (ObjectKind::Set, "bk_set_id")
                | (ObjectKind::Module, "bk_module_id")
        );
        let name = matches!(
            (self.object, self.field.as_str()),
            (_, "bk_inst_name")
                | (ObjectKind::Set, "bk_set_name")
                | (ObjectKind::Module, "bk_module_name")
        );
        if id {
            self.op.holds(Field::Integer(node.bk_inst_id))
        } else if name {
            self.op.holds(Field::Text(&node.name))
        } else {
            node.attributes
                .get(&self.field)
                .is_some_and(|v| self.op.holds(Field::Value(v)))
        }
    }
}
