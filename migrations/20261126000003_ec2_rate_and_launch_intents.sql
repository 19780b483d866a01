-- Client-side rate limits on EC2 API calls, shared by every provisioner replica: one token
-- bucket per EC2 action (RunInstances, DescribeInstances, ...), refilled by the time elapsed
-- since updated_at (database clock) and capped at the configured burst. Rows are made on first use.
CREATE TABLE ec2_rate (
    action      TEXT PRIMARY KEY,
    tokens      DOUBLE PRECISION NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);

-- A slot's RunInstances call, recorded just before it is made. A slot with an intent for its
-- generation but no instance recorded had a launch whose outcome is unknown: only then is EC2
-- searched by tag before launching.
CREATE TABLE launch_intents (
    booking_id    TEXT NOT NULL REFERENCES bookings (booking_id) ON DELETE CASCADE,
    slot          INTEGER NOT NULL CHECK (slot >= 0),
    generation    INTEGER NOT NULL CHECK (generation >= 0),
    requested_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (booking_id, slot, generation)
);

-- Slots left without an instance before intents were recorded may have had a launch: they are
-- searched for, as before.
INSERT INTO launch_intents (booking_id, slot, generation)
SELECT booking_id, slot, generation FROM slots WHERE instance_id IS NULL;
