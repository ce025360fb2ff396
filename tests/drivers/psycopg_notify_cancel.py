"""psycopg 3 through pgward: the PID a client is given is its server backend's, so it can
recognise its own notifications, and cancelling with that key still reaches only its query.

Run by tests/it/compat.rs with PGWARD_DSN set (an unrestricted service); exits non-zero on the
first failed check.
"""
import os
import threading
import time

import psycopg

from driver_check import check


def main():
    dsn = os.environ["PGWARD_DSN"]
    me = psycopg.connect(dsn, autocommit=True)
    other = psycopg.connect(dsn, autocommit=True)
    pid = me.info.backend_pid
    check(pid == me.execute("select pg_backend_pid()").fetchone()[0], "BackendKeyData PID is the server's")
    check(pid != other.info.backend_pid, "two sessions, two PIDs")
    me.execute("listen pgward_pid")
    me.execute("notify pgward_pid, 'mine'")
    other.execute("notify pgward_pid, 'theirs'")
    seen = {}
    for n in me.notifies(timeout=5, stop_after=2):
        seen[n.payload] = n.pid
    check(seen.get("mine") == pid, f"own notification carries own PID: {seen} vs {pid}")
    check(seen.get("theirs") == other.info.backend_pid, f"other's PID: {seen}")

    # Cancel with the key pgward handed out: only this session's query stops.
    cancel = getattr(me, "cancel_safe", me.cancel)
    timer = threading.Timer(0.5, cancel)
    timer.start()
    started = time.monotonic()
    try:
        me.execute("select pg_sleep(30)")
        check(False, "the sleep was cancelled")
    except psycopg.errors.QueryCanceled:
        pass
    check(time.monotonic() - started < 10, "cancel delivered promptly")
    check(other.execute("select 1").fetchone()[0] == 1, "the other session is untouched")
    check(me.execute("select 2").fetchone()[0] == 2, "the cancelled session goes on")
    me.close()
    other.close()
    print("all checks passed")


main()
