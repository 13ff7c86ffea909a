-- Key packages uploaded ahead of time, per device (single use: taken when
-- the server adds the device to a group), and the organisation's retention
-- recorder, which the server adds to calls whose members' policy requires it.

CREATE TABLE key_packages (
    id           TEXT PRIMARY KEY,
    user_id      TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    device_id    TEXT NOT NULL,
    key_package  TEXT NOT NULL,
    created_at   BIGINT NOT NULL
);
CREATE INDEX key_packages_by_device ON key_packages (user_id, device_id, created_at);

ALTER TABLE organisations ADD COLUMN recorder_user_id TEXT;
