//! JSON Schema checks for a queue's `schemaDefinition`.
//!
//! Patterns (`pattern`, `patternProperties`) run on the `regex` engine, which matches in
//! linear time: a tenant's schema cannot make a publish take exponential time. Patterns that
//! need backtracking (look-around, back-references) are refused when the schema is set.

use jsonschema::{PatternOptions, Validator};
use serde_json::Value;

/// Compiled patterns stay small; a larger one is refused with the schema.
const PATTERN_SIZE_LIMIT: usize = 1 << 20;

/// Compiles `schema` (an object or a boolean) into a validator, or says why it cannot be one.
pub fn compile(schema: &Value) -> Result<Validator, String> {
    if !(schema.is_object() || schema.is_boolean()) {
        return Err("a schema must be a JSON object or boolean".into());
    }
    jsonschema::options()
        .with_pattern_options(PatternOptions::regex().size_limit(PATTERN_SIZE_LIMIT))
        .build(schema)
        .map_err(|error| {
            // Valid for a backtracking engine, not for ours: a pattern needs backtracking.
            if jsonschema::validator_for(schema).is_ok() {
                format!(
                    "{error}: patterns run on a linear-time engine, so look-around and \
                     back-references are not supported"
                )
            } else {
                error.to_string()
            }
        })
}

/// Whether `schema` is a usable JSON Schema.
pub fn check(schema: &Value) -> Result<(), String> {
    compile(schema).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn type_object_rejects_a_string() {
        let validator = compile(&json!({"type": "object"})).unwrap();
        assert!(!validator.is_valid(&json!("text")));
        assert_eq!(validator.iter_errors(&json!("text")).count(), 1);
    }

    #[test]
    fn patterns_that_need_backtracking_are_refused() {
        assert!(compile(&json!({"type": "string", "pattern": "^[a-z]+$"})).is_ok());
        for pattern in ["^(?=a)a$", "(a)\\1", "(?<!x)y"] {
            let error = compile(&json!({"pattern": pattern})).unwrap_err();
            assert!(error.contains("linear-time"), "{pattern}: {error}");
        }
        let error = compile(&json!({"patternProperties": {"(?!x).*": {}}})).unwrap_err();
        assert!(error.contains("linear-time"), "{error}");
    }
}
