-- Helper objects for the pgward policy engine (src/policy).
-- pgward.assert_row(ok, msg) is how write checks are enforced *inside* the database:
-- the rewriter wraps every written row's check in it, so values bound to $n parameters are
-- verified by PostgreSQL itself. A false or NULL check raises SQLSTATE 42501 with msg.
CREATE SCHEMA IF NOT EXISTS pgward;

CREATE OR REPLACE FUNCTION pgward.assert_row(ok boolean, msg text) RETURNS boolean
    LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    IF ok IS NOT TRUE THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = msg;
    END IF;
    RETURN true;
END
$$;
