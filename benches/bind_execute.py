#!/usr/bin/env python3
"""The demo's point lookup through a driver that prepares its statement once and then only
binds and executes it: asyncpg sends Bind, Execute and Sync per call, with no Describe (unlike
pgbench, whose libpq describes every portal). Prints the transactions per second of all
connections together.

    benches/bind_execute.py --port P --user U --password TOKEN [--seconds S]
                            [--connections N] [--processes N]
"""
import argparse
import asyncio
import multiprocessing
import random
import time

QUERY = "SELECT id, status, amount_cents, card_number FROM invoices WHERE id = $1"


async def connection(args, deadline):
    import asyncpg

    conn = await asyncpg.connect(
        host="127.0.0.1",
        port=args.port,
        user=args.user,
        password=args.password,
        database=args.database,
        ssl=False,
    )
    statement = await conn.prepare(QUERY)
    done = 0
    while time.monotonic() < deadline:
        await statement.fetchrow(random.randint(1, 5000))
        done += 1
    await conn.close()
    return done


async def run_process(args, deadline):
    counts = await asyncio.gather(
        *(connection(args, deadline) for _ in range(args.connections))
    )
    return sum(counts)


def process(args, deadline, results):
    results.put(asyncio.run(run_process(args, deadline)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", default="")
    parser.add_argument("--database", default="bench")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=4, help="per process")
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    results = multiprocessing.Queue()
    start = time.monotonic()
    deadline = start + args.seconds
    workers = [
        multiprocessing.Process(target=process, args=(args, deadline, results))
        for _ in range(args.processes)
    ]
    for w in workers:
        w.start()
    total = sum(results.get() for _ in workers)
    for w in workers:
        w.join()
    print(f"{total} {total / (time.monotonic() - start):.0f}")


if __name__ == "__main__":
    main()
