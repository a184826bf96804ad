#!/usr/bin/env bash
# Runs every test on SQLite and PostgreSQL.
#
# PostgreSQL comes from GATEHOUSE_TEST_POSTGRES_SERVER (default: the local server,
# postgres://postgres@127.0.0.1:5432), which is started if it is not running. Each
# run gets a fresh database; the tests then make a schema each. Without a reachable
# PostgreSQL this script fails: it never skips the PostgreSQL tests.
set -euo pipefail
cd "$(dirname "$0")/.."

server="${GATEHOUSE_TEST_POSTGRES_SERVER:-postgres://postgres@127.0.0.1:5432}"
host_port="${server#*@}"; host="${host_port%%:*}"; port="${host_port##*:}"; port="${port%%/*}"

if ! pg_isready -q -h "$host" -p "$port" 2>/dev/null; then
  echo "PostgreSQL is not answering on $host:$port; starting it"
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  fi
  for _ in $(seq 1 30); do pg_isready -q -h "$host" -p "$port" && break; sleep 1; done
  pg_isready -q -h "$host" -p "$port" || { echo "PostgreSQL at $host:$port cannot be reached" >&2; exit 1; }
fi

db="gatehouse_test_$(date +%s)_$$"
psql "$server/postgres" -v ON_ERROR_STOP=1 -qc "CREATE DATABASE $db" >/dev/null
# Old runs' databases are dropped; this run's is dropped at the end.
for old in $(psql "$server/postgres" -Atc "SELECT datname FROM pg_database WHERE datname LIKE 'gatehouse_test_%' AND datname <> '$db'"); do
  psql "$server/postgres" -qc "DROP DATABASE IF EXISTS $old" >/dev/null 2>&1 || true
done
trap 'psql "$server/postgres" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true' EXIT

export GATEHOUSE_TEST_POSTGRES_URL="$server/$db"
cargo test --lib --bins --tests -- --include-ignored "$@"
