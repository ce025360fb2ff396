#!/usr/bin/env bash
# End-to-end benchmark: pgbench against PostgreSQL directly, through PgBouncer (session mode)
# and through pgward, in one run, alternating targets each round, and prints TPS and ratios.
# Then the cost of pgward's features in the same run: a policy-bound service (row filter on
# pgbench_accounts) against pass-through, with PostgreSQL's own RLS of the same filter as a
# reference, and auditing on against auditing off.
#
#   benches/pgbench.sh [--duration SECONDS] [--rounds N] [--clients N] [--scale N] [--only SECTIONS]
#
# SECTIONS is a comma-separated subset of proxies (direct / PgBouncer / pgward and p99),
# features (policy and auditing against pass-through), policy (the policy part of features
# alone), rls (the server's RLS reference), encryption, and demo (the demo workload —
# billing's invoice lookup — with each feature added in turn, up to everything on, and
# everything on again with its audit log in RAM where /dev/shm is a tmpfs, against PgBouncer;
# with what one fdatasync costs each log's filesystem), and pooling (transaction pooling: 200 clients through pgward and through PgBouncer,
# both in pool_mode = transaction with 20 server connections, the server connections counted
# in pg_stat_activity), bindexec (the demo's statement through asyncpg, a driver that prepares
# once and then only binds and executes — no Describe per call, unlike pgbench — against
# PgBouncer, with the proxy's CPU time per transaction; skipped without asyncpg), and
# instructions (the demo's instructions per transaction in pgward's own process, counted by
# callgrind under valgrind: repeatable on a busy machine, for comparing two builds with
# PGWARD=…); all but policy and instructions by default.
#
# Installs pgbouncer (Debian package) when missing and running as root. Everything it starts
# (PostgreSQL in a temp dir, PgBouncer, pgward) listens on 127.0.0.1 only and is stopped at exit.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=10
ROUNDS=3
CLIENTS=8
THREADS=2
SCALE=10
ONLY=proxies,features,rls,encryption,demo,bindexec,pooling
POOL_CLIENTS=200
POOL_SIZE=20
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --clients) CLIENTS=$2; shift 2 ;;
    --scale) SCALE=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --pool-clients) POOL_CLIENTS=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

want() { [[ ",$ONLY," == *",$1,"* ]]; }

BINDIR=$(pg_config --bindir 2>/dev/null || true)
[ -x "$BINDIR/initdb" ] || BINDIR=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
if ! command -v pgbouncer >/dev/null; then
  [ "$(id -u)" -eq 0 ] || { echo "pgbouncer is missing (apt-get install pgbouncer)" >&2; exit 1; }
  apt-get install -y -qq pgbouncer >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq pgbouncer >/dev/null; }
fi
PGBOUNCER=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)

# PGWARD=/path/to/pgward benches/pgbench.sh measures that binary instead (an A/B comparison
# of two builds, or a build kept while the tree changes).
if [ -z "${PGWARD:-}" ]; then
  cargo build --release --quiet
  PGWARD=$PWD/target/release/pgward
fi

WORK=$(mktemp -d /tmp/pgward-bench.XXXXXX)
chmod 755 "$WORK"
RUN_AS=()
if [ "$(id -u)" -eq 0 ]; then
  chown postgres: "$WORK"
  RUN_AS=(runuser -u postgres --)
fi
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PG_PORT=$(free_port); BOUNCER_PORT=$(free_port); WARD_PORT=$(free_port)

cleanup() {
  [ -n "${WARD_PID:-}" ] && kill "$WARD_PID" 2>/dev/null || true
  [ -n "${AUDIT_PID:-}" ] && kill "$AUDIT_PID" 2>/dev/null || true
  [ -n "${AUDIT_NOSYNC_PID:-}" ] && kill "$AUDIT_NOSYNC_PID" 2>/dev/null || true
  [ -n "${AUDIT_FWD_PID:-}" ] && kill "$AUDIT_FWD_PID" 2>/dev/null || true
  [ -n "${CRYPT_PID:-}" ] && kill "$CRYPT_PID" 2>/dev/null || true
  for pid in ${DEMO_PIDS:-}; do kill "$pid" 2>/dev/null || true; done
  [ -n "${DEMO_RAM_PID:-}" ] && kill "$DEMO_RAM_PID" 2>/dev/null || true
  [ -n "${BOUNCER_PID:-}" ] && kill "$BOUNCER_PID" 2>/dev/null || true
  [ -n "${POOL_WARD_PID:-}" ] && kill "$POOL_WARD_PID" 2>/dev/null || true
  [ -n "${POOL_BOUNCER_PID:-}" ] && kill "$POOL_BOUNCER_PID" 2>/dev/null || true
  "${RUN_AS[@]}" "$BINDIR/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
  [ -z "${RAM_DIR:-}" ] || rm -rf "$RAM_DIR"
}
trap cleanup EXIT

echo "== setting up PostgreSQL (port $PG_PORT), PgBouncer ($BOUNCER_PORT), pgward ($WARD_PORT)"
"${RUN_AS[@]}" "$BINDIR/initdb" -D "$WORK/data" -U postgres -A trust --no-instructions >/dev/null
"${RUN_AS[@]}" "$BINDIR/pg_ctl" -D "$WORK/data" -l "$WORK/pg.log" -w \
  -o "-p $PG_PORT -k $WORK -c listen_addresses=127.0.0.1 -c max_connections=150 -c shared_buffers=256MB" start >/dev/null
"$BINDIR/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres bench
"$BINDIR/pgbench" -h 127.0.0.1 -p "$PG_PORT" -U postgres -i -s "$SCALE" -q bench >/dev/null 2>&1

