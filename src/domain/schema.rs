//! JSON Schema checks for a queue's `schemaDefinition`.
//!
//! Patterns (`pattern`, `patternProperties`) run on the `regex` engine, which matches in
//! linear time: a tenant's schema cannot make a publish take exponential time. Patterns that
//! need backtracking (look-around, back-references) are refused when the schema is set.

use jsonschema::{PatternOptions, Validator};
use serde_json::Value;

/// Compiled patterns stay small; a larger one is refused with the schema.
const PATTERN_SIZE_LIMIT: usize = 1 << 20;
/// Patterns (`pattern` values, `patternProperties` keys) one schema may hold.
pub const MAX_PATTERNS: usize = 100;
/// What all of a schema's compiled patterns may take together: each gets its share, so a
/// schema costs at most this much to compile and to keep, however many patterns it has.
const PATTERNS_TOTAL_SIZE_LIMIT: usize = 4 << 20;

/// How many patterns `schema` holds, counting no further than `MAX_PATTERNS + 1`.
fn count_patterns(schema: &Value) -> usize {
    fn walk(value: &Value, count: &mut usize) {
        if *count > MAX_PATTERNS {
            return;
        }
        match value {
            Value::Object(fields) => {
                for (name, field) in fields {
                    match (name.as_str(), field) {
                        ("pattern", Value::String(_)) => *count += 1,
                        ("patternProperties", Value::Object(patterns)) => {
                            *count += patterns.len();
                        }
                        _ => {}
                    }
                    walk(field, count);
                }
            }
            Value::Array(items) => items.iter().for_each(|item| walk(item, count)),
            _ => {}
        }
    }
    let mut count = 0;
    walk(schema, &mut count);
    count
}

/// What can be told of `schema` without compiling it (cheap, on any thread): its form and
/// how many patterns it holds.
pub fn precheck(schema: &Value) -> Result<(), String> {
    if !(schema.is_object() || schema.is_boolean()) {
        return Err("a schema must be a JSON object or boolean".into());
    }
    if count_patterns(schema) > MAX_PATTERNS {
        return Err(format!(
            "a schema holds at most {MAX_PATTERNS} patterns (pattern, patternProperties)"
        ));
    }
    Ok(())
}

/// Compiles `schema` (an object or a boolean) into a validator, or says why it cannot be one.
/// Milliseconds for a large schema: callers run it on the blocking pool.
pub fn compile(schema: &Value) -> Result<Validator, String> {
    precheck(schema)?;
    let patterns = count_patterns(schema);
    // Each pattern gets its share of the budget, for its program and for its lazy DFA's
    // cache alike.
    let size_limit = PATTERN_SIZE_LIMIT.min(PATTERNS_TOTAL_SIZE_LIMIT / patterns.max(1));
    jsonschema::options()
        .with_pattern_options(
            PatternOptions::regex()
                .size_limit(size_limit)
                .dfa_size_limit(size_limit),
        )
        .build(schema)
        .map_err(|error| {
            // Valid for a backtracking engine (within the same limits), not for ours: a
            // pattern needs backtracking.
            let backtracking = jsonschema::options()
                .with_pattern_options(
                    PatternOptions::fancy_regex()
                        .size_limit(size_limit)
                        .dfa_size_limit(size_limit),
                )
                .build(schema)
                .is_ok();
            if backtracking {
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
    fn a_schema_holds_a_bounded_number_of_patterns() {
        let properties: serde_json::Map<String, Value> = (0..MAX_PATTERNS)
            .map(|n| {
                (
                    format!("p{n}"),
                    json!({"type": "string", "pattern": format!("^a{{{n}}}$")}),
                )
            })
            .collect();
        assert!(compile(&json!({"properties": properties})).is_ok());
        let mut too_many = properties.clone();
        too_many.insert("extra".into(), json!({"patternProperties": {"^x": {}}}));
        let error = compile(&json!({"properties": too_many})).unwrap_err();
        assert!(error.contains("at most 100 patterns"), "{error}");
    }

    #[test]
    fn many_patterns_share_one_compiled_size_budget() {
        // Alone, a pattern of over 40 KiB compiled (a hundredth of the budget) is fine; a
        // hundred of them are not.
        let heavy = "\\w{500}";
        assert!(compile(&json!({"pattern": heavy})).is_ok());
        let properties: serde_json::Map<String, Value> = (0..MAX_PATTERNS)
            .map(|n| (format!("p{n}"), json!({"pattern": heavy})))
            .collect();
        assert!(compile(&json!({"properties": properties})).is_err());
    }

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
