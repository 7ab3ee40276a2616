//! Request parameters: a JSON body or a query string, read into typed requests with errors that
//! name the field.
//!
//! In a query every value is text, so the typed requests read numbers and booleans leniently
//! (see [`lenient`]).

use axum::http::Method;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::ApiError;

/// Largest request body accepted (a 16 MiB script, base64-encoded, plus the rest).
pub const MAX_BODY: usize = 24 * 1024 * 1024;

#[derive(Debug)]
pub struct Params(pub Map<String, Value>);

impl Params {
    pub fn from_request(
        method: &Method,
        query: Option<&str>,
        body: &[u8],
    ) -> Result<Self, ApiError> {
        let mut map = Map::new();
        if let Some(query) = query {
            let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query)
                .map_err(|e| ApiError::invalid("query string", e))?;
            for (key, value) in pairs {
                // A repeated key is a list: `host_id_list=1&host_id_list=2`.
                match map.get_mut(&key) {
                    Some(Value::Array(items)) => items.push(Value::String(value)),
                    Some(first) => {
                        let first = first.take();
                        map.insert(key, Value::Array(vec![first, Value::String(value)]));
                    }
                    None => {
                        map.insert(key, Value::String(value));
                    }
                }
            }
        }
        let has_body = !body.iter().all(u8::is_ascii_whitespace);
        if has_body && *method != Method::GET {
            if body.len() > MAX_BODY {
                return Err(ApiError::invalid(
                    "body",
                    format!("larger than {MAX_BODY} bytes"),
                ));
            }
            let value: Value = serde_json::from_slice(body)
                .map_err(|e| ApiError::invalid("body", format!("malformed JSON: {e}")))?;
            let Value::Object(fields) = value else {
                return Err(ApiError::invalid("body", "must be a JSON object"));
            };
            // Body fields win over query fields of the same name.
            map.extend(fields);
        }
        Ok(Self(map))
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(Value::as_str)
    }

    /// Reads the whole parameter set as `T`; a type error names the field that failed.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        let value = Value::Object(self.0.clone());
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let message = inner.to_string();
            if let Some(field) = message
                .strip_prefix("missing field `")
                .and_then(|m| m.split('`').next())
            {
                let full = if path == "." {
                    field.to_owned()
                } else {
                    format!("{path}.{field}")
                };
                ApiError::missing(&full)
            } else {
                ApiError::invalid(&path, message)
            }
        })
    }
}

/// Reads paging fields: `start` from 0, `length` 1 to 1000 (default 20).
pub(super) fn paging(start: Option<i64>, length: Option<i64>) -> Result<(i64, i64), ApiError> {
    let start = start.unwrap_or(0);
    if start < 0 {
        return Err(ApiError::invalid("start", format!("{start} is negative")));
    }
    let length = length.unwrap_or(20);
    if !(1..=1000).contains(&length) {
        return Err(ApiError::invalid(
            "length",
            format!("{length} is outside [1, 1000]"),
        ));
    }
    Ok((start, length))
}

/// Deserializers that accept a value as JSON or as the text a query string carries.
pub mod lenient {
    use serde::{Deserialize, Deserializer, de::Error};
    use serde_json::Value;

    fn int_of(value: &Value) -> Option<i64> {
        match value {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
    }

    pub fn int<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        let value = Value::deserialize(d)?;
        int_of(&value).ok_or_else(|| D::Error::custom(format!("expected an integer, got {value}")))
    }

    pub fn opt_int<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        match Value::deserialize(d)? {
            Value::Null => Ok(None),
            Value::String(s) if s.is_empty() => Ok(None),
            value => int_of(&value)
                .map(Some)
                .ok_or_else(|| D::Error::custom(format!("expected an integer, got {value}"))),
        }
    }

    pub fn opt_bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
        match Value::deserialize(d)? {
            Value::Null => Ok(None),
            Value::Bool(b) => Ok(Some(b)),
            Value::Number(n) if n.as_i64() == Some(1) => Ok(Some(true)),
            Value::Number(n) if n.as_i64() == Some(0) => Ok(Some(false)),
            Value::String(s) => match s.as_str() {
                "true" | "True" | "1" => Ok(Some(true)),
                "false" | "False" | "0" => Ok(Some(false)),
                "" => Ok(None),
                _ => Err(D::Error::custom(format!("expected a boolean, got {s:?}"))),
            },
            other => Err(D::Error::custom(format!("expected a boolean, got {other}"))),
        }
    }

    /// Text, also when a client sent it as a number (`"bk_scope_id": 2`).
    pub fn text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(s),
            Value::Number(n) => Ok(n.to_string()),
            other => Err(D::Error::custom(format!("expected a string, got {other}"))),
        }
    }

    /// A list of integers: a JSON array of numbers or numeric strings, a single value, or a
    /// comma-separated string (as a query string carries it).
    pub fn opt_int_list<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<i64>>, D::Error> {
        let items = match Value::deserialize(d)? {
            Value::Null => return Ok(None),
            Value::Array(items) => items,
            Value::String(s) => s
                .split(',')
                .filter(|p| !p.trim().is_empty())
                .map(|p| Value::String(p.to_owned()))
                .collect(),
            other => vec![other],
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                int_of(v).ok_or_else(|| {
                    D::Error::custom(format!("item {i}: expected an integer, got {v}"))
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}
