//! The small languages of the inventory commands, read by clap so that a mistake is a usage
//! error (exit 2) before anything is sent: typed values, `KEY=VALUE` attributes, `TYPE:ID`
//! nodes and `--where` conditions.

use serde_json::{Value, json};

/// How `--where` is written, for every error about it.
pub const CONDITION_SYNTAX: &str = "\
expected OBJECT.FIELD OP VALUE: OBJECT is host, set or module; OP is = (equal), != (not equal), \
~ (contains), in or not-in (VALUE a comma-separated list), range (VALUE MIN..MAX, MIN.. or ..MAX); \
e.g. 'module.bk_module_name in nginx,php', 'host.cpu range 8..', 'set.env = prod'";

/// A value as the inventory types it: an integer, else a finite number, else `true`/`false`,
/// else the text itself.
pub fn typed(text: &str) -> Value {
    if let Ok(n) = text.parse::<i64>() {
        return json!(n);
    }
    if let Ok(x) = text.parse::<f64>() {
        // "nan" and "inf" parse as floats but mean words here, and JSON has no such numbers.
        if x.is_finite() {
            return json!(x);
        }
    }
    match text {
        "true" => json!(true),
        "false" => json!(false),
        _ => json!(text),
    }
}

/// `--attr KEY=VALUE`: the key and the typed value.
pub fn attribute(text: &str) -> Result<(String, Value), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE, e.g. rack=a1 or cpu=8"))?;
    let key = key.trim();
    if key.is_empty() || key.contains(char::is_whitespace) {
        return Err(format!("{text:?}: the key must be a word, e.g. rack=a1"));
    }
    Ok((key.to_owned(), typed(value)))
}

/// `--unset-attr KEY`.
pub fn attribute_key(text: &str) -> Result<String, String> {
    let key = text.trim();
    if key.is_empty() || key.contains(char::is_whitespace) || key.contains('=') {
        return Err(format!("{text:?} is not an attribute name"));
    }
    Ok(key.to_owned())
}

/// A topology node, `TYPE:ID`: `set:12`, `module:120`, or a custom level such as `region:1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRef {
    pub bk_obj_id: String,
    pub bk_inst_id: i64,
}

impl std::fmt::Display for NodeRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.bk_obj_id, self.bk_inst_id)
    }
}

fn type_and_id(text: &str) -> Option<(String, i64)> {
    let (kind, id) = text.trim().split_once(':')?;
    let id = id.trim().parse().ok()?;
    let kind = kind.trim();
    let is_word = !kind.is_empty()
        && kind
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    is_word.then(|| (kind.to_owned(), id))
}

/// A node below a business (never `biz:ID`: businesses are `fleetrun biz`'s).
pub fn node(text: &str) -> Result<NodeRef, String> {
    let (kind, id) = type_and_id(text)
        .ok_or_else(|| format!("{text:?} is not TYPE:ID, e.g. set:12 or module:120"))?;
    if kind == "biz" {
        return Err(format!(
            "{text:?} is a business: `fleetrun biz` manages businesses, nodes are set:ID, \
             module:ID or a custom level's TYPE:ID"
        ));
    }
    Ok(NodeRef {
        bk_obj_id: kind,
        bk_inst_id: id,
    })
}

/// A node's parent: `biz:ID` or another node's `TYPE:ID`, as the API writes it.
pub fn parent(text: &str) -> Result<String, String> {
    let (kind, id) = type_and_id(text)
        .ok_or_else(|| format!("{text:?} is not biz:ID or TYPE:ID, e.g. biz:2 or set:12"))?;
    Ok(format!("{kind}:{id}"))
}

/// A scope an account may be used in: `biz:2`, `biz_set:9` (a bare number is a business).
pub fn scope(text: &str) -> Result<String, String> {
    let text = text.trim();
    let (kind, id) = text.split_once(':').unwrap_or(("biz", text));
    match (kind, id.parse::<i64>()) {
        ("biz" | "biz_set", Ok(id)) => Ok(format!("{kind}:{id}")),
        _ => Err(format!("{text:?} is not biz:ID or biz_set:ID")),
    }
}

/// An IP address of a host.
pub fn ip(text: &str) -> Result<String, String> {
    text.trim()
        .parse::<std::net::IpAddr>()
        .map(|ip| ip.to_string())
        .map_err(|_| format!("{text:?} is not an IPv4 or IPv6 address"))
}

/// A `--where` condition, as the API's `{object, field, op, value | min, max}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition(pub Value);

