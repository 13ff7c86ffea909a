-- Conclave's durable state. Portable SQL: runs unchanged on SQLite and PostgreSQL.
-- Ids are TEXT; times are BIGINT milliseconds since the Unix epoch; flags are BIGINT 0/1;
-- keys are base64 TEXT; policies are JSON TEXT.

CREATE TABLE organisations (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL
);

CREATE TABLE security_groups (
    id          TEXT PRIMARY KEY,
    org_id      TEXT NOT NULL REFERENCES organisations(id),
    name        TEXT NOT NULL,
    policy      TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    UNIQUE (org_id, name)
);

CREATE TABLE users (
    id             TEXT PRIMARY KEY,
    org_id         TEXT NOT NULL REFERENCES organisations(id),
    username       TEXT NOT NULL UNIQUE,
    display_name   TEXT NOT NULL,
    password_hash  TEXT NOT NULL,
    group_id       TEXT NOT NULL REFERENCES security_groups(id),
    is_admin       BIGINT NOT NULL DEFAULT 0,
    token_version  BIGINT NOT NULL DEFAULT 0,
    created_at     BIGINT NOT NULL
);

CREATE TABLE devices (
    user_id       TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    device_id     TEXT NOT NULL,
    identity_key  TEXT NOT NULL,
    first_seen    BIGINT NOT NULL,
    last_seen     BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);

CREATE TABLE calls (
    id          TEXT PRIMARY KEY,
    org_id      TEXT NOT NULL,
    created_by  TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    ended_at    BIGINT
);

-- Audit log: who joined, left, was removed, and every rekey. No content, no keys.
CREATE TABLE call_events (
    id         TEXT PRIMARY KEY,
    call_id    TEXT NOT NULL,
    at         BIGINT NOT NULL,
    kind       TEXT NOT NULL,
    user_id    TEXT,
    device_id  TEXT,
    epoch      BIGINT
);
CREATE INDEX call_events_by_call ON call_events (call_id, at);

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    secret      TEXT NOT NULL,
    label       TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT
);

CREATE TABLE guest_invitations (
    id          TEXT PRIMARY KEY,
    call_id     TEXT NOT NULL,
    created_by  TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    expires_at  BIGINT NOT NULL,
    created_at  BIGINT NOT NULL
);
