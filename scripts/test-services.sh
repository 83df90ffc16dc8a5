#!/usr/bin/env bash
# The test suite talks to a real Redis (127.0.0.1:6379) and a real PostgreSQL (127.0.0.1:5432, user
# postgres with trust auth, database "test"). This makes sure both answer: when one is missing on a Debian
# machine, it installs it from Debian's packages and starts it. Point the tests elsewhere with
# SERVING_TEST_REDIS_URL / SERVING_TEST_POSTGRES_URL (then nothing is checked here).
set -euo pipefail

reachable() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_for() {  # host port what
  for _ in $(seq 100); do reachable "$1" "$2" && return 0; sleep 0.1; done
  echo "$3 did not come up on $1:$2" >&2
  exit 1
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
  command -v apt-get >/dev/null || { echo "install $* (no apt-get here), or set SERVING_TEST_*_URL" >&2; exit 1; }
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null \
    || { as_root apt-get update -q >/dev/null && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null; }
}

if [ -z "${SERVING_TEST_REDIS_URL:-}" ] && ! reachable 127.0.0.1 6379; then
  echo "starting Redis for the tests"
  command -v redis-server >/dev/null || apt_install redis-server
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no --logfile /tmp/serving-test-redis.log
  wait_for 127.0.0.1 6379 Redis
fi

if [ -z "${SERVING_TEST_POSTGRES_URL:-}" ]; then
  if ! reachable 127.0.0.1 5432; then
    echo "starting PostgreSQL for the tests"
    command -v pg_ctlcluster >/dev/null || apt_install postgresql
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    hba="/etc/postgresql/$version/main/pg_hba.conf"
    # Local test server only: trust connections from this machine so the tests need no password.
    as_root grep -q '^host all all 127.0.0.1/32 trust' "$hba" \
      || as_root sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
    wait_for 127.0.0.1 5432 PostgreSQL
  fi
  if command -v psql >/dev/null && ! psql -h 127.0.0.1 -U postgres -d test -c 'SELECT 1' >/dev/null 2>&1; then
    psql -h 127.0.0.1 -U postgres -d postgres -c 'CREATE DATABASE test' >/dev/null
  fi
fi

# Prometheus and promtool (Debian package prometheus, 2.42 on Debian 12): the metrics, alert-rule and dashboard
# tests run them, and so do billing's integration tests. The tests start their own servers on free ports.
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  echo "installing Prometheus for the tests"
  apt_install prometheus
fi
