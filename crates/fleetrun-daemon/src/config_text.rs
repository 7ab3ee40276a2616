//! Configuration files read so that every error says where: the key at fault and its
//! `line:column`, for the daemons' start and their `check-config`.

/// Deserializes `text`; an error comes with where it is and a message that names the key at
/// fault (toml's own names only the value's line).
pub fn from_toml<T: serde::de::DeserializeOwned>(
    text: &str,
) -> Result<T, (Option<std::ops::Range<usize>>, String)> {
    let deserializer = toml::Deserializer::parse(text)
        .map_err(|e| (e.span(), e.message().trim_end().to_owned()))?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.message().trim_end();
        let message = if key == "." {
            message.to_owned()
        } else {
            format!("{key}: {message}")
        };
        (inner.span(), message)
    })
}

/// One step down into the file: a key of a table, or an element of an array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Name(&'static str),
    Index(usize),
}

/// Where in the file a problem is, when that is known: `:line:column`, both from 1.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Location(pub Option<(usize, usize)>);

impl Location {
    /// The line and column of byte `offset` of `text`.
    pub fn of_offset(text: &str, offset: usize) -> Self {
        let before = &text[..text.floor_char_boundary(offset.min(text.len()))];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        Self(Some((line, column)))
    }

    /// Where an error `from_toml` returned stands, if it said.
    pub fn of_span(text: &str, span: Option<std::ops::Range<usize>>) -> Self {
        span.map_or_else(Self::default, |span| Self::of_offset(text, span.start))
    }

    /// Where the value at `keys` is written in `text` (the deepest table found on the way when
    /// a key is absent).
    pub fn of_keys(text: &str, keys: &[Key]) -> Self {
        let Ok(root) = toml::de::DeTable::parse(text) else {
            return Self::default();
        };
        let mut span = root.span();
        let mut value: Option<&toml::de::DeValue<'_>> = None;
        let mut table = Some(root.get_ref());
        for key in keys {
            let found = match (key, table, value) {
                (Key::Name(name), Some(t), _) => t
                    .iter()
                    .find(|(k, _)| k.get_ref().as_ref() == *name)
                    .map(|(_, v)| v),
                (Key::Index(i), _, Some(toml::de::DeValue::Array(items))) => items.get(*i),
                _ => None,
            };
            let Some(found) = found else { break };
            span = found.span();
            value = Some(found.get_ref());
            table = match found.get_ref() {
                toml::de::DeValue::Table(t) => Some(t),
                _ => None,
            };
        }
        Self::of_offset(text, span.start)
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some((line, column)) => write!(f, ":{line}:{column}"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_count_lines_and_characters_from_one() {
        let text = "a = 1\n[t]\nkey = \"é\"\nlist = [1, 2]\n";
        assert_eq!(Location::of_offset(text, 0).to_string(), ":1:1");
        assert_eq!(
            Location::of_keys(text, &[Key::Name("t"), Key::Name("key")]).to_string(),
            ":3:7"
        );
        assert_eq!(
            Location::of_keys(text, &[Key::Name("t"), Key::Name("list"), Key::Index(1)])
                .to_string(),
            ":4:12"
        );
        // An absent key points at the table that should hold it.
        assert_eq!(
            Location::of_keys(text, &[Key::Name("t"), Key::Name("missing")]).to_string(),
            ":2:1"
        );
        assert_eq!(Location::of_keys("not toml [", &[]).to_string(), "");
    }
}
