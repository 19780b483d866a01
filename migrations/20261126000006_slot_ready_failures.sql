-- How many times a slot's machine started but did not become ready (its bootstrap failed or did
-- not report in time). The first time the machine is replaced; the second time the booking fails.
ALTER TABLE slots ADD COLUMN ready_failures INTEGER NOT NULL DEFAULT 0 CHECK (ready_failures >= 0);
