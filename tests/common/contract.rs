//! Every response a test reads through `TestApp::call` is checked against the service's own
//! OpenAPI description: the schema of its route, method and status (or the error schema).
//! The check is stricter than the description: an object may not carry a property its schema
//! does not name, so a field the handler adds without describing it fails here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::{json, Map, Value};

type Validators = Mutex<HashMap<(String, String, String), Option<Arc<jsonschema::Validator>>>>;

fn description() -> &'static Value {
    mq::api::openapi_description()
}

/// The path template of the description that `path` is an instance of.
pub fn template_of(path: &str) -> Option<String> {
    let path = path.split('?').next().unwrap_or(path);
    let segments: Vec<&str> = path.split('/').collect();
    let paths = description()["paths"].as_object()?;
    let mut best: Option<(usize, &String)> = None;
    for template in paths.keys() {
        let parts: Vec<&str> = template.split('/').collect();
        if parts.len() != segments.len() {
            continue;
        }
        let mut literal = 0;
        let fits = parts.iter().zip(&segments).all(|(part, segment)| {
            if part.starts_with('{') {
                !segment.is_empty()
            } else {
                literal += 1;
                part == segment
            }
        });
        if fits && best.is_none_or(|(count, _)| literal > count) {
            best = Some((literal, template));
        }
    }
    best.map(|(_, template)| template.clone())
}

/// Checks one answer; panics with the schema errors when it does not fit.
pub fn check(method: &str, path: &str, status: u16, body: &Value) {
    if status == 204 || status == 405 {
        return;
    }
    let method = method.to_ascii_lowercase();
    let template = template_of(path);
    let operation = template
        .as_ref()
        .and_then(|t| description()["paths"][t].get(&method));
    let validator = validator(template.as_deref(), &method, operation, status);
    let Some(validator) = validator else { return };
    let errors: Vec<String> = validator
        .iter_errors(body)
        .map(|error| format!("{} at {}", error, error.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{method} {path} answered {status} with a body that breaks its OpenAPI schema: {errors:?}\nbody: {body}"
    );
}

fn validator(
    template: Option<&str>,
    method: &str,
    operation: Option<&Value>,
    status: u16,
) -> Option<Arc<jsonschema::Validator>> {
    static CACHE: OnceLock<Validators> = OnceLock::new();
    let key = (
        template.unwrap_or("(unknown)").to_owned(),
        method.to_owned(),
        status.to_string(),
    );
    let cache = CACHE.get_or_init(Default::default);
    if let Some(found) = cache.lock().unwrap().get(&key) {
        return found.clone();
    }
    let schema = match operation {
        // Not a route of the description: the answer is the contract's error.
        None => Some(json!({"$ref": "#/components/schemas/Error"})),
        Some(operation) => {
            let responses = &operation["responses"];
            let response = responses
                .get(status.to_string())
                .or_else(|| responses.get("default"))
                .unwrap_or_else(|| {
                    panic!("{method} {template:?}: status {status} is not described")
                });
            response["content"]["application/json"]
                .get("schema")
                .cloned()
        }
    };
    let built = schema.map(|schema| {
        let strict = strict(&inline(&schema, 0), false);
        Arc::new(
            jsonschema::draft202012::new(&strict)
                .unwrap_or_else(|e| panic!("schema of {method} {template:?} {status}: {e}")),
        )
    });
    cache.lock().unwrap().insert(key, built.clone());
    built
}

/// `schema` with every `$ref` to a component replaced by the component itself.
fn inline(schema: &Value, depth: usize) -> Value {
    assert!(
        depth < 32,
        "the description's schemas nest too deep (a cycle?)"
    );
    match schema {
        Value::Object(map) => {
            if let Some(Value::String(reference)) = map.get("$ref") {
                let name = reference.trim_start_matches("#/components/schemas/");
                let target = &description()["components"]["schemas"][name];
                assert!(!target.is_null(), "unknown component {reference}");
                return inline(target, depth + 1);
            }
            Value::Object(
                map.iter()
                    .map(|(key, value)| (key.clone(), inline(value, depth + 1)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.iter().map(|v| inline(v, depth + 1)).collect()),
        other => other.clone(),
    }
}

/// Closes every object schema to properties it does not name. A part of an `allOf` is left
/// open: the properties of its siblings are evaluated by the `allOf` that holds them, which
/// is closed instead.
fn strict(schema: &Value, in_all_of: bool) -> Value {
    let Value::Object(map) = schema else {
        return schema.clone();
    };
    let mut out = Map::new();
    for (key, value) in map {
        let value = match (key.as_str(), value) {
            ("allOf", Value::Array(parts)) => {
                Value::Array(parts.iter().map(|part| strict(part, true)).collect())
            }
            ("properties", Value::Object(properties)) => Value::Object(
                properties
                    .iter()
                    .map(|(name, property)| (name.clone(), strict(property, false)))
                    .collect(),
            ),
            ("items" | "additionalProperties", item @ Value::Object(_)) => strict(item, false),
            // A branch stands for the schema holding it: open when that is a part of an allOf.
            ("oneOf" | "anyOf", Value::Array(parts)) => {
                Value::Array(parts.iter().map(|part| strict(part, in_all_of)).collect())
            }
            _ => value.clone(),
        };
        out.insert(key.clone(), value);
    }
    let closes = (map.contains_key("properties") || map.contains_key("allOf"))
        && !map.contains_key("additionalProperties")
        && !in_all_of;
    if closes {
        out.insert("unevaluatedProperties".into(), Value::Bool(false));
    }
    Value::Object(out)
}