cat > "$WORK/pgbouncer.ini" <<INI
[databases]
bench = host=127.0.0.1 port=$PG_PORT dbname=bench
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = trust
auth_file = $WORK/userlist.txt
pool_mode = session
max_client_conn = 200
default_pool_size = 40
logfile = $WORK/pgbouncer.log
INI
echo '"postgres" ""' > "$WORK/userlist.txt"
chmod 644 "$WORK/pgbouncer.ini" "$WORK/userlist.txt"
"${RUN_AS[@]}" "$PGBOUNCER" -q "$WORK/pgbouncer.ini" &
BOUNCER_PID=$!

AUDIT_PORT=$(free_port); AUDIT_NOSYNC_PORT=$(free_port); AUDIT_FWD_PORT=$(free_port); CRYPT_PORT=$(free_port)
mkdir -p "$WORK/policies"
cat > "$WORK/policies/tenant.toml" <<TOML
# One branch's rows: the filter the benchmark pays for.
service = "tenant"
claim_types = { bid = "int" }
[tables.pgbench_accounts]
actions = ["select"]
filter = "bid = claim('bid')"
[tables.pgbench_branches]
actions = ["select"]
filter = "bid = claim('bid')"
TOML
cat > "$WORK/pgward.toml" <<TOML
[listen]
address = "127.0.0.1:$WARD_PORT"
allow_plaintext_loopback = true
max_client_connections = 200
[upstream]
host = "127.0.0.1"
port = $PG_PORT
[auth]
jwks_file = "$WORK/keys/jwks.json"
issuer = "pgward-dev"
audience = ["pgward"]
max_token_lifetime = "3h"
[services.postgres]
upstream_user = "postgres"
unrestricted = true
[services.tenant]
upstream_user = "postgres"
[services.billing]
upstream_user = "postgres"
[policy]
dir = "$WORK/policies"
database = "bench"
catalog_service = "postgres"
TOML
# Tokens checked against the lifetime this configuration allows.
mint() { "$PGWARD" token mint --dir "$WORK/keys" --config "$WORK/pgward.toml" --ttl 2h "$@"; }
TOKEN=$(mint --service postgres --create-key)
TENANT_TOKEN=$(mint --service tenant --claim bid=1)
# The demo workload: the demo schema and billing's policy (its invoices filtered by tenant).
"${RUN_AS[@]}" "$BINDIR/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -q bench -f migrations/0001_demo_schema.sql >/dev/null
"${RUN_AS[@]}" "$BINDIR/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -q bench -c "INSERT INTO tenants VALUES (1, 'one'), (2, 'two')"
cp policies/billing.toml "$WORK/policies/billing.toml"
BILLING_TOKEN=$(mint --service billing --claim tenant_id=1)
sed -e "s/127.0.0.1:$WARD_PORT/127.0.0.1:$AUDIT_PORT/" "$WORK/pgward.toml" > "$WORK/pgward-audit.toml"
printf '[audit]\ndir = "%s"\n' "$WORK/audit" >> "$WORK/pgward-audit.toml"
sed -e "s/127.0.0.1:$WARD_PORT/127.0.0.1:$AUDIT_NOSYNC_PORT/" "$WORK/pgward.toml" > "$WORK/pgward-audit-nosync.toml"
printf '[audit]\ndir = "%s"\nfsync = false\n' "$WORK/audit-nosync" >> "$WORK/pgward-audit-nosync.toml"
sed -e "s/127.0.0.1:$WARD_PORT/127.0.0.1:$AUDIT_FWD_PORT/" "$WORK/pgward.toml" > "$WORK/pgward-audit-fwd.toml"
printf '[audit]\ndir = "%s"\ndurability = "before_forward"\n' "$WORK/audit-fwd" >> "$WORK/pgward-audit-fwd.toml"
"$PGWARD" serve --config "$WORK/pgward.toml" --log warn &
WARD_PID=$!
"$PGWARD" serve --config "$WORK/pgward-audit.toml" --log warn &
AUDIT_PID=$!
"$PGWARD" serve --config "$WORK/pgward-audit-nosync.toml" --log warn &
AUDIT_NOSYNC_PID=$!
"$PGWARD" serve --config "$WORK/pgward-audit-fwd.toml" --log warn &
AUDIT_FWD_PID=$!
# Field encryption: two encrypted text columns vs the same data in plaintext columns.
"${RUN_AS[@]}" "$BINDIR/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -q bench -c \
  "CREATE TABLE enc_items (id int PRIMARY KEY, a bytea, b bytea); CREATE TABLE plain_items (id int PRIMARY KEY, a text, b text)"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$WORK/master.key"
