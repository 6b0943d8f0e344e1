//! Collects every problem of a request at once, so a client fixes them in one round trip.

use serde::{Deserialize, Deserializer};

use crate::error::ApiError;

#[derive(Debug, Default)]
pub struct Problems {
    items: Vec<(String, String)>,
}

impl Problems {
    pub fn add(&mut self, field: impl Into<String>, problem: impl Into<String>) {
        self.items.push((field.into(), problem.into()));
    }

    pub fn check(&mut self, ok: bool, field: &str, problem: impl FnOnce() -> String) {
        if !ok {
            self.add(field, problem());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// `value` when it lies in `min..=max`; otherwise notes the problem and returns `min`.
    pub fn in_range(&mut self, field: &str, value: i64, min: i64, max: i64) -> i64 {
        if (min..=max).contains(&value) {
            value
        } else {
            self.add(
                field,
                format!("must be between {min} and {max} (got {value})"),
            );
            min
        }
    }

    /// One of a closed set of values (see `string_enum!`), or a problem listing them.
    pub fn choice<T>(
        &mut self,
        field: &str,
        text: &str,
        parse: fn(&str) -> Option<T>,
        all: &[&str],
    ) -> Option<T> {
        let parsed = parse(text);
        if parsed.is_none() {
            self.add(
                field,
                format!("must be one of {} (got '{text}')", all.join(", ")),
            );
        }
        parsed
    }

    /// `Ok(value)` when nothing was found wrong, else one 400 naming every field.
    pub fn into_result<T>(self, value: T) -> Result<T, ApiError> {
        if self.items.is_empty() {
            return Ok(value);
        }
        let message = self
            .items
            .iter()
            .map(|(field, problem)| format!("{field} {problem}"))
            .collect::<Vec<_>>()
            .join("; ");
        let fields = self.items.into_iter().map(|(field, _)| field).collect();
        Err(ApiError::validation(message, fields))
    }
}

/// A closed set of lowercase string values, with its wire form and parser.
macro_rules! string_enum {
    ($name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
        pub enum $name { $(#[serde(rename = $text)] $variant),+ }

        // By hand: the derive does not see a `rename` whose text comes from a macro argument.
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .enum_values(Some([$($text),+]))
                    .into()
            }
        }

        impl utoipa::ToSchema for $name {
            fn name() -> std::borrow::Cow<'static, str> {
                std::borrow::Cow::Borrowed(stringify!($name))
            }
        }

        impl $name {
            pub const ALL: &'static [&'static str] = &[$($text),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            pub fn parse(text: &str) -> Option<Self> {
                match text { $($text => Some($name::$variant),)+ _ => None }
            }
        }
    };
}
pub(crate) use string_enum;

/// For partial updates: distinguishes an absent field (`None`) from an explicit `null`
/// (`Some(None)`), which clears it.
pub fn nullable<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

/// Whether a JSON value holds the NUL character in a string or a key: PostgreSQL's jsonb
/// cannot store it, so configuration that does is refused up front.
pub fn holds_nul(value: &serde_json::Value) -> bool {
    use serde_json::Value;
    match value {
        Value::String(text) => text.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => map
            .iter()
            .any(|(key, item)| key.contains('\0') || holds_nul(item)),
        _ => false,
    }
}

/// Free text (descriptions, header values): any character but the control characters,
/// except tab, line feed and carriage return.
pub fn is_free_text(text: &str) -> bool {
    !text
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
}

/// Name rule shared by queues and consumer groups: 1–200 of `[A-Za-z0-9._-]`, starting with
/// a letter or digit.
pub fn is_valid_name(name: &str) -> bool {
    (1..=200).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_valid_name("orders"));
        assert!(is_valid_name("0rders.v2_eu-west"));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name(".orders"));
        assert!(!is_valid_name("-orders"));
        assert!(!is_valid_name("or ders"));
        assert!(!is_valid_name("orders/1"));
        assert!(!is_valid_name("ördërs"));
        assert!(is_valid_name(&"a".repeat(200)));
        assert!(!is_valid_name(&"a".repeat(201)));
    }

    #[test]
    fn problems_name_every_field() {
        let mut problems = Problems::default();
        problems.add("a", "is bad");
        problems.check(false, "b", || "is worse".into());
        problems.check(true, "c", || "never".into());
        let error = problems.into_result(()).unwrap_err();
        assert_eq!(error.details["fields"], serde_json::json!(["a", "b"]));
        assert_eq!(error.message, "a is bad; b is worse");
    }
}
