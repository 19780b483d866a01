-- Version 3 of the contract: a machine's way to ready is durable state, advanced by the
-- readiness loop every provisioner replica runs (claiming due rows with FOR UPDATE SKIP LOCKED),
-- not a delivery held through the boot.

-- `next_check_at`: when the loop looks at the slot's machine next (NULL: nothing to watch).
-- `ready_at`: when its machine was seen ready; a ready machine is never polled again.
-- `console_reads`: GetConsoleOutput calls spent on the machine (the boot benchmark's figure).
-- `console_buffered`: EC2 refused the live console (`Latest`) for the machine's type, so the
-- buffered copy is read. `http_only`: why the machine could not set up HTTPS (its bootstrap
-- said so), so its lab is served over HTTP. `image_id`: the AMI the machine booted from.
ALTER TABLE slots
    ADD COLUMN next_check_at     TIMESTAMPTZ,
    ADD COLUMN ready_at          TIMESTAMPTZ,
    ADD COLUMN console_reads     INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN console_buffered  BOOLEAN NOT NULL DEFAULT false,
    ADD COLUMN http_only         TEXT,
    ADD COLUMN image_id          TEXT;
CREATE INDEX slots_watch ON slots (next_check_at)
    WHERE next_check_at IS NOT NULL AND ready_at IS NULL AND instance_id IS NOT NULL;

-- Machines of bookings provisioned before this version were ready when their email went out;
-- machines of bookings being provisioned now are watched by the loop from the start.
UPDATE slots s SET ready_at = COALESCE(s.launched_at, now())
FROM bookings b
WHERE b.booking_id = s.booking_id AND s.instance_id IS NOT NULL
  AND b.state IN ('provisioned', 'ended', 'failed', 'cancelled');
UPDATE slots s SET next_check_at = now()
FROM bookings b
WHERE b.booking_id = s.booking_id AND s.instance_id IS NOT NULL AND s.ready_at IS NULL;

-- Every machine labbook launched, one row per instance, kept after its slot moves on: when it
-- was launched, became ready and was terminated, from which image and of which type. Boot
-- durations (the scheduler's expected boot time) and running time (a booking's cost) come
-- from here.
CREATE TABLE machines (
    instance_id    TEXT PRIMARY KEY,
    booking_id     TEXT NOT NULL,
    slot           INTEGER NOT NULL,
    generation     INTEGER NOT NULL,
    image_id       TEXT,
    instance_type  TEXT,
    subnet_id      TEXT,
    launched_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    ready_at       TIMESTAMPTZ,
    boot_seconds   DOUBLE PRECISION,
    terminated_at  TIMESTAMPTZ
);
CREATE INDEX machines_booking ON machines (booking_id);
CREATE INDEX machines_boots ON machines (image_id, ready_at DESC) WHERE boot_seconds IS NOT NULL;
INSERT INTO machines (instance_id, booking_id, slot, generation, image_id, launched_at, ready_at)
SELECT instance_id, booking_id, slot, generation, NULL, COALESCE(launched_at, now()), ready_at
FROM slots WHERE instance_id IS NOT NULL
ON CONFLICT DO NOTHING;

-- Stage messages a step decided on, written in the step's transaction and published after it
-- commits (so a consumer never sees the message before the state it follows), then deleted.
-- A row left by a process that died between the commit and the publish is published by the
-- next boot watch tick of any replica.
CREATE TABLE stage_outbox (
    id          BIGSERIAL PRIMARY KEY,
    queue       TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    body        BYTEA NOT NULL,
    traceparent TEXT,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The W3C trace a booking was stored under (its first message's, or a new one): what the timer
-- and the boot watch publish for it continues that trace.
ALTER TABLE bookings ADD COLUMN traceparent TEXT;

-- Launch intents of generations before a slot's current one are resolved: their machines were
-- recorded (and retired when the slot moved on). From here on a launch whose outcome stayed
-- unknown when its slot moved on is searched for by its generation's tag.
DELETE FROM launch_intents i USING slots s
WHERE s.booking_id = i.booking_id AND s.slot = i.slot AND i.generation < s.generation;

-- Offerings (an instance type in a subnet; '' for the default VPC's choice) EC2 just had no
-- capacity for: every provisioner replica skips them until `blocked_until`.
CREATE TABLE offering_blocks (
    instance_type  TEXT NOT NULL,
    subnet_id      TEXT NOT NULL DEFAULT '',
    blocked_until  TIMESTAMPTZ NOT NULL,
    reason         TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (instance_type, subnet_id)
);
