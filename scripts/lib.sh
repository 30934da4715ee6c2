# Shared set-up for demo.sh, test.sh and airflow-ui.sh (sourced, not run).
# Installs what a fresh Debian-like machine is missing and starts local services:
#   - system packages (MySQL client headers for mysqlclient, a MariaDB server if none is reachable)
#   - the project's virtualenv in .venv (pinned: requirements.txt + constraints.txt)
#   - MariaDB: the one on 127.0.0.1:3306 when it answers, else a private one under .services/
#   - an NCP-like S3 server (moto behind a proxy that refuses ListObjectsV2, as NCP does)
#   - for the Celery tests: PostgreSQL, the one on 127.0.0.1:5432 when it answers, else a private cluster
# Everything it starts is recorded under .services/ ($INSPECTION_STATE_DIR) and stopped by stop_services.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STATE="${INSPECTION_STATE_DIR:-$ROOT/.services}"
PY="$VENV/bin/python"
mkdir -p "$STATE"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

port_open() {  # host port
  timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null
}

ensure_system_packages() {
  local wanted=(default-libmysqlclient-dev pkg-config gcc)
  if ! python_for_venv >/dev/null 2>&1 || ! "$(python_for_venv)" -c 'import ensurepip, venv' 2>/dev/null; then
    wanted+=(python3 python3-venv python3-dev)
  fi
  if ! port_open 127.0.0.1 3306 && ! command -v mariadbd >/dev/null && ! command -v mysqld >/dev/null; then
    wanted+=(mariadb-server)
  fi
  install_missing_packages "system packages" "${wanted[@]}"
}

