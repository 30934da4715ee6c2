"""CLIP similarity-index DAGs: ``clip_index_normal`` and ``clip_index_defect``, from one factory.

Wiring, params and docs only; the work is in ``inspection_refresh.tasks.clip_index``.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import DAG, Asset, Param, get_current_context, task
from inspection_refresh.config import get_settings
from inspection_refresh.operators import (
    APPROVAL_PARAM, QUALITY_PARAM, PublishApproval, deployment_dag_args, executor_args, quality_gate_param,
    queue_args,
)
from inspection_refresh.runtime import fail_permanent_errors, fail_unless_completed, leave_run_note, run_identity
from inspection_refresh.schedules import deployment_schedule
from inspection_refresh.tasks import clip_index as pipeline
from inspection_refresh.tasks.common import NothingToDo

try:
    from airflow.sdk.exceptions import AirflowSkipException
except ImportError:  # older Task SDKs
    from airflow.exceptions import AirflowSkipException

# The tasks' own timeouts add up to about 2 h without retries: 3 h stops a run stuck queued or retrying.
DAGRUN_TIMEOUT = timedelta(hours=3)

DOC_MD = """
### CLIP {index_type} image index

Rebuilds the **{index_type}** similarity index of the defect-inspection service and deploys it.

1. **download** — lists the **prefix** param in NCP Object Storage (ListObjects V1), mirrors the images
   (`INSPECTION_MAX_TRANSFERS` at once, as many slots of the `storage_transfers` pool, shared with the
   PatchCore downloads; unchanged files are not downloaded again) and opens the `deployment_logs` row.
   Folder markers, empty and non-image objects are skipped and listed. Images that still fail after
   retries fail the task, which Airflow retries; **max_missing_images** lets a run publish without up to
   that many (listed as `missing_images` in the deployment row and `manifest.json`).
2. **embed** — embeds every image exactly as the service embeds queries (open_clip, RGB, 224×224 squash,
   CLIP mean/std, L2-normalised). Embeddings are cached by image content + model, so a rerun only embeds
   new or changed images. Unreadable images are skipped and listed. Runs on `INSPECTION_HEAVY_QUEUE` (e.g.
   the GPU workers) when set; with `INSPECTION_RUN_STORE=storage` it first fetches the run's images into
   its own worker's mirror.
3. **index_save** — writes `faiss_index.bin`, `index_data.pt`, `embeddings.pt`, `metadata.json` and
   `manifest.json` into a staging version (not live yet) and checks that every image finds itself first.
