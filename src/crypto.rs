//! Sealing stored payloads: compression (`compressionType`), then encryption for
//! `encrypted: true` queues.
//!
//! Encryption is AES-256-GCM under a per-tenant key derived with HKDF-SHA256 from a master
//! key (`MQ_ENCRYPTION_KEY` / `MQ_ENCRYPTION_KEYS`), with a fresh random 96-bit nonce per
//! message and the tenant, queue and message id bound as associated data, so a ciphertext
//! moved to another tenant, queue or message fails authentication. The sealed payload names
//! its key id, so keys rotate: new messages use the active key, older ones still open with
//! theirs as long as it stays configured.

use std::io::{Read, Write};

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;
use uuid::Uuid;

use crate::config::KeyRing;
use crate::domain::queue::Compression;

/// A payload as stored for a compressed or encrypted queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SealedPayload {
    /// `none`, `gzip` or `zstd`: applied to the JSON text before encryption.
    pub codec: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// Base64 of the 96-bit nonce, for an encrypted payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// Base64 of the (compressed, encrypted) bytes.
    pub data: String,
    /// Size of the payload's JSON text before sealing.
    pub original_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("no encryption key is configured")]
    NoKey,
    #[error("encryption key '{0}' is not configured")]
    UnknownKey(String),
    #[error("the payload failed authentication (tampered, or sealed for another message)")]
    Tampered,
    #[error("the stored payload is malformed: {0}")]
    Malformed(String),
    #[error("the payload of an encrypted queue is not sealed with a key of this service")]
    NotSealed,
}

/// Who a payload belongs to: bound into the ciphertext.
#[derive(Debug, Clone, Copy)]
pub struct Binding<'a> {
    pub tenant_id: Uuid,
    pub queue_id: Uuid,
    pub message_id: &'a str,
}

impl Binding<'_> {
    fn associated_data(&self) -> Vec<u8> {
        format!("{}|{}|{}", self.tenant_id, self.queue_id, self.message_id).into_bytes()
    }
}

pub struct Sealer {
    keys: Option<KeyRing>,
}

impl Sealer {
    pub fn new(keys: Option<KeyRing>) -> Sealer {
        Sealer { keys }
    }

    pub fn seal(
        &self,
        payload: &Value,
        compression: Compression,
        encrypt: bool,
        binding: Binding<'_>,
    ) -> Result<SealedPayload, SealError> {
        let text = serde_json::to_vec(payload).map_err(|e| SealError::Malformed(e.to_string()))?;
        let compressed = compress(compression, &text)?;
        if !encrypt {
            return Ok(SealedPayload {
                codec: compression.as_str().to_owned(),
                key_id: None,
                nonce: None,
                data: BASE64.encode(compressed),
                original_bytes: text.len(),
            });
        }
        let keys = self.keys.as_ref().ok_or(SealError::NoKey)?;
        let master = keys
            .key(&keys.active)
            .ok_or_else(|| SealError::UnknownKey(keys.active.clone()))?;
        let cipher = tenant_cipher(master, binding.tenant_id);
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let aad = binding.associated_data();
        let ciphertext = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: &compressed,
                    aad: &aad,
                },
            )
            .map_err(|_| SealError::Malformed("encryption failed".into()))?;
        Ok(SealedPayload {
            codec: compression.as_str().to_owned(),
            key_id: Some(keys.active.clone()),
            nonce: Some(BASE64.encode(nonce)),
            data: BASE64.encode(ciphertext),
            original_bytes: text.len(),
        })
    }

    pub fn open(&self, sealed: &SealedPayload, binding: Binding<'_>) -> Result<Value, SealError> {
        let data = BASE64
            .decode(&sealed.data)
            .map_err(|_| SealError::Malformed("data is not base64".into()))?;
        let compressed = match (&sealed.key_id, &sealed.nonce) {
            (None, None) => data,
            (Some(key_id), Some(nonce)) => {
                let keys = self.keys.as_ref().ok_or(SealError::NoKey)?;
                let master = keys
                    .key(key_id)
                    .ok_or_else(|| SealError::UnknownKey(key_id.clone()))?;
                let nonce = BASE64
                    .decode(nonce)
                    .ok()
                    .filter(|n| n.len() == 12)
                    .ok_or_else(|| SealError::Malformed("nonce is not 96 bits".into()))?;
                let aad = binding.associated_data();
                tenant_cipher(master, binding.tenant_id)
                    .decrypt(
                        Nonce::from_slice(&nonce),
                        Payload {
                            msg: &data,
                            aad: &aad,
                        },
                    )
                    .map_err(|_| SealError::Tampered)?
            }
            _ => return Err(SealError::Malformed("keyId and nonce go together".into())),
        };
        let codec = Compression::parse(&sealed.codec)
            .ok_or_else(|| SealError::Malformed(format!("unknown codec '{}'", sealed.codec)))?;
        let text = decompress(codec, &compressed, sealed.original_bytes)?;
        serde_json::from_slice(&text).map_err(|e| SealError::Malformed(e.to_string()))
    }
}

/// The tenant's own AES key: HKDF-SHA256 of the master key, salted by purpose, keyed to the
/// tenant, so no two tenants share a key and the master key never encrypts directly.
fn tenant_cipher(master: &[u8; 32], tenant_id: Uuid) -> Aes256Gcm {
    let hkdf = Hkdf::<Sha256>::new(Some(b"message-queue-service payload key v1"), master);
    let mut key = [0u8; 32];
    hkdf.expand(tenant_id.as_bytes(), &mut key)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    Aes256Gcm::new_from_slice(&key).expect("a 32-byte key")
}

