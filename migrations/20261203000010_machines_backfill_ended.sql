-- Machines recorded from slots when the machines table was made (no image, no type) whose
-- booking is over were given no termination time, so their running time grew for ever: they
-- ended when their booking was last updated (its teardown, cancellation or failure).
UPDATE machines m
   SET terminated_at = GREATEST(m.launched_at, b.updated_at)
  FROM bookings b
 WHERE b.booking_id = m.booking_id
   AND m.terminated_at IS NULL
   AND m.image_id IS NULL
   AND m.instance_type IS NULL
   AND b.state IN ('ended', 'cancelled', 'failed');
