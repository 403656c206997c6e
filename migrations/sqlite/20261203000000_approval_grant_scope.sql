-- What the grant of an approved request allows (`@grant_scope`): `call` (exactly the request,
-- the only scope before this migration), `tool` or `resource`. The binding hash is of this
-- scope. Mirrors migrations/postgres.
ALTER TABLE approval_requests ADD COLUMN grant_scope TEXT NOT NULL DEFAULT 'call';
