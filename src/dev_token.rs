//! `message-queue-service token --tenant <uuid> --sub <name> [--ttl 1h]`: prints a
//! development JWT signed with `JWT_SECRET`, so the first requests need nothing but curl.
//! Refused unless `MQ_DEV_MODE` is set: a production secret never mints tokens here.

use std::time::Duration;

use jsonwebtoken::{EncodingKey, Header};
use serde::Serialize;
use uuid::Uuid;

const USAGE: &str = "usage: message-queue-service token --tenant <uuid> --sub <name> [--ttl 1h]";
const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// A development token is for a session of work, not for a deployment.
const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, PartialEq, Eq)]
pub struct TokenRequest {
    pub tenant: Uuid,
    pub sub: String,
    pub ttl: Duration,
}

#[derive(Serialize)]
struct Claims<'a> {
    tenant_id: String,
    sub: &'a str,
    iat: u64,
    exp: u64,
}

/// Reads the command's arguments (after `token`); the error says what to do instead.
pub fn parse(args: &[String]) -> Result<TokenRequest, String> {
    let (mut tenant, mut sub, mut ttl) = (None, None, DEFAULT_TTL);
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--tenant" => {
                tenant =
                    Some(Uuid::parse_str(value).map_err(|_| {
                        format!("--tenant must be a UUID, such as {}", Uuid::new_v4())
                    })?);
            }
            "--sub" => {
                if value.is_empty()
                    || value.chars().count() > 1024
                    || value.chars().any(char::is_control)
                {
                    return Err(
                        "--sub must be 1 to 1024 characters, none of them control characters"
                            .into(),
                    );
                }
                sub = Some(value.clone());
            }
            "--ttl" => ttl = parse_ttl(value)?,
            other => return Err(format!("unknown option {other}\n{USAGE}")),
        }
    }
    Ok(TokenRequest {
        tenant: tenant.ok_or_else(|| format!("--tenant is required\n{USAGE}"))?,
        sub: sub.ok_or_else(|| format!("--sub is required\n{USAGE}"))?,
        ttl,
    })
}

/// `90`, `90s`, `15m`, `1h` or `7d`; at most 30 days.
fn parse_ttl(value: &str) -> Result<Duration, String> {
    let invalid = || {
        format!("--ttl must be a duration such as 90s, 15m, 1h or 7d (at most 30d), not '{value}'")
    };
    let (number, unit) = match value.char_indices().last() {
        Some((at, unit)) if unit.is_ascii_alphabetic() => (&value[..at], unit),
        _ => (value, 's'),
    };
    let seconds_per_unit = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(invalid()),
    };
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let ttl = Duration::from_secs(number.checked_mul(seconds_per_unit).ok_or_else(invalid)?);
    if ttl.is_zero() || ttl > MAX_TTL {
        return Err(invalid());
    }
    Ok(ttl)
}

/// The signed token, valid from `now` (seconds since the epoch) for the request's TTL.
pub fn mint(secret: &str, request: &TokenRequest, now: u64) -> String {
    let claims = Claims {
        tenant_id: request.tenant.to_string(),
        sub: &request.sub,
        iat: now,
        exp: now + request.ttl.as_secs(),
    };
    jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing of plain claims cannot fail")
}

/// The whole command: the token, or one line saying what to do.
pub fn run(args: &[String], lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let request = parse(args)?;
    let dev_mode = lookup("MQ_DEV_MODE").is_some_and(|v| matches!(v.trim(), "true" | "1"));
    if !dev_mode {
        return Err("token is for development: set MQ_DEV_MODE=true (scripts/run.sh reads it from .env); in production, the gateway issues tokens".into());
    }
    let secret = lookup("JWT_SECRET")
        .filter(|secret| !secret.is_empty())
        .ok_or(
        "JWT_SECRET is not set: set it to the service's secret (scripts/run.sh reads it from .env)",
    )?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|since| since.as_secs())
        .unwrap_or_default();
    Ok(mint(&secret, &request, now))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn reads_its_options_and_says_what_is_wrong() {
        let tenant = Uuid::new_v4().to_string();
        let parsed = parse(&args(&["--tenant", &tenant, "--sub", "me", "--ttl", "15m"])).unwrap();
        assert_eq!(parsed.ttl, Duration::from_secs(900));
        assert_eq!(parsed.sub, "me");
        let defaulted = parse(&args(&["--sub", "me", "--tenant", &tenant])).unwrap();
        assert_eq!(defaulted.ttl, DEFAULT_TTL);
        for (bad, says) in [
            (args(&["--sub", "me"]), "--tenant is required"),
            (
                args(&["--tenant", "nope", "--sub", "me"]),
                "--tenant must be a UUID",
            ),
            (
                args(&["--tenant", &tenant, "--sub", "me", "--ttl", "31d"]),
                "at most 30d",
            ),
            (
                args(&["--tenant", &tenant, "--sub", "me", "--ttl", "1w"]),
                "--ttl must be",
            ),
            (
                args(&["--tenant", &tenant, "--sub", "me", "--ttl", "0"]),
                "--ttl must be",
            ),
            (args(&["--tenant", &tenant, "--sub"]), "--sub needs a value"),
            (
                args(&["--tenant", &tenant, "--sub", "me", "--admin", "1"]),
                "unknown option --admin",
            ),
        ] {
            let error = parse(&bad).unwrap_err();
            assert!(error.contains(says), "{bad:?}: {error}");
        }
    }

    #[test]
    fn the_service_accepts_what_it_mints() {
        let secret = "a-development-secret-of-some-length-0123456789";
        let request = TokenRequest {
            tenant: Uuid::new_v4(),
            sub: "me".into(),
            ttl: Duration::from_secs(60),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let authenticator = crate::auth::Authenticator::new(secret, "service-token");
        let tenant = authenticator
            .verify_jwt(&mint(secret, &request, now))
            .unwrap();
        assert_eq!(
            (tenant.tenant_id, tenant.principal.as_str()),
            (request.tenant, "me")
        );
        // Expired an hour ago: refused.
        assert!(authenticator
            .verify_jwt(&mint(secret, &request, now - 3600))
            .is_err());
    }

    #[test]
    fn refuses_outside_development_mode() {
        let tenant = Uuid::new_v4().to_string();
        let request = args(&["--tenant", &tenant, "--sub", "me"]);
        let secret = |name: &str| (name == "JWT_SECRET").then(|| "s".repeat(40));
        let error = run(&request, secret).unwrap_err();
        assert!(error.contains("MQ_DEV_MODE"), "{error}");
    }
}