/// No stored payload is larger than this, whatever its sealed form claims.
const MAX_DECOMPRESSED: usize = 64 * 1024 * 1024;

fn compress(codec: Compression, bytes: &[u8]) -> Result<Vec<u8>, SealError> {
    match codec {
        Compression::None => Ok(bytes.to_vec()),
        Compression::Gzip => {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            encoder
                .write_all(bytes)
                .and_then(|()| encoder.finish())
                .map_err(|e| SealError::Malformed(e.to_string()))
        }
        Compression::Zstd => {
            zstd::bulk::compress(bytes, 3).map_err(|e| SealError::Malformed(e.to_string()))
        }
    }
}

/// Inflates at most `expected` bytes (the size recorded when sealing, itself capped): a
/// crafted stored value cannot make a lookup or delivery inflate more than the payload was.
fn decompress(codec: Compression, bytes: &[u8], expected: usize) -> Result<Vec<u8>, SealError> {
    let limit = expected.min(MAX_DECOMPRESSED);
    let mut out = Vec::new();
    // One byte past the limit tells an oversized stream from an exact one.
    let cap = limit as u64 + 1;
    let read = match codec {
        Compression::None => return Ok(bytes.to_vec()),
        Compression::Gzip => flate2::read::GzDecoder::new(bytes)
            .take(cap)
            .read_to_end(&mut out),
        Compression::Zstd => zstd::stream::read::Decoder::new(bytes)
            .and_then(|decoder| decoder.take(cap).read_to_end(&mut out)),
    };
    read.map_err(|e| SealError::Malformed(format!("cannot decompress: {e}")))?;
    if out.len() > limit {
        return Err(SealError::Malformed(format!(
            "inflates past its recorded size of {limit} bytes"
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ring(active: &str) -> KeyRing {
        KeyRing {
            active: active.into(),
            keys: vec![("k1".into(), [1u8; 32]), ("k2".into(), [2u8; 32])],
        }
    }

    fn binding(message_id: &str) -> Binding<'_> {
        Binding {
            tenant_id: Uuid::from_u128(1),
            queue_id: Uuid::from_u128(2),
            message_id,
        }
    }

    #[test]
    fn round_trips_for_every_codec_with_and_without_encryption() {
        let sealer = Sealer::new(Some(ring("k1")));
        let payload = json!({"text": "marker-7f3a ".repeat(50), "n": [1, 2, 3]});
        for codec in [Compression::None, Compression::Gzip, Compression::Zstd] {
            for encrypt in [false, true] {
                let sealed = sealer.seal(&payload, codec, encrypt, binding("m")).unwrap();
                assert!(!sealed.data.contains("marker"), "{codec:?} {encrypt}");
                assert_eq!(sealer.open(&sealed, binding("m")).unwrap(), payload);
                if codec != Compression::None {
                    assert!(BASE64.decode(&sealed.data).unwrap().len() < sealed.original_bytes);
                }
            }
        }
    }

    #[test]
    fn tampering_or_moving_a_ciphertext_is_detected() {
        let sealer = Sealer::new(Some(ring("k1")));
        let sealed = sealer
            .seal(&json!("secret"), Compression::None, true, binding("m"))
            .unwrap();
        let mut tampered = sealed.clone();
        let mut bytes = BASE64.decode(&tampered.data).unwrap();
        bytes[0] ^= 1;
        tampered.data = BASE64.encode(bytes);
        assert_eq!(
            sealer.open(&tampered, binding("m")),
            Err(SealError::Tampered)
        );
        assert_eq!(
            sealer.open(&sealed, binding("other")),
            Err(SealError::Tampered)
        );
        let other_tenant = Binding {
            tenant_id: Uuid::from_u128(9),
            ..binding("m")
        };
        assert_eq!(sealer.open(&sealed, other_tenant), Err(SealError::Tampered));
    }

    #[test]
    fn rotated_keys_still_open_old_messages() {
        let old = Sealer::new(Some(ring("k1")));
        let sealed = old
            .seal(&json!({"a": 1}), Compression::None, true, binding("m"))
            .unwrap();
        assert_eq!(sealed.key_id.as_deref(), Some("k1"));
        let rotated = Sealer::new(Some(ring("k2")));
        assert_eq!(
            rotated.open(&sealed, binding("m")).unwrap(),
            json!({"a": 1})
        );
        let newer = rotated
            .seal(&json!(1), Compression::None, true, binding("m"))
            .unwrap();
        assert_eq!(newer.key_id.as_deref(), Some("k2"));
        let without_k1 = Sealer::new(Some(KeyRing {
            active: "k2".into(),
            keys: vec![("k2".into(), [2u8; 32])],
        }));
        assert_eq!(
            without_k1.open(&sealed, binding("m")),
            Err(SealError::UnknownKey("k1".into()))
        );
    }

    #[test]
    fn inflating_past_the_recorded_size_is_refused() {
        let sealer = Sealer::new(None);
        let payload = json!("x".repeat(100_000));
        let mut sealed = sealer
            .seal(&payload, Compression::Zstd, false, binding("m"))
            .unwrap();
        assert_eq!(sealer.open(&sealed, binding("m")).unwrap(), payload);
        sealed.original_bytes = 10;
        assert!(matches!(
            sealer.open(&sealed, binding("m")),
            Err(SealError::Malformed(_))
        ));
    }

    #[test]
    fn nonces_are_fresh() {
        let sealer = Sealer::new(Some(ring("k1")));
        let a = sealer
            .seal(&json!(1), Compression::None, true, binding("m"))
            .unwrap();
        let b = sealer
            .seal(&json!(1), Compression::None, true, binding("m"))
            .unwrap();
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.data, b.data);
    }
}
