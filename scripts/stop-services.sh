#!/usr/bin/env bash
# Stops the Airflow UI (every process of it), the local S3 server and the private MariaDB that demo.sh,
# test.sh and airflow-ui.sh started (if any).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
stop_services
echo "stopped"