/// `OBJECT.FIELD OP VALUE`, e.g. `module.bk_module_name in nginx,php` or `host.cpu range 8..`.
pub fn condition(text: &str) -> Result<Condition, String> {
    let bad = |why: &str| format!("{why} ({CONDITION_SYNTAX})");
    let text = text.trim();
    let subject_end = text
        .find(|c: char| c.is_whitespace() || matches!(c, '=' | '!' | '~'))
        .unwrap_or(text.len());
    let (subject, rest) = text.split_at(subject_end);
    let (object, field) = subject
        .split_once('.')
        .ok_or_else(|| bad(&format!("{subject:?} is not OBJECT.FIELD")))?;
    if !matches!(object, "host" | "set" | "module") {
        return Err(bad(&format!(
            "{object:?} is not an object: host, set or module"
        )));
    }
    if field.is_empty() {
        return Err(bad(&format!("{subject:?} has no field after the dot")));
    }
    let rest = rest.trim_start();
    let (op, value) = if let Some(value) = rest.strip_prefix("!=") {
        ("not_equal", value)
    } else if let Some(value) = rest.strip_prefix("==").or_else(|| rest.strip_prefix('=')) {
        ("equal", value)
    } else if let Some(value) = rest.strip_prefix('~') {
        ("contains", value)
    } else {
        let (word, value) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        let op = match word {
            "in" => "in",
            "not-in" | "not_in" => "not_in",
            "range" => "range",
            "equal" => "equal",
            "not-equal" | "not_equal" => "not_equal",
            "contains" => "contains",
            "" => return Err(bad("no operator")),
            other => return Err(bad(&format!("{other:?} is not an operator"))),
        };
        (op, value)
    };
    let value = value.trim();
    if value.is_empty() {
        return Err(bad("no value"));
    }
    let mut condition = json!({"object": object, "field": field, "op": op});
    match op {
        "in" | "not_in" => {
            let items: Vec<&str> = value.split(',').map(str::trim).collect();
            if items.iter().any(|i| i.is_empty()) {
                return Err(bad(&format!("{value:?} has an empty item")));
            }
            condition["value"] = items.into_iter().map(typed).collect();
        }
        "range" => {
            let (min, max) = value
                .split_once("..")
                .ok_or_else(|| bad(&format!("{value:?} is not MIN..MAX, MIN.. or ..MAX")))?;
            let bound = |side: &str| -> Result<Option<Value>, String> {
                let side = side.trim();
                if side.is_empty() {
                    return Ok(None);
                }
                match typed(side) {
                    n @ Value::Number(_) => Ok(Some(n)),
                    _ => Err(bad(&format!("{side:?} is not a number"))),
                }
            };
            let (min, max) = (bound(min)?, bound(max)?);
            if min.is_none() && max.is_none() {
                return Err(bad("a range needs MIN, MAX or both"));
            }
            if let Some(min) = min {
                condition["min"] = min;
            }
            if let Some(max) = max {
                condition["max"] = max;
            }
        }
        // A text search: `~ 10` looks for the text "10".
        "contains" => condition["value"] = json!(value),
        _ => condition["value"] = typed(value),
    }
    Ok(Condition(condition))
}

