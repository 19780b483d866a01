-- Version 2 of the contract: bookings change and are cancelled (§3a), and each step is
-- published as an event (§7).

-- The upstream's revision of the stored content; `cancelled` stays true once set (a booking
-- cancelled after its end keeps the state `ended`). `schedule_revision` is the revision that
-- last set the booking's time: a `provision-due` of an earlier one is for a time that moved.
-- `provisioned_revision` is the revision whose machines the last instance-details email lists.
ALTER TABLE bookings
    ADD COLUMN revision              INTEGER NOT NULL DEFAULT 0 CHECK (revision >= 0),
    ADD COLUMN first_revision        INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN cancelled             BOOLEAN NOT NULL DEFAULT false,
    ADD COLUMN schedule_revision     INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN provisioned_revision  INTEGER;
ALTER TABLE bookings DROP CONSTRAINT bookings_state_check;
ALTER TABLE bookings ADD CONSTRAINT bookings_state_check
    CHECK (state IN ('received', 'scheduled', 'provisioning', 'provisioned', 'failed', 'ended', 'cancelled'));

-- A cancellation of a booking that was never stored: kept, so that the booking arriving late
-- with a lower revision is not provisioned.
CREATE TABLE cancellations (
    booking_id    TEXT PRIMARY KEY,
    revision      INTEGER NOT NULL CHECK (revision >= 0),
    cancelled_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The schedule row's revision travels on the message the timer publishes for it.
ALTER TABLE schedule ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;

-- Emails are logged per revision: `Booking Updated` once per revision, and the instance details
-- again after a change that launched machines or moved the booking.
ALTER TABLE emails ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
ALTER TABLE emails DROP CONSTRAINT emails_pkey;
ALTER TABLE emails ADD PRIMARY KEY (booking_id, kind, revision);
ALTER TABLE emails DROP CONSTRAINT emails_kind_check;
ALTER TABLE emails ADD CONSTRAINT emails_kind_check
    CHECK (kind IN ('confirmation', 'instance_details', 'failure', 'updated', 'cancelled'));

-- Machines of an earlier launch of the booking (it was moved to another time): terminated by the
-- provisioner's next message for the booking, and by the sweep.
CREATE TABLE retired_instances (
    booking_id   TEXT NOT NULL,
    instance_id  TEXT NOT NULL,
    retired_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (booking_id, instance_id)
);

-- A booking's history: every event published for it (§7), with the exact body, so that a copy
-- published again is the same message. A booking id that was never stored may have `rejected`
-- events, hence no foreign key. One row per event and revision, except `rejected`.
CREATE TABLE booking_events (
    seq         BIGSERIAL PRIMARY KEY,
    booking_id  TEXT NOT NULL,
    event       TEXT NOT NULL,
    revision    INTEGER NOT NULL,
    at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    state       TEXT,
    detail      TEXT NOT NULL DEFAULT '',
    body        TEXT NOT NULL
);
CREATE UNIQUE INDEX booking_events_once ON booking_events (booking_id, event, revision)
    WHERE event <> 'rejected';
CREATE INDEX booking_events_booking ON booking_events (booking_id, seq);
