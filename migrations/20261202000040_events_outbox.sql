-- Events as an outbox (docs/contract.md §7: per booking, in order, at least once). An event
-- row is written in the transaction of the step it reports, under the booking's lock, with the
-- next number of the booking's own sequence; a relay in every worker publishes the rows of each
-- booking in that order with confirms and marks them published. A step done again marks its
-- row unpublished, so the recorded body goes out again.
ALTER TABLE booking_events
    ADD COLUMN booking_seq  INTEGER,
    ADD COLUMN published_at TIMESTAMPTZ,
    ADD COLUMN traceparent  TEXT;

-- Rows written before the outbox were published when they were written.
UPDATE booking_events SET published_at = at;
UPDATE booking_events e SET booking_seq = n.seq_in_booking
  FROM (SELECT seq, row_number() OVER (PARTITION BY booking_id ORDER BY seq) AS seq_in_booking
          FROM booking_events) n
 WHERE e.seq = n.seq;

ALTER TABLE booking_events ALTER COLUMN booking_seq SET NOT NULL;
CREATE UNIQUE INDEX booking_events_order ON booking_events (booking_id, booking_seq);
CREATE INDEX booking_events_unpublished ON booking_events (booking_id, booking_seq)
    WHERE published_at IS NULL;
