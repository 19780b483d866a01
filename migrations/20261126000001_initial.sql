-- Bookings as received, with their life-cycle state.
CREATE TABLE bookings (
    booking_id        TEXT PRIMARY KEY,
    email             TEXT NOT NULL,
    booking_time      TIMESTAMPTZ NOT NULL,
    number_of_users   INTEGER NOT NULL CHECK (number_of_users > 0),
    duration_minutes  INTEGER NOT NULL CHECK (duration_minutes > 0),
    state             TEXT NOT NULL DEFAULT 'received'
                      CHECK (state IN ('received', 'scheduled', 'provisioning', 'provisioned', 'failed', 'ended')),
    failure_reason    TEXT,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One trainee login per user of a booking. The password is stored encrypted
-- (XChaCha20-Poly1305 with LABBOOK_SECRET_KEY) and as a SHA-512-crypt hash.
CREATE TABLE credentials (
    booking_id          TEXT NOT NULL REFERENCES bookings (booking_id) ON DELETE CASCADE,
    position            INTEGER NOT NULL CHECK (position >= 0),
    username            TEXT NOT NULL,
    password_encrypted  BYTEA NOT NULL,
    password_hash       TEXT NOT NULL,
    PRIMARY KEY (booking_id, position),
    UNIQUE (booking_id, username)
);

-- The durable timer: what is due when, and whether it was published.
CREATE TABLE schedule (
    booking_id    TEXT NOT NULL REFERENCES bookings (booking_id) ON DELETE CASCADE,
    action        TEXT NOT NULL CHECK (action IN ('provision', 'teardown')),
    due_at        TIMESTAMPTZ NOT NULL,
    published_at  TIMESTAMPTZ,
    PRIMARY KEY (booking_id, action)
);
CREATE INDEX schedule_pending ON schedule (due_at) WHERE published_at IS NULL;

-- One lab machine of a booking: its users, its admin account and the instance launched for it.
CREATE TABLE slots (
    booking_id                TEXT NOT NULL REFERENCES bookings (booking_id) ON DELETE CASCADE,
    slot                      INTEGER NOT NULL CHECK (slot >= 0),
    first_user                INTEGER NOT NULL,
    user_count                INTEGER NOT NULL,
    admin_username            TEXT NOT NULL,
    admin_password_encrypted  BYTEA NOT NULL,
    admin_password_hash       TEXT NOT NULL,
    instance_id               TEXT,
    instance_state            TEXT,
    public_dns                TEXT,
    public_ip                 TEXT,
    launched_at               TIMESTAMPTZ,
    updated_at                TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (booking_id, slot)
);

-- The email log: each kind is sent once per booking.
CREATE TABLE emails (
    booking_id  TEXT NOT NULL REFERENCES bookings (booking_id) ON DELETE CASCADE,
    kind        TEXT NOT NULL CHECK (kind IN ('confirmation', 'instance_details', 'failure')),
    message_id  TEXT NOT NULL,
    sent_at     TIMESTAMPTZ,
    last_error  TEXT,
    PRIMARY KEY (booking_id, kind)
);
