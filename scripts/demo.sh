#!/usr/bin/env bash
# The whole job on embedded defaults, on a fresh machine:
#   installs what is missing, starts a local NCP-like S3 server and MariaDB, seeds sample
#   products (~1 MP JPEGs in the service's key layout), runs clip_index_normal,
#   clip_index_defect and patchcore_memory_bank through Airflow (`airflow dags test`),
#   then prints where everything was published and the deployment history.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ensure_local_stack

say "Seeding sample products into the local object storage and database"
python -m inspection_refresh.dev.demo seed

failed=()
for dag_id in clip_index_normal clip_index_defect patchcore_memory_bank; do
  say "Running $dag_id through Airflow (task logs: $AIRFLOW_HOME/demo-$dag_id.log)"
  started=$SECONDS
  if airflow dags test "$dag_id" >"$AIRFLOW_HOME/demo-$dag_id.log" 2>&1; then
    echo "    $dag_id succeeded in $((SECONDS - started))s"
  else
    echo "    $dag_id FAILED after $((SECONDS - started))s; last log lines:"
    grep -E "ERROR|error|Failed|failed" "$AIRFLOW_HOME/demo-$dag_id.log" | tail -15 | sed 's/^/      /'
    failed+=("$dag_id")
  fi
done

python -m inspection_refresh.dev.demo report
cat <<MSG

NOTE: the CLIP checkpoint and the PatchCore backbone are RANDOM-INIT weights made offline (no hub access):
the pipeline, formats and deployment are real, the similarity scores and thresholds are not meaningful.
Local services keep running for the Airflow UI: scripts/airflow-ui.sh (stop them: scripts/stop-services.sh).
MSG
if ((${#failed[@]})); then
  echo "Failed DAGs: ${failed[*]}" >&2
  exit 1
fi