install_missing_packages() {  # what-for package...
  local what="$1" missing=() pkg
  shift
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    say "Installing $what: ${missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# What only the test suite needs: Debian's chromium for the real-browser test (Playwright drives it; browser
# downloads are not possible everywhere), and a Redis server and PostgreSQL for the CeleryExecutor tests
# when none answers.
ensure_test_packages() {
  local wanted=(chromium)
  if ! port_open 127.0.0.1 6379 && ! command -v redis-server >/dev/null; then
    wanted+=(redis-server)
  fi
  if ! port_open 127.0.0.1 5432 && [ -z "$(postgres_bin initdb)" ]; then
    wanted+=(postgresql)
  fi
  install_missing_packages "system packages for the tests" "${wanted[@]}"
}

python_for_venv() {
  local candidate
  for candidate in python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "$candidate"; return
    fi
  done
  echo "Python 3.11 or newer is required (found: $(python3 --version 2>&1))" >&2
  return 1
}

ensure_venv() {
  local stamp="$VENV/.installed" want
  want="$(cat "$ROOT/requirements.txt" "$ROOT/constraints.txt" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
  if [ -x "$PY" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    return
  fi
  say "Installing Python packages into .venv (first run: several minutes, torch is large)"
  [ -x "$PY" ] || "$(python_for_venv)" -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q -r "$ROOT/requirements.txt" -c "$ROOT/constraints.txt"
  "$PY" -m pip install -q --no-deps -e "$ROOT"
  echo "$want" > "$stamp"
}

# Exports INSPECTION_MYSQL_HOST/PORT/USER/PASSWORD for a server that answers.
ensure_mysql() {
  export INSPECTION_MYSQL_HOST="${INSPECTION_MYSQL_HOST:-127.0.0.1}"
  export INSPECTION_MYSQL_USER="${INSPECTION_MYSQL_USER:-root}"
  export INSPECTION_MYSQL_PASSWORD="${INSPECTION_MYSQL_PASSWORD:-}"
  if [ -z "${INSPECTION_MYSQL_PORT:-}" ] && port_open 127.0.0.1 3306; then
    export INSPECTION_MYSQL_PORT=3306
    return
  fi
  export INSPECTION_MYSQL_PORT="${INSPECTION_MYSQL_PORT:-3407}"
  if port_open "$INSPECTION_MYSQL_HOST" "$INSPECTION_MYSQL_PORT"; then
    return
  fi
  local datadir="$STATE/mariadb" server
  server="$(command -v mariadbd || command -v mysqld || echo /usr/sbin/mariadbd)"
  if [ ! -d "$datadir/mysql" ]; then
    say "Initialising a private MariaDB in $datadir"
    mkdir -p "$datadir"
    mariadb-install-db --no-defaults --datadir="$datadir" --user="$(id -un)" \
      --auth-root-authentication-method=normal >"$STATE/mariadb-install.log" 2>&1
  fi
  say "Starting a private MariaDB on 127.0.0.1:$INSPECTION_MYSQL_PORT"
  nohup "$server" --no-defaults --datadir="$datadir" --port="$INSPECTION_MYSQL_PORT" --bind-address=127.0.0.1 \
    --socket="$STATE/mariadb.sock" --pid-file="$STATE/mariadb.pid" --user="$(id -un)" \
    >"$STATE/mariadb.log" 2>&1 &
  wait_for_port "$INSPECTION_MYSQL_PORT" "MariaDB" "$STATE/mariadb.log"
}

# A PostgreSQL program (initdb, pg_ctl): on PATH, else the newest Debian postgresql's; empty if none.
postgres_bin() {
  command -v "$1" 2>/dev/null || ls -d /usr/lib/postgresql/*/bin/"$1" 2>/dev/null | sort -V | tail -1
}

# As the user PostgreSQL runs as: initdb and the server refuse root, so root runs them as Debian's postgres user.
as_postgres() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

# The Celery tests' metadata DB (Airflow 3.3's scheduler fails on MariaDB). Exports INSPECTION_POSTGRES_HOST/PORT/
# USER/PASSWORD (read by tests/integration/celery_cluster.py) for a server that answers: the one on
# 127.0.0.1:5432 (user postgres, trust authentication), else a private cluster under $STATE/postgres on a free
# port (or on INSPECTION_POSTGRES_PORT when that is set and nothing answers there), stopped by stop_services.
ensure_postgres() {
  export INSPECTION_POSTGRES_HOST="${INSPECTION_POSTGRES_HOST:-127.0.0.1}"
  export INSPECTION_POSTGRES_USER="${INSPECTION_POSTGRES_USER:-postgres}"
  export INSPECTION_POSTGRES_PASSWORD="${INSPECTION_POSTGRES_PASSWORD:-}"
  if [ -z "${INSPECTION_POSTGRES_PORT:-}" ] && port_open 127.0.0.1 5432; then
    export INSPECTION_POSTGRES_PORT=5432
    return
  fi
  if [ -n "${INSPECTION_POSTGRES_PORT:-}" ] && port_open "$INSPECTION_POSTGRES_HOST" "$INSPECTION_POSTGRES_PORT"; then
    return
  fi
  local datadir="$STATE/postgres" port initdb pg_ctl
  port="$(cat "$STATE/postgres.port" 2>/dev/null || true)"
  if [ -z "${INSPECTION_POSTGRES_PORT:-}" ] && [ -n "$port" ] && port_open 127.0.0.1 "$port"; then
    export INSPECTION_POSTGRES_HOST=127.0.0.1 INSPECTION_POSTGRES_PORT="$port"  # started by an earlier run
    return
  fi
  port="${INSPECTION_POSTGRES_PORT:-5433}"
  while [ -z "${INSPECTION_POSTGRES_PORT:-}" ] && port_open 127.0.0.1 "$port"; do port=$((port + 1)); done
  initdb="$(postgres_bin initdb)" pg_ctl="$(postgres_bin pg_ctl)"
  if [ -z "$initdb" ] || [ -z "$pg_ctl" ]; then
    echo "No PostgreSQL answers and initdb/pg_ctl are missing: apt-get install postgresql (ensure_test_packages)" >&2
    return 1
  fi
  mkdir -p "$datadir"
  [ "$(id -u)" = 0 ] && chown postgres: "$datadir"
  if [ ! -f "$datadir/PG_VERSION" ]; then
    say "Initialising a private PostgreSQL in $datadir"
    as_postgres "$initdb" -D "$datadir" -U postgres --auth=trust -E UTF8 --no-locale >"$STATE/postgres-init.log" 2>&1 \
      || { tail -20 "$STATE/postgres-init.log" >&2; return 1; }
  fi
  say "Starting a private PostgreSQL on 127.0.0.1:$port"
  as_postgres "$pg_ctl" -D "$datadir" -l "$datadir/server.log" -w -t 60 \
    -o "-p $port -c listen_addresses=127.0.0.1 -k $datadir" start >/dev/null \
    || { tail -20 "$datadir/server.log" >&2; return 1; }
  echo "$port" > "$STATE/postgres.port"
  export INSPECTION_POSTGRES_HOST=127.0.0.1 INSPECTION_POSTGRES_PORT="$port" INSPECTION_POSTGRES_USER=postgres
}

wait_for_port() {  # port what logfile
  for _ in $(seq 120); do
    port_open 127.0.0.1 "$1" && return
    sleep 0.5
  done
  echo "$2 did not start on port $1; see $3" >&2
  return 1
}

# Starts the NCP-like S3 server on $1 (default 9000) unless one answers there; exports its URL.
ensure_s3() {
  local port="${1:-9000}"
  export INSPECTION_S3_ENDPOINT="http://127.0.0.1:$port"
  if port_open 127.0.0.1 "$port"; then return; fi
  say "Starting the local NCP-like object storage on $INSPECTION_S3_ENDPOINT"
  nohup "$PY" -m inspection_refresh.dev.ncp_emulator --port "$port" --access-key "${INSPECTION_S3_ACCESS_KEY:-local-access-key}" \
    >"$STATE/s3.log" 2>&1 &
  echo $! > "$STATE/s3.pid"
  wait_for_port "$port" "The local object storage" "$STATE/s3.log"
}

# Everything demo.sh and airflow-ui.sh need: packages, venv, MariaDB, S3, Airflow.
ensure_local_stack() {
  ensure_system_packages
  ensure_venv
  ensure_mysql
  ensure_s3 "${INSPECTION_S3_PORT:-9000}"
  airflow_env
}

# Stops the Airflow UI (airflow-ui.sh): every process of its session and all they started, SIGTERM
# then, after INSPECTION_STOP_GRACE_SECONDS (10), SIGKILL; LocalExecutor workers ignore SIGTERM.
stop_airflow() {
  [ -f "$STATE/airflow.pid" ] || return 0
  "$PY" -m inspection_refresh.dev.process_tree stop --pid-file "$STATE/airflow.pid" --name "Airflow standalone" \
    --grace "${INSPECTION_STOP_GRACE_SECONDS:-10}"
}

stop_services() {
  local pidfile
  stop_airflow || true
  if [ -f "$STATE/postgres/postmaster.pid" ]; then  # the private PostgreSQL of ensure_postgres
    as_postgres "$(postgres_bin pg_ctl)" -D "$STATE/postgres" -m fast stop >/dev/null 2>&1 || true
    rm -f "$STATE/postgres.port"
  fi
  for pidfile in "$STATE/s3.pid" "$STATE/mariadb.pid"; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
  done
}

# Airflow on SQLite under .airflow/, the DAGs of this checkout, connections to the local services.
# Settings (INSPECTION_*) put every published artefact under .demo/.
airflow_env() {
  export PATH="$VENV/bin:$PATH"
  export AIRFLOW_HOME="${AIRFLOW_HOME:-$ROOT/.airflow}"
  export AIRFLOW__CORE__DAGS_FOLDER="$ROOT/dags"
  export AIRFLOW__CORE__LOAD_EXAMPLES=False
  export AIRFLOW__CORE__PLUGINS_FOLDER="$ROOT/plugins"
  export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="sqlite:///$AIRFLOW_HOME/airflow.db"
  export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS:-True}"
  # Tasks at once; LocalExecutor forks this many workers up front. Airflow's default (32) swamps a small machine.
  local cpus; cpus="$(nproc)"
  export AIRFLOW__CORE__PARALLELISM="${AIRFLOW__CORE__PARALLELISM:-$((cpus > 2 ? cpus : 2))}"
  export INSPECTION_DATA_ROOT="${INSPECTION_DATA_ROOT:-$ROOT/.demo}"
  export INSPECTION_INDEX_ROOT="${INSPECTION_INDEX_ROOT:-$INSPECTION_DATA_ROOT/clip_index}"
  export INSPECTION_PATCHCORE_ROOT="${INSPECTION_PATCHCORE_ROOT:-$INSPECTION_DATA_ROOT/patchCore}"
  export INSPECTION_CACHE_ROOT="${INSPECTION_CACHE_ROOT:-$INSPECTION_DATA_ROOT/cache}"
  export INSPECTION_BUCKET="${INSPECTION_BUCKET:-dm-obs}"
  export INSPECTION_CLIP_PRETRAINED="${INSPECTION_CLIP_PRETRAINED:-$INSPECTION_DATA_ROOT/weights/clip-vit-b-32-random.pt}"
  export INSPECTION_PATCHCORE_WEIGHTS="${INSPECTION_PATCHCORE_WEIGHTS:-random}"
  export INSPECTION_DEMO_DATABASE="${INSPECTION_DEMO_DATABASE:-inspection_demo}"
  local key="${INSPECTION_S3_ACCESS_KEY:-local-access-key}"
  export AIRFLOW_CONN_NCP_OBJECT_STORAGE="{\"conn_type\": \"aws\", \"login\": \"$key\", \"password\": \"local-secret-key\", \"extra\": {\"endpoint_url\": \"$INSPECTION_S3_ENDPOINT\", \"region_name\": \"kr-standard\"}}"
  export AIRFLOW_CONN_DEPLOY_DB="{\"conn_type\": \"mysql\", \"host\": \"$INSPECTION_MYSQL_HOST\", \"port\": $INSPECTION_MYSQL_PORT, \"login\": \"$INSPECTION_MYSQL_USER\", \"password\": \"$INSPECTION_MYSQL_PASSWORD\", \"schema\": \"$INSPECTION_DEMO_DATABASE\"}"
  mkdir -p "$AIRFLOW_HOME"
  if [ ! -f "$AIRFLOW_HOME/airflow.db" ] || [ "$(cat "$AIRFLOW_HOME/.migrated" 2>/dev/null)" != "$(airflow version)" ]; then
    say "Migrating the Airflow metadata database ($AIRFLOW_HOME/airflow.db)"
    airflow db migrate >"$AIRFLOW_HOME/migrate.log" 2>&1 || { tail -20 "$AIRFLOW_HOME/migrate.log" >&2; return 1; }
    airflow version > "$AIRFLOW_HOME/.migrated"
  fi
  airflow pools set "${INSPECTION_PATCHCORE_POOL:-patchcore_build}" 1 "Concurrent PatchCore bank builds" >/dev/null 2>&1 || true
  airflow pools set "${INSPECTION_TRANSFER_POOL:-storage_transfers}" "${INSPECTION_MAX_TRANSFERS:-10}" \
    "Concurrent object-storage downloads (one slot per transfer)" >/dev/null 2>&1 || true
}
