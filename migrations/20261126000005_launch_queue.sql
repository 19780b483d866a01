-- Launches waiting for the account's RunInstances budget, ranked by their booking's time: the
-- shared rate limit gives a token to a launch only when no live waiter of an earlier booking is
-- ahead of it (a waiter refreshes `seen_at` while it waits; one not seen for a while is gone).
CREATE TABLE ec2_rate_waiters (
    action    TEXT NOT NULL,
    waiter    TEXT NOT NULL,
    rank      TIMESTAMPTZ NOT NULL,
    seen_at   TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (action, waiter)
);
CREATE INDEX ec2_rate_waiters_rank ON ec2_rate_waiters (action, rank, waiter);
