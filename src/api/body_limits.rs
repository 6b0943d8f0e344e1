//! Limits a JSON body is held to before it is decoded.
//!
//! Decoding amplifies: an empty object `{}` of three bytes becomes a `serde_json::Value` of
//! 32 bytes, or a message of a few hundred, so a 16 MiB body of five million `{}` would
//! take gigabytes before any count could be checked on the decoded value. One linear pass
//! over the bytes counts first — every JSON value, and the entries of the top-level fields
//! that hold lists — and a body past a limit is refused before anything is built.

use crate::error::ApiError;

/// JSON values one body may hold in all (every string, number, literal, array and object).
/// Whatever their shape, that many values decode to a few tens of megabytes at most.
pub const MAX_VALUES: usize = 500_000;

/// How deep arrays and objects may nest (serde_json refuses deeper ones too).
pub const MAX_DEPTH: usize = 128;

/// What a body is held to.
pub struct BodyLimits<'a> {
    pub max_values: usize,
    /// Top-level fields (of a body that is an object) whose array or object may hold at
    /// most this many entries.
    pub lists: &'a [(&'a str, usize)],
}

/// The limits of every JSON body: the lists of the routes that take them. Routes check
/// their own, often lower, limits again once decoded (`MAX_BATCH_SIZE`, for one).
pub const DEFAULT: BodyLimits<'static> = BodyLimits {
    max_values: MAX_VALUES,
    lists: &[
        ("messages", 100_000),
        ("ackIds", 1000),
        ("allowedProducers", 100),
        ("allowedConsumers", 100),
        ("headers", 64),
    ],
};

struct Frame {
    is_object: bool,
    entries: usize,
    /// The top-level field this container is the value of, and its limit.
    limit: Option<(String, usize)>,
}

/// Checks `bytes` against `limits` in one pass, without building anything. Malformed JSON
/// passes (the decoder that follows names what is wrong with it).
pub fn check(bytes: &[u8], limits: &BodyLimits<'_>) -> Result<(), ApiError> {
    let mut stack: Vec<Frame> = Vec::new();
    let mut values = 0usize;
    // In an object: whether the next string is a key.
    let mut expect_key = false;
    // The last key read directly in the top-level object.
    let mut top_key: Option<String> = None;
    let mut at = 0;
    while at < bytes.len() {
        let byte = bytes[at];
        match byte {
            b'"' => {
                let start = at + 1;
                at = string_end(bytes, start);
                let is_key = expect_key && stack.last().is_some_and(|frame| frame.is_object);
                if is_key {
                    expect_key = false;
                    if stack.len() == 1 {
                        let key = &bytes[start..at.min(bytes.len()).max(start)];
                        top_key =
                            Some(String::from_utf8_lossy(&key[..key.len().min(64)]).into_owned());
                    }
                    enter_entry(&mut stack)?;
                } else {
                    count_value(&mut values, limits, &mut stack)?;
                }
            }
            b'{' | b'[' => {
                count_value(&mut values, limits, &mut stack)?;
                let limit = if stack.len() == 1 && stack[0].is_object {
                    top_key.as_deref().and_then(|key| {
                        limits
                            .lists
                            .iter()
                            .find(|(name, _)| *name == key)
                            .map(|(name, most)| ((*name).to_owned(), *most))
                    })
                } else {
                    None
                };
                if stack.len() >= MAX_DEPTH {
                    return Err(ApiError::validation(
                        format!("request body nests arrays and objects deeper than {MAX_DEPTH}"),
                        vec![],
                    ));
                }
                stack.push(Frame {
                    is_object: byte == b'{',
                    entries: 0,
                    limit,
                });
                expect_key = byte == b'{';
            }
            b'}' | b']' => {
                stack.pop();
                expect_key = false;
            }
            b',' => expect_key = stack.last().is_some_and(|frame| frame.is_object),
            b':' => expect_key = false,
            b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => {
                count_value(&mut values, limits, &mut stack)?;
                // The rest of the scalar.
                while at + 1 < bytes.len()
                    && !matches!(bytes[at + 1], b',' | b'}' | b']' | b':' | b'"')
                    && !bytes[at + 1].is_ascii_whitespace()
                {
                    at += 1;
                }
            }
            _ => {}
        }
        at += 1;
    }
    Ok(())
}

