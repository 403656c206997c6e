-- Signed checkpoints of each sidecar's audit chain (shared/DESIGN.md §5), kept where the
-- log's writer cannot rewrite them. `log_id` is the hash of the log's first record: the
-- chain's own name, distinct for every log of a fleet sharing this database.
CREATE TABLE audit_checkpoints (
    log_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL,
    at BIGINT NOT NULL,
    key_id TEXT NOT NULL,
    signature TEXT NOT NULL,
    PRIMARY KEY (log_id, seq)
);
