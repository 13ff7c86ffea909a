//! HTTP API: sign-in, machine tokens, guest invitations, and the admin API
//! under `/admin` (documented as OpenAPI at `/admin/openapi.json`).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};

use crate::AppState;
use crate::auth::{self, Claims, TokenKind};
use crate::db::{CallEventRow, CallRow, DbError, Policy, SecurityGroup, User};

/// An API error: a status and a sentence.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiError {
    /// Machine-readable code.
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
    #[serde(skip)]
    status: StatusCode,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            status,
        }
    }
    fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing, invalid or expired token",
        )
    }
    fn forbidden(why: &str) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", why)
    }
    fn bad_request(why: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", why)
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::NotFound(what) => Self::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("{what} not found"),
            ),
            DbError::Conflict(what) => Self::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("{what} already exists"),
            ),
            other => {
                tracing::error!(error = %other, "database error");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error",
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self)).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// Verifies a bearer token and, for users and machines, that the account
/// still exists and the token predates no credential reset.
pub async fn authenticate(state: &AppState, token: &str) -> Result<Claims, ApiError> {
    let claims = state
        .tokens
        .verify(token)
        .map_err(|_| ApiError::unauthorized())?;
    if claims.kind != TokenKind::Guest {
        let user = state
            .db
            .user(&claims.sub)
            .await?
            .ok_or_else(ApiError::unauthorized)?;
        if user.token_version != claims.ver {
            return Err(ApiError::unauthorized());
        }
    }
    Ok(claims)
}

async fn admin(state: &AppState, headers: &HeaderMap) -> Result<Claims, ApiError> {
    let claims = authenticate(state, bearer(headers).ok_or_else(ApiError::unauthorized)?).await?;
    let user = state
        .db
        .user(&claims.sub)
        .await?
        .ok_or_else(ApiError::unauthorized)?;
    if !user.is_admin || claims.kind != TokenKind::User {
        return Err(ApiError::forbidden("administrators only"));
    }
    Ok(claims)
}

/// Password sign-in.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    /// Login name.
    pub username: String,
    /// Password.
    pub password: String,
}

/// A session token.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenResponse {
    /// JWT for `/ws?token=` and `Authorization: Bearer`.
    pub token: String,
    /// The user (or guest) id.
    pub user_id: String,
    /// Seconds until it expires.
    pub expires_in: u64,
}

/// `POST /api/login`
#[utoipa::path(post, path = "/api/login", request_body = LoginRequest,
    responses((status = 200, body = TokenResponse), (status = 401, body = ApiError)))]
pub async fn login(
    State(state): State<AppState>,
    Json(req): Json<LoginRequest>,
) -> ApiResult<TokenResponse> {
    let user = state.db.user_by_username(&req.username).await?;
    // Verify against a dummy hash when the user is unknown, so timing does not tell.
    let hash = match &user {
        Some(u) => state.db.password_hash(&u.id).await?.unwrap_or_default(),
        None => state.dummy_hash.to_string(),
    };
    let ok = auth::verify_password(&req.password, &hash);
    let (Some(user), true) = (user, ok) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "wrong username or password",
        ));
    };
    Ok(Json(TokenResponse {
        token: state
            .tokens
            .issue_versioned(&user.id, TokenKind::User, None, user.token_version),
        user_id: user.id,
        expires_in: state.tokens.ttl().as_secs(),
    }))
}

/// Proof of an API key.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MachineTokenRequest {
    /// API key id.
    pub key_id: String,
    /// Unix seconds; must be within 60 s of the server's clock.
    pub timestamp: u64,
    /// Hex `HMAC-SHA256(secret, "<key_id>:<timestamp>")`.
    pub signature: String,
}

/// `POST /api/token`: an API key and its HMAC proof for a machine token.
#[utoipa::path(post, path = "/api/token", request_body = MachineTokenRequest,
    responses((status = 200, body = TokenResponse), (status = 401, body = ApiError)))]
pub async fn machine_token(
    State(state): State<AppState>,
    Json(req): Json<MachineTokenRequest>,
) -> ApiResult<TokenResponse> {
    let now = auth::unix_time();
    if now.abs_diff(req.timestamp) > 60 {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "timestamp out of range",
        ));
    }
    let (user_id, secret) = state
        .db
        .api_key(&req.key_id)
        .await?
        .ok_or_else(ApiError::unauthorized)?;
    let secret = B64.decode(secret).map_err(|_| ApiError::unauthorized())?;
    let expected = auth::api_signature(&secret, &req.key_id, req.timestamp);
    let good: bool =
        subtle::ConstantTimeEq::ct_eq(expected.as_bytes(), req.signature.as_bytes()).into();
    if !good {
        return Err(ApiError::unauthorized());
    }
    let user = state
        .db
        .user(&user_id)
        .await?
        .ok_or_else(ApiError::unauthorized)?;
    Ok(Json(TokenResponse {
        token: state
            .tokens
            .issue_versioned(&user.id, TokenKind::Machine, None, user.token_version),
        user_id: user.id,
        expires_in: state.tokens.ttl().as_secs(),
    }))
}

