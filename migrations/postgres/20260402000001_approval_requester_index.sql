-- Per-principal escalation limits (SECURITY A-16) count a principal's requests at every new
-- escalation: the store's count queries use exactly this expression. Mirrors the other backend.
CREATE INDEX approval_requests_requester
    ON approval_requests ((principal->>'id'), created_at);
