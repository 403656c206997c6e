-- Approval requests, reviews and grants (SQLite). Times are unix seconds; JSON is stored as
-- text; ids are UUID strings. Mirrors migrations/postgres: change both together.

CREATE TABLE approval_requests (
    -- Insertion order: the list cursor and "oldest first".
    seq                 INTEGER PRIMARY KEY AUTOINCREMENT,
    id                  TEXT    NOT NULL UNIQUE,
    binding_hash        TEXT    NOT NULL,
    principal           TEXT    NOT NULL,
    action              TEXT    NOT NULL,
    action_properties   TEXT,
    resource            TEXT    NOT NULL,
    context             TEXT    NOT NULL,
    policy_version      TEXT    NOT NULL,
    policy_ids          TEXT    NOT NULL,
    groups              TEXT    NOT NULL,
    current_groups      TEXT    NOT NULL,
    quorum              INTEGER NOT NULL CHECK (quorum >= 1),
    evidence            TEXT    NOT NULL,
    grant_ttl_secs      INTEGER NOT NULL CHECK (grant_ttl_secs >= 0),
    fallback_group      TEXT,
    fallback_after_secs INTEGER,
    status              TEXT    NOT NULL
        CHECK (status IN ('pending', 'approved', 'denied', 'expired', 'cancelled')),
    created_at          INTEGER NOT NULL,
    expires_at          INTEGER NOT NULL,
    fallback_at         INTEGER,
    fell_back_at        INTEGER,
    decided_at          INTEGER,
    version             INTEGER NOT NULL,
    -- A final state always records when it was reached.
    CHECK ((status = 'pending') = (decided_at IS NULL)),
    CHECK ((fallback_group IS NULL) = (fallback_after_secs IS NULL))
);

-- At most one pending request per binding hash: a retrying agent gets the existing request,
-- not a new one (no approval flood), even under concurrency.
CREATE UNIQUE INDEX approval_requests_one_pending
    ON approval_requests (binding_hash) WHERE status = 'pending';
CREATE INDEX approval_requests_status ON approval_requests (status, expires_at);

CREATE TABLE approval_reviews (
    request_id      TEXT    NOT NULL REFERENCES approval_requests (id),
    approver_id     TEXT    NOT NULL,
    approver_issuer TEXT    NOT NULL,
    verdict         TEXT    NOT NULL CHECK (verdict IN ('approve', 'deny')),
    rationale       TEXT    NOT NULL,
    evidence        TEXT    NOT NULL,
    at              INTEGER NOT NULL,
    -- One review per approver per request: a quorum counts distinct approvers (SECURITY A-13).
    PRIMARY KEY (request_id, approver_id)
);

CREATE TABLE grants (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    id             TEXT    NOT NULL UNIQUE,
    -- One grant per request: two racing final approvals cannot both create one.
    request_id     TEXT    NOT NULL UNIQUE REFERENCES approval_requests (id),
    binding_hash   TEXT    NOT NULL,
    policy_version TEXT    NOT NULL,
    created_at     INTEGER NOT NULL,
    expires_at     INTEGER NOT NULL,
    revoked_at     INTEGER
);
CREATE INDEX grants_binding_hash ON grants (binding_hash, expires_at);
