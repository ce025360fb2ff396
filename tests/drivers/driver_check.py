"""What every driver script shares: the failure check and an asyncpg connection to pgward.

The scripts are run by the integration tests with PGWARD_PORT, PGWARD_TOKEN and
PGWARD_DATABASE (asyncpg) or PGWARD_DSN (psycopg) set; each exits non-zero on the first failed
check.
"""
import os
import ssl
import sys


def check(condition, what):
    if not condition:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


async def connect_asyncpg(user, tls=True):
    """An asyncpg connection to pgward as `user`, over TLS unless `tls` is False (the test
    certificate is self-signed, so it is not verified)."""
    import asyncpg

    context = False
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return await asyncpg.connect(
        host="127.0.0.1",
        port=int(os.environ["PGWARD_PORT"]),
        user=user,
        password=os.environ["PGWARD_TOKEN"],
        database=os.environ["PGWARD_DATABASE"],
        ssl=context,
    )
