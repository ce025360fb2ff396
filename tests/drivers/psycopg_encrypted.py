"""psycopg 3 against encrypted columns through pgward: values of every configured type written
with server-side parameters and read back in text and binary format, equality search, NULLs,
and a refused computation on ciphertext.

Run by tests/it/encryption.rs with PGWARD_DSN set and the table `vault_items` created;
exits non-zero on the first failed check.
"""
import datetime
import decimal
import os

import psycopg
from psycopg.types.json import Jsonb

from driver_check import check


COLUMNS = "c_text, c_varchar, c_int4, c_int8, c_numeric, c_bool, c_date, c_tstz, c_bytea, c_jsonb"


def main():
    dsn = os.environ["PGWARD_DSN"]
    utc = datetime.timezone.utc
    row = (
        "psycopg-secret ✓",
        "",
        -42,
        2**40,
        decimal.Decimal("12.50"),
        True,
        datetime.date(2031, 2, 3),
        datetime.datetime(2026, 11, 25, 6, 30, 1, 250000, tzinfo=utc),
        b"\x00\x01psycopg",
        {"k": ["v", 1]},
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.cursor()
        values = list(row[:-1]) + [Jsonb(row[-1])]
        cur.execute(
            f"insert into vault_items (id, {COLUMNS}) values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            [1000] + values,
        )
        cur.execute(f"insert into vault_items (id, {COLUMNS}) values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    [1001] + [None] * 10)
        for binary in (False, True):
            c = conn.cursor(binary=binary)
            c.execute(f"select {COLUMNS} from vault_items where id = %s", (1000,))
            got = c.fetchone()
            check(got == row, f"round trip (binary={binary}): {got!r}")
            c.execute(f"select {COLUMNS} from vault_items where id = %s", (1001,))
            check(c.fetchone() == (None,) * 10, f"NULLs (binary={binary})")
        # A named prepared statement, reused, searching by blind index.
        for _ in range(6):
            cur.execute("select id from vault_items where c_text = %s", ("psycopg-secret ✓",), prepare=True)
            check(cur.fetchall() == [(1000,)], "equality search")
        cur.execute("select id from vault_items where c_int4 in (%s, %s)", (-42, 7))
        check(cur.fetchall() == [(1000,)], "IN search on int4")
        try:
            cur.execute("select id from vault_items where c_text like %s", ("psycopg%",))
            check(False, "LIKE on an encrypted column was not refused")
        except psycopg.errors.FeatureNotSupported as e:
            check("vault_items.c_text" in str(e), f"refusal names the column: {e}")
        cur.execute("select 1")
        check(cur.fetchone() == (1,), "session usable after a refusal")
    server_side_cursors(dsn, row)
    print("all checks passed")


def server_side_cursors(dsn, row):
    """Named cursors (DECLARE … FETCH in chunks of itersize, as Django's iterator() and
    SQLAlchemy's stream_results use them): decrypted rows, searches by blind index."""
    with psycopg.connect(dsn) as conn:
        for binary in (False, True):
            with conn.cursor(name=f"vault cursor {binary}", binary=binary) as cur:
                cur.itersize = 1
                cur.execute(f"select {COLUMNS} from vault_items where id in (%s, %s) order by id", (1000, 1001))
                check(cur.description[0].type_code == 25, f"described as text: {cur.description}")
                got = list(cur)
                check(got == [row, (None,) * 10], f"server-side cursor (binary={binary}): {got!r}")
            with conn.cursor(name=f"vault search {binary}", binary=binary) as cur:
                cur.execute("select id, c_text from vault_items where c_text = %s", ("psycopg-secret ✓",))
                check(cur.fetchall() == [(1000, "psycopg-secret ✓")], "search through a server-side cursor")
        with conn.cursor(name="vault computed") as cur:
            try:
                cur.execute("select length(c_text) from vault_items")
                cur.fetchall()
                check(False, "a computation on ciphertext through a cursor was not refused")
            except psycopg.errors.FeatureNotSupported as e:
                check("vault_items.c_text" in str(e), f"refusal names the column: {e}")
        conn.rollback()


if __name__ == "__main__":
    main()