/// The index of the quote that ends the string whose text starts at `start`.
fn string_end(bytes: &[u8], start: usize) -> usize {
    let mut at = start;
    while at < bytes.len() {
        match bytes[at] {
            b'\\' => at += 2,
            b'"' => return at,
            _ => at += 1,
        }
    }
    bytes.len()
}

/// A value begins: counted in all, and as an entry of the array holding it.
fn count_value(
    values: &mut usize,
    limits: &BodyLimits<'_>,
    stack: &mut [Frame],
) -> Result<(), ApiError> {
    *values += 1;
    if *values > limits.max_values {
        return Err(ApiError::validation(
            format!(
                "request body holds more than {} JSON values",
                limits.max_values
            ),
            vec![],
        ));
    }
    if stack.last().is_some_and(|frame| !frame.is_object) {
        enter_entry(stack)?;
    }
    Ok(())
}

/// An entry (array element or object key) of the innermost container begins.
fn enter_entry(stack: &mut [Frame]) -> Result<(), ApiError> {
    let Some(frame) = stack.last_mut() else {
        return Ok(());
    };
    frame.entries += 1;
    if let Some((field, most)) = &frame.limit {
        if frame.entries > *most {
            return Err(ApiError::validation(
                format!("{field} holds at most {most} entries"),
                vec![field.clone()],
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(lists: &'static [(&'static str, usize)]) -> BodyLimits<'static> {
        BodyLimits {
            max_values: 20,
            lists,
        }
    }

    #[test]
    fn top_level_lists_are_counted_by_their_field() {
        let lists = &[("messages", 2), ("ackIds", 3)];
        assert!(check(
            br#"{"queue":"q","messages":[{"a":[1,2,3]},{}]}"#,
            &limits(lists)
        )
        .is_ok());
        let error = check(br#"{"queue":"q","messages":[{},{},{}]}"#, &limits(lists)).unwrap_err();
        assert_eq!(error.details["fields"], serde_json::json!(["messages"]));
        let error = check(br#"{"ackIds":["a","b","c","d"]}"#, &limits(lists)).unwrap_err();
        assert!(
            error.message.contains("ackIds holds at most 3"),
            "{}",
            error.message
        );
        // The same name deeper down is not the top-level field.
        assert!(check(br#"{"x":{"messages":[1,2,3]}}"#, &limits(lists)).is_ok());
        // An object's entries are its keys.
        let lists = &[("headers", 2)];
        assert!(check(br#"{"headers":{"a":"1","b":"2"}}"#, &limits(lists)).is_ok());
        assert!(check(br#"{"headers":{"a":"1","b":"2","c":"3"}}"#, &limits(lists)).is_err());
    }

    #[test]
    fn every_value_counts_strings_with_tricky_content_included() {
        let lists = &[];
        // 1 object + 19 values: at the limit.
        let body = format!(r#"{{"a":[{}]}}"#, vec![r#""x\"]{,""#; 18].join(","));
        assert!(check(body.as_bytes(), &limits(lists)).is_ok(), "{body}");
        let body = format!(r#"{{"a":[{}]}}"#, vec!["{}"; 19].join(","));
        let error = check(body.as_bytes(), &limits(lists)).unwrap_err();
        assert!(error.message.contains("more than 20 JSON values"));
        let body = format!("[{}]", vec!["-1.5e3"; 25].join(","));
        assert!(check(body.as_bytes(), &limits(lists)).is_err());
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(check(deep.as_bytes(), &DEFAULT).is_ok());
        let deeper = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert!(check(deeper.as_bytes(), &DEFAULT).is_err());
    }

    #[test]
    fn malformed_bodies_pass_to_the_decoder() {
        for body in [
            &b"{"[..],
            b"]]]",
            b"\"unterminated",
            b"{\"a\":",
            b"",
            b"nul",
        ] {
            assert!(check(body, &DEFAULT).is_ok());
        }
    }
}
