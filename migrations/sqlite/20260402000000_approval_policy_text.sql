-- The Cedar source of the policies that asked for approval, as a JSON object id -> text, kept
-- with the request so the approver sees them as they were in the request's policy version.
-- Requests stored before this migration have none. Mirrors migrations/postgres.
ALTER TABLE approval_requests ADD COLUMN policy_text TEXT NOT NULL DEFAULT '{}';
