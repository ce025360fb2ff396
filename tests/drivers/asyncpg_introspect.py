"""asyncpg's type introspection through pgward as a policy-bound service, over TLS.

asyncpg introspects a type the first time it meets one without a built-in codec, and when a
codec is set for a type by name. Run by tests/it/catalog.rs with PGWARD_PORT, PGWARD_TOKEN,
PGWARD_DATABASE and PGWARD_USER set; exits non-zero on the first failed check.
"""
import asyncio
import json
import os
import ssl
import sys

import asyncpg


def check(condition, what):
    if not condition:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


async def main():
    tls = ssl.create_default_context()
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE  # the test certificate is self-signed
    conn = await asyncpg.connect(
        host="127.0.0.1",
        port=int(os.environ["PGWARD_PORT"]),
        user=os.environ["PGWARD_USER"],
        password=os.environ["PGWARD_TOKEN"],
        database=os.environ["PGWARD_DATABASE"],
        ssl=tls,
    )
    # set_type_codec introspects the type by name (asyncpg's TYPE_BY_NAME query).
    await conn.set_type_codec(
        "jsonb", schema="pg_catalog", encoder=json.dumps, decoder=json.loads
    )
    value = await conn.fetchval("SELECT $1::jsonb", {"a": 1})
    check(value == {"a": 1}, f"jsonb codec: {value!r}")
    # An array of a range is introspected on first use (INTRO_LOOKUP_TYPES).
    value = await conn.fetchval("SELECT ARRAY['[1,3)'::int4range]")
    check(value is not None and len(value) == 1, f"int4range[]: {value!r}")
    rows = await conn.fetch("SELECT id, name FROM customers ORDER BY id")
    check(len(rows) == 5, f"customers: {len(rows)}")
    await conn.close()
    print("all checks passed")


asyncio.run(main())
