//! Limits a JSON body is held to before it is decoded.
//!
//! Decoding amplifies: an empty object `{}` of three bytes becomes a `serde_json::Value` of
//! 32 bytes, `{"a":0}` a tree node of some 640 bytes, a message a struct of a few hundred,
//! so a 16 MiB body of five million `{}` would take gigabytes before any count could be
//! checked on the decoded value. One linear pass over the bytes estimates first what
//! decoding would take — every value, every object's tree nodes, every string's bytes — and
//! counts the entries of the top-level fields that hold lists; a body past a limit is
//! refused before anything is built.

use crate::error::ApiError;

/// What decoding one body may take, by the estimate below: whatever the body's shape, its
/// decoded form stays within this (the body itself aside).
pub const MAX_DECODED_BYTES: usize = 32 << 20;
/// A value in an array or object, with room for its vector's growth.
const VALUE_COST: usize = 64;
/// An object's tree node, one per eleven keys (serde_json's map is a B-tree).
const NODE_COST: usize = 640;
const NODE_KEYS: usize = 11;
/// How deep arrays and objects may nest (serde_json refuses deeper ones too).
pub const MAX_DEPTH: usize = 128;

/// What a body is held to.
pub struct BodyLimits<'a> {
    pub max_decoded_bytes: usize,
    /// Top-level fields (of a body that is an object) whose array or object may hold at
    /// most this many entries.
    pub lists: &'a [(&'a str, usize)],
}

/// The limits of every JSON body: the lists of the routes that take them. Routes check
/// their own, often lower, limits again once decoded (`MAX_BATCH_SIZE`, for one).
pub const DEFAULT: BodyLimits<'static> = BodyLimits {
    max_decoded_bytes: MAX_DECODED_BYTES,
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

/// What decoding would take so far, against what it may.
struct Cost {
    spent: usize,
    most: usize,
}

impl Cost {
    fn spend(&mut self, bytes: usize) -> Result<(), ApiError> {
        self.spent = self.spent.saturating_add(bytes);
        if self.spent > self.most {
            return Err(ApiError::validation(
                format!(
                    "request body would take more than {} MB to decode: too many values",
                    self.most >> 20
                ),
                vec![],
            ));
        }
        Ok(())
    }
}

