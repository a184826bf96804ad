#!/usr/bin/env bash
# The benchmark suite: builds in release, runs the load benchmark on SQLite and on
# PostgreSQL (one and two instances, fresh databases), then the criterion benches.
# Results: target/bench/results.{json,svg} and target/criterion/.
# GATEHOUSE_BENCH_SECONDS sets the length of each phase (default 5).
set -euo pipefail
cd "$(dirname "$0")/.."
# Profiles need perf (Debian's linux-perf) and inferno for the flame graphs.
command -v perf >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf; } || true
command -v inferno-flamegraph >/dev/null 2>&1 || cargo install inferno --locked || true
server="${GATEHOUSE_TEST_POSTGRES_SERVER:-postgres://postgres@127.0.0.1:5432}"
if pg_isready -q -h 127.0.0.1 2>/dev/null || { pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start && sleep 2; }; then
  one="gatehouse_bench_1_$$"; two="gatehouse_bench_2_$$"
  psql "$server/postgres" -qc "CREATE DATABASE $one" -c "CREATE DATABASE $two" >/dev/null
  trap 'psql "$server/postgres" -qc "DROP DATABASE IF EXISTS $one WITH (FORCE)" -c "DROP DATABASE IF EXISTS $two WITH (FORCE)" >/dev/null 2>&1 || true' EXIT
  export GATEHOUSE_BENCH_POSTGRES_URL="$server/$one" GATEHOUSE_BENCH_POSTGRES_URL_2="$server/$two"
fi
GATEHOUSE_BENCH_PROFILE="${GATEHOUSE_BENCH_PROFILE:-1}" cargo bench --bench load
cargo bench --bench hot -- --warm-up-time 1 --measurement-time 3
