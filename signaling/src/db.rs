//! Durable state with sqlx: SQLite by default (one file, WAL), PostgreSQL by
//! URL, the same embedded migrations for both.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Row};

/// Why a database operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The database refused or failed.
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored policy could not be read.
    #[error("stored policy is invalid: {0}")]
    Policy(#[from] serde_json::Error),
    /// A name is already taken.
    #[error("{0} already exists")]
    Conflict(&'static str),
    /// No such row.
    #[error("{0} not found")]
    NotFound(&'static str),
}

/// What a security group allows its members.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// May start new calls.
    pub may_start_calls: bool,
    /// May join calls.
    pub may_join_calls: bool,
    /// May publish microphone audio.
    pub may_publish_audio: bool,
    /// May publish camera video.
    pub may_publish_video: bool,
    /// May share the screen.
    pub may_share_screen: bool,
    /// Largest call a member may start or join.
    pub max_call_size: u32,
    /// May invite guests to calls.
    pub guests_allowed: bool,
    /// Calls need the organisation's retention recorder.
    pub retention_required: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            may_start_calls: true,
            may_join_calls: true,
            may_publish_audio: true,
            may_publish_video: true,
            may_share_screen: true,
            max_call_size: 500,
            guests_allowed: true,
            retention_required: false,
        }
    }
}

/// A user account (without its password hash).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct User {
    /// Id.
    pub id: String,
    /// Organisation.
    pub org_id: String,
    /// Login name.
    pub username: String,
    /// Name shown to others.
    pub display_name: String,
    /// Security group.
    pub group_id: String,
    /// May use the admin API.
    pub is_admin: bool,
    /// Bumped on credential reset: older tokens stop working.
    pub token_version: i64,
}

/// A security group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SecurityGroup {
    /// Id.
    pub id: String,
    /// Name, unique in the organisation.
    pub name: String,
    /// What members may do.
    pub policy: Policy,
}

/// An audit event of a call. No content, no keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CallEventRow {
    /// Milliseconds since the Unix epoch.
    pub at: i64,
    /// `created`, `joined`, `left`, `removed`, `rekeyed`, `ended`.
    pub kind: String,
    /// User concerned, if any.
    pub user_id: Option<String>,
    /// Device concerned, if any.
    pub device_id: Option<String>,
    /// MLS epoch, for rekeys.
    pub epoch: Option<i64>,
}

/// A call as the admin API lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CallRow {
    /// Call id.
    pub id: String,
    /// Who started it.
    pub created_by: String,
    /// When.
    pub created_at: i64,
    /// When it ended, if it has.
    pub ended_at: Option<i64>,
}

/// What changed when a device showed its identity key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKey {
    /// First time this device was seen.
    New,
    /// The key is the one on record.
    Same,
    /// The device presented a different key than before.
    Changed,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A fresh random id (128 bits, hex).
