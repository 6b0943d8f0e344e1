//! JSON Schema checks for a queue's `schemaDefinition`.

use serde_json::Value;

/// Whether `schema` is a usable JSON Schema (an object or a boolean that compiles).
pub fn check(schema: &Value) -> Result<(), String> {
    if !(schema.is_object() || schema.is_boolean()) {
        return Err("a schema must be a JSON object or boolean".into());
    }
    jsonschema::validator_for(schema)
        .map(|_| ())
        .map_err(|error| error.to_string())
}
