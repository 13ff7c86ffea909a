//! Device identities and the MLS credential that binds them to a user.
//!
//! Every device of every user has its own Ed25519 identity key. The MLS
//! basic credential carries `u:<user_id>/<device_id>`; the group's external
//! sender (the signaling server, acting as delivery service) carries
//! `s:<name>`. The identity provider accepts nothing else, so a leaf in a
//! Conclave group always names exactly one user and device.

use mls_rs::crypto::{SignaturePublicKey, SignatureSecretKey};
use mls_rs::error::IntoAnyError;
use mls_rs::identity::basic::BasicCredential;
use mls_rs::identity::{CredentialType, SigningIdentity};
use mls_rs::time::MlsTime;
use mls_rs::{CipherSuite, CipherSuiteProvider, CryptoProvider, ExtensionList, IdentityProvider};
use mls_rs_core::identity::MemberValidationContext;
use mls_rs_crypto_rustcrypto::RustCryptoProvider;

use crate::signal::valid_id;

/// Why an identity could not be made or parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// Not a valid Conclave principal or credential.
    #[error("invalid identity")]
    Invalid,
    /// The crypto provider lacks MLS cipher suite 1.
    #[error("MLS cipher suite unsupported by the crypto provider")]
    UnsupportedSuite,
    /// Key generation failed.
    #[error("crypto provider: {0}")]
    Crypto(String),
}

/// MLS cipher suite 1: X25519, AES-128-GCM, SHA-256, Ed25519.
pub const MLS_SUITE: CipherSuite = CipherSuite::CURVE25519_AES128;

/// Who a credential names.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Principal {
    /// A user's device: a call member.
    Member {
        /// The user's id.
        user_id: String,
        /// The device's id, unique per user.
        device_id: String,
    },
    /// The signaling server, acting as the group's external sender.
    Server {
        /// The deployment's name.
        name: String,
    },
}

impl Principal {
    /// A member principal, validating both ids.
    pub fn member(user_id: &str, device_id: &str) -> Result<Self, IdentityError> {
        if !valid_id(user_id) || !valid_id(device_id) {
            return Err(IdentityError::Invalid);
        }
        Ok(Self::Member {
            user_id: user_id.to_owned(),
            device_id: device_id.to_owned(),
        })
    }

    /// A server principal.
    pub fn server(name: &str) -> Result<Self, IdentityError> {
        if !valid_id(name) {
            return Err(IdentityError::Invalid);
        }
        Ok(Self::Server {
            name: name.to_owned(),
        })
    }

    /// The credential bytes.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Member { user_id, device_id } => format!("u:{user_id}/{device_id}").into_bytes(),
            Self::Server { name } => format!("s:{name}").into_bytes(),
        }
    }

    /// Parses credential bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, IdentityError> {
        let s = std::str::from_utf8(bytes).map_err(|_| IdentityError::Invalid)?;
        if let Some(rest) = s.strip_prefix("u:") {
            let (user, device) = rest.split_once('/').ok_or(IdentityError::Invalid)?;
            Self::member(user, device)
        } else if let Some(name) = s.strip_prefix("s:") {
            Self::server(name)
        } else {
            Err(IdentityError::Invalid)
        }
    }

    /// The principal named by a signing identity's basic credential.
    pub fn of(identity: &SigningIdentity) -> Result<Self, IdentityError> {
        let basic = identity
            .credential
            .as_basic()
            .ok_or(IdentityError::Invalid)?;
        Self::decode(&basic.identifier)
    }
}

/// A device's (or the server's) signing identity with its secret key.
/// The secret key is zeroized on drop by mls-rs.
#[derive(Clone)]
pub struct Identity {
    principal: Principal,
    signing_identity: SigningIdentity,
    secret: SignatureSecretKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("principal", &self.principal)
            .finish_non_exhaustive()
    }
}

fn suite_provider() -> Result<impl CipherSuiteProvider, IdentityError> {
    RustCryptoProvider::default()
        .cipher_suite_provider(MLS_SUITE)
        .ok_or(IdentityError::UnsupportedSuite)
}

impl Identity {
    /// Generates a fresh Ed25519 identity key for `principal`.
    pub fn generate(principal: Principal) -> Result<Self, IdentityError> {
        let (secret, public) = suite_provider()?
            .signature_key_generate()
            .map_err(|e| IdentityError::Crypto(format!("{:?}", e.into_any_error())))?;
        Ok(Self::from_parts(principal, secret, public))
    }