/// Checks `bytes` against `limits` in one pass, without building anything. Malformed JSON
/// passes (the decoder that follows names what is wrong with it).
pub fn check(bytes: &[u8], limits: &BodyLimits<'_>) -> Result<(), ApiError> {
    let mut stack: Vec<Frame> = Vec::new();
    let mut cost = Cost {
        spent: 0,
        most: limits.max_decoded_bytes,
    };
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
                let length = at.saturating_sub(start);
                let is_key = expect_key && stack.last().is_some_and(|frame| frame.is_object);
                if is_key {
                    expect_key = false;
                    if stack.len() == 1 {
                        top_key = Some(key_text(bytes, start, at));
                    }
                    if enter_entry(&mut stack)? % NODE_KEYS == 1 {
                        cost.spend(NODE_COST)?;
                    }
                } else {
                    count_value(&mut cost, &mut stack)?;
                }
                cost.spend(length)?;
            }
            b'{' | b'[' => {
                count_value(&mut cost, &mut stack)?;
                if stack.len() >= MAX_DEPTH {
                    return Err(ApiError::validation(
                        format!("request body nests arrays and objects deeper than {MAX_DEPTH}"),
                        vec![],
                    ));
                }
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
                count_value(&mut cost, &mut stack)?;
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

/// The index of the quote that ends the string whose text starts at `start` (the body's
/// length if it never ends).
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

/// A top-level key as the decoder will see it: escapes (`\u0065`) resolved, so an escaped
/// name still meets its field's limit.
fn key_text(bytes: &[u8], start: usize, end: usize) -> String {
    let end = end.min(bytes.len());
    let raw = &bytes[start.min(end)..end];
    if raw.contains(&b'\\') && raw.len() <= 1024 && end < bytes.len() {
        // The key with its quotes, as JSON.
        if let Ok(text) = serde_json::from_slice::<String>(&bytes[start - 1..=end]) {
            return text;
        }
    }
    String::from_utf8_lossy(&raw[..raw.len().min(1024)]).into_owned()
}

/// A value begins: its cost counted, and it counts as an entry of the array holding it.
fn count_value(cost: &mut Cost, stack: &mut [Frame]) -> Result<(), ApiError> {
    cost.spend(VALUE_COST)?;
    if stack.last().is_some_and(|frame| !frame.is_object) {
        enter_entry(stack)?;
    }
    Ok(())
}

/// An entry (array element or object key) of the innermost container begins; how many it
/// has now.
fn enter_entry(stack: &mut [Frame]) -> Result<usize, ApiError> {
    let Some(frame) = stack.last_mut() else {
        return Ok(0);
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
    Ok(frame.entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(lists: &'static [(&'static str, usize)]) -> BodyLimits<'static> {
        BodyLimits {
            max_decoded_bytes: 20 * VALUE_COST,
            lists,
        }
    }

    #[test]
    fn top_level_lists_are_counted_by_their_field() {
        let lists = &[("messages", 2), ("ackIds", 3)];
        let wide = BodyLimits {
            max_decoded_bytes: MAX_DECODED_BYTES,
            lists,
        };
        assert!(check(br#"{"queue":"q","messages":[{"a":[1,2,3]},{}]}"#, &wide).is_ok());
        let error = check(br#"{"queue":"q","messages":[{},{},{}]}"#, &wide).unwrap_err();
        assert_eq!(error.details["fields"], serde_json::json!(["messages"]));
        let error = check(br#"{"ackIds":["a","b","c","d"]}"#, &wide).unwrap_err();
        assert!(
            error.message.contains("ackIds holds at most 3"),
            "{}",
            error.message
        );
        // An escaped name is the same field to the decoder, and to the count.
        let error = check(br#"{"m\u0065ssages":[{},{},{}]}"#, &wide).unwrap_err();
        assert_eq!(error.details["fields"], serde_json::json!(["messages"]));
        // The same name deeper down is not the top-level field.
        assert!(check(br#"{"x":{"messages":[1,2,3]}}"#, &wide).is_ok());
        // An object's entries are its keys.
        let lists = &[("headers", 2)];
        let wide = BodyLimits {
            max_decoded_bytes: MAX_DECODED_BYTES,
            lists,
        };
        assert!(check(br#"{"headers":{"a":"1","b":"2"}}"#, &wide).is_ok());
        assert!(check(br#"{"headers":{"a":"1","b":"2","c":"3"}}"#, &wide).is_err());
    }

    #[test]
    fn what_decoding_would_take_is_estimated_strings_with_tricky_content_included() {
        // Each value costs its share, a string its text too: ten strings holding quotes and
        // brackets pass, twenty empty objects do not.
        let body = format!(r#"[{}]"#, [r#""x\"]{,""#; 10].join(","));
        assert!(check(body.as_bytes(), &limits(&[])).is_ok(), "{body}");
        let body = format!("[{}]", vec!["{}"; 20].join(","));
        let error = check(body.as_bytes(), &limits(&[])).unwrap_err();
        assert!(error.message.contains("to decode"), "{}", error.message);
        let body = format!("[{}]", vec!["-1.5e3"; 25].join(","));
        assert!(check(body.as_bytes(), &limits(&[])).is_err());
    }

    #[test]
    fn objects_cost_their_tree_nodes() {
        // Few values, but each a one-key object: a node each.
        let budget = BodyLimits {
            max_decoded_bytes: 10 * (NODE_COST + 2 * VALUE_COST),
            lists: &[],
        };
        let body = format!("[{}]", [r#"{"a":0}"#; 8].join(","));
        assert!(check(body.as_bytes(), &budget).is_ok());
        let body = format!("[{}]", [r#"{"a":0}"#; 12].join(","));
        assert!(check(body.as_bytes(), &budget).is_err());
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
            b"{\"m\\u00",
            b"{\"\\",
        ] {
            assert!(check(body, &DEFAULT).is_ok());
        }
    }
}
