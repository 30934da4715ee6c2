"""``deployment_rollback``: put a kept version of a CLIP index or PatchCore bank back live, and pin it.

Wiring, params and docs only; the work is in ``inspection_refresh.tasks.rollback``.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import DAG, Param, get_current_context, task
from inspection_refresh.config import get_settings
from inspection_refresh.notifications import RollbackNotifier
from inspection_refresh.operators import deployment_dag_args, queue_args
from inspection_refresh.runtime import fail_permanent_errors, fail_unless_completed, run_identity
from inspection_refresh.tasks import rollback as pipeline

DOC_MD = """
### Roll back a deployment

Makes a kept version of a published artefact live again and **pins** it, then records the rollback in
`deployment_logs` (`deploy_type` `rollback`).

- **artefact** — `clip:normal`, `clip:defect` or a PatchCore product code (e.g. `BRKT01`).
- **version** — `previous` (the newest kept version older than the live one) or a version id as
  `inspection-publish list` prints it.
- **unpin** — instead of rolling back, remove the pin: scheduled runs deploy the artefact again.

This DAG is created **unpaused** (it has no schedule, so that starts nothing): a rollback asked for on
the Deployments page runs at once. Paused on purpose, it is respected: the page then triggers nothing
and says how to unpause it.

With a release channel (`INSPECTION_PUBLISH_TARGETS` `channel` or `both`) "live" and "kept" mean the
channel's `current.json` and versions, whichever host asks (the Deployments page of an API server
without local roots too).

1. **rollback** — one atomic symlink swap (the same code as `inspection-publish rollback`), then the pin
   file `<releases>/<name>/.pin.json` (version, who, when, run). Needs no database; never retried, so a
   `previous` is never applied twice.
2. **register** — writes the `rollback` row: completed ("clip:normal rolled back from X to Y by ...") or
   failed with the reason. Retried while the database is unreachable; the rollback itself stands.

While an artefact is pinned, scheduled CLIP runs skip it and scheduled PatchCore runs leave the product
out. A manual run of the CLIP or PatchCore DAG that publishes a new version removes the pin.
"""

settings = get_settings()

with DAG(
    dag_id=pipeline.ROLLBACK_DAG_ID,
    description="Re-publish a kept version of a CLIP index or PatchCore bank and pin it",
    doc_md=DOC_MD,
    schedule=None,
    # Unpaused from the start: the Deployments page's Roll back must run, and with no schedule nothing
    # starts by itself. A DAG paused on purpose later is respected: the page then triggers nothing.
    is_paused_upon_creation=False,
    dagrun_timeout=timedelta(hours=1),
    **deployment_dag_args(),
    on_success_callback=RollbackNotifier(),  # tells people who rolled back what (when notifications are on)
    tags=["deployment", "rollback", "clip", "patchcore"],
    params={
        "artefact": Param("clip:normal", type="string", minLength=1, title="Artefact",
                          description="clip:normal, clip:defect, or a PatchCore product code (e.g. BRKT01)."),
        "version": Param(pipeline.PREVIOUS, type="string", minLength=1, title="Version",
                         description="previous = the newest kept version older than the live one; or a version "
                                     "id as 'inspection-publish list' prints it (e.g. 20261126T020000123456Z)."),
        "unpin": Param(False, type="boolean", title="Unpin instead",
                       description="Do not roll back: remove the artefact's pin so scheduled runs deploy it again."),
    },
) as dag:

    def current_run() -> pipeline.RollbackRun:
        context = get_current_context()
        params = context["params"]
        run_id, _, deployed_by = run_identity(context)
        return pipeline.RollbackRun(run_id=run_id, artefact=str(params["artefact"]), version=str(params["version"]),
                                    unpin=bool(params["unpin"]), deployed_by=deployed_by,
                                    dag_id=context["dag"].dag_id)

    # Not retried: a retry of "previous" after a swap would roll back one version further.
    @task(retries=0, execution_timeout=timedelta(minutes=30), **queue_args(settings))
    def rollback() -> dict:
        with fail_permanent_errors():
            return pipeline.roll_back(current_run())

    @task(trigger_rule="all_done", execution_timeout=timedelta(minutes=5), **queue_args(settings))
    def register() -> dict:
        return fail_unless_completed(pipeline.register(current_run()))

    rollback() >> register()
