//! Session tokens: short-lived JWTs (HS256) naming a user, their kind and,
//! for guests, the one call they may join.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Who a token was issued to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    /// A signed-in user.
    User,
    /// A guest admitted by an invitation to one call.
    Guest,
    /// A server, bot or recorder authenticated by API key.
    Machine,
    /// An administrator (admin API).
    Admin,
}

/// A token's claims.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// User id.
    pub sub: String,
    /// Kind of principal.
    pub kind: TokenKind,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at.
    pub iat: u64,
    /// The only call a guest may join.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call: Option<String>,
    /// The user's credential version when issued; a reset bumps it and
    /// every older token stops working.
    #[serde(default)]
    pub ver: i64,
}

/// Hashes a password with argon2id (default parameters, random salt).
pub fn hash_password(password: &str) -> Result<String, TokenError> {
    use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
    let salt = SaltString::generate(&mut OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|_| TokenError)
}

/// Checks a password against a stored argon2 hash.
pub fn verify_password(password: &str, hash: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    PasswordHash::new(hash).is_ok_and(|h| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// `HMAC-SHA256(secret, "<key_id>:<timestamp>")`, hex: how a machine proves
/// it holds an API key's secret.
pub fn api_signature(secret: &[u8], key_id: &str, timestamp: u64) -> String {
    use hmac::{Hmac, Mac};
    let Ok(mut mac) = <Hmac<sha2::Sha256> as Mac>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(format!("{key_id}:{timestamp}").as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Seconds since the Unix epoch.
pub fn unix_time() -> u64 {
    unix_now()
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
#[error("invalid or expired token")]
pub struct TokenError;

/// Issues and checks tokens with one secret.
#[derive(Clone)]
pub struct Tokens {
    enc: EncodingKey,
    dec: DecodingKey,
    ttl: Duration,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Tokens {
    /// Tokens signed with `secret`, valid for `ttl`.
    pub fn new(secret: &[u8], ttl: Duration) -> Self {
        Self {
            enc: EncodingKey::from_secret(secret),
            dec: DecodingKey::from_secret(secret),
            ttl,
        }
    }

    /// How long tokens live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Issues a token.
    pub fn issue(&self, sub: &str, kind: TokenKind, call: Option<&str>) -> String {
        self.issue_versioned(sub, kind, call, 0)
    }

    /// Issues a token carrying the user's credential version.
    pub fn issue_versioned(
        &self,
        sub: &str,
        kind: TokenKind,
        call: Option<&str>,
        ver: i64,
    ) -> String {
        let iat = unix_now();
        let claims = Claims {
            sub: sub.to_owned(),
            kind,
            exp: iat + self.ttl.as_secs(),
            iat,
            call: call.map(str::to_owned),
            ver,
        };
        // HS256 over plain claims cannot fail.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.enc).unwrap_or_default()
    }

    /// Verifies signature, algorithm and expiry.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let mut v = Validation::new(Algorithm::HS256);
        v.leeway = 5;
        jsonwebtoken::decode::<Claims>(token, &self.dec, &v)
            .map(|d| d.claims)
            .map_err(|_| TokenError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_and_verifies() {
        let t = Tokens::new(b"0123456789abcdef0123456789abcdef", Duration::from_secs(60));
        let tok = t.issue("alice", TokenKind::User, None);
        let c = t.verify(&tok).unwrap();
        assert_eq!((c.sub.as_str(), c.kind), ("alice", TokenKind::User));
        let other = Tokens::new(b"another secret of enough length!", Duration::from_secs(60));
        assert!(other.verify(&tok).is_err());
        assert!(t.verify("garbage").is_err());
        let expired = Tokens::new(b"0123456789abcdef0123456789abcdef", Duration::ZERO);
        let old = Claims {
            sub: "a".into(),
            kind: TokenKind::User,
            exp: 1,
            iat: 0,
            call: None,
            ver: 0,
        };
        let tok = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &old, &expired.enc).unwrap();
        assert!(t.verify(&tok).is_err());
    }
}
