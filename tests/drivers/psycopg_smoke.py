"""psycopg 3 through pgward: server-side parameter binding (extended protocol), prepared
statements, pipeline mode, binary results, COPY, and recovery after an error.

Run by tests/it/tools.rs with PGWARD_DSN set; exits non-zero on the first failed check.
"""
import os

import psycopg

from driver_check import check


def main():
    dsn = os.environ["PGWARD_DSN"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.cursor()
        # Server-side binding: psycopg 3 sends Parse/Bind/Execute for parametrised queries.
        cur.execute("select %s::int + %s::int, %s::text", (40, 2, "héllo"))
        check(cur.fetchone() == (42, "héllo"), "parametrised query")
        # prepare=True: a named server-side prepared statement, reused.
        for i in range(8):
            cur.execute("select %s::int * 2", (i,), prepare=True)
            check(cur.fetchone() == (i * 2,), f"prepared execution {i}")
        # Binary result format.
        bcur = conn.cursor(binary=True)
        bcur.execute("select %s::int8, %s::float8, now() is not null", (2**40, 1.5))
        check(bcur.fetchone() == (2**40, 1.5, True), "binary results")
        # Pipeline mode: many statements before a Sync.
        with conn.pipeline():
            cur.execute("create temp table drv(a int, b text)")
            cur.executemany("insert into drv values (%s, %s)", [(i, str(i)) for i in range(100)])
        cur.execute("select count(*), sum(a) from drv")
        check(cur.fetchone() == (100, 4950), "pipelined executemany")
        # COPY in and out.
        with cur.copy("copy drv from stdin") as copy:
            for i in range(100, 200):
                copy.write_row((i, f"row {i}"))
        out = bytearray()
        with cur.copy("copy (select a from drv where a >= 195 order by a) to stdout") as copy:
            for chunk in copy:
                out += chunk
        check(bytes(out) == b"195\n196\n197\n198\n199\n", "copy out")
        # An error, then the session keeps working.
        try:
            cur.execute("select 1 / %s", (0,))
            check(False, "division by zero raised")
        except psycopg.errors.DivisionByZero:
            pass
        cur.execute("select 'still fine'")
        check(cur.fetchone() == ("still fine",), "recovery after error")
        # A transaction with a savepoint.
        with conn.transaction():
            cur.execute("insert into drv values (-1, 'tx')")
            try:
                with conn.transaction():
                    cur.execute("insert into drv values ('bad', 'x')")
            except psycopg.errors.InvalidTextRepresentation:
                pass
        cur.execute("select count(*) from drv where a = -1")
        check(cur.fetchone() == (1,), "savepoint rollback kept the outer insert")
    print("psycopg: all checks passed")


if __name__ == "__main__":
    main()
