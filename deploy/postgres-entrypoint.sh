#!/bin/sh
# PostgreSQL for docker-compose.yml: create the cluster, its user and database on the first start,
# then run the server. Nothing listens on TCP until the real server does (the database is made in
# single-user mode, not by a temporary server), so a health check over TCP cannot pass while the
# database is still being created. Reads the variables the official postgres image reads:
# POSTGRES_PASSWORD (required on the first start), POSTGRES_USER, POSTGRES_DB, PGDATA.
set -eu
# Local (Unix socket) connections are trusted: only a process inside this container can make one,
# e.g. `docker compose exec postgres pg_dump -U tokenmill tokenmill` for a backup.
: "${PGDATA:=/var/lib/postgresql/data}"
: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  if [ -z "${POSTGRES_PASSWORD:-}" ]; then
    echo "postgres-entrypoint: POSTGRES_PASSWORD is not set; refusing to create a database without one" >&2
    exit 1
  fi
  pwfile=$(mktemp)
  trap 'rm -f "$pwfile"' EXIT
  printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
  initdb --pgdata="$PGDATA" --username="$POSTGRES_USER" --pwfile="$pwfile" \
    --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >/dev/null
  rm -f "$pwfile"
  # Other containers reach it over the compose network, with the password.
  echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
  if [ "$POSTGRES_DB" != "postgres" ]; then
    db=$(printf '%s' "$POSTGRES_DB" | sed 's/"/""/g')
    owner=$(printf '%s' "$POSTGRES_USER" | sed 's/"/""/g')
    echo "CREATE DATABASE \"$db\" OWNER \"$owner\"" | postgres --single -D "$PGDATA" postgres >/dev/null
  fi
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
