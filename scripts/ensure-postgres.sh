#!/usr/bin/env bash
# Make sure PostgreSQL answers on 127.0.0.1:5432 with a database `test` that user postgres reaches without a
# password (what the tests use): start the local cluster, or install PostgreSQL first.
set -euo pipefail
host=127.0.0.1
port=${INFERQ_POSTGRES_PORT:-5432}

answers() { (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; }

if ! answers; then
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    echo "PostgreSQL is not installed: installing postgresql with apt-get" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  version=$(ls /usr/lib/postgresql | sort -V | tail -1)
  if ! pg_lsclusters -h | grep -q "^$version main"; then
    pg_createcluster "$version" main >/dev/null
  fi
  conf_dir=/etc/postgresql/$version/main
  # Tests connect over TCP on loopback as user postgres without a password.
  if ! grep -q "^host all all 127.0.0.1/32 trust" "$conf_dir/pg_hba.conf"; then
    sed -i '1i host all all 127.0.0.1/32 trust' "$conf_dir/pg_hba.conf"
  fi
  echo "starting PostgreSQL $version" >&2
  pg_ctlcluster "$version" main start || true
  for _ in $(seq 1 60); do
    answers && break
    sleep 0.5
  done
  if ! answers; then
    echo "PostgreSQL did not start listening on $host:$port within 30s" >&2
    exit 1
  fi
fi
for _ in $(seq 1 20); do
  if psql -h "$host" -p "$port" -U postgres -d postgres -Atqc "SELECT 1" >/dev/null 2>&1; then
    break
  fi
  sleep 0.5
done
if ! psql -h "$host" -p "$port" -U postgres -d postgres -Atqc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1; then
  psql -h "$host" -p "$port" -U postgres -d postgres -qc "CREATE DATABASE test" >/dev/null
fi
