"""The admin console (database `pgward`) through two more drivers: asyncpg (named prepared
statements, Describe of the statement, binary results) and psycopg 3 (the extended protocol
for every execute, unnamed and server-prepared, text and binary results).

Run by tests/it/console.rs with PGWARD_PORT, PGWARD_TOKEN and PGWARD_DATABASE (= pgward) set,
and PGWARD_DSN for psycopg; exits non-zero on the first failed check.
"""
import asyncio
import os

import psycopg

from driver_check import check, connect_asyncpg


async def asyncpg_checks():
    conn = await connect_asyncpg("ops")
    clients = await conn.fetch("SHOW CLIENTS")
    check(len(clients) >= 1, f"asyncpg: SHOW CLIENTS lists this session: {clients}")
    mine = [c for c in clients if c["user"] == "ops" and c["pool_mode"] == "console"]
    check(len(mine) == 1, f"asyncpg: one console client: {clients}")
    check(isinstance(mine[0]["port"], int) and mine[0]["port"] > 0, "asyncpg: port is an integer")
    check(mine[0]["server_pid"] is None, "asyncpg: a console session holds no server")
    pools = await conn.fetch("show pools;")
    pooled = [p for p in pools if p["pool_mode"] == "transaction"]
    check(len(pooled) == 1 and pooled[0]["pool_size"] == 3, f"asyncpg: the pooled pool: {pools}")
    # The same statement again: asyncpg's statement cache reuses the named statement.
    again = await conn.fetch("SHOW CLIENTS")
    check([c["id"] for c in again] == [c["id"] for c in clients], "asyncpg: cached statement")
    stats = await conn.fetch("SHOW STATS")
    check(any(s["user"] == "pooled" for s in stats), f"asyncpg: SHOW STATS: {stats}")
    try:
        await conn.fetch("SELECT 1")
        check(False, "asyncpg: SELECT on the console is refused")
    except asyncpg_error() as error:
        check(error.sqlstate == "0A000", f"asyncpg: 0A000, got {error.sqlstate}")
    # The session goes on after the error.
    check(len(await conn.fetch("SHOW SERVERS")) >= 0, "asyncpg: usable after an error")
    await conn.close()


def asyncpg_error():
    import asyncpg

    return asyncpg.PostgresError


def psycopg_checks():
    with psycopg.connect(os.environ["PGWARD_DSN"], autocommit=True) as conn:
        rows = conn.execute("SHOW POOLS").fetchall()
        names = [d.name for d in conn.execute("SHOW POOLS").description]
        check("cl_active" in names and "pool_size" in names, f"psycopg: POOLS columns {names}")
        check(len(rows) >= 1, f"psycopg: SHOW POOLS rows {rows}")
        # Server-side prepared (named Parse, then Bind/Execute on later runs).
        for _ in range(3):
            clients = conn.execute("SHOW CLIENTS", prepare=True).fetchall()
            check(len(clients) >= 1, "psycopg: prepared SHOW CLIENTS")
        # Binary results.
        with conn.cursor(binary=True) as cur:
            cur.execute("SHOW CLIENTS")
            columns = [d.name for d in cur.description]
            row = dict(zip(columns, cur.fetchone()))
            check(isinstance(row["port"], int), f"psycopg: binary port {row}")
        try:
            conn.execute("show databases")
            check(False, "psycopg: show databases is refused")
        except psycopg.errors.FeatureNotSupported:
            pass
        check(conn.execute("SHOW HELP").fetchall() != [], "psycopg: usable after an error")


asyncio.run(asyncpg_checks())
psycopg_checks()
print("all checks passed")