/// A request to invite guests to a call.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InvitationRequest {
    /// The call.
    pub call_id: String,
}

/// An invitation.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct InvitationResponse {
    /// The invitation code (goes in the link).
    pub invitation: String,
    /// The call it admits to.
    pub call_id: String,
    /// Seconds it stays valid.
    pub expires_in: u64,
}

const INVITATION_TTL_MS: i64 = 24 * 3600 * 1000;

/// `POST /api/invitations`: a signed-in user whose policy allows guests invites to one call.
#[utoipa::path(post, path = "/api/invitations", request_body = InvitationRequest,
    responses((status = 200, body = InvitationResponse), (status = 403, body = ApiError)))]
pub async fn invite(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(req): Json<InvitationRequest>,
) -> ApiResult<InvitationResponse> {
    let claims = authenticate(&state, bearer(&headers).ok_or_else(ApiError::unauthorized)?).await?;
    if claims.kind != TokenKind::User {
        return Err(ApiError::forbidden("only signed-in users can invite"));
    }
    if !conclave_protocol::signal::valid_id(&req.call_id) {
        return Err(ApiError::bad_request("invalid call id"));
    }
    if !state.db.policy_of(&claims.sub).await?.guests_allowed {
        return Err(ApiError::forbidden(
            "your security group does not allow guests",
        ));
    }
    let invitation = state
        .db
        .create_invitation(&req.call_id, &claims.sub, INVITATION_TTL_MS)
        .await?;
    Ok(Json(InvitationResponse {
        invitation,
        call_id: req.call_id,
        expires_in: (INVITATION_TTL_MS / 1000) as u64,
    }))
}

/// A guest redeeming an invitation.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GuestRequest {
    /// The invitation code.
    pub invitation: String,
}

/// `POST /api/guest`: an invitation for a guest token good for one call.
#[utoipa::path(post, path = "/api/guest", request_body = GuestRequest,
    responses((status = 200, body = TokenResponse), (status = 403, body = ApiError)))]
pub async fn guest(
    State(state): State<AppState>,
    Json(req): Json<GuestRequest>,
) -> ApiResult<TokenResponse> {
    let (call_id, by) = state
        .db
        .invitation(&req.invitation)
        .await?
        .ok_or_else(|| ApiError::forbidden("this invitation is invalid or has expired"))?;
    // The inviter's policy must still allow guests.
    if !state.db.policy_of(&by).await?.guests_allowed {
        return Err(ApiError::forbidden("guests are no longer allowed"));
    }
    let guest_id = format!("guest.{}", &crate::db::new_id()[..12]);
    Ok(Json(TokenResponse {
        token: state
            .tokens
            .issue(&guest_id, TokenKind::Guest, Some(&call_id)),
        user_id: guest_id,
        expires_in: state.tokens.ttl().as_secs(),
    }))
}

/// A new user.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    /// Login name (`[A-Za-z0-9._@+-]`, 1–128).
    pub username: String,
    /// Name shown to others.
    pub display_name: String,
    /// Initial password (at least 8 characters).
    pub password: String,
    /// Security group (the default group if absent).
    #[serde(default)]
    pub group_id: Option<String>,
    /// Administrator.
    #[serde(default)]
    pub is_admin: bool,
}

/// Changes to a user.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserPatch {
    /// New display name.
    pub display_name: Option<String>,
    /// New security group.
    pub group_id: Option<String>,
    /// Administrator or not.
    pub is_admin: Option<bool>,
}

/// A credential reset.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetRequest {
    /// The new password.
    pub password: String,
}

/// What a removal did.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RemovalResponse {
    /// Call memberships removed (each forces a rekey).
    pub removed_from_calls: usize,
    /// Sockets closed.
    pub sessions_closed: usize,
}

fn check_password(p: &str) -> Result<(), ApiError> {
    if p.chars().count() < 8 {
        return Err(ApiError::bad_request(
            "passwords need at least 8 characters",
        ));
    }
    Ok(())
}

/// `GET /admin/users`
#[utoipa::path(get, path = "/admin/users", responses((status = 200, body = [User])), security(("bearer" = [])))]
pub async fn list_users(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Vec<User>> {
    admin(&state, &headers).await?;
    Ok(Json(state.db.list_users().await?))
}

/// `POST /admin/users`
#[utoipa::path(post, path = "/admin/users", request_body = NewUser,
    responses((status = 200, body = User), (status = 409, body = ApiError)), security(("bearer" = [])))]
