"""psycopg 3 type and schema introspection through pgward as a policy-bound service, over TLS.

Run by tests/it/catalog.rs with PGWARD_DSN set (a bound service's token as password); exits
non-zero on the first failed check.
"""
import os
import sys

import psycopg
from psycopg.types import TypeInfo
from psycopg.types.range import RangeInfo


def check(condition, what):
    if not condition:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


with psycopg.connect(os.environ["PGWARD_DSN"]) as conn:
    check(conn.pgconn.ssl_in_use, "TLS in use")
    info = TypeInfo.fetch(conn, "int4")
    check(info is not None and info.oid == 23, f"TypeInfo int4: {info}")
    info = TypeInfo.fetch(conn, "text[]")
    check(info is not None, f"TypeInfo text[]: {info}")
    rng = RangeInfo.fetch(conn, "int4range")
    check(rng is not None and rng.subtype_oid == 23, f"RangeInfo int4range: {rng}")
    # Columns as an ORM reflects them: only what the policy shows.
    cols = [
        r[0]
        for r in conn.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_name = 'customers' ORDER BY ordinal_position"
        )
    ]
    check("id" in cols and "tenant_id" in cols, f"customers columns: {cols}")
    tables = sorted(
        r[0]
        for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
    )
    check(tables == ["customers", "invoices"], f"tables: {tables}")
print("all checks passed")
