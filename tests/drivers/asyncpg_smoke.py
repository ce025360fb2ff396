"""asyncpg through pgward, over TLS: asyncpg speaks only the extended protocol with binary
formats, caches prepared statements, pipelines executemany, and uses COPY — a strict test of
the relay's fidelity.

Run by tests/it/tools.rs with PGWARD_PORT, PGWARD_TOKEN and PGWARD_DATABASE set; exits non-zero
on the first failed check.
"""
import asyncio
import datetime
import decimal
import uuid

import asyncpg

from driver_check import check, connect_asyncpg


async def main():
    conn = await connect_asyncpg("app")
    check(conn.get_server_pid() != 0, "a backend key")
    # Binary types both ways.
    row = await conn.fetchrow(
        "select $1::int8, $2::numeric, $3::uuid, $4::timestamptz, $5::jsonb, $6::bytea, $7::text[]",
        2**40, decimal.Decimal("12.345"), uuid.UUID(int=7),
        datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
        '{"a": [1, 2]}', b"\x00\x01\xff", ["x", "y"],
    )
    check(row[0] == 2**40 and row[1] == decimal.Decimal("12.345"), "int8/numeric")
    check(row[2] == uuid.UUID(int=7) and row[5] == b"\x00\x01\xff", "uuid/bytea")
    check(row[6] == ["x", "y"], "text[]")
    # Prepared statement cache: the same text many times.
    for i in range(20):
        check(await conn.fetchval("select $1::int * 3", i) == i * 3, f"cached statement {i}")
    stmt = await conn.prepare("select generate_series(1, $1::int) as n")
    check([r["n"] for r in await stmt.fetch(5)] == [1, 2, 3, 4, 5], "explicit prepare")
    # Transactions, executemany (pipelined), savepoints.
    await conn.execute("create temp table drv(a int primary key, b text)")
    async with conn.transaction():
        await conn.executemany("insert into drv values ($1, $2)", [(i, str(i)) for i in range(200)])
        try:
            async with conn.transaction():  # a savepoint
                await conn.execute("insert into drv values (1, 'dup')")
        except asyncpg.UniqueViolationError:
            pass
    check(await conn.fetchval("select count(*) from drv") == 200, "executemany + savepoint")
    # An error mid-transaction, then the session goes on.
    try:
        async with conn.transaction():
            await conn.execute("select 1/0")
    except asyncpg.DivisionByZeroError:
        pass
    check(await conn.fetchval("select 1") == 1, "session usable after an error")
    # COPY in and out (binary COPY in asyncpg's copy_records_to_table).
    await conn.copy_records_to_table("drv", records=[(1000 + i, "c") for i in range(50)])
    check(await conn.fetchval("select count(*) from drv where b = 'c'") == 50, "copy in")
    out = []

    async def sink(data):
        out.append(data)

    await conn.copy_from_query("select a from drv where a >= 1000 order by a", output=sink)
    check(b"".join(out).count(b"\n") == 50, "copy out")
    # A cursor fetched in steps (portal suspended).
    async with conn.transaction():
        cur = await conn.cursor("select a from drv order by a")
        check([r["a"] for r in await cur.fetch(3)] == [0, 1, 2], "cursor fetch")
    await conn.close()
    print("all checks passed")


asyncio.run(main())
