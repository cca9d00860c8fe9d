#!/bin/sh
# The postgres container's second init script (compose.yaml mounts deploy/postgres/roles.sql as the first,
# 10-roles.sql): replace roles.sql's placeholder passwords with the ones in deploy/containers/.env.
# The official image runs /docker-entrypoint-initdb.d/* once, into an empty data volume, as the postgres
# user over the local socket. The passwords travel as psql variables, quoted by psql (:'name'), never
# pasted into SQL. tests/test_containers.py runs this very file after roles.sql on a real PostgreSQL.
# No `set -e`/`set -u`: the image sources (does not execute) a script without the executable bit.
: "${EDGEFLEET_OWNER_DB_PASSWORD:?is not set: put it in deploy/containers/.env (env.example)}"
: "${EDGEFLEET_APP_DB_PASSWORD:?is not set: put it in deploy/containers/.env (env.example)}"
psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet --username "${POSTGRES_USER:-postgres}" --dbname postgres \
    -v owner_password="$EDGEFLEET_OWNER_DB_PASSWORD" -v app_password="$EDGEFLEET_APP_DB_PASSWORD" <<'SQL'
ALTER ROLE edgefleet_owner PASSWORD :'owner_password';
ALTER ROLE edgefleet_app PASSWORD :'app_password';
SQL
