//! Body and query extractors whose rejections are contract errors.
//!
//! axum's own `Json`/`Query` rejections are plain text; these decode through
//! `serde_path_to_error` so a wrong type or a missing field is answered with
//! `MQ_VALIDATION_ERROR` and the exact path in `details.fields` (e.g. `messages[3].payload`).

use axum::body::Bytes;
use axum::extract::{FromRef, FromRequest, FromRequestParts, Request};
use axum::http::header::CONTENT_LENGTH;
use axum::http::request::Parts;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;

use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;

/// A JSON request body.
pub struct ApiJson<T>(pub T);

/// Bodies larger than this are decoded on the blocking pool, off the async threads.
const INLINE_DECODE_BYTES: usize = 64 * 1024;
/// A body's buffer starts at most this large, whatever its `Content-Length` says.
const INITIAL_BODY_CAPACITY: usize = 1 << 20;

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned + Send + 'static,
    AppState: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = AppState::from_ref(state).config.max_request_bytes;
        let bytes = read_body(request, limit).await?;
        if bytes.len() <= INLINE_DECODE_BYTES {
            return decode_json(&bytes).map(ApiJson);
        }
        tokio::task::spawn_blocking(move || decode_json(&bytes))
            .await
            .map_err(|error| ApiError::internal(format!("decoding task failed: {error}")))?
            .map(ApiJson)
    }
}

/// The request body, at most `limit` bytes (`MAX_REQUEST_BYTES`), read into one buffer sized
/// by `Content-Length` up front: collecting chunks and joining them afterwards would hold
/// the body twice.
async fn read_body(request: Request, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            ErrorCode::MessageTooLarge,
            "request body is larger than MAX_REQUEST_BYTES",
        )
    };
    let announced = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok());
    if announced.is_some_and(|length| length > limit) {
        return Err(too_large());
    }
    // Grown as bytes arrive (never past what was announced, or the limit), so a client
    // that announces much and sends little holds little.
    let most = announced.unwrap_or(limit);
    let mut body: Vec<u8> = Vec::with_capacity(most.min(INITIAL_BODY_CAPACITY));
    let mut chunks = request.into_body().into_data_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|error| {
            ApiError::validation(format!("could not read the request body: {error}"), vec![])
        })?;
        let needed = body.len() + chunk.len();
        if needed > limit {
            return Err(too_large());
        }
        if needed > body.capacity() {
            let grown = (body.capacity() * 2).max(needed).min(most.max(needed));
            body.reserve_exact(grown - body.len());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(body))
}

/// Decodes a JSON document, naming the offending field path on failure.
pub fn decode_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::validation(
            "request body must be a JSON document",
            vec![],
        ));
    }
    // Counted before anything is built: decoding a body of millions of tiny values would
    // take gigabytes before its lists could be checked.
    super::body_limits::check(bytes, &super::body_limits::DEFAULT)?;
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(decoding_error)?;
    deserializer
        .end()
        .map_err(|error| ApiError::validation(format!("malformed JSON: {error}"), vec![]))?;
    Ok(value)
}

/// Decodes an already parsed JSON value, naming the offending field path on failure.
pub fn decode_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(decoding_error)
}

fn decoding_error(error: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let inner = error.inner();
    if inner.is_syntax() || inner.is_eof() {
        return ApiError::validation(format!("malformed JSON: {inner}"), vec![]);
    }
    let problem = inner.to_string();
    let field = field_path(&error.path().to_string(), &problem);
    let message = match &field {
        Some(path) => format!("{path}: {}", strip_position(&problem)),
        None => format!("invalid request body: {}", strip_position(&problem)),
    };
    ApiError::validation(message, field.into_iter().collect())
}

/// The path of the offending field. serde reports a missing field at its parent's path, with
/// the field's name only in the message, so the two are joined here.
fn field_path(path: &str, message: &str) -> Option<String> {
    let parent = if path == "." { "" } else { path };
    if let Some(missing) = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
    {
        return Some(if parent.is_empty() {
            missing.to_owned()
        } else {
            format!("{parent}.{missing}")
        });
    }
    (!parent.is_empty()).then(|| parent.to_owned())
}

/// serde_json appends " at line L column C", which means nothing for a typed field error.
fn strip_position(message: &str) -> &str {
    message
        .rfind(" at line ")
        .map_or(message, |at| &message[..at])
}

/// A query string decoded into `T`.
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        let deserializer =
            serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(deserializer)
            .map(ApiQuery)
            .map_err(|error| {
                let path = error.path().to_string();
                let inner = error.inner().to_string();
                let field = field_path(&path, &inner);
                ApiError::validation(
                    format!("invalid query parameter: {inner}"),
                    field.into_iter().collect(),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Item {
        payload: i64,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Batch {
        queue: String,
        messages: Vec<Item>,
    }

    fn fields(error: &ApiError) -> serde_json::Value {
        error.details["fields"].clone()
    }

    #[test]
    fn wrong_type_names_the_nested_path() {
        let error =
            decode_json::<Batch>(br#"{"queue":"q","messages":[{"payload":1},{"payload":"x"}]}"#)
                .unwrap_err();
        assert_eq!(fields(&error), serde_json::json!(["messages[1].payload"]));
    }

    #[test]
    fn missing_field_names_the_field() {
        let error = decode_json::<Batch>(br#"{"messages":[]}"#).unwrap_err();
        assert_eq!(fields(&error), serde_json::json!(["queue"]));
        let error = decode_json::<Batch>(br#"{"queue":"q","messages":[{}]}"#).unwrap_err();
        assert_eq!(fields(&error), serde_json::json!(["messages[0].payload"]));
    }

    #[test]
    fn malformed_json_is_a_validation_error_without_fields() {
        let error = decode_json::<Batch>(br#"{"queue": "#).unwrap_err();
        assert_eq!(error.code, ErrorCode::Validation);
        assert!(error.message.starts_with("malformed JSON"));
        let error = decode_json::<Batch>(b"").unwrap_err();
        assert_eq!(error.code, ErrorCode::Validation);
    }
}