/// A condition written back the way `--where` reads it; `None` for one it cannot say.
pub fn describe_condition(condition: &Value) -> Option<String> {
    let object = condition["object"].as_str().unwrap_or("host");
    let field = condition["field"].as_str()?;
    let plain = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let list = |v: &Value| {
        v.as_array().map_or_else(
            || plain(v),
            |items| items.iter().map(plain).collect::<Vec<_>>().join(","),
        )
    };
    let value = &condition["value"];
    let text = match condition["op"].as_str()?.trim_start_matches('$') {
        "equal" | "eq" => format!("= {}", plain(value)),
        "not_equal" | "ne" => format!("!= {}", plain(value)),
        "contains" => format!("~ {}", plain(value)),
        "in" => format!("in {}", list(value)),
        "not_in" | "nin" => format!("not-in {}", list(value)),
        "range" => {
            // The inventory keeps bounds as floats: 8.0 reads better as 8.
            let side = |v: &Value| match v.as_f64() {
                None => String::new(),
                Some(x) if x.fract() == 0.0 && x.abs() < 1e15 => (x as i64).to_string(),
                Some(_) => plain(v),
            };
            format!(
                "range {}..{}",
                side(&condition["min"]),
                side(&condition["max"])
            )
        }
        _ => return None,
    };
    Some(format!("{object}.{field} {text}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_typed_like_the_inventory_types_them() {
        assert_eq!(typed("8"), json!(8));
        assert_eq!(typed("-3"), json!(-3));
        assert_eq!(typed("2.5"), json!(2.5));
        assert_eq!(typed("true"), json!(true));
        assert_eq!(typed("False"), json!("False"));
        assert_eq!(typed("nan"), json!("nan"));
        assert_eq!(typed("inf"), json!("inf"));
        assert_eq!(typed("a1"), json!("a1"));
        assert_eq!(typed(""), json!(""));
        assert_eq!(attribute("rack=a1"), Ok(("rack".into(), json!("a1"))));
        assert_eq!(attribute("cpu=16"), Ok(("cpu".into(), json!(16))));
        assert_eq!(attribute("note=a=b"), Ok(("note".into(), json!("a=b"))));
        assert!(attribute("rack").is_err());
        assert!(attribute("=x").is_err());
    }

    #[test]
    fn nodes_and_parents_are_type_and_id() {
        assert_eq!(
            node("set:12"),
            Ok(NodeRef {
                bk_obj_id: "set".into(),
                bk_inst_id: 12
            })
        );
        assert_eq!(node("region:1").unwrap().to_string(), "region:1");
        assert!(node("biz:2").unwrap_err().contains("fleetrun biz"));
        assert!(node("set").is_err());
        assert!(node("set:x").is_err());
        assert!(node(":1").is_err());
        assert_eq!(parent("biz:2").as_deref(), Ok("biz:2"));
        assert_eq!(parent(" set:12 ").as_deref(), Ok("set:12"));
        assert!(parent("biz").is_err());
        assert_eq!(scope("biz_set:9").as_deref(), Ok("biz_set:9"));
        assert_eq!(scope("2").as_deref(), Ok("biz:2"));
        assert!(scope("app:2").is_err());
        assert_eq!(ip(" fd00::5 ").as_deref(), Ok("fd00::5"));
        assert!(ip("10.0.0").is_err());
    }

    fn check(text: &str, expected: Value) {
        let parsed = condition(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(parsed.0, expected, "{text}");
        assert_eq!(
            condition(&describe_condition(&parsed.0).unwrap()).unwrap(),
            parsed,
            "{text} reads back"
        );
    }

    #[test]
    fn conditions_read_like_the_help_says() {
        check(
            "module.bk_module_name in nginx,php",
            json!({"object": "module", "field": "bk_module_name", "op": "in", "value": ["nginx", "php"]}),
        );
        check(
            "host.cpu range 8..",
            json!({"object": "host", "field": "cpu", "op": "range", "min": 8}),
        );
        check(
            "host.cpu range ..2.5",
            json!({"object": "host", "field": "cpu", "op": "range", "max": 2.5}),
        );
        check(
            "host.cpu range 4..16",
            json!({"object": "host", "field": "cpu", "op": "range", "min": 4, "max": 16}),
        );
        check(
            "set.env = prod",
            json!({"object": "set", "field": "env", "op": "equal", "value": "prod"}),
        );
        check(
            "set.env=prod",
            json!({"object": "set", "field": "env", "op": "equal", "value": "prod"}),
        );
        check(
            "host.ssd != true",
            json!({"object": "host", "field": "ssd", "op": "not_equal", "value": true}),
        );
        check(
            "host.bk_host_name ~ web 1",
            json!({"object": "host", "field": "bk_host_name", "op": "contains", "value": "web 1"}),
        );
        check(
            "host.rack not-in a1, b2 ,3",
            json!({"object": "host", "field": "rack", "op": "not_in", "value": ["a1", "b2", 3]}),
        );
        check(
            "host.bk_host_id ~ 10",
            json!({"object": "host", "field": "bk_host_id", "op": "contains", "value": "10"}),
        );
    }

    #[test]
    fn stored_float_bounds_read_back_as_written() {
        let stored =
            json!({"object": "module", "field": "cpu", "op": "range", "min": 8.0, "max": 32.5});
        assert_eq!(
            describe_condition(&stored).as_deref(),
            Some("module.cpu range 8..32.5")
        );
    }

    #[test]
    fn a_bad_condition_says_what_is_wrong_and_how_to_write_it() {
        for (text, why) in [
            ("cpu > 8", "is not OBJECT.FIELD"),
            ("rack.cpu = 8", "is not an object"),
            ("host. = 8", "no field"),
            ("host.cpu > 8", "\">\" is not an operator"),
            ("host.cpu", "no operator"),
            ("host.cpu =", "no value"),
            ("host.cpu range 8", "is not MIN..MAX"),
            ("host.cpu range ..", "needs MIN, MAX or both"),
            ("host.cpu range a..b", "\"a\" is not a number"),
            ("host.rack in a,,b", "empty item"),
        ] {
            let error = condition(text).expect_err(text);
            assert!(error.contains(why), "{text}: {error}");
            assert!(error.contains("OBJECT.FIELD OP VALUE"), "{text}: {error}");
        }
    }
}
