-- The account's vCPU quota and what runs against it, as the provisioner last read them (from
-- Service Quotas and EC2), for the intake to compare each booking's machines with.
CREATE TABLE account_capacity (
    id                 BOOLEAN PRIMARY KEY DEFAULT true CHECK (id),
    quota_vcpus        DOUBLE PRECISION NOT NULL,
    other_vcpus        BIGINT NOT NULL,
    vcpus_per_machine  INTEGER NOT NULL,
    read_at            TIMESTAMPTZ NOT NULL DEFAULT now()
);
