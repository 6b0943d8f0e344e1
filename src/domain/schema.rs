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

#[cfg(test)]
mod tests {
    #[test]
    fn type_object_rejects_a_string() {
        let validator = jsonschema::validator_for(&serde_json::json!({"type": "object"})).unwrap();
        assert!(!validator.is_valid(&serde_json::json!("text")));
        assert_eq!(validator.iter_errors(&serde_json::json!("text")).count(), 1);
    }
}
