#!/usr/bin/env bash
# Stops the local S3 server and the private MariaDB that demo.sh / test.sh started (if any).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
stop_services
echo "stopped"
