#!/usr/bin/env bash
# The whole test suite: installs what is missing, makes sure a MariaDB and (for the Celery tests) a PostgreSQL
# answer, runs pytest.
# The tests start their own S3 server and Airflow metadata DB. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ensure_system_packages
ensure_test_packages
ensure_venv
ensure_mysql
ensure_postgres
cd "$ROOT"
say "Running the test suite"
exec "$PY" -m pytest "$@"