sed -e "s/127.0.0.1:$WARD_PORT/127.0.0.1:$CRYPT_PORT/" "$WORK/pgward.toml" > "$WORK/pgward-crypt.toml"
cat >> "$WORK/pgward-crypt.toml" <<TOML
[keys]
provider = "local"
local_master_key_file = "$WORK/master.key"
[[encrypt]]
table = "enc_items"
column = "a"
key = "bench"
type = "text"
[[encrypt]]
table = "enc_items"
column = "b"
key = "bench"
type = "text"
TOML
"$PGWARD" serve --config "$WORK/pgward-crypt.toml" --log warn &
CRYPT_PID=$!
# The demo with each feature added: policy + encryption (card_number, searchable), then audit
# with fsync = false, then everything as shipped (default durability).
DEMO_ENC_PORT=$(free_port); DEMO_NOSYNC_PORT=$(free_port); DEMO_ALL_PORT=$(free_port)
demo_config() { # port [audit lines]
  sed -e "s/127.0.0.1:$WARD_PORT/127.0.0.1:$1/" "$WORK/pgward.toml"
  cat <<TOML
[keys]
provider = "local"
local_master_key_file = "$WORK/master.key"
[[encrypt]]
table = "invoices"
column = "card_number"
key = "demo"
type = "text"
searchable = true
TOML
  [ -z "${2:-}" ] || printf '%b\n' "$2"
}
demo_config "$DEMO_ENC_PORT" > "$WORK/demo-enc.toml"
demo_config "$DEMO_NOSYNC_PORT" "[audit]\ndir = \"$WORK/demo-audit-nosync\"\nfsync = false" > "$WORK/demo-nosync.toml"
demo_config "$DEMO_ALL_PORT" "[audit]\ndir = \"$WORK/demo-audit\"" > "$WORK/demo-all.toml"
DEMO_PIDS=""
for c in demo-enc demo-nosync demo-all; do
  "$PGWARD" serve --config "$WORK/$c.toml" --log warn &
  DEMO_PIDS="$DEMO_PIDS $!"
done
# Everything on again, its log in RAM (tmpfs), where an fdatasync returns at once: the same
# group commit, waits and wake-ups without the disk's flush, which separates what the disk
# costs from what pgward does. Its closed segments are deleted after each of its runs (a run
# writes hundreds of megabytes of records).
RAM_DIR=""
if [ -d /dev/shm ] && [ "$(stat -f -c %T /dev/shm 2>/dev/null)" = tmpfs ]; then
  RAM_DIR=$(mktemp -d /dev/shm/pgward-bench.XXXXXX)
  DEMO_RAM_PORT=$(free_port)
  demo_config "$DEMO_RAM_PORT" "[audit]\ndir = \"$RAM_DIR/audit\"\nrotate_size = \"16MiB\"" > "$WORK/demo-ram.toml"
  "$PGWARD" serve --config "$WORK/demo-ram.toml" --log warn &
  DEMO_RAM_PID=$!
fi
sleep 1

# 5 000 invoices of tenant 1 and 5 000 of tenant 2, card numbers encrypted by pgward itself;
# the demo's statement as a pgbench script.
seed_demo() {
  [ -f "$WORK/demo.sql" ] && return
  for batch in $(seq 0 19); do
    printf 'INSERT INTO invoices (id, tenant_id, amount_cents, card_number, status) VALUES '
    for i in $(seq $((batch * 500 + 1)) $((batch * 500 + 500))); do
      [ "$i" -eq $((batch * 500 + 1)) ] || printf ','
      printf "(%d, %d, %d, '4111-1111-1111-%04d', 'open')" "$i" $(( i <= 5000 ? 1 : 2 )) $((i * 7)) $((i % 10000))
    done
    printf ';\n'
  done > "$WORK/demo-seed.sql"
  PGPASSWORD=$TOKEN PGSSLMODE=disable "$BINDIR/psql" -h 127.0.0.1 -p "$DEMO_ENC_PORT" -U postgres -q -X bench -f "$WORK/demo-seed.sql" >/dev/null
  printf '\\set id random(1, 5000)\nSELECT id, status, amount_cents, card_number FROM invoices WHERE id = :id;\n' > "$WORK/demo.sql"
}