pub async fn create_user(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(req): Json<NewUser>,
) -> ApiResult<User> {
    admin(&state, &headers).await?;
    if !conclave_protocol::signal::valid_id(&req.username) {
        return Err(ApiError::bad_request("invalid username"));
    }
    check_password(&req.password)?;
    let hash =
        auth::hash_password(&req.password).map_err(|_| ApiError::bad_request("bad password"))?;
    let group = req
        .group_id
        .unwrap_or_else(|| state.default_group.to_string());
    Ok(Json(
        state
            .db
            .create_user(
                &state.org_id,
                &req.username,
                &req.display_name,
                &hash,
                &group,
                req.is_admin,
            )
            .await?,
    ))
}

/// `GET /admin/users/{id}`
#[utoipa::path(get, path = "/admin/users/{id}", responses((status = 200, body = User), (status = 404, body = ApiError)), security(("bearer" = [])))]
pub async fn get_user(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<User> {
    admin(&state, &headers).await?;
    Ok(Json(
        state.db.user(&id).await?.ok_or(DbError::NotFound("user"))?,
    ))
}

/// `PATCH /admin/users/{id}`
#[utoipa::path(patch, path = "/admin/users/{id}", request_body = UserPatch, responses((status = 200, body = User)), security(("bearer" = [])))]
pub async fn update_user(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(req): Json<UserPatch>,
) -> ApiResult<User> {
    admin(&state, &headers).await?;
    Ok(Json(
        state
            .db
            .update_user(
                &id,
                req.display_name.as_deref(),
                req.group_id.as_deref(),
                req.is_admin,
            )
            .await?,
    ))
}

/// `DELETE /admin/users/{id}`: deletes the account and removes it from every call.
#[utoipa::path(delete, path = "/admin/users/{id}", responses((status = 200, body = RemovalResponse)), security(("bearer" = [])))]
pub async fn delete_user(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<RemovalResponse> {
    admin(&state, &headers).await?;
    state.db.delete_user(&id).await?;
    Ok(Json(remove_everywhere(&state, &id)))
}

fn remove_everywhere(state: &AppState, user_id: &str) -> RemovalResponse {
    let removed_from_calls = state.hub.remove_user_everywhere(user_id);
    let sessions_closed = state
        .hub
        .close_user_sessions(user_id, "removed by an administrator");
    RemovalResponse {
        removed_from_calls,
        sessions_closed,
    }
}

/// `POST /admin/users/{id}/reset`: new password; every token and API key of the user is revoked and its sockets closed.
#[utoipa::path(post, path = "/admin/users/{id}/reset", request_body = ResetRequest, responses((status = 200, body = RemovalResponse)), security(("bearer" = [])))]
pub async fn reset_user(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(req): Json<ResetRequest>,
) -> ApiResult<RemovalResponse> {
    admin(&state, &headers).await?;
    check_password(&req.password)?;
    let hash =
        auth::hash_password(&req.password).map_err(|_| ApiError::bad_request("bad password"))?;
    state.db.reset_credentials(&id, &hash).await?;
    Ok(Json(remove_everywhere(&state, &id)))
}

/// `POST /admin/users/{id}/remove`: removes the user from every call now (forces a rekey in each) and closes their sockets.
#[utoipa::path(post, path = "/admin/users/{id}/remove", responses((status = 200, body = RemovalResponse)), security(("bearer" = [])))]
pub async fn remove_user(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<RemovalResponse> {
    admin(&state, &headers).await?;
    state.db.user(&id).await?.ok_or(DbError::NotFound("user"))?;
    Ok(Json(remove_everywhere(&state, &id)))
}

/// A new security group.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewGroup {
    /// Name.
    pub name: String,
    /// Policy (defaults for missing fields).
    #[serde(default)]
    pub policy: Policy,
}

/// `GET /admin/groups`
#[utoipa::path(get, path = "/admin/groups", responses((status = 200, body = [SecurityGroup])), security(("bearer" = [])))]
pub async fn list_groups(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> ApiResult<Vec<SecurityGroup>> {
    admin(&state, &headers).await?;
    Ok(Json(state.db.list_groups().await?))
}

/// `POST /admin/groups`
#[utoipa::path(post, path = "/admin/groups", request_body = NewGroup, responses((status = 200, body = SecurityGroup)), security(("bearer" = [])))]
pub async fn create_group(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(req): Json<NewGroup>,
) -> ApiResult<SecurityGroup> {
    admin(&state, &headers).await?;
    if req.name.trim().is_empty() || req.name.len() > 128 {
        return Err(ApiError::bad_request("invalid group name"));
    }
    Ok(Json(
        state
            .db
            .create_group(&state.org_id, &req.name, &req.policy)
            .await?,
    ))
}

/// `PUT /admin/groups/{id}/policy`
#[utoipa::path(put, path = "/admin/groups/{id}/policy", request_body = Policy, responses((status = 200, body = SecurityGroup)), security(("bearer" = [])))]
pub async fn set_policy(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(policy): Json<Policy>,
) -> ApiResult<SecurityGroup> {
    admin(&state, &headers).await?;
    Ok(Json(state.db.set_policy(&id, &policy).await?))
}

/// `GET /admin/calls`
#[utoipa::path(get, path = "/admin/calls", responses((status = 200, body = [CallRow])), security(("bearer" = [])))]
pub async fn list_calls(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> ApiResult<Vec<CallRow>> {
    admin(&state, &headers).await?;
    Ok(Json(state.db.list_calls().await?))
}

/// `GET /admin/calls/{id}/events`: the audit log of a call.
#[utoipa::path(get, path = "/admin/calls/{id}/events", responses((status = 200, body = [CallEventRow])), security(("bearer" = [])))]
pub async fn call_events(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Vec<CallEventRow>> {
    admin(&state, &headers).await?;
    Ok(Json(state.db.call_events(&id).await?))
}

/// A new API key.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewApiKey {
    /// What it is for.
    pub label: String,
}

/// An API key; the secret is shown only once.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ApiKeyResponse {
    /// Key id.
    pub key_id: String,
    /// Base64 secret for the HMAC.
    pub secret: String,
}

/// `POST /admin/users/{id}/api-keys`: an API key for a server, bot or recorder acting as this user.
#[utoipa::path(post, path = "/admin/users/{id}/api-keys", request_body = NewApiKey, responses((status = 200, body = ApiKeyResponse)), security(("bearer" = [])))]
pub async fn create_api_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(req): Json<NewApiKey>,
) -> ApiResult<ApiKeyResponse> {
    admin(&state, &headers).await?;
    let mut secret = [0u8; 32];
    rand::Rng::fill(&mut rand::thread_rng(), &mut secret);
    let secret = B64.encode(secret);
    let key_id = state.db.create_api_key(&id, &secret, &req.label).await?;
    Ok(Json(ApiKeyResponse { key_id, secret }))
}

/// The organisation's retention recorder.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetentionSettings {
    /// The user (usually a machine user with an API key) whose device is
    /// added to every call whose members' policy has `retention_required`;
    /// `null` for none. Such joins are refused while no recorder is set,
    /// online, and holding uploaded key packages.
    pub recorder_user_id: Option<String>,
}

/// `GET /admin/retention`
#[utoipa::path(get, path = "/admin/retention", responses((status = 200, body = RetentionSettings)), security(("bearer" = [])))]
pub async fn get_retention(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> ApiResult<RetentionSettings> {
    admin(&state, &headers).await?;
    Ok(Json(RetentionSettings {
        recorder_user_id: state.db.recorder(&state.org_id).await?,
    }))
}

/// `PUT /admin/retention`
#[utoipa::path(put, path = "/admin/retention", request_body = RetentionSettings, responses((status = 200, body = RetentionSettings)), security(("bearer" = [])))]
pub async fn set_retention(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(req): Json<RetentionSettings>,
) -> ApiResult<RetentionSettings> {
    admin(&state, &headers).await?;
    state
        .db
        .set_recorder(&state.org_id, req.recorder_user_id.as_deref())
        .await?;
    Ok(Json(req))
}

/// The admin and public API, as OpenAPI.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "Conclave API",
        description = "Sign-in, tokens, invitations and administration. The call protocol itself is the WebSocket at /ws (docs/protocol.md)."
    ),
    paths(
        login,
        machine_token,
        invite,
        guest,
        list_users,
        create_user,
        get_user,
        update_user,
        delete_user,
        reset_user,
        remove_user,
        list_groups,
        create_group,
        set_policy,
        list_calls,
        call_events,
        create_api_key,
        get_retention,
        set_retention
    ),
    components(schemas(
        ApiError,
        LoginRequest,
        TokenResponse,
        MachineTokenRequest,
        InvitationRequest,
        InvitationResponse,
        GuestRequest,
        NewUser,
        UserPatch,
        ResetRequest,
        RemovalResponse,
        NewGroup,
        NewApiKey,
        ApiKeyResponse,
        User,
        SecurityGroup,
        Policy,
        CallRow,
        CallEventRow,
        RetentionSettings
    ))
)]
pub struct ApiDoc;

/// `GET /admin/openapi.json`
pub async fn openapi() -> impl IntoResponse {
    Json(ApiDoc::openapi())
}
