-- pgward field encryption: blind-index root rotation (`pgward keys rotate-index`).
-- Idempotent: safe to apply on every start. Needs 0100_pgward_keys.sql.
--
-- The blind-index root a key name's index values are computed with is pgward.data_keys
-- DEK version 0. A rotation stores the next root here (wrapped by the KEK like any data
-- key) while both live: writes compute indexes with the new root, searches match either.
-- `pgward keys reencrypt` recomputes every index made with the old root; once every
-- searchable column of the key is done it moves the new root into DEK version 0 (the old
-- root's wrapped form is overwritten: no live pgward can compute it again) and records
-- completed_at here. root_version counts roots: the first root of a key name is version 1.
CREATE TABLE IF NOT EXISTS pgward.index_roots (
    key_name     text        NOT NULL,
    root_version integer     NOT NULL CHECK (root_version > 1),
    kek_version  integer     NOT NULL CHECK (kek_version >= 0),
    provider     text        NOT NULL,
    -- The new root's wrapped form while the rotation is in progress; NULL once it moved
    -- into pgward.data_keys.
    wrapped      text,
    started_at   timestamptz NOT NULL DEFAULT now(),
    completed_at timestamptz,
    PRIMARY KEY (key_name, root_version),
    CHECK ((completed_at IS NULL) = (wrapped IS NOT NULL))
);

-- At most one rotation in progress per key name.
CREATE UNIQUE INDEX IF NOT EXISTS index_roots_one_in_progress
    ON pgward.index_roots (key_name) WHERE completed_at IS NULL;
