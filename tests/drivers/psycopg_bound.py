"""psycopg 3 as a policy-bound service (billing, tenant 1) through pgward over TLS, in both
protocols, with the client encoding spelled the way libpq users do (PGCLIENTENCODING=utf-8).

Run by tests/it/compat.rs with PGWARD_DSN set; exits non-zero on the first failed check.
"""
import os

import psycopg

from driver_check import check


def main():
    with psycopg.connect(os.environ["PGWARD_DSN"]) as conn:
        check(conn.info.encoding == "utf-8", f"encoding {conn.info.encoding}")
        tenants = {r[0] for r in conn.execute("select tenant_id from customers")}
        check(tenants == {1}, f"only tenant 1, got {tenants}")
        n = conn.execute("select count(*) from invoices where tenant_id = %s", (2,)).fetchone()[0]
        check(n == 0, "no invoices of tenant 2")
        conn.execute("set client_encoding to 'UTF-8'")
        check(conn.execute("select 'ü'").fetchone()[0] == "ü", "UTF-8 round trip")
    print("all checks passed")


main()
