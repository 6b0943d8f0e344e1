//! Subscription message filters (API.md `messageFilter`), parsed once at subscription create
//! or update and evaluated per message.
//!
//! A filter is an object whose entries all must match (AND). A key is `headers.<name>`,
//! `payload.<dot.path>` or `key`; `$or` takes a list of filters, any of which must match. A
//! value is a scalar (equals), an array (any of), or an object of operators, all of which must
//! hold: `exists`, `prefix`, `anythingBut`, `gt`, `gte`, `lt`, `lte`. A field that is absent
//! matches only `{"exists": false}`.

use std::collections::BTreeMap;

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    conditions: Vec<Condition>,
}

#[derive(Debug, Clone, PartialEq)]
enum Condition {
    Any(Vec<Filter>),
    Field(Field, Vec<Test>),
}

#[derive(Debug, Clone, PartialEq)]
enum Field {
    Header(String),
    Payload(Vec<String>),
    Key,
}

#[derive(Debug, Clone, PartialEq)]
enum Test {
    Equals(Value),
    AnyOf(Vec<Value>),
    Exists(bool),
    Prefix(String),
    AnythingBut(Vec<Value>),
    Compare(Comparison, f64),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Comparison {
    Gt,
    Gte,
    Lt,
    Lte,
}

/// What a filter looks at in a message.
pub struct MessageView<'a> {
    pub headers: &'a BTreeMap<String, String>,
    pub payload: &'a Value,
    pub key: Option<&'a str>,
}

const MAX_DEPTH: usize = 8;
const MAX_CONDITIONS: usize = 100;
/// Values of one list (`[..]`, `anythingBut`).
const MAX_LIST_VALUES: usize = 100;
/// Characters of one string value or key.
const MAX_TEXT_CHARS: usize = 1024;
/// The whole filter as JSON text: every filter is evaluated against every message.
pub const MAX_FILTER_BYTES: usize = 16 * 1024;

impl Filter {
    /// Parses a filter, or says what is wrong with it.
    pub fn parse(value: &Value) -> Result<Filter, String> {
        let size = serde_json::to_vec(value).map_or(usize::MAX, |text| text.len());
        if size > MAX_FILTER_BYTES {
            return Err(format!(
                "is {size} bytes of JSON; at most {MAX_FILTER_BYTES} are allowed"
            ));
        }
        let mut budget = MAX_CONDITIONS;
        parse_filter(value, 0, &mut budget)
    }

    pub fn matches(&self, message: &MessageView<'_>) -> bool {
        self.conditions.iter().all(|condition| match condition {
            Condition::Any(filters) => filters.iter().any(|filter| filter.matches(message)),
            Condition::Field(field, tests) => {
                let value = lookup(field, message);
                tests.iter().all(|test| test.holds(value.as_ref()))
            }
        })
    }
}

fn parse_filter(value: &Value, depth: usize, budget: &mut usize) -> Result<Filter, String> {
    if depth > MAX_DEPTH {
        return Err(format!("is nested deeper than {MAX_DEPTH} levels"));
    }
    let object = value.as_object().ok_or("must be a JSON object")?;
    let mut conditions = Vec::with_capacity(object.len());
    for (name, rule) in object {
        *budget = budget
            .checked_sub(1)
            .ok_or(format!("has more than {MAX_CONDITIONS} conditions"))?;
        if name == "$or" {
            let alternatives = rule
                .as_array()
                .filter(|list| !list.is_empty())
                .ok_or("$or must be a non-empty array of filters")?;
            let filters = alternatives
                .iter()
                .map(|alternative| parse_filter(alternative, depth + 1, budget))
                .collect::<Result<_, _>>()?;
            conditions.push(Condition::Any(filters));
        } else {
            conditions.push(Condition::Field(
                parse_field(name)?,
                parse_tests(name, rule)?,
            ));
        }
    }
    Ok(Filter { conditions })
}

fn parse_field(name: &str) -> Result<Field, String> {
    if name == "key" {
        return Ok(Field::Key);
    }
    if let Some(header) = name.strip_prefix("headers.").filter(|h| !h.is_empty()) {
        return Ok(Field::Header(header.to_owned()));
    }
    if let Some(path) = name.strip_prefix("payload.") {
        let segments: Vec<String> = path.split('.').map(str::to_owned).collect();
        if segments.iter().all(|s| !s.is_empty()) {
            return Ok(Field::Payload(segments));
        }
    }
    Err(format!(
        "'{name}' is not a filter key (key, headers.<name>, payload.<path> or $or)"
    ))
}

/// A list of scalar values of at most `MAX_LIST_VALUES`, each within `MAX_TEXT_CHARS`.
fn check_list(name: &str, values: &[Value]) -> Result<(), String> {
    if values.iter().any(|v| v.is_array() || v.is_object()) {
        return Err(format!("'{name}': a list holds scalar values only"));
    }
    if values.len() > MAX_LIST_VALUES {
        return Err(format!(
            "'{name}': a list holds at most {MAX_LIST_VALUES} values"
        ));
    }
    values.iter().try_for_each(|value| check_text(name, value))
}

