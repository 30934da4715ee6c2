#!/usr/bin/env bash
# The Airflow UI (airflow standalone) on the same embedded set-up as demo.sh, on http://localhost:8080.
# Log in (all users are admins in this local set-up), open a DAG, press Trigger, fill in the form.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ensure_local_stack
python -m inspection_refresh.dev.demo seed
say "Starting Airflow standalone on http://localhost:8080 (Ctrl-C stops it)"
exec airflow standalone
