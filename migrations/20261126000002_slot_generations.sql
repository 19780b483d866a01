-- A slot's launch generation: raised when the slot's machine is to be launched again (a replay
-- of a failed booking), so the new launch gets a new EC2 ClientToken. Generation 0 keeps the
-- tokens of machines launched before.
ALTER TABLE slots ADD COLUMN generation INTEGER NOT NULL DEFAULT 0 CHECK (generation >= 0);

-- The provisioner records instance states by instance id.
CREATE INDEX slots_instance_id ON slots (instance_id) WHERE instance_id IS NOT NULL;
