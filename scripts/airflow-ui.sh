#!/usr/bin/env bash
# The Airflow UI (airflow standalone) on the same embedded set-up as demo.sh, on http://localhost:8080.
# No sign-in in this local set-up (every visitor is an admin); open a DAG, press Trigger, fill in the form.
# Ctrl-C, SIGTERM or scripts/stop-services.sh stop every Airflow process it started.
# Environment: AIRFLOW__API__PORT (8080), AIRFLOW__API__HOST (127.0.0.1), INSPECTION_UI_SEED=false (no samples),
# AIRFLOW_HOME / INSPECTION_DATA_ROOT / INSPECTION_STATE_DIR (where it keeps its files).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ensure_local_stack
export AIRFLOW__API__PORT="${AIRFLOW__API__PORT:-8080}"
# Nobody signs in (see below), so only this machine may reach it unless asked otherwise.
export AIRFLOW__API__HOST="${AIRFLOW__API__HOST:-127.0.0.1}"
# Tasks reach the execution API at base_url; it must follow a non-default port.
export AIRFLOW__API__BASE_URL="${AIRFLOW__API__BASE_URL:-http://localhost:$AIRFLOW__API__PORT}"
if [ -f "$STATE/airflow.pid" ] && kill -0 "$(cut -d' ' -f1 "$STATE/airflow.pid")" 2>/dev/null; then
  echo "An Airflow UI started earlier is still running (pid $(cut -d' ' -f1 "$STATE/airflow.pid")):" \
    "scripts/stop-services.sh stops it" >&2
  exit 1
fi
if port_open 127.0.0.1 "$AIRFLOW__API__PORT"; then
  echo "Port $AIRFLOW__API__PORT is in use (an Airflow UI started earlier? scripts/stop-services.sh stops it)," \
    "or choose another: AIRFLOW__API__PORT=8081 $0" >&2
  exit 1
fi
if [ "${INSPECTION_UI_SEED:-true}" != false ]; then
  python -m inspection_refresh.dev.demo seed
fi

if [ "$(echo "$AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS" | tr '[:upper:]' '[:lower:]')" = true ]; then
  sign_in="no sign-in: AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=True makes Airflow's SimpleAuthManager
    treat every visitor as the admin \"Anonymous\" (no login page, no password, the REST API needs no token).
    Fine on this machine; anyone who can reach the port controls Airflow. To require a password instead, start
    with AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=False: user admin, password generated on first start,
    printed below and kept in $AIRFLOW_HOME/simple_auth_manager_passwords.json.generated."
else
  # What SimpleAuthManager does: the users of [core] simple_auth_manager_users (default admin:admin) sign in, and
  # each one's password is generated on its first start and kept in the passwords file, whoever the users are.
  users="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS:-admin:admin}"
  passwords_file="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:-$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated}"
  sign_in="user(s) $(echo "$users" | sed -E 's/:[^,]*//g; s/,/, /g') ([core] simple_auth_manager_users); a user's
    password is generated on its first start, printed below and kept in $passwords_file."
fi
say "Starting Airflow standalone: $AIRFLOW__API__BASE_URL (ready when it prints \"Airflow is ready\", ~1 min)"
cat >&2 <<MSG
    Sign-in: $sign_in
    Stop: Ctrl-C here, or scripts/stop-services.sh from another terminal: every Airflow process stops.
    $AIRFLOW__CORE__PARALLELISM tasks at once (AIRFLOW__CORE__PARALLELISM); Airflow files in $AIRFLOW_HOME.
MSG

# standalone leads a session of its own: stop_airflow finds every process it started through it,
# and a Ctrl-C here reaches this script only, which then stops them all.
trap stop_airflow EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
setsid airflow standalone &
echo "$! $(date +%s)" > "$STATE/airflow.pid"
status=0
wait $! || status=$?
exit "$status"
