//! Errors of the client SDK.

use conclave_protocol::sframe::SframeError;

/// Why an MLS agent operation failed. Input that fails leaves the agent's
/// group state unchanged.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Bytes from the network are not a well-formed MLS message.
    #[error("malformed MLS message: {0}")]
    Malformed(mls_rs::error::MlsError),
    /// MLS refused the operation or the message (bad signature, wrong epoch, ...).
    #[error("MLS: {0}")]
    Mls(#[from] mls_rs::error::MlsError),
    /// An MLS extension could not be encoded or decoded.
    #[error("MLS extension: {0}")]
    Extension(#[from] mls_rs::error::ExtensionError),
    /// Frame protection failed.
    #[error("SFrame: {0}")]
    Sframe(#[from] SframeError),
    /// The operation needs a group and the agent is in none.
    #[error("not in a group")]
    NotInGroup,
    /// The agent is already in a group.
    #[error("already in a group")]
    AlreadyInGroup,
    /// A credential or id is not a valid Conclave identity.
    #[error("identity: {0}")]
    Identity(#[from] conclave_protocol::mls::IdentityError),
    /// The MLS message is valid but not one the agent accepts here.
    #[error("unexpected MLS message: {0}")]
    UnexpectedMessage(&'static str),
    /// A commit of ours is already waiting for the delivery service.
    #[error("a commit is already pending")]
    CommitPending,
    /// No member has this leaf index.
    #[error("no member at leaf {0}")]
    NoSuchMember(u32),
}