run_pgbench() { # target-port mode clients [user token] -> tps
  local port=$1 mode=$2 clients=$3 user=${4:-postgres} token=${5:-$TOKEN}
  PGPASSWORD=$token "$BINDIR/pgbench" -h 127.0.0.1 -p "$port" -U "$user" -S -M "$mode" \
    -c "$clients" -j "$THREADS" -T "$DURATION" bench 2>/dev/null \
    | awk '/^tps/ {print $3; exit}'
}

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# The targets (the arguments after the round number), one per line, in reverse order every
# other round: drift over a run (the machine, the disk's writeback) falls on no one side.
round_order() {
  local round=$1 k
  shift
  if [ $((round % 2)) -eq 0 ]; then
    for ((k = $#; k >= 1; k--)); do printf '%s\n' "${!k}"; done
  else
    printf '%s\n' "$@"
  fi
}

# Deletes every segment of the audit log in $1 but the newest (the one pgward writes to).
prune_closed_segments() {
  find "$1" -maxdepth 1 -name 'audit-*.jsonl' | sort | head -n -1 | xargs -r rm -f
}

# Median µs of a 300-byte append followed by fdatasync, 1 000 times, in a scratch file in $1:
# the floor of what a statement waits for its record to be durable there.
fdatasync_us() {
  python3 - "$1" <<'PY'
import os, statistics, sys, time
path = os.path.join(sys.argv[1], "fdatasync-probe")
os.makedirs(sys.argv[1], exist_ok=True)
fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
samples = []
for _ in range(1000):
    start = time.perf_counter()
    os.write(fd, b"x" * 300)
    os.fdatasync(fd)
    samples.append(time.perf_counter() - start)
os.close(fd)
os.unlink(path)
print(round(statistics.median(samples) * 1e6))
PY
}

if want proxies; then
declare -A TPS
TARGETS=(direct:$PG_PORT pgbouncer:$BOUNCER_PORT pgward:$WARD_PORT)
for mode in simple prepared; do
  for round in $(seq 1 "$ROUNDS"); do
    mapfile -t order < <(round_order "$round" "${TARGETS[@]}")
    for target in "${order[@]}"; do
      name=${target%%:*}; port=${target##*:}
      tps=$(run_pgbench "$port" "$mode" "$CLIENTS")
      TPS[$mode,$name]="${TPS[$mode,$name]:-} $tps"
      printf '  round %s %-8s %-9s %10s tps\n' "$round" "$mode" "$name" "$tps"
    done
  done
done

echo
echo "== pgbench -S, $CLIENTS clients, $THREADS threads, ${DURATION}s x $ROUNDS rounds (median TPS)"
printf '%-9s %12s %12s %12s %16s %16s\n' mode direct pgbouncer pgward "pgward/direct" "pgward/pgbouncer"
for mode in simple prepared; do
  d=$(echo "${TPS[$mode,direct]}" | median); b=$(echo "${TPS[$mode,pgbouncer]}" | median); w=$(echo "${TPS[$mode,pgward]}" | median)
  awk -v m="$mode" -v d="$d" -v b="$b" -v w="$w" \
    'BEGIN { printf "%-9s %12.0f %12.0f %12.0f %16.2f %16.2f\n", m, d, b, w, w / d, w / b }' 
done

# Added latency, unloaded (1 client): p99 from per-transaction logs.
p99_of() { # port -> p99 latency in microseconds
  local port=$1 dir
  dir=$(mktemp -d "$WORK/log.XXXX")
  (cd "$dir" && PGPASSWORD=$TOKEN "$BINDIR/pgbench" -h 127.0.0.1 -p "$port" -U postgres -S -M prepared \
      -c 1 -j 1 -T "$DURATION" -l bench >/dev/null 2>&1)
  cat "$dir"/pgbench_log.* | awk '{print $3}' | sort -n | awk '{a[NR]=$1} END {print a[int(NR*0.99)]}'
}
pd=$(p99_of "$PG_PORT"); pw=$(p99_of "$WARD_PORT"); pb=$(p99_of "$BOUNCER_PORT")
echo
echo "== 1 client, prepared: p99 latency direct ${pd}us, pgbouncer ${pb}us, pgward ${pw}us; pgward adds $((pw - pd))us"

fi

# Feature overhead, same run: policy-bound vs pass-through through one pgward, and auditing on
# (a second pgward writing JSON Lines with fsync per group commit) vs off.
if want features || want policy; then
declare -A FEAT RATIO
FEATURES=("passthrough:$WARD_PORT:postgres:$TOKEN" "policy:$WARD_PORT:tenant:$TENANT_TOKEN" "audited:$AUDIT_PORT:postgres:$TOKEN" "audit-nosync:$AUDIT_NOSYNC_PORT:postgres:$TOKEN" "audit-fwd:$AUDIT_FWD_PORT:postgres:$TOKEN")
want features || FEATURES=("${FEATURES[@]:0:2}")
measure() { # mode round name port user token -> LAST_TPS (no subshell: FEAT is kept)
  LAST_TPS=$(run_pgbench "$4" "$1" "$CLIENTS" "$5" "$6")
  FEAT[$1,$3]="${FEAT[$1,$3]:-} $LAST_TPS"
  printf '  round %s %-8s %-12s %10s tps\n' "$2" "$1" "$3" "$LAST_TPS"
}
for mode in simple prepared; do
  for round in $(seq 1 "$ROUNDS"); do
    for feature in "${FEATURES[@]:1}"; do
      IFS=: read -r name port user token <<<"$feature"
      IFS=: read -r _ pport puser ptoken <<<"${FEATURES[0]}"
      # Each feature is paired with a pass-through run, in alternating order (ABBA), after the
      # kernel has written back the audit logs: neither the shared machine's drift nor the
      # previous run's I/O falls on one side of a ratio.
      sync
      if [ $((round % 2)) -eq 1 ]; then
        measure "$mode" "$round" passthrough "$pport" "$puser" "$ptoken"; p=$LAST_TPS
        measure "$mode" "$round" "$name" "$port" "$user" "$token"; f=$LAST_TPS
      else
        measure "$mode" "$round" "$name" "$port" "$user" "$token"; f=$LAST_TPS
        measure "$mode" "$round" passthrough "$pport" "$puser" "$ptoken"; p=$LAST_TPS
      fi
      RATIO[$mode,$name]="${RATIO[$mode,$name]:-} $(awk -v a="$f" -v b="$p" 'BEGIN { printf "%.3f", a / b }')"
    done
  done
done
echo
echo "== pgward features, pgbench -S, $CLIENTS clients (median TPS; policy = row filter bid = claim('bid');"
echo "   audited = default durability: records written before the statement runs, fsync'ed before its results;"
echo "   audit-nosync = [audit] fsync = false; audit-fwd = durability = \"before_forward\": fsync'ed before it runs)"
printf '%-9s %12s %12s %12s %12s %12s %10s %10s %10s %10s\n' mode passthrough policy audited audit-nosync audit-fwd policy/p audited/p nosync/p fwd/p
for mode in simple prepared; do
  p=$(echo "${FEAT[$mode,passthrough]}" | median); r=$(echo "${FEAT[$mode,policy]}" | median)
  a=$(echo "${FEAT[$mode,audited]:-}" | median); n=$(echo "${FEAT[$mode,audit-nosync]:-}" | median)
  w=$(echo "${FEAT[$mode,audit-fwd]:-}" | median)
  # Features --only left out print as "-".
  awk -v m="$mode" -v p="$p" -v r="$r" -v a="$a" -v n="$n" -v w="$w" 'BEGIN {
    tps = "%12s"; ratio = "%10s"
    printf "%-9s %12.0f %12.0f ", m, p, r
    if (a == "") printf tps " ", "-"; else printf "%12.0f ", a
    if (n == "") printf tps " ", "-"; else printf "%12.0f ", n
    if (w == "") printf tps " ", "-"; else printf "%12.0f ", w
    printf "%10.2f ", r / p
    if (a == "") printf ratio " ", "-"; else printf "%10.2f ", a / p
    if (n == "") printf ratio " ", "-"; else printf "%10.2f ", n / p
    if (w == "") printf ratio "\n", "-"; else printf "%10.2f\n", w / p
  }'
done
echo "ratios to the pass-through run paired with each (median, min - max, every pair):"
for mode in simple prepared; do
  for name in policy audited audit-nosync audit-fwd; do
    r=${RATIO[$mode,$name]:-}
    [ -n "$r" ] || continue
    printf '  %-9s %-12s %s  (%s - %s)   rounds:%s\n' "$mode" "$name" "$(echo "$r" | median)" \
      "$(echo "$r" | tr ' ' '\n' | grep -v '^$' | sort -g | head -1)" \
      "$(echo "$r" | tr ' ' '\n' | grep -v '^$' | sort -g | tail -1)" "$r"
  done
done
if want features; then
  echo "audit log: $(cat "$WORK"/audit/*.jsonl 2>/dev/null | wc -l) records written"
fi

fi

# The server's own share of a row filter, for reference: PostgreSQL's row-level security with
# the same filter (bid = 1), directly, as a role it applies to, against the superuser (which
# bypasses it). Whatever this costs the server, a policy-bound service through pgward pays too.
if want rls; then
"${RUN_AS[@]}" "$BINDIR/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -q bench -c \
  "CREATE ROLE rls_tenant LOGIN; GRANT SELECT ON pgbench_accounts, pgbench_branches TO rls_tenant;
   ALTER TABLE pgbench_accounts ENABLE ROW LEVEL SECURITY; CREATE POLICY tenant ON pgbench_accounts USING (bid = 1)"
declare -A RLS
for mode in simple prepared; do
  for round in $(seq 1 "$ROUNDS"); do
    for user in postgres rls_tenant; do
      tps=$("$BINDIR/pgbench" -h 127.0.0.1 -p "$PG_PORT" -U "$user" -S -M "$mode" \
        -c "$CLIENTS" -j "$THREADS" -T "$DURATION" bench 2>/dev/null | awk '/^tps/ {print $3; exit}')
      RLS[$mode,$user]="${RLS[$mode,$user]:-} $tps"
      printf '  round %s %-8s direct %-10s %10s tps\n' "$round" "$mode" "$user" "$tps"
    done
  done
done
echo
echo "== reference: PostgreSQL RLS with the same filter, direct (median TPS)"
printf '%-9s %12s %12s %10s\n' mode no-rls rls rls/no-rls
for mode in simple prepared; do
  p=$(echo "${RLS[$mode,postgres]}" | median); r=$(echo "${RLS[$mode,rls_tenant]}" | median)
  awk -v m="$mode" -v p="$p" -v r="$r" 'BEGIN { printf "%-9s %12.0f %12.0f %10.2f\n", m, p, r, r / p }'
done

fi

# Field encryption end to end: rows with two encrypted columns vs the same rows in plaintext
# columns, both selected through the encrypting pgward (prepared).
if want encryption; then
for i in $(seq 1 2000); do
  printf "INSERT INTO enc_items VALUES (%d, 'customer-%d@example.com', '4111-1111-1111-%04d');\n" "$i" "$i" "$i"
  printf "INSERT INTO plain_items VALUES (%d, 'customer-%d@example.com', '4111-1111-1111-%04d');\n" "$i" "$i" "$i"
done > "$WORK/seed.sql"
PGPASSWORD=$TOKEN PGSSLMODE=disable "$BINDIR/psql" -h 127.0.0.1 -p "$CRYPT_PORT" -U postgres -q -X bench -f "$WORK/seed.sql" >/dev/null
for t in enc plain; do
  printf '\\set id random(1, 2000)\nSELECT a, b FROM %s_items WHERE id = :id;\n' "$t" > "$WORK/$t.sql"
done
declare -A CRYPT
for round in $(seq 1 "$ROUNDS"); do
  for t in plain enc; do
    tps=$(PGPASSWORD=$TOKEN "$BINDIR/pgbench" -h 127.0.0.1 -p "$CRYPT_PORT" -U postgres -n -M prepared \
      -f "$WORK/$t.sql" -c "$CLIENTS" -j "$THREADS" -T "$DURATION" bench 2>/dev/null | awk '/^tps/ {print $3; exit}')
    CRYPT[$t]="${CRYPT[$t]:-} $tps"
    printf '  round %s %-9s %10s tps\n' "$round" "$t" "$tps"
  done
done
p=$(echo "${CRYPT[plain]}" | median); e=$(echo "${CRYPT[enc]}" | median)
echo
echo "== field encryption: SELECT of two columns by primary key through pgward, prepared, $CLIENTS clients"
awk -v p="$p" -v e="$e" 'BEGIN { printf "plaintext %10.0f tps   encrypted %10.0f tps   encrypted/plaintext %.2f\n", p, e, e / p }'
fi

# The demo workload (billing's point lookup of its own invoices, card_number encrypted), with
# each feature added in turn, against PgBouncer running the same statement, alternating
# targets in every round.
if want demo; then
seed_demo
DEMO=("pgbouncer:$BOUNCER_PORT:postgres:$TOKEN" "passthrough:$WARD_PORT:postgres:$TOKEN"
      "policy:$WARD_PORT:billing:$BILLING_TOKEN" "policy+enc:$DEMO_ENC_PORT:billing:$BILLING_TOKEN"
      "all-nosync:$DEMO_NOSYNC_PORT:billing:$BILLING_TOKEN" "all-on:$DEMO_ALL_PORT:billing:$BILLING_TOKEN")
[ -z "$RAM_DIR" ] || DEMO+=("all-on-ram:$DEMO_RAM_PORT:billing:$BILLING_TOKEN")
# What one fdatasync costs each log's filesystem, before the rounds (the machine otherwise idle).
DISK_SYNC_US=$(fdatasync_us "$WORK")
[ -z "$RAM_DIR" ] || RAM_SYNC_US=$(fdatasync_us "$RAM_DIR")
declare -A DEMO_TPS
for mode in simple prepared; do
  for round in $(seq 1 "$ROUNDS"); do
    mapfile -t order < <(round_order "$round" "${DEMO[@]}")
    for target in "${order[@]}"; do
      IFS=: read -r name port user token <<<"$target"
      sync
      tps=$(PGPASSWORD=$token "$BINDIR/pgbench" -h 127.0.0.1 -p "$port" -U "$user" -n -M "$mode" \
        -f "$WORK/demo.sql" -c "$CLIENTS" -j "$THREADS" -T "$DURATION" bench 2>/dev/null | awk '/^tps/ {print $3; exit}')
      DEMO_TPS[$mode,$name]="${DEMO_TPS[$mode,$name]:-} $tps"
      [ "$name" != all-on-ram ] || prune_closed_segments "$RAM_DIR/audit"
      printf '  round %s %-8s %-12s %10s tps\n' "$round" "$mode" "$name" "$tps"
    done
  done
done
echo
echo "== demo workload: billing's SELECT id, status, amount_cents, card_number FROM invoices WHERE id = :id,"
echo "   $CLIENTS clients, ${DURATION}s x $ROUNDS rounds; median TPS and ratio to PgBouncer (session mode)"
echo "   policy = tenant filter; +enc = card_number encrypted; all-nosync = + audit, fsync = false;"
echo "   all-on = + audit with the default durability (fsync'ed before results reach the client)"
echo "   all-on-ram = all-on with the log in RAM (tmpfs): the group commit without the disk's flush"
echo "   an append + fdatasync, alone: ${DISK_SYNC_US} us median on the log's disk${RAM_DIR:+, ${RAM_SYNC_US} us in RAM}"
printf '%-9s %-12s %12s %14s\n' mode config tps /pgbouncer
for mode in simple prepared; do
  b=$(echo "${DEMO_TPS[$mode,pgbouncer]}" | median)
  for target in "${DEMO[@]}"; do
    name=${target%%:*}
    t=$(echo "${DEMO_TPS[$mode,$name]}" | median)
    awk -v m="$mode" -v n="$name" -v t="$t" -v b="$b" 'BEGIN { printf "%-9s %-12s %12.0f %14.2f\n", m, n, t, t / b }'
  done
done
echo "demo audit log: $(cat "$WORK"/demo-audit/*.jsonl 2>/dev/null | wc -l) records written"
fi

# The demo's statement through asyncpg (benches/bind_execute.py: 2 processes of 4 connections,
# the statement prepared once per connection, then Bind/Execute/Sync per call), against
# PgBouncer, alternating targets each round; with the CPU time the proxy's process spent per
# transaction (user + system, from /proc), which the client's own CPU cost does not blur.
if want bindexec; then
if ! python3 -c 'import asyncpg' 2>/dev/null; then
  echo "== bindexec: skipped (asyncpg is not installed: pip install asyncpg)"
else
seed_demo
read -r ENC_PID NOSYNC_PID ALL_PID <<<"$DEMO_PIDS"
BOUNCER_REAL_PID=$(pgrep -f "^$PGBOUNCER -q $WORK/pgbouncer.ini" | head -1)
BIND=("pgbouncer:$BOUNCER_PORT:postgres:$TOKEN:$BOUNCER_REAL_PID"
      "policy+enc:$DEMO_ENC_PORT:billing:$BILLING_TOKEN:$ENC_PID"
      "all-nosync:$DEMO_NOSYNC_PORT:billing:$BILLING_TOKEN:$NOSYNC_PID"
      "all-on:$DEMO_ALL_PORT:billing:$BILLING_TOKEN:$ALL_PID")
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK_US=$((1000000 / $(getconf CLK_TCK)))
declare -A BIND_TPS BIND_CPU
for round in $(seq 1 "$ROUNDS"); do
  mapfile -t order < <(round_order "$round" "${BIND[@]}")
  for target in "${order[@]}"; do
    IFS=: read -r name port user token pid <<<"$target"
    sync
    before=$(cpu_ticks "$pid")
    read -r count tps < <(python3 benches/bind_execute.py --port "$port" --user "$user" \
      --password "$token" --seconds "$DURATION")
    after=$(cpu_ticks "$pid")
    cpu=$(( (after - before) * TICK_US / (count > 0 ? count : 1) ))
    BIND_TPS[$name]="${BIND_TPS[$name]:-} $tps"
    BIND_CPU[$name]="${BIND_CPU[$name]:-} $cpu"
    printf '  round %s %-12s %10s tps %6s us cpu/tx\n' "$round" "$name" "$tps" "$cpu"
  done
done
echo
echo "== demo statement through asyncpg (prepared once, then Bind/Execute/Sync), 8 connections,"
echo "   ${DURATION}s x $ROUNDS rounds; median TPS, ratio to PgBouncer, the proxy's CPU per transaction"
printf '%-12s %12s %12s %14s\n' config tps /pgbouncer 'cpu us/tx'
b=$(echo "${BIND_TPS[pgbouncer]}" | median)
for target in "${BIND[@]}"; do
  name=${target%%:*}
  t=$(echo "${BIND_TPS[$name]}" | median)
  c=$(echo "${BIND_CPU[$name]}" | median)
  awk -v n="$name" -v t="$t" -v b="$b" -v c="$c" 'BEGIN { printf "%-12s %12.0f %12.2f %14.0f\n", n, t, t / b, c }'
done
fi
fi

if want pooling; then
# Transaction pooling: POOL_CLIENTS clients on POOL_SIZE server connections. Each pooler logs
# in upstream as a role of its own (pgward: pool_bench, PgBouncer: pool_bouncer), so
# pg_stat_activity counts exactly one pool's connections (PgBouncer keeps its idle ones open).
"${RUN_AS[@]}" "$BINDIR/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -q bench -c \
  "CREATE ROLE pool_bench LOGIN; CREATE ROLE pool_bouncer LOGIN; GRANT ALL ON ALL TABLES IN SCHEMA public TO pool_bench, pool_bouncer"
POOL_BOUNCER_PORT=$(free_port); POOL_WARD_PORT=$(free_port)
BOUNCER_VERSION=$("$PGBOUNCER" --version | awk 'NR == 1 {print $2}')
# Protocol-level prepared statements in transaction mode need PgBouncer 1.21.
bouncer_prepares() { [ "$(printf '%s\n1.21\n' "$BOUNCER_VERSION" | sort -V | head -1)" = 1.21 ]; }
BOUNCER_PREPARED=""
bouncer_prepares && BOUNCER_PREPARED="max_prepared_statements = 100"
cat > "$WORK/pgbouncer-tx.ini" <<INI
[databases]
bench = host=127.0.0.1 port=$PG_PORT dbname=bench user=pool_bouncer
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $POOL_BOUNCER_PORT
unix_socket_dir =
auth_type = trust
auth_file = $WORK/userlist-tx.txt
pool_mode = transaction
max_client_conn = $((POOL_CLIENTS + 20))
default_pool_size = $POOL_SIZE
$BOUNCER_PREPARED
logfile = $WORK/pgbouncer-tx.log
pidfile = $WORK/pgbouncer-tx.pid
INI
echo '"pool_bench" ""' > "$WORK/userlist-tx.txt"
chmod 644 "$WORK/pgbouncer-tx.ini" "$WORK/userlist-tx.txt"
"${RUN_AS[@]}" "$PGBOUNCER" -q "$WORK/pgbouncer-tx.ini" &
POOL_BOUNCER_PID=$!
cat > "$WORK/pgward-pool.toml" <<TOML
[listen]
address = "127.0.0.1:$POOL_WARD_PORT"
allow_plaintext_loopback = true
max_client_connections = $((POOL_CLIENTS + 20))
[upstream]
host = "127.0.0.1"
port = $PG_PORT
[auth]
jwks_file = "$WORK/keys/jwks.json"
issuer = "pgward-dev"
audience = ["pgward"]
max_token_lifetime = "3h"
[services.pool_bench]
upstream_user = "pool_bench"
unrestricted = true
pool_mode = "transaction"
pool_size = $POOL_SIZE
pool_timeout = "60s"
TOML
POOL_TOKEN=$(mint --service pool_bench)
"$PGWARD" serve --config "$WORK/pgward-pool.toml" --log warn &
POOL_WARD_PID=$!
sleep 1
pool_conns() { # upstream role -> its server connections now
  "$BINDIR/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -At bench -c \
    "SELECT count(*) FROM pg_stat_activity WHERE usename = '$1' AND backend_type = 'client backend'"
}
echo
echo "== transaction pooling: $POOL_CLIENTS clients, pool of $POOL_SIZE server connections, ${DURATION}s x $ROUNDS rounds (select-only)"
declare -A POOL_TPS POOL_MAX
for ((round = 1; round <= ROUNDS; round++)); do
  mapfile -t targets < <(round_order "$round" "pgbouncer:$POOL_BOUNCER_PORT:pool_bouncer:" \
    "pgward:$POOL_WARD_PORT:pool_bench:$POOL_TOKEN")
  for mode in simple prepared; do
    for target in "${targets[@]}"; do
      IFS=: read -r name port role token <<<"$target"
      if [ "$name" = pgbouncer ] && [ "$mode" = prepared ] && ! bouncer_prepares; then
        printf '  round %s %-8s %-9s %10s\n' "$round" "$mode" "$name" "n/a (PgBouncer $BOUNCER_VERSION < 1.21: no prepared statements in transaction mode)"
        continue
      fi
      out="$WORK/pool-$name-$mode.out"
      PGPASSWORD=$token "$BINDIR/pgbench" -h 127.0.0.1 -p "$port" -U pool_bench -n -S -M "$mode" \
        -c "$POOL_CLIENTS" -j "$THREADS" -T "$DURATION" bench >"$out" 2>&1 &
      bench_pid=$!
      most=0
      while kill -0 "$bench_pid" 2>/dev/null; do
        n=$(pool_conns "$role"); [ "${n:-0}" -gt "$most" ] && most=$n
        sleep 0.5
      done
      wait "$bench_pid" || true
      tps=$(awk '/^tps/ {print $3; exit}' "$out")
      POOL_TPS[$mode,$name]="${POOL_TPS[$mode,$name]:-} ${tps:-0}"
      [ "$most" -gt "${POOL_MAX[$mode,$name]:-0}" ] && POOL_MAX[$mode,$name]=$most
      printf '  round %s %-8s %-9s %10s tps, at most %s server connections\n' "$round" "$mode" "$name" "${tps:-failed}" "$most"
    done
  done
done
echo
echo "== transaction pooling: median TPS, most server connections seen (pool_size $POOL_SIZE)"
printf '%-9s %-10s %12s %12s\n' mode target tps servers
for mode in simple prepared; do
  for name in pgbouncer pgward; do
    [ -n "${POOL_TPS[$mode,$name]:-}" ] || continue
    t=$(echo "${POOL_TPS[$mode,$name]}" | median)
    printf '%-9s %-10s %12.0f %12s\n' "$mode" "$name" "$t" "${POOL_MAX[$mode,$name]:-0}"
  done
done
fi

# Instructions per transaction of the demo workload in pgward's own process, counted by
# callgrind: the same count whatever else the machine is doing, so it resolves changes far
# smaller than TPS can (user space only: what the kernel does for a socket or a write(2) is not
# counted, nor waiting). Each configuration runs in a pgward of its own under valgrind; a short
# run warms its caches, then two counted runs of one client, IR_SHORT and IR_LONG transactions,
# whose difference divided by IR_LONG - IR_SHORT leaves the connection's setup out.
if want instructions; then
command -v valgrind >/dev/null || {
  [ "$(id -u)" -eq 0 ] || { echo "valgrind is missing (apt-get install valgrind)" >&2; exit 1; }
  apt-get install -y -qq valgrind >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq valgrind >/dev/null; }
}
seed_demo
IR_SHORT=${IR_SHORT:-300}; IR_LONG=${IR_LONG:-1300}
mkdir -p "$WORK/callgrind"
counted_run() { # port mode user token transactions -> instructions since the last dump
  local port=$1 mode=$2 user=$3 token=$4 n=$5 pid=$6 before
  before=$(ls "$WORK/callgrind" | wc -l)
  PGPASSWORD=$token "$BINDIR/pgbench" -h 127.0.0.1 -p "$port" -U "$user" -n -M "$mode" \
    -f "$WORK/demo.sql" -c 1 -j 1 -t "$n" bench >/dev/null 2>&1
  callgrind_control -d "$pid" >/dev/null 2>&1
  while [ "$(ls "$WORK/callgrind" | wc -l)" -le "$before" ]; do sleep 0.2; done
  sleep 0.5
  local dump total sha
  dump=$(ls -t "$WORK"/callgrind/* | head -1)
  total=$(awk '/^(summary|totals):/ {print $2; exit}' "$dump")
  # valgrind hides the CPU's SHA extensions, so SHA-256 runs its portable code there (several
  # times the native cost): counted apart, so that the rest can be compared.
  sha=$(callgrind_annotate --threshold=100 "$dump" 2>/dev/null \
    | awk '/:sha2::sha256::soft::compress( \[|$)/ {gsub(",", "", $1); s += $1} END {print s + 0}')
  echo "$total $sha"
}
echo
echo "== demo workload, instructions per transaction in pgward (callgrind, 1 client, $IR_SHORT and $IR_LONG transactions)"
echo "   (of them in SHA-256's portable code, which valgrind makes pgward use instead of the CPU's SHA instructions)"
printf '%-12s %14s %14s %14s %14s\n' config simple "(sha-256)" prepared "(sha-256)"
for target in "passthrough:pgward.toml:postgres:$TOKEN" "policy:pgward.toml:billing:$BILLING_TOKEN" \
    "policy+enc:demo-enc.toml:billing:$BILLING_TOKEN" "all-nosync:demo-nosync.toml:billing:$BILLING_TOKEN" \
    "all-on:demo-all.toml:billing:$BILLING_TOKEN"; do
  IFS=: read -r name config user token <<<"$target"
  port=$(free_port)
  # Its own port and audit directory: the demo's pgwards may still hold theirs.
  sed -E -e "s/^address = \"127.0.0.1:[0-9]+\"/address = \"127.0.0.1:$port\"/" \
    -e "s#$WORK/demo-audit#$WORK/callgrind-audit#" "$WORK/$config" > "$WORK/callgrind-$name.toml"
  valgrind --tool=callgrind --callgrind-out-file="$WORK/callgrind/$name.%p" \
    "$PGWARD" serve --config "$WORK/callgrind-$name.toml" --log warn >/dev/null 2>&1 &
  cg_pid=$!
  for _ in $(seq 1 600); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.2; done
  row=()
  for mode in simple prepared; do
    PGPASSWORD=$token "$BINDIR/pgbench" -h 127.0.0.1 -p "$port" -U "$user" -n -M "$mode" \
      -f "$WORK/demo.sql" -c 1 -j 1 -t 100 bench >/dev/null 2>&1
    callgrind_control -z "$cg_pid" >/dev/null 2>&1
    read -r short short_sha <<<"$(counted_run "$port" "$mode" "$user" "$token" "$IR_SHORT" "$cg_pid")"
    read -r long long_sha <<<"$(counted_run "$port" "$mode" "$user" "$token" "$IR_LONG" "$cg_pid")"
    row+=("$(( (long - short) / (IR_LONG - IR_SHORT) ))" "$(( (long_sha - short_sha) / (IR_LONG - IR_SHORT) ))")
  done
  kill "$cg_pid" 2>/dev/null; wait "$cg_pid" 2>/dev/null || true
  printf '%-12s %14s %14s %14s %14s\n' "$name" "${row[@]}"
done
# CALLGRIND_KEEP=dir keeps the counted runs' profiles (for callgrind_annotate).
[ -z "${CALLGRIND_KEEP:-}" ] || { mkdir -p "$CALLGRIND_KEEP" && cp "$WORK"/callgrind/* "$CALLGRIND_KEEP"/; }
fi