    /// Rebuilds an identity from a stored key pair.
    pub fn from_parts(
        principal: Principal,
        secret: SignatureSecretKey,
        public: SignaturePublicKey,
    ) -> Self {
        let credential = BasicCredential::new(principal.encode()).into_credential();
        Self {
            signing_identity: SigningIdentity::new(credential, public),
            principal,
            secret,
        }
    }

    /// Who this identity is.
    pub fn principal(&self) -> &Principal {
        &self.principal
    }

    /// The public signing identity (credential and Ed25519 public key).
    pub fn signing_identity(&self) -> &SigningIdentity {
        &self.signing_identity
    }

    /// The Ed25519 public key bytes.
    pub fn public_key(&self) -> &[u8] {
        self.signing_identity.signature_key.as_bytes()
    }

    /// The Ed25519 secret key (for the MLS client or external sender).
    pub fn secret(&self) -> &SignatureSecretKey {
        &self.secret
    }
}

/// TLS-encodes a signing identity (for the `external_sender` field of `ready`).
pub fn encode_signing_identity(id: &SigningIdentity) -> Result<Vec<u8>, IdentityError> {
    use mls_rs::mls_rs_codec::MlsEncode;
    id.mls_encode_to_vec().map_err(|_| IdentityError::Invalid)
}

/// Decodes a TLS-encoded signing identity.
pub fn decode_signing_identity(bytes: &[u8]) -> Result<SigningIdentity, IdentityError> {
    use mls_rs::mls_rs_codec::MlsDecode;
    let mut rest = bytes;
    let id = SigningIdentity::mls_decode(&mut rest).map_err(|_| IdentityError::Invalid)?;
    if !rest.is_empty() {
        return Err(IdentityError::Invalid);
    }
    Ok(id)
}

/// Accepts only Conclave credentials: members as leaves, the server as
/// external sender. A member's successor must name the same user and device.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConclaveIdentityProvider;

/// Why the identity provider refused a credential.
#[derive(Debug, thiserror::Error)]
#[error("credential is not a Conclave {0}")]
pub struct IdentityRejected(&'static str);

impl IntoAnyError for IdentityRejected {}

impl IdentityProvider for ConclaveIdentityProvider {
    type Error = IdentityRejected;

    fn validate_member(
        &self,
        signing_identity: &SigningIdentity,
        _timestamp: Option<MlsTime>,
        _context: MemberValidationContext<'_>,
    ) -> Result<(), Self::Error> {
        match Principal::of(signing_identity) {
            Ok(Principal::Member { .. }) => Ok(()),
            _ => Err(IdentityRejected("member")),
        }
    }

    fn validate_external_sender(
        &self,
        signing_identity: &SigningIdentity,
        _timestamp: Option<MlsTime>,
        _extensions: Option<&ExtensionList>,
    ) -> Result<(), Self::Error> {
        match Principal::of(signing_identity) {
            Ok(Principal::Server { .. }) => Ok(()),
            _ => Err(IdentityRejected("server")),
        }
    }

    fn identity(
        &self,
        signing_identity: &SigningIdentity,
        _extensions: &ExtensionList,
    ) -> Result<Vec<u8>, Self::Error> {
        Principal::of(signing_identity)
            .map(|p| p.encode())
            .map_err(|_| IdentityRejected("identity"))
    }

    fn valid_successor(
        &self,
        predecessor: &SigningIdentity,
        successor: &SigningIdentity,
        _extensions: &ExtensionList,
    ) -> Result<bool, Self::Error> {
        let a = Principal::of(predecessor).map_err(|_| IdentityRejected("member"))?;
        let b = Principal::of(successor).map_err(|_| IdentityRejected("member"))?;
        Ok(a == b)
    }

    fn supported_types(&self) -> Vec<CredentialType> {
        vec![BasicCredential::credential_type()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals_round_trip_and_reject_garbage() {
        let m = Principal::member("alice", "laptop-1").unwrap();
        assert_eq!(Principal::decode(&m.encode()).unwrap(), m);
        let s = Principal::server("conclave.example").unwrap();
        assert_eq!(Principal::decode(&s.encode()).unwrap(), s);
        for bad in [
            &b""[..],
            b"alice",
            b"u:alice",
            b"u:/x",
            b"u:a/b/c",
            b"s:",
            b"\xff\xfe",
            b"u:a b/c",
        ] {
            assert!(Principal::decode(bad).is_err(), "{bad:?}");
        }
        assert!(Principal::member(&"x".repeat(129), "d").is_err());
    }
}
