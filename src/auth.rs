//! Who is calling: the tenant and principal of a gateway JWT, or a platform service holding
//! the internal service token. Both are extractors, so a handler that names one cannot run
//! unauthenticated.

use std::sync::Arc;

use axum::extract::{FromRef, FromRequestParts};
use axum::http::header;
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::error::ApiError;

/// Clock skew tolerated on `exp` (API.md: at most 60 s).
const EXP_LEEWAY_SECS: u64 = 60;
const MAX_PRINCIPAL_CHARS: usize = 1024;

/// Verification material, built once from the configuration.
pub struct Authenticator {
    jwt_key: DecodingKey,
    jwt_validation: Validation,
    service_token: Vec<u8>,
}

impl Authenticator {
    pub fn new(jwt_secret: &str, service_token: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = EXP_LEEWAY_SECS;
        validation.validate_exp = true;
        validation.set_required_spec_claims(&["exp"]);
        Authenticator {
            jwt_key: DecodingKey::from_secret(jwt_secret.as_bytes()),
            jwt_validation: validation,
            service_token: service_token.as_bytes().to_vec(),
        }
    }

    pub fn verify_jwt(&self, token: &str) -> Result<Tenant, ApiError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.jwt_key, &self.jwt_validation)
            .map_err(|error| {
                use jsonwebtoken::errors::ErrorKind;
                let reason = match error.kind() {
                    ErrorKind::ExpiredSignature => "token has expired",
                    ErrorKind::InvalidSignature => "token signature is invalid",
                    ErrorKind::InvalidAlgorithm => "token must be signed with HS256",
                    ErrorKind::MissingRequiredClaim(_) => "token lacks the exp claim",
                    ErrorKind::Json(_) => "token claims are malformed",
                    _ => "token is malformed",
                };
                ApiError::unauthorized(reason)
            })?;
        let tenant_id = data
            .claims
            .tenant_id
            .as_deref()
            .and_then(|raw| Uuid::parse_str(raw).ok())
            .ok_or_else(|| ApiError::unauthorized("token lacks a UUID tenant_id claim"))?;
        let principal = data.claims.sub.unwrap_or_default();
        // The principal is stored (a subscription's creator) and compared with ACLs.
        if principal.chars().count() > MAX_PRINCIPAL_CHARS
            || principal.chars().any(char::is_control)
        {
            return Err(ApiError::unauthorized(
                "token claim sub must be at most 1024 characters, none of them control characters",
            ));
        }
        Ok(Tenant {
            tenant_id,
            principal,
        })
    }

    pub fn verify_service_token(&self, presented: &str) -> bool {
        bool::from(presented.as_bytes().ct_eq(&self.service_token))
    }
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    tenant_id: Option<String>,
    #[serde(default)]
    sub: Option<String>,
}

/// The caller of a public route: its tenant and its principal (JWT `sub`, used by ACLs).
#[derive(Debug, Clone)]
pub struct Tenant {
    pub tenant_id: Uuid,
    pub principal: String,
}

impl<S> FromRequestParts<S> for Tenant
where
    Arc<Authenticator>: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let header_value = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthorized("missing Authorization header"))?;
        let token = header_value
            .to_str()
            .ok()
            .and_then(|value| {
                value
                    .strip_prefix("Bearer ")
                    .or_else(|| value.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .ok_or_else(|| ApiError::unauthorized("Authorization must be 'Bearer <JWT>'"))?;
        Arc::<Authenticator>::from_ref(state).verify_jwt(token)
    }
}

/// A platform service calling `/internal/mq/*` with `X-Service-Token`.
#[derive(Debug, Clone)]
pub struct ServiceCaller {
    pub service_name: Option<String>,
}

impl<S> FromRequestParts<S> for ServiceCaller
where
    Arc<Authenticator>: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let presented = parts
            .headers
            .get("x-service-token")
            .and_then(|value| value.to_str().ok())
            .ok_or_else(|| ApiError::unauthorized("missing X-Service-Token header"))?;
        if !Arc::<Authenticator>::from_ref(state).verify_service_token(presented) {
            return Err(ApiError::unauthorized("invalid service token"));
        }
        let service_name = parts
            .headers
            .get("x-service-name")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        Ok(ServiceCaller { service_name })
    }
}
