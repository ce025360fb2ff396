"""psycopg 3's server-side (named) cursor as a policy-bound service (support, tenant 1) through
pgward: DECLARE, FETCH FORWARD in chunks of `itersize`, CLOSE, as psycopg sends them. Prints
the number of rows read.

Run by tests/it/audit_statements.rs with PGWARD_DSN set; exits non-zero on a failed check.
"""
import os

import psycopg

from driver_check import check


def main():
    with psycopg.connect(os.environ["PGWARD_DSN"]) as conn:
        with conn.cursor(name="Named Cursor") as cur:
            cur.itersize = 2
            cur.execute("SELECT name FROM customers ORDER BY id")
            check(cur.description[0].name == "name", f"description {cur.description}")
            rows = list(cur)
        check(len(rows) >= 2, f"rows {rows}")
        print(f"rows read: {len(rows)}")
    print("all checks passed")


main()