fn check_text(name: &str, value: &Value) -> Result<(), String> {
    match value.as_str() {
        Some(text) if text.chars().count() > MAX_TEXT_CHARS => Err(format!(
            "'{name}': a string value has at most {MAX_TEXT_CHARS} characters"
        )),
        _ => Ok(()),
    }
}

fn parse_tests(name: &str, rule: &Value) -> Result<Vec<Test>, String> {
    if name.chars().count() > MAX_TEXT_CHARS {
        return Err(format!("a key has at most {MAX_TEXT_CHARS} characters"));
    }
    match rule {
        Value::Array(options) => {
            check_list(name, options)?;
            Ok(vec![Test::AnyOf(options.clone())])
        }
        Value::Object(operators) => {
            if operators.is_empty() {
                return Err(format!("'{name}': an operator object cannot be empty"));
            }
            operators
                .iter()
                .map(|(operator, argument)| parse_operator(name, operator, argument))
                .collect()
        }
        scalar => {
            check_text(name, scalar)?;
            Ok(vec![Test::Equals(scalar.clone())])
        }
    }
}

fn parse_operator(name: &str, operator: &str, argument: &Value) -> Result<Test, String> {
    let number = || {
        argument
            .as_f64()
            .ok_or(format!("'{name}': {operator} takes a number"))
    };
    match operator {
        "exists" => argument
            .as_bool()
            .map(Test::Exists)
            .ok_or(format!("'{name}': exists takes true or false")),
        "prefix" => {
            check_text(name, argument)?;
            argument
                .as_str()
                .map(|p| Test::Prefix(p.to_owned()))
                .ok_or(format!("'{name}': prefix takes a string"))
        }
        "anythingBut" => match argument {
            Value::Array(values) => {
                check_list(name, values)?;
                Ok(Test::AnythingBut(values.clone()))
            }
            scalar if !scalar.is_object() => {
                check_text(name, scalar)?;
                Ok(Test::AnythingBut(vec![scalar.clone()]))
            }
            _ => Err(format!("'{name}': anythingBut takes a value or a list")),
        },
        "gt" => Ok(Test::Compare(Comparison::Gt, number()?)),
        "gte" => Ok(Test::Compare(Comparison::Gte, number()?)),
        "lt" => Ok(Test::Compare(Comparison::Lt, number()?)),
        "lte" => Ok(Test::Compare(Comparison::Lte, number()?)),
        other => Err(format!(
            "'{name}': unknown operator '{other}' (exists, prefix, anythingBut, gt, gte, lt, lte)"
        )),
    }
}

fn lookup(field: &Field, message: &MessageView<'_>) -> Option<Value> {
    match field {
        Field::Key => message.key.map(|key| Value::String(key.to_owned())),
        Field::Header(name) => message.headers.get(name).map(|v| Value::String(v.clone())),
        Field::Payload(path) => {
            let mut current = message.payload;
            for segment in path {
                current = match current {
                    Value::Object(map) => map.get(segment)?,
                    Value::Array(items) => items.get(segment.parse::<usize>().ok()?)?,
                    _ => return None,
                };
            }
            Some(current.clone())
        }
    }
}

/// JSON equality, with numbers compared by value (1 equals 1.0).
fn same(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) if a.is_number() && b.is_number() => x == y,
        _ => a == b,
    }
}

