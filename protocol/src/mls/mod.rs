//! MLS (RFC 9420) pieces shared by clients and the delivery service:
//! identities and credentials, and the delivery service's public view of a
//! group. Enabled by the `mls` feature.

pub mod ds;
pub mod identity;

pub use ds::{AcceptedCommit, DeliveryGroup, DsError, KeyPackageInfo, validate_key_package};
pub use identity::{
    ConclaveIdentityProvider, Identity, IdentityError, MLS_SUITE, Principal,
    decode_signing_identity, encode_signing_identity,
};
