//! `ackId`s: opaque to clients, and unforgeable. Each names the subscription, partition,
//! stream entry, message and delivery attempt it was issued for, and carries an
//! HMAC-SHA256 tag under a key derived from `JWT_SECRET`, so a client can neither make one up
//! nor point one at another subscription's (or tenant's) messages.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use uuid::Uuid;

type HmacSha256 = Hmac<Sha256>;

/// Bytes of the HMAC kept in the token (128 bits).
const TAG_BYTES: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckToken {
    #[serde(rename = "s")]
    pub subscription_id: Uuid,
    #[serde(rename = "p")]
    pub partition: u16,
    #[serde(rename = "e")]
    pub entry_id: String,
    #[serde(rename = "m")]
    pub message_id: String,
    #[serde(rename = "a")]
    pub attempt: u32,
    /// When the delivery was made (ms), for processing times.
    #[serde(rename = "t")]
    pub delivered_at_ms: i64,
    /// When the message was published (ms), for publish→ack latency.
    #[serde(rename = "u", default)]
    pub published_at_ms: i64,
}

pub struct AckSigner {
    key: [u8; 32],
}

impl AckSigner {
    /// A signing key derived from the service secret, distinct from its use for JWTs.
    pub fn new(secret: &str) -> AckSigner {
        let mut mac =
            HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
        mac.update(b"message-queue-service ackId key v1");
        AckSigner {
            key: mac.finalize().into_bytes().into(),
        }
    }

    pub fn issue(&self, token: &AckToken) -> String {
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(token).unwrap_or_default());
        let tag = URL_SAFE_NO_PAD.encode(&self.tag(body.as_bytes())[..TAG_BYTES]);
        format!("{body}.{tag}")
    }

    /// The token an `ackId` stands for, if it was issued by this service.
    pub fn verify(&self, ack_id: &str) -> Option<AckToken> {
        let (body, tag) = ack_id.split_once('.')?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        let mut mac = HmacSha256::new_from_slice(&self.key).ok()?;
        mac.update(body.as_bytes());
        mac.verify_truncated_left(&tag).ok()?;
        if tag.len() != TAG_BYTES {
            return None;
        }
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(body).ok()?).ok()
    }

    fn tag(&self, body: &[u8]) -> [u8; 32] {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(body);
        mac.finalize().into_bytes().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> AckToken {
        AckToken {
            subscription_id: Uuid::nil(),
            partition: 3,
            entry_id: "1-0".into(),
            message_id: "m".into(),
            attempt: 2,
            delivered_at_ms: 5,
            published_at_ms: 4,
        }
    }

    #[test]
    fn round_trip() {
        let signer = AckSigner::new("secret");
        assert_eq!(signer.verify(&signer.issue(&token())), Some(token()));
    }

    #[test]
    fn forged_or_foreign_tokens_are_refused() {
        let signer = AckSigner::new("secret");
        let issued = signer.issue(&token());
        assert_eq!(AckSigner::new("other").verify(&issued), None);
        let (body, tag) = issued.split_once('.').unwrap();
        let mut changed = token();
        changed.partition = 4;
        let forged_body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&changed).unwrap());
        assert_eq!(signer.verify(&format!("{forged_body}.{tag}")), None);
        assert_eq!(signer.verify(&format!("{body}.")), None);
        assert_eq!(signer.verify(&format!("{body}.{}", &tag[..4])), None);
        assert_eq!(signer.verify("garbage"), None);
        assert_eq!(signer.verify(""), None);
    }
}