/// A number, or a string holding one (header values are strings).
fn numeric(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

impl Test {
    fn holds(&self, value: Option<&Value>) -> bool {
        match (self, value) {
            (Test::Exists(expected), value) => value.is_some_and(|v| !v.is_null()) == *expected,
            (_, None) => false,
            (Test::Equals(expected), Some(actual)) => same(expected, actual),
            (Test::AnyOf(options), Some(actual)) => options.iter().any(|o| same(o, actual)),
            (Test::Prefix(prefix), Some(actual)) => actual
                .as_str()
                .is_some_and(|s| s.starts_with(prefix.as_str())),
            (Test::AnythingBut(excluded), Some(actual)) => {
                !excluded.iter().any(|e| same(e, actual))
            }
            (Test::Compare(comparison, bound), Some(actual)) => {
                numeric(actual).is_some_and(|n| match comparison {
                    Comparison::Gt => n > *bound,
                    Comparison::Gte => n >= *bound,
                    Comparison::Lt => n < *bound,
                    Comparison::Lte => n <= *bound,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(filter: Value, headers: &[(&str, &str)], payload: Value, key: Option<&str>) -> bool {
        let headers: BTreeMap<String, String> = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Filter::parse(&filter).unwrap().matches(&MessageView {
            headers: &headers,
            payload: &payload,
            key,
        })
    }

    #[test]
    fn equals_any_of_and_and() {
        let filter = json!({"headers.eventType": "order.created", "payload.region": ["eu", "us"]});
        assert!(check(
            filter.clone(),
            &[("eventType", "order.created")],
            json!({"region": "eu"}),
            None
        ));
        assert!(!check(
            filter.clone(),
            &[("eventType", "order.created")],
            json!({"region": "ap"}),
            None
        ));
        assert!(!check(
            filter,
            &[("eventType", "order.paid")],
            json!({"region": "eu"}),
            None
        ));
        assert!(check(
            json!({"payload.total": 10}),
            &[],
            json!({"total": 10.0}),
            None
        ));
        assert!(check(
            json!({"key": "customer-42"}),
            &[],
            json!({}),
            Some("customer-42")
        ));
        assert!(!check(json!({"key": "customer-42"}), &[], json!({}), None));
    }

    #[test]
    fn operators() {
        let payload = json!({"order": {"total": 120, "items": [{"sku": "A-1"}]}, "note": null});
        assert!(check(
            json!({"payload.order.total": {"gt": 100, "lte": 120}}),
            &[],
            payload.clone(),
            None
        ));
        assert!(!check(
            json!({"payload.order.total": {"gt": 120}}),
            &[],
            payload.clone(),
            None
        ));
        assert!(check(
            json!({"payload.order.items.0.sku": {"prefix": "A-"}}),
            &[],
            payload.clone(),
            None
        ));
        assert!(check(
            json!({"payload.order.missing": {"exists": false}}),
            &[],
            payload.clone(),
            None
        ));
        assert!(check(
            json!({"payload.note": {"exists": false}}),
            &[],
            payload.clone(),
            None
        ));
        assert!(!check(
            json!({"payload.order.missing": {"exists": true}}),
            &[],
            payload.clone(),
            None
        ));
        assert!(check(
            json!({"payload.order.total": {"anythingBut": [1, 2]}}),
            &[],
            payload.clone(),
            None
        ));
        assert!(!check(
            json!({"payload.order.total": {"anythingBut": 120}}),
            &[],
            payload.clone(),
            None
        ));
        assert!(!check(
            json!({"payload.absent": {"anythingBut": [1]}}),
            &[],
            payload.clone(),
            None
        ));
        assert!(check(
            json!({"headers.priority": {"gte": 5}}),
            &[("priority", "7")],
            json!({}),
            None
        ));
        assert!(!check(
            json!({"headers.priority": {"gte": 5}}),
            &[("priority", "high")],
            json!({}),
            None
        ));
    }

    #[test]
    fn or_at_any_level() {
        let filter = json!({
            "headers.kind": "order",
            "$or": [{"payload.total": {"gt": 1000}}, {"payload.vip": true, "$or": [{"key": "a"}, {"key": "b"}]}]
        });
        assert!(check(
            filter.clone(),
            &[("kind", "order")],
            json!({"total": 5000}),
            None
        ));
        assert!(check(
            filter.clone(),
            &[("kind", "order")],
            json!({"vip": true}),
            Some("b")
        ));
        assert!(!check(
            filter.clone(),
            &[("kind", "order")],
            json!({"vip": true}),
            Some("c")
        ));
        assert!(!check(
            filter,
            &[("kind", "refund")],
            json!({"total": 5000}),
            None
        ));
    }

    #[test]
    fn invalid_filters_are_refused() {
        for bad in [
            json!("x"),
            json!({"body.x": 1}),
            json!({"headers.": 1}),
            json!({"payload..a": 1}),
            json!({"key": {"between": [1, 2]}}),
            json!({"key": {}}),
            json!({"key": {"gt": "ten"}}),
            json!({"key": {"exists": "yes"}}),
            json!({"key": [[1]]}),
            json!({"$or": []}),
            json!({"$or": {"key": 1}}),
        ] {
            assert!(Filter::parse(&bad).is_err(), "{bad}");
        }
        let mut deep = json!({"key": 1});
        for _ in 0..10 {
            deep = json!({"$or": [deep]});
        }
        assert!(Filter::parse(&deep).is_err());
    }

    #[test]
    fn sizes_are_bounded() {
        let many: Vec<u32> = (0..101).collect();
        assert!(Filter::parse(&json!({"key": many})).is_err());
        assert!(Filter::parse(&json!({"key": {"anythingBut": many}})).is_err());
        let long = "x".repeat(1025);
        assert!(Filter::parse(&json!({"key": long})).is_err());
        assert!(Filter::parse(&json!({"key": {"prefix": long}})).is_err());
        assert!(Filter::parse(&json!({ format!("headers.{long}"): 1 })).is_err());
        let wide: serde_json::Map<String, Value> = (0..60)
            .map(|n| (format!("payload.f{n}"), json!("v".repeat(400))))
            .collect();
        let error = Filter::parse(&Value::Object(wide)).unwrap_err();
        assert!(error.contains("bytes"), "{error}");
        let fine: Vec<u32> = (0..100).collect();
        assert!(
            Filter::parse(&json!({"key": fine, "headers.a": {"prefix": "x".repeat(1024)}})).is_ok()
        );
    }
}
