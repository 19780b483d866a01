-- The operator's console acts on bookings (cancel, change the end, resend an email, replay or
-- purge dead letters); each action is kept here with who did it (the console login), so the
-- booking's timeline can tell it. The pipeline's own events stay in `booking_events`.
CREATE TABLE operator_actions (
    id          BIGSERIAL PRIMARY KEY,
    booking_id  TEXT NOT NULL,
    at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    operator    TEXT NOT NULL,
    action      TEXT NOT NULL,
    -- The revision the action published (cancel, change), or the one whose email it resent.
    revision    INTEGER,
    detail      TEXT NOT NULL DEFAULT ''
);
CREATE INDEX operator_actions_booking ON operator_actions (booking_id, id);

-- A resent email is a copy of its own in the log: copy 0 is the email the pipeline sends,
-- copy n the operator's n-th resend of it. Each row is sent once, so a resend is recorded and
-- sent exactly once, and a redelivered resend does not send it again.
ALTER TABLE emails ADD COLUMN copy INTEGER NOT NULL DEFAULT 0 CHECK (copy >= 0);
ALTER TABLE emails DROP CONSTRAINT emails_pkey;
ALTER TABLE emails ADD PRIMARY KEY (booking_id, kind, revision, copy);

-- Liveness of periodic loops, one row each (the scheduler's durable timer: `scheduler-timer`),
-- written once per tick: the console's health page and the stale-timer alert read it.
CREATE TABLE heartbeats (
    loop_name   TEXT PRIMARY KEY,
    beat_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Which process beat last (host and pid), for an operator looking for it.
    beater      TEXT NOT NULL,
    beats       BIGINT NOT NULL DEFAULT 1
);