4. **approve** — only when **require_approval** is on: waits for a person to **Approve** or **Reject** on
   this task's **Required actions** page (open the run, the `approve` task, "Required actions"; or the
   "Required Actions" list under Browse), which shows the image count before/after, the images added and
   removed, and the self-retrieval check of the new index. Reject (or no answer within the request's
   timeout: `INSPECTION_APPROVAL_TIMEOUT_MINUTES`, default 240, and never past 20 minutes before the
   run's 3 h `dagrun_timeout`) keeps the live index, discards the staged version and records the run as
   failed ("rejected by <user>" / "approval timed out"). Off (the default): passes at once. An approval names
   the staged version and the sha256 of its files: a version rebuilt afterwards (index_save cleared) is refused
   by publish ("not what was approved"; clear approve to ask again).
5. **publish** — publishes the staged version atomically at `INSPECTION_INDEX_ROOT/{index_type}/`. If it fails,
   the staged version is kept: clearing publish (and register) retries it without a rebuild. The last
   `INSPECTION_KEEP_VERSIONS` versions are kept; roll back with the `deployment_rollback` DAG (artefact
   `clip:{index_type}`). When the images and the model are those of the live index nothing is published:
   the run completes with "unchanged, version X stays live" (and nobody is asked to approve).
6. **register** — closes the `deployment_logs` row (`clip_rebuild`) as completed or failed (with the
   approval's decision in `result_data.approval`) and emits the asset event `clip_index_{index_type}`.

A failed run never replaces the live index. A finished run's note (on its page) says in one line what it did,
also when it published nothing. Scheduled runs (at their cron slots only: unpausing starts no run for a missed
slot) skip the rebuild when the images and the
model are unchanged since the published index; set **full_rebuild** to ignore all caches and publish
anyway. A rolled-back index is pinned: scheduled runs skip it, a manual run that publishes unpins it.

**Quality gate** (param **quality_gate**, default `warn`; scheduled runs: `INSPECTION_QUALITY_GATE`, default
`approve`): index_save checks the gallery (exact and near-duplicates, images also in the other gallery, product
outliers) and approve compares the image count with the live index's. `warn` publishes and reports, `approve`
asks a person (even without require_approval), `block` publishes nothing and fails the run naming what was
flagged. Findings are in the row (`result_data.quality_gate`), the approval request and the Deployments page.
"""


def build_clip_index_dag(index_type: str, default_prefix: str) -> DAG:
    """One CLIP index DAG; ``index_type`` is ``normal`` or ``defect``."""
    settings = get_settings()
    # Named, not located: the published path (which may move) travels in each event's extra.
    asset = Asset(name=f"clip_index_{index_type}", group="clip_index")

    def current_run() -> pipeline.ClipRun:
        context = get_current_context()
        params = context["params"]
        run_id, scheduled, deployed_by = run_identity(context)
        return pipeline.ClipRun(
            index_type=index_type, run_id=run_id, prefix=params["prefix"], model=params["model"],
            pretrained=params["pretrained"], batch_size=int(params["batch_size"]), device=params["device"],
            full_rebuild=bool(params["full_rebuild"]), skip_if_unchanged=bool(params["skip_if_unchanged"]),
            max_missing_images=int(params["max_missing_images"]), scheduled=scheduled, deployed_by=deployed_by,
            dag_id=context["dag"].dag_id,
        )

    with DAG(
        dag_id=f"clip_index_{index_type}",
        description=f"Rebuild and deploy the CLIP {index_type}-image similarity index",
        doc_md=DOC_MD.format(index_type=index_type),
        schedule=deployment_schedule(settings.clip_schedule),  # cron slots, never a missed one on unpausing
        dagrun_timeout=DAGRUN_TIMEOUT,
        **deployment_dag_args(),
        tags=["clip", "faiss", "deployment", index_type],
        params={
            "prefix": Param(default_prefix, type="string", minLength=1, title="Storage prefix",
                            description="Object-storage prefix holding the images to index."),
            "model": Param(settings.clip_model, type="string", minLength=1, title="open_clip model",
                           description="Must be the model the service embeds queries with."),
            "pretrained": Param(settings.clip_pretrained, type="string", minLength=1, title="Pretrained weights",
                                description="open_clip tag (e.g. openai) or a local checkpoint path."),
            "batch_size": Param(32, type="integer", minimum=1, maximum=1024, title="Batch size"),
            "device": Param("auto", type="string", enum=["auto", "cpu", "cuda"], title="Device",
                            description="auto uses CUDA when the worker has a GPU."),
            "full_rebuild": Param(False, type="boolean", title="Full rebuild",
                                  description="Ignore the embedding cache and re-embed every image."),
            "skip_if_unchanged": Param(False, type="boolean", title="Skip if unchanged",
                                       description="Skip the rebuild when images and model are unchanged "
                                                   "since the published index (scheduled runs always do)."),
            "max_missing_images": Param(0, type="integer", minimum=0, maximum=100000, title="Max missing images",
                                        description="Publish even if up to this many images could not be "
                                                    "downloaded after every retry (they are listed in the "
                                                    "deployment record); 0 = all images or no new index."),
            APPROVAL_PARAM: Param(False, type="boolean", title="Require approval",
                                  description="Wait for a person to approve the new index (the approve task's "
                                              "Required actions page) before publishing it."),
            QUALITY_PARAM: quality_gate_param(settings),
        },
    ) as dag:

        # One pool slot per download thread: at most INSPECTION_MAX_TRANSFERS transfers across all DAGs.
        @task(execution_timeout=timedelta(minutes=30), pool=settings.transfer_pool,
              pool_slots=settings.max_transfers, **queue_args(settings))
        def download() -> dict:
            with fail_permanent_errors():
                try:
                    return pipeline.download(current_run())
                except NothingToDo as skip:
                    raise AirflowSkipException(str(skip)) from None

        # The heavy task: INSPECTION_HEAVY_QUEUE (e.g. the GPU workers), a GPU pod with INSPECTION_HEAVY_POD_GPUS.
        @task(execution_timeout=timedelta(minutes=60), retries=1, **queue_args(settings, heavy=True),
              **executor_args(settings, heavy=True))
        def embed() -> dict:
            with fail_permanent_errors():
                return pipeline.embed(current_run())

        @task(execution_timeout=timedelta(minutes=20), **queue_args(settings))
        def index_save() -> dict:
            with fail_permanent_errors():
                return pipeline.index_save(current_run())

        @task(execution_timeout=timedelta(minutes=10), **queue_args(settings))
        def publish() -> dict:
            with fail_permanent_errors():
                try:
                    return pipeline.publish(current_run())
                except NothingToDo as refused:  # not approved
                    raise AirflowSkipException(str(refused)) from None

        @task(trigger_rule="all_done", outlets=[asset], execution_timeout=timedelta(minutes=5), **queue_args(settings))
        def register() -> dict:
            try:
                outcome = pipeline.register(current_run())
            except NothingToDo as skip:  # e.g. a scheduled run with unchanged images
                leave_run_note(get_current_context(), f"Nothing published: {skip}")
                raise AirflowSkipException(f"No deployment: {skip}") from None
            leave_run_note(get_current_context(), outcome["message"])
            fail_unless_completed(outcome)
            get_current_context()["outlet_events"][asset].extra = {
                k: outcome[k] for k in ("version", "num_images", "embedding_dim", "model", "pretrained", "index_path")
            }
            return outcome

        staged = download() >> embed() >> index_save()
        # Waits only when the run requires approval; its response timeout is set per run (see DOC_MD).
        approve = PublishApproval(task_id="approve", current_run=current_run, summarize=pipeline.approval_request,
                                  check_quality=pipeline.quality_check, longest_wait=settings.approval_timeout,
                                  execution_timeout=timedelta(minutes=5),
                                  **queue_args(settings))
        staged >> approve >> publish() >> register()
    return dag


clip_index_normal = build_clip_index_dag("normal", "images/normal/")
clip_index_defect = build_clip_index_dag("defect", "images/defect/")