pub fn new_id() -> String {
    let mut b = [0u8; 16];
    rand::Rng::fill(&mut rand::thread_rng(), &mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The database.
#[derive(Clone, Debug)]
pub struct Db {
    pool: AnyPool,
}

fn group_from(r: &sqlx::any::AnyRow) -> Result<SecurityGroup, DbError> {
    Ok(SecurityGroup {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        policy: serde_json::from_str(&r.try_get::<String, _>("policy")?)?,
    })
}

fn user_from(row: &sqlx::any::AnyRow) -> Result<User, sqlx::Error> {
    Ok(User {
        id: row.try_get("id")?,
        org_id: row.try_get("org_id")?,
        username: row.try_get("username")?,
        display_name: row.try_get("display_name")?,
        group_id: row.try_get("group_id")?,
        is_admin: row.try_get::<i64, _>("is_admin")? != 0,
        token_version: row.try_get("token_version")?,
    })
}

impl Db {
    /// Connects (creating a SQLite file if needed) and runs the migrations.
    pub async fn connect(url: &str) -> Result<Self, DbError> {
        install_default_drivers();
        let sqlite = url.starts_with("sqlite:");
        let pool = AnyPoolOptions::new()
            .max_connections(if sqlite { 4 } else { 10 })
            .connect(url)
            .await?;
        if sqlite {
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await?;
            sqlx::query("PRAGMA busy_timeout = 5000")
                .execute(&pool)
                .await?;
        }
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Self { pool })
    }

    /// The organisation and group a fresh install starts with, created if
    /// missing (safe when two servers start on one database at once).
    pub async fn ensure_defaults(&self) -> Result<(String, String), DbError> {
        match self.try_ensure_defaults().await {
            Ok(v) => Ok(v),
            // Another server created them between our read and our insert.
            Err(DbError::Sql(_)) => self.try_ensure_defaults().await,
            Err(e) => Err(e),
        }
    }

    async fn try_ensure_defaults(&self) -> Result<(String, String), DbError> {
        if let Some(row) = sqlx::query("SELECT id FROM organisations WHERE name = $1")
            .bind("default")
            .fetch_optional(&self.pool)
            .await?
        {
            let org: String = row.try_get("id")?;
            let group: String =
                sqlx::query("SELECT id FROM security_groups WHERE org_id = $1 AND name = $2")
                    .bind(&org)
                    .bind("everyone")
                    .fetch_one(&self.pool)
                    .await?
                    .try_get("id")?;
            return Ok((org, group));
        }
        let org = new_id();
        let group = new_id();
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO organisations (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(&org)
            .bind("default")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO security_groups (id, org_id, name, policy, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&group)
        .bind(&org)
        .bind("everyone")
        .bind(serde_json::to_string(&Policy::default())?)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((org, group))
    }

    /// Number of admin accounts.
    pub async fn admin_count(&self) -> Result<i64, DbError> {
        Ok(
            sqlx::query("SELECT COUNT(*) AS n FROM users WHERE is_admin = 1")
                .fetch_one(&self.pool)
                .await?
                .try_get("n")?,
        )
    }

    /// Creates a user with an argon2 password hash.
    pub async fn create_user(
        &self,
        org_id: &str,
        username: &str,
        display_name: &str,
        password_hash: &str,
        group_id: &str,
        is_admin: bool,
    ) -> Result<User, DbError> {
        if self.user_by_username(username).await?.is_some() {
            return Err(DbError::Conflict("username"));
        }
        self.group(group_id)
            .await?
            .ok_or(DbError::NotFound("security group"))?;
        let id = new_id();
        sqlx::query(
            "INSERT INTO users (id, org_id, username, display_name, password_hash, group_id, is_admin, token_version, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 0, $8)",
        )
        .bind(&id)
        .bind(org_id)
        .bind(username)
        .bind(display_name)
        .bind(password_hash)
        .bind(group_id)
        .bind(i64::from(is_admin))
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        self.user(&id).await?.ok_or(DbError::NotFound("user"))
    }

    /// A user by id.
    pub async fn user(&self, id: &str) -> Result<Option<User>, DbError> {
        let row = sqlx::query("SELECT id, org_id, username, display_name, group_id, is_admin, token_version FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(user_from).transpose()?)
    }

    /// A user by login name.
    pub async fn user_by_username(&self, username: &str) -> Result<Option<User>, DbError> {
        let row = sqlx::query("SELECT id, org_id, username, display_name, group_id, is_admin, token_version FROM users WHERE username = $1")
            .bind(username)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(user_from).transpose()?)
    }

    /// The stored password hash of a user.
    pub async fn password_hash(&self, user_id: &str) -> Result<Option<String>, DbError> {
        let row = sqlx::query("SELECT password_hash FROM users WHERE id = $1")
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("password_hash")).transpose()?)
    }

    /// Every user.
    pub async fn list_users(&self) -> Result<Vec<User>, DbError> {
        let rows = sqlx::query("SELECT id, org_id, username, display_name, group_id, is_admin, token_version FROM users ORDER BY username")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(user_from).collect::<Result<_, _>>()?)
    }

    /// Changes name, group or admin flag.
    pub async fn update_user(
        &self,
        id: &str,
        display_name: Option<&str>,
        group_id: Option<&str>,
        is_admin: Option<bool>,
    ) -> Result<User, DbError> {
        let mut user = self.user(id).await?.ok_or(DbError::NotFound("user"))?;
        if let Some(g) = group_id {
            self.group(g)
                .await?
                .ok_or(DbError::NotFound("security group"))?;
            user.group_id = g.to_owned();
        }
        if let Some(n) = display_name {
            user.display_name = n.to_owned();
        }
        if let Some(a) = is_admin {
            user.is_admin = a;
        }
        sqlx::query(
            "UPDATE users SET display_name = $1, group_id = $2, is_admin = $3 WHERE id = $4",
        )
        .bind(&user.display_name)
        .bind(&user.group_id)
        .bind(i64::from(user.is_admin))
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(user)
    }

    /// Sets a new password hash and invalidates every token of the user.
    pub async fn reset_credentials(&self, id: &str, password_hash: &str) -> Result<(), DbError> {
        let n = sqlx::query(
            "UPDATE users SET password_hash = $1, token_version = token_version + 1 WHERE id = $2",
        )
        .bind(password_hash)
        .bind(id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(DbError::NotFound("user"));
        }
        sqlx::query(
            "UPDATE api_keys SET revoked_at = $1 WHERE user_id = $2 AND revoked_at IS NULL",
        )
        .bind(now_ms())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Deletes a user.
    pub async fn delete_user(&self, id: &str) -> Result<(), DbError> {
        let mut tx = self.pool.begin().await?;
        for q in [
            "DELETE FROM devices WHERE user_id = $1",
            "DELETE FROM api_keys WHERE user_id = $1",
            "DELETE FROM guest_invitations WHERE created_by = $1",
        ] {
            sqlx::query(q).bind(id).execute(&mut *tx).await?;
        }
        let n = sqlx::query("DELETE FROM users WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        if n == 0 {
            return Err(DbError::NotFound("user"));
        }
        Ok(())
    }

    /// A security group.
    pub async fn group(&self, id: &str) -> Result<Option<SecurityGroup>, DbError> {
        let row = sqlx::query("SELECT id, name, policy FROM security_groups WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(group_from).transpose()
    }

    /// Every security group.
    pub async fn list_groups(&self) -> Result<Vec<SecurityGroup>, DbError> {
        let rows = sqlx::query("SELECT id, name, policy FROM security_groups ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(group_from).collect()
    }

    /// Creates a security group.
    pub async fn create_group(
        &self,
        org_id: &str,
        name: &str,
        policy: &Policy,
    ) -> Result<SecurityGroup, DbError> {
        let taken = sqlx::query("SELECT id FROM security_groups WHERE org_id = $1 AND name = $2")
            .bind(org_id)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        if taken.is_some() {
            return Err(DbError::Conflict("security group"));
        }
        let id = new_id();
        sqlx::query(
            "INSERT INTO security_groups (id, org_id, name, policy, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&id)
        .bind(org_id)
        .bind(name)
        .bind(serde_json::to_string(policy)?)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(SecurityGroup {
            id,
            name: name.to_owned(),
            policy: policy.clone(),
        })
    }

    /// Replaces a group's policy.
    pub async fn set_policy(&self, id: &str, policy: &Policy) -> Result<SecurityGroup, DbError> {
        let n = sqlx::query("UPDATE security_groups SET policy = $1 WHERE id = $2")
            .bind(serde_json::to_string(policy)?)
            .bind(id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(DbError::NotFound("security group"));
        }
        self.group(id)
            .await?
            .ok_or(DbError::NotFound("security group"))
    }

    /// The policy that applies to a user.
    pub async fn policy_of(&self, user_id: &str) -> Result<Policy, DbError> {
        let user = self.user(user_id).await?.ok_or(DbError::NotFound("user"))?;
        Ok(self
            .group(&user.group_id)
            .await?
            .ok_or(DbError::NotFound("security group"))?
            .policy)
    }

    /// Records a device's identity key; says whether it is new or changed.
    pub async fn see_device(
        &self,
        user_id: &str,
        device_id: &str,
        identity_key_b64: &str,
    ) -> Result<DeviceKey, DbError> {
        let now = now_ms();
        let row =
            sqlx::query("SELECT identity_key FROM devices WHERE user_id = $1 AND device_id = $2")
                .bind(user_id)
                .bind(device_id)
                .fetch_optional(&self.pool)
                .await?;
        let state = match row {
            None => {
                sqlx::query(
                    "INSERT INTO devices (user_id, device_id, identity_key, first_seen, last_seen) VALUES ($1, $2, $3, $4, $4)",
                )
                .bind(user_id)
                .bind(device_id)
                .bind(identity_key_b64)
                .bind(now)
                .execute(&self.pool)
                .await?;
                return Ok(DeviceKey::New);
            }
            Some(r) if r.try_get::<String, _>("identity_key")? == identity_key_b64 => {
                DeviceKey::Same
            }
            Some(_) => DeviceKey::Changed,
        };
        sqlx::query("UPDATE devices SET identity_key = $1, last_seen = $2 WHERE user_id = $3 AND device_id = $4")
            .bind(identity_key_b64)
            .bind(now)
            .bind(user_id)
            .bind(device_id)
            .execute(&self.pool)
            .await?;
        Ok(state)
    }

    /// Records that a call started (idempotent for a restarted call id).
    pub async fn call_started(&self, call_id: &str, org_id: &str, by: &str) -> Result<(), DbError> {
        let exists = sqlx::query("SELECT id FROM calls WHERE id = $1")
            .bind(call_id)
            .fetch_optional(&self.pool)
            .await?;
        if exists.is_some() {
            sqlx::query("UPDATE calls SET ended_at = NULL WHERE id = $1")
                .bind(call_id)
                .execute(&self.pool)
                .await?;
        } else {
            sqlx::query(
                "INSERT INTO calls (id, org_id, created_by, created_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(call_id)
            .bind(org_id)
            .bind(by)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    /// Records that a call ended.
    pub async fn call_ended(&self, call_id: &str) -> Result<(), DbError> {
        sqlx::query("UPDATE calls SET ended_at = $1 WHERE id = $2")
            .bind(now_ms())
            .bind(call_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Appends an audit event.
    pub async fn record_event(
        &self,
        call_id: &str,
        kind: &str,
        user_id: Option<&str>,
        device_id: Option<&str>,
        epoch: Option<i64>,
    ) -> Result<(), DbError> {
        // Ids sort in the order events were recorded (time, then a counter).
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let at = now_ms();
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{at:015}{seq:012}{}", &new_id()[..8]);
        sqlx::query(
            "INSERT INTO call_events (id, call_id, at, kind, user_id, device_id, epoch) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(id)
        .bind(call_id)
        .bind(at)
        .bind(kind)
        .bind(user_id)
        .bind(device_id)
        .bind(epoch)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Calls, newest first.
    pub async fn list_calls(&self) -> Result<Vec<CallRow>, DbError> {
        let rows = sqlx::query(
            "SELECT id, created_by, created_at, ended_at FROM calls ORDER BY created_at DESC",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(CallRow {
                    id: r.try_get("id")?,
                    created_by: r.try_get("created_by")?,
                    created_at: r.try_get("created_at")?,
                    ended_at: r.try_get("ended_at")?,
                })
            })
            .collect()
    }

    /// A call's audit events, oldest first.
    pub async fn call_events(&self, call_id: &str) -> Result<Vec<CallEventRow>, DbError> {
        let rows = sqlx::query(
            "SELECT at, kind, user_id, device_id, epoch FROM call_events WHERE call_id = $1 ORDER BY at, id",
        )
        .bind(call_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(CallEventRow {
                    at: r.try_get("at")?,
                    kind: r.try_get("kind")?,
                    user_id: r.try_get("user_id")?,
                    device_id: r.try_get("device_id")?,
                    epoch: r.try_get("epoch")?,
                })
            })
            .collect()
    }

    /// Stores an invitation for a guest to one call.
    pub async fn create_invitation(
        &self,
        call_id: &str,
        by: &str,
        ttl_ms: i64,
    ) -> Result<String, DbError> {
        let id = new_id();
        let now = now_ms();
        sqlx::query(
            "INSERT INTO guest_invitations (id, call_id, created_by, expires_at, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&id)
        .bind(call_id)
        .bind(by)
        .bind(now + ttl_ms)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(id)
    }

    /// The call of a valid, unexpired invitation and the user who issued it.
    pub async fn invitation(&self, id: &str) -> Result<Option<(String, String)>, DbError> {
        let row = sqlx::query(
            "SELECT call_id, created_by FROM guest_invitations WHERE id = $1 AND expires_at > $2",
        )
        .bind(id)
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Ok((r.try_get("call_id")?, r.try_get("created_by")?)))
            .transpose()
    }

    /// Stores an API key for a user; returns its id.
    pub async fn create_api_key(
        &self,
        user_id: &str,
        secret_b64: &str,
        label: &str,
    ) -> Result<String, DbError> {
        self.user(user_id).await?.ok_or(DbError::NotFound("user"))?;
        let id = new_id();
        sqlx::query(
            "INSERT INTO api_keys (id, user_id, secret, label, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&id)
        .bind(user_id)
        .bind(secret_b64)
        .bind(label)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(id)
    }

    /// The owner and secret of a live API key.
    pub async fn api_key(&self, id: &str) -> Result<Option<(String, String)>, DbError> {
        let row = sqlx::query(
            "SELECT user_id, secret FROM api_keys WHERE id = $1 AND revoked_at IS NULL",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Ok((r.try_get("user_id")?, r.try_get("secret")?)))
            .transpose()
    }
    /// Stores key packages (base64) for a device, keeping at most
    /// [`MAX_KEY_PACKAGES_PER_DEVICE`] (the oldest go first); returns how many
    /// the device now has.
    pub async fn store_key_packages(
        &self,
        user_id: &str,
        device_id: &str,
        key_packages_b64: &[String],
    ) -> Result<i64, DbError> {
        let now = now_ms();
        for (i, kp) in key_packages_b64.iter().enumerate() {
            sqlx::query(
                "INSERT INTO key_packages (id, user_id, device_id, key_package, created_at) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(new_id())
            .bind(user_id)
            .bind(device_id)
            .bind(kp)
            // Keeps upload order among packages of one batch.
            .bind(now + i as i64)
            .execute(&self.pool)
            .await?;
        }
        let count = self.key_package_count(user_id, device_id).await?;
        if count > MAX_KEY_PACKAGES_PER_DEVICE {
            let excess = count - MAX_KEY_PACKAGES_PER_DEVICE;
            let rows = sqlx::query(
                "SELECT id FROM key_packages WHERE user_id = $1 AND device_id = $2 ORDER BY created_at LIMIT $3",
            )
            .bind(user_id)
            .bind(device_id)
            .bind(excess)
            .fetch_all(&self.pool)
            .await?;
            for r in rows {
                sqlx::query("DELETE FROM key_packages WHERE id = $1")
                    .bind(r.try_get::<String, _>("id")?)
                    .execute(&self.pool)
                    .await?;
            }
            return Ok(MAX_KEY_PACKAGES_PER_DEVICE);
        }
        Ok(count)
    }

    /// How many stored key packages a device has.
    pub async fn key_package_count(&self, user_id: &str, device_id: &str) -> Result<i64, DbError> {
        let r = sqlx::query(
            "SELECT COUNT(*) AS n FROM key_packages WHERE user_id = $1 AND device_id = $2",
        )
        .bind(user_id)
        .bind(device_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(r.try_get("n")?)
    }

    /// Takes (removes and returns) a device's oldest stored key package.
    /// Safe against two servers taking the same one.
    pub async fn take_key_package(
        &self,
        user_id: &str,
        device_id: &str,
    ) -> Result<Option<String>, DbError> {
        for _ in 0..5 {
            let row = sqlx::query(
                "SELECT id, key_package FROM key_packages WHERE user_id = $1 AND device_id = $2 ORDER BY created_at LIMIT 1",
            )
            .bind(user_id)
            .bind(device_id)
            .fetch_optional(&self.pool)
            .await?;
            let Some(row) = row else { return Ok(None) };
            let id: String = row.try_get("id")?;
            let taken = sqlx::query("DELETE FROM key_packages WHERE id = $1")
                .bind(&id)
                .execute(&self.pool)
                .await?
                .rows_affected();
            if taken == 1 {
                return Ok(Some(row.try_get("key_package")?));
            }
        }
        Ok(None)
    }

    /// The organisation's retention recorder, if one is set.
    pub async fn recorder(&self, org_id: &str) -> Result<Option<String>, DbError> {
        let r = sqlx::query("SELECT recorder_user_id FROM organisations WHERE id = $1")
            .bind(org_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match r {
            Some(r) => r.try_get::<Option<String>, _>("recorder_user_id")?,
            None => None,
        })
    }

    /// Sets (or clears) the organisation's retention recorder.
    pub async fn set_recorder(&self, org_id: &str, user_id: Option<&str>) -> Result<(), DbError> {
        if let Some(u) = user_id {
            self.user(u).await?.ok_or(DbError::NotFound("user"))?;
        }
        sqlx::query("UPDATE organisations SET recorder_user_id = $1 WHERE id = $2")
            .bind(user_id)
            .bind(org_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// Most key packages kept per device.
pub const MAX_KEY_PACKAGES_PER_DEVICE: i64 = 100;
