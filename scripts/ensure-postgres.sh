#!/usr/bin/env bash
# Make sure a local PostgreSQL server answers, with a role the tests can use; on Debian as
# root, install and start one. Prints the server URL for JOBDOCK_TEST_DATABASE_URL.
#
#   export JOBDOCK_TEST_DATABASE_URL="$(scripts/ensure-postgres.sh)"
set -euo pipefail

role=jobdock
password=jobdock

if [[ "$(id -u)" != 0 || ! -x /usr/bin/apt-get ]]; then
    echo "only root on Debian can install and start PostgreSQL here; point" >&2
    echo "JOBDOCK_TEST_DATABASE_URL at a server you run instead (a role that may create databases)" >&2
    exit 1
fi
if ! command -v pg_lsclusters >/dev/null; then
    echo "installing postgresql from Debian" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
fi
read -r version cluster port status < <(pg_lsclusters -h | awk '{print $1, $2, $3, $4}' | head -n 1)
if [[ -z "${version:-}" ]]; then
    echo "no PostgreSQL cluster exists; create one with pg_createcluster" >&2
    exit 1
fi
if [[ "$status" != online* ]]; then
    pg_ctlcluster "$version" "$cluster" start >&2
fi
for _ in $(seq 1 60); do
    if su postgres -c "psql -qAtc 'select 1'" >/dev/null 2>&1; then
        break
    fi
    sleep 0.5
done
su postgres -c "psql -qAt" >/dev/null <<SQL
DO \$\$BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '${role}') THEN
    CREATE ROLE ${role} LOGIN CREATEDB PASSWORD '${password}';
  END IF;
END\$\$;
SQL
echo "postgresql+asyncpg://${role}:${password}@127.0.0.1:${port}/postgres"
