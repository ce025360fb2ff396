"""asyncpg as a policy-bound service (billing, tenant 1) through pgward over TLS.

asyncpg sends `client_encoding='utf-8'` (quotes included) in its startup packet, a spelling
PostgreSQL accepts; pgward must accept it too. Run by tests/it/compat.rs with PGWARD_PORT,
PGWARD_TOKEN and PGWARD_DATABASE set; exits non-zero on the first failed check.
"""
import asyncio

from driver_check import check, connect_asyncpg


async def main():
    conn = await connect_asyncpg("billing")
    tenants = {r["tenant_id"] for r in await conn.fetch("select tenant_id from customers")}
    check(tenants == {1}, f"only tenant 1's customers, got {tenants}")
    count = await conn.fetchval("select count(*) from invoices where tenant_id = $1", 2)
    check(count == 0, "no invoices of tenant 2")
    await conn.execute("set client_encoding = 'utf-8'")
    check(await conn.fetchval("select 'ü'::text") == "ü", "UTF-8 text round trip")
    await conn.close()
    print("all checks passed")


asyncio.run(main())
