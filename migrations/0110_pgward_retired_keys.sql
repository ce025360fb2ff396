-- pgward field encryption: retired data keys (`pgward keys retire`).
-- Idempotent: safe to apply on every start. Needs 0100_pgward_keys.sql.

-- The KEK version that first wrapped each data key, taken from the wrapped form
-- ("vault:v<N>:..."), which is what Vault unwraps by. `keys rewrap` changes kek_version
-- and wrapped, never this: a backup taken before a rewrap holds the data key wrapped by
-- an older KEK version, at the oldest this one. NULL for keys stored before this column.
ALTER TABLE pgward.data_keys ADD COLUMN IF NOT EXISTS first_kek_version integer;

CREATE OR REPLACE FUNCTION pgward.data_keys_first_kek_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.first_kek_version := coalesce(
        NEW.first_kek_version,
        substring(NEW.wrapped from '^vault:v([0-9]+):')::integer,
        NEW.kek_version
    );
    RETURN NEW;
END
$$;

DROP TRIGGER IF EXISTS data_keys_first_kek_version ON pgward.data_keys;
CREATE TRIGGER data_keys_first_kek_version BEFORE INSERT ON pgward.data_keys
    FOR EACH ROW EXECUTE FUNCTION pgward.data_keys_first_kek_version();

-- Keys never rewrapped are still wrapped by the KEK version that first wrapped them.
UPDATE pgward.data_keys
   SET first_kek_version = substring(wrapped from '^vault:v([0-9]+):')::integer
 WHERE first_kek_version IS NULL AND rewrapped_at IS NULL;

-- Data keys removed by `pgward keys retire` once no value was left under them (every value
-- was re-encrypted under a newer data key). Only facts are kept, never the wrapped key: a
-- live pgward can no longer decrypt anything under a retired key. Backups taken before
-- retired_at still hold the wrapped key, wrapped by a KEK version between
-- first_kek_version and kek_version: they stay readable as long as Vault keeps that
-- KEK version (min_decryption_version at or below it, not trimmed).
CREATE TABLE IF NOT EXISTS pgward.retired_keys (
    key_name          text        NOT NULL,
    dek_version       integer     NOT NULL CHECK (dek_version > 0),
    -- KEK version wrapping the data key when it was retired (read from the wrapped form).
    kek_version       integer     NOT NULL CHECK (kek_version >= 0),
    -- KEK version that first wrapped it; NULL when not recorded.
    first_kek_version integer,
    created_at        timestamptz NOT NULL,
    rewrapped_at      timestamptz,
    retired_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (key_name, dek_version)
);
