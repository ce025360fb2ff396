"""asyncpg's executemany with a timeout through pgward: the pipeline is far larger than the
socket buffers and the server executes it slowly, so pgward is still writing it when asyncpg
sends its cancel. The cancel must reach the server at once, and the whole executemany (atomic)
must roll back.

Run by tests/it/compat.rs with PGWARD_PORT, PGWARD_TOKEN and PGWARD_DATABASE set; exits
non-zero on the first failed check.
"""
import asyncio
import time

from driver_check import check, connect_asyncpg


async def main():
    conn = await connect_asyncpg("app", tls=False)
    await conn.execute("create table slow_batch(n int, pad text)")
    # Many small, slow statements: ~8 MB of Bind/Execute messages fill the socket buffers, and
    # each 16 KiB pgward writes then waits for ~200 statements (10 s) to be executed.
    rows = [(i, "") for i in range(100000)]
    started = time.monotonic()
    try:
        await conn.executemany(
            "insert into slow_batch select $1, $2 from pg_sleep(0.05)", rows, timeout=1.0
        )
        check(False, "executemany timed out")
    except asyncio.TimeoutError:
        pass
    # asyncpg has sent its cancel; the session answers again once the server has cancelled the
    # running statement and skipped the rest of the pipeline.
    try:
        check(await asyncio.wait_for(conn.fetchval("select 1"), 30) == 1, "session usable")
    except asyncio.TimeoutError:
        check(False, "the cancel never took effect")
    elapsed = time.monotonic() - started
    check(elapsed < 4, f"the cancel took effect promptly ({elapsed:.1f} s)")
    count = await conn.fetchval("select count(*) from slow_batch")
    check(count == 0, f"the cancelled executemany rolled back ({count} rows committed)")
    await conn.close()
    print(f"all checks passed (usable again after {elapsed:.1f} s)")


asyncio.run(main())
