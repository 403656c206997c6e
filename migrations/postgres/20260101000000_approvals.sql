-- Approval requests, reviews and grants (PostgreSQL). Times are unix seconds; JSON is jsonb.
-- Mirrors migrations/sqlite: change both together.

CREATE TABLE approval_requests (
    -- Insertion order: the list cursor and "oldest first".
    seq                 BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id                  UUID    NOT NULL UNIQUE,
    binding_hash        TEXT    NOT NULL,
    principal           JSONB   NOT NULL,
    action              TEXT    NOT NULL,
    action_properties   JSONB,
    resource            JSONB   NOT NULL,
    context             JSONB   NOT NULL,
    policy_version      TEXT    NOT NULL,
    policy_ids          JSONB   NOT NULL,
    groups              JSONB   NOT NULL,
    current_groups      JSONB   NOT NULL,
    quorum              BIGINT  NOT NULL CHECK (quorum >= 1),
    evidence            JSONB   NOT NULL,
    grant_ttl_secs      BIGINT  NOT NULL CHECK (grant_ttl_secs >= 0),
    fallback_group      TEXT,
    fallback_after_secs BIGINT,
    status              TEXT    NOT NULL
        CHECK (status IN ('pending', 'approved', 'denied', 'expired', 'cancelled')),
    created_at          BIGINT  NOT NULL,
    expires_at          BIGINT  NOT NULL,
    fallback_at         BIGINT,
    fell_back_at        BIGINT,
    decided_at          BIGINT,
    version             BIGINT  NOT NULL,
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
    request_id      UUID    NOT NULL REFERENCES approval_requests (id),
    approver_id     TEXT    NOT NULL,
    approver_issuer TEXT    NOT NULL,
    verdict         TEXT    NOT NULL CHECK (verdict IN ('approve', 'deny')),
    rationale       TEXT    NOT NULL,
    evidence        JSONB   NOT NULL,
    at              BIGINT  NOT NULL,
    -- Recording order, for listing reviews.
    seq             BIGINT  GENERATED ALWAYS AS IDENTITY,
    -- One review per approver per request: a quorum counts distinct approvers (SECURITY A-13).
    PRIMARY KEY (request_id, approver_id)
);

CREATE TABLE grants (
    seq            BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id             UUID    NOT NULL UNIQUE,
    -- One grant per request: two racing final approvals cannot both create one.
    request_id     UUID    NOT NULL UNIQUE REFERENCES approval_requests (id),
    binding_hash   TEXT    NOT NULL,
    policy_version TEXT    NOT NULL,
    created_at     BIGINT  NOT NULL,
    expires_at     BIGINT  NOT NULL,
    revoked_at     BIGINT
);
CREATE INDEX grants_binding_hash ON grants (binding_hash, expires_at);
