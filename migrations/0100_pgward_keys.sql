-- pgward field encryption: wrapped data keys and online re-encryption progress.
-- Idempotent: safe to apply on every start.
CREATE SCHEMA IF NOT EXISTS pgward;

-- One row per data key (DEK). Only the wrapped form is stored: for the transit
-- provider `wrapped` is the Vault transit ciphertext ("vault:v<kek>:..."), useless
-- without access to the KEK in Vault. dek_version 0 is the key name's blind-index
-- root key, which never rotates.
CREATE TABLE IF NOT EXISTS pgward.data_keys (
    key_name     text        NOT NULL,
    dek_version  integer     NOT NULL CHECK (dek_version >= 0),
    kek_version  integer     NOT NULL CHECK (kek_version >= 0),
    provider     text        NOT NULL,
    wrapped      text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    rewrapped_at timestamptz,
    PRIMARY KEY (key_name, dek_version)
);

-- Resumable batch jobs (`keys reencrypt`, `encrypt-existing`): the last primary key
-- processed, so a restarted job continues where the crashed one stopped.
CREATE TABLE IF NOT EXISTS pgward.job_progress (
    job          text        NOT NULL,
    table_name   text        NOT NULL,
    column_name  text        NOT NULL,
    last_pk      text,
    rows_done    bigint      NOT NULL DEFAULT 0,
    started_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    PRIMARY KEY (job, table_name, column_name)
);

-- Values encrypted under each DEK, summed over every pgward instance (each adds its
-- count at every key poll). A DEK is replaced before it reaches keys.dek_max_encryptions:
-- random 96-bit GCM nonces allow a bounded number of encryptions per key (NIST SP 800-38D 8.3).
ALTER TABLE pgward.data_keys ADD COLUMN IF NOT EXISTS encryptions bigint NOT NULL DEFAULT 0;

-- Key names whose data keys were destroyed on purpose (`pgward keys shred`): their KEK is
-- deleted from Vault and their wrapped DEKs from pgward.data_keys, so values under them can
-- never be decrypted again, from this database or from any backup. The row stays so every
-- pgward stops serving the name at its next poll (a restored backup still holds the old
-- wrapped DEKs, useless without the KEK) and `keys status` can say since when.
-- key_name is the per-tenant key name (a hash), never the tenant id itself.
CREATE TABLE IF NOT EXISTS pgward.destroyed_keys (
    key_name       text        PRIMARY KEY,
    configured_key text        NOT NULL,
    reason         text        NOT NULL,
    destroyed_at   timestamptz NOT NULL DEFAULT now()
);

REVOKE ALL ON SCHEMA pgward FROM PUBLIC;

-- Used by `pgward encrypt-existing` while it copies a plaintext column into its
-- encrypted twin: an application UPDATE of the plaintext clears the stale
-- encrypted copy (TG_ARGV = the columns to clear) so the final pass redoes it.
CREATE OR REPLACE FUNCTION pgward.invalidate_encrypted_copy() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    col text;
BEGIN
    FOREACH col IN ARRAY TG_ARGV LOOP
        NEW := jsonb_populate_record(NEW, jsonb_build_object(col, NULL));
    END LOOP;
    RETURN NEW;
END
$$;
