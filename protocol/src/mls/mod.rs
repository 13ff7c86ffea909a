//! MLS (RFC 9420) pieces shared by clients and the delivery service:
//! identities and credentials, and the delivery service's public view of a
//! group. Enabled by the `mls` feature.

pub mod ds;
pub mod identity;

pub use ds::{AcceptedCommit, DeliveryGroup, DsError};
pub use identity::{ConclaveIdentityProvider, Identity, IdentityError, MLS_SUITE, Principal};
