"""PatchCore memory-bank DAG: one bank per product, built by ``build_patchcore.sh``.

Wiring, params and docs only; the work is in ``inspection_refresh.tasks.patchcore``.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG, Asset, AssetAlias, Param, get_current_context, task, task_group
from inspection_refresh.config import get_settings
from inspection_refresh.operators import (
    APPROVAL_PARAM, QUALITY_PARAM, PublishApproval, deployment_dag_args, executor_args, quality_gate_param,
    queue_args,
)
from inspection_refresh.runtime import fail_permanent_errors, fail_unless_completed, leave_run_note, run_identity
from inspection_refresh.schedules import deployment_schedule
from inspection_refresh.tasks import patchcore as pipeline
from inspection_refresh.tasks.common import NothingToDo

try:
    from airflow.sdk.exceptions import AirflowSkipException
except ImportError:  # older Task SDKs
    from airflow.exceptions import AirflowSkipException

# The script's stdout and stderr also go to a per-product log file: publish reads
# the builder's PATCHCORE_SUMMARY line from it, register the error of a failed build.
BUILD_COMMAND = 'set -o pipefail; bash "$PATCHCORE_SCRIPT" 2>&1 | tee "$PATCHCORE_LOG"'

# Builds queue on a one-slot pool, so a run of many products takes hours; 8 h stops a stuck one.
DAGRUN_TIMEOUT = timedelta(hours=8)

DOC_MD = """
### PatchCore memory banks

Regenerates the PatchCore memory bank of every active product (or those chosen in **products**) and
deploys each to `INSPECTION_PATCHCORE_ROOT/<product_code>/` (`memory_bank.pt`, `bank_config.json`,
`tau.json`, `ok/`, `score_histogram.png`).

Per product (the `product` group is mapped, one row per product code in the UI):
1. **prepare** — mirrors `images/normal/<product_id>/` (and labelled defects, used only for the held-out
   AUROC) and creates a staging directory. Its `INSPECTION_PATCHCORE_TRANSFERS` downloads take as many
   slots of the `storage_transfers` pool, shared with the CLIP downloads. An image that still fails after
   retries fails the task (Airflow retries it); a bank is never built from part of the images.
2. **build** — runs `build_patchcore.sh` (or the script in **script**) with the product's paths in its
   environment: `PRODUCT_CODE`, `OK_DIR`, `OUT_DIR`, `DEFECT_DIRS`, `PATCHCORE_SHORTER`, `PATCHCORE_STRIDE`,
   `PATCHCORE_LAYERS`, `PATCHCORE_CORESET`, `PATCHCORE_WEIGHTS`, `PATCHCORE_DEVICE`, `PYTHON`.
   Builds share the pool `patchcore_build` (create it with `airflow pools set patchcore_build 1 ...`) and
   run on `INSPECTION_HEAVY_QUEUE` (e.g. the GPU workers) when set. With `INSPECTION_RUN_STORE=storage`
   the task first fetches the product's images into its own worker's mirror and afterwards stores the
   bank and its log in the run store, so the build may run on any worker.
3. **approve** (once for the whole run, after every product's build has ended) — when the run requires
   approval (**require_approval**, or a scheduled run while `INSPECTION_APPROVE_SCHEDULED_PATCHCORE` is
   true, the default) it waits for a person to **Approve** or **Reject** on this task's **Required actions**
   page (open the run, the `approve` task, "Required actions"; or Browse → "Required Actions"). The page
   lists, per product to publish, images, bank size, AUROC and tau of the live bank → the new one, and the
   products whose prepare or build failed (they keep their bank whatever the answer). Reject (or no answer
   within the request's timeout: `INSPECTION_APPROVAL_TIMEOUT_MINUTES`, default 240, never past 20 minutes
   before the run's 8 h `dagrun_timeout`) publishes nothing, discards the new banks and records the run as
   failed ("rejected by <user>" / "approval timed out"). Otherwise it passes at once; when nothing was built
   (every product unchanged or failed, or no product chosen) it is skipped, saying why.
4. **publish** — validates the bank (the service's extraction and the requested weights recorded, shapes, finite values,
   sane tau, config as requested) and publishes it
   atomically. A product whose build fails keeps its previous bank; the others still publish. An approved bank
   must be the one approved (sha256 of its files): one rebuilt afterwards is refused (clear approve to ask again).
   A failed publish keeps the built bank: clearing publish (and register) retries it without a rebuild.

**register** writes one `patchcore_create` row in `deployment_logs` with per-product results (and the
approval's decision in `result_data.approval`), `completed` only if every product published or was unchanged. A product whose normal images and settings are those
of its live bank is not rebuilt (**prepare** logs "<product>: unchanged since version X ...; nothing to build" and
is skipped). The run's note says what it did in one line (e.g. "3 products unchanged, nothing published"). A
product code in **products** that is no active product fails **list_products** at once, naming the active ones.

Roll back a product with the `deployment_rollback` DAG (artefact = the product code), which also pins it:
scheduled runs leave a pinned product out until a manual run of this DAG publishes it or it is unpinned.

**Quality gate** (param **quality_gate**, default `warn`; scheduled runs: `INSPECTION_QUALITY_GATE`, default
`approve`): approve checks each built bank: normal images that score 1.05x tau or more out of sample
(suspected defects, `quality.json`), held-out AUROC more than 0.05 below the live bank's, image tau outside x0.5-x2 of
the live one. `warn` publishes and reports, `approve` asks a person, `block` keeps a flagged product's live
bank (the product is failed "at quality_gate"; the others publish).
"""

settings = get_settings()
BANKS = AssetAlias(name="patchcore_banks")

with DAG(
    dag_id="patchcore_memory_bank",
    description="Rebuild and deploy the PatchCore memory bank of each product",
    doc_md=DOC_MD,
    schedule=deployment_schedule(settings.patchcore_schedule),  # cron slots, never a missed one on unpausing
    dagrun_timeout=DAGRUN_TIMEOUT,
    **deployment_dag_args(),
    tags=["patchcore", "anomaly-detection", "deployment"],
    params={
        # type null too: the form then does not mark it required (empty is valid); each code is checked as typed.
        "products": Param([], type=["array", "null"], items={"type": "string", "pattern": pipeline.PRODUCT_PATTERN},
                          uniqueItems=True, title="Products",
                          description="Product codes (e.g. TEX01) or product ids to rebuild, one per line; "
                                      "empty = every active product. An unknown code fails the run at once, "
                                      "naming the active products."),
        "coreset": Param(pipeline.BUILD_DEFAULTS.coreset, type="number", exclusiveMinimum=0, title="Coreset size",
                         description="Share of patch features kept in the bank (0-1], or a count above 1."),
        "shorter": Param(pipeline.BUILD_DEFAULTS.shorter, type="integer", minimum=32, maximum=2048, title="Short side (px)"),
        "stride": Param(pipeline.BUILD_DEFAULTS.stride, type="integer", minimum=1, maximum=8, title="Patch stride"),
        "layers": Param(list(pipeline.BUILD_DEFAULTS.layers), type="array", minItems=1, uniqueItems=True,
                        items={"type": "string", "enum": list(pipeline.LAYERS)}, title="ResNet-50 layers"),
        "weights": Param(settings.patchcore_weights, type="string", minLength=1, title="Backbone weights",
                         description="imagenet (torchvision IMAGENET1K_V2, as the service), a checkpoint path, "
                                     "or random (offline demo only)."),
        "device": Param("auto", type="string", enum=["auto", "cpu", "cuda"], title="Device"),
        "script": Param(pipeline.allowed_scripts(settings)[0], type="string",
                        enum=pipeline.allowed_scripts(settings), title="Build script",
                        description="Build scripts allowed on the workers (INSPECTION_PATCHCORE_SCRIPTS); "
                                    "the first is the default."),
        APPROVAL_PARAM: Param(False, type="boolean", title="Require approval",
                              description="Wait for a person to approve the new banks (the approve task's Required "
                                          "actions page) before publishing them. Scheduled runs wait unless "
                                          "INSPECTION_APPROVE_SCHEDULED_PATCHCORE is false."),
        QUALITY_PARAM: quality_gate_param(settings),
    },
) as dag:

    def current_run(context=None) -> pipeline.PatchcoreRun:
        context = context or get_current_context()
        params = context["params"]
        run_id, scheduled, deployed_by = run_identity(context)
        return pipeline.PatchcoreRun(
            run_id=run_id, products=tuple(str(p) for p in params["products"] or ()),
            coreset=float(params["coreset"]),
            shorter=int(params["shorter"]), stride=int(params["stride"]), layers=tuple(params["layers"]),
            script=params["script"], weights=params["weights"], device=params["device"],
            scheduled=scheduled, deployed_by=deployed_by, dag_id=context["dag"].dag_id,
        )

    def store_failed_build_log(context) -> None:
        pipeline.store_failed_build_log(current_run(context), context["task"])

    @task(execution_timeout=timedelta(minutes=5), **queue_args(settings))
    def list_products() -> list[dict]:
        with fail_permanent_errors():
            return pipeline.list_products(current_run())

    # One approval for the whole run, once every build has ended (a failed product does not block the others);
    # it waits only when the run requires approval, with a response timeout set per run (see DOC_MD).
    approve = PublishApproval(task_id="approve", current_run=current_run, summarize=pipeline.approval_request,
                              check_quality=pipeline.quality_check, nothing_to_approve=pipeline.nothing_to_approve,
                              approve_scheduled=settings.approve_scheduled_patchcore,
                              longest_wait=settings.approval_timeout, trigger_rule="all_done",
                              execution_timeout=timedelta(minutes=5), **queue_args(settings))

    @task_group(group_id="product")
    def product_pipeline(product: dict):
        # One pool slot per download thread: at most INSPECTION_MAX_TRANSFERS transfers across all DAGs.
        @task(map_index_template="{{ product_code }}", execution_timeout=timedelta(minutes=30),
              pool=settings.transfer_pool, pool_slots=settings.patchcore_transfers, **queue_args(settings))
        def prepare(product: dict) -> dict:
            get_current_context()["product_code"] = product.get("label", product["product_code"])
            with fail_permanent_errors():
                try:
                    return pipeline.prepare_product(current_run(), product)
                except NothingToDo as unchanged:  # the live bank is identical: skip build and publish
                    raise AirflowSkipException(str(unchanged)) from None

        env = prepare(product)
        # The heavy task. Its own process (which may read Airflow connections; the script may not) fetches
        # the product's images to this worker and completes the env before the command, and stores the bank
        # after it: needed with INSPECTION_RUN_STORE=storage, nothing to do with the local store.
        build = BashOperator(
            task_id="build",
            bash_command=BUILD_COMMAND,
            env=env,
            append_env=False,  # the script gets the contract's variables, not the worker's secrets
            pool=settings.patchcore_pool,
            retries=1,
            execution_timeout=timedelta(minutes=60),
            map_index_template="{{ task.env['PRODUCT_CODE'] }}",
            pre_execute=lambda context: pipeline.fetch_build_inputs(current_run(context), context["task"]),
            post_execute=lambda context, result: pipeline.store_build_outputs(current_run(context), context["task"]),
            on_retry_callback=store_failed_build_log,
            on_failure_callback=store_failed_build_log,
            **queue_args(settings, heavy=True),
            **executor_args(settings, heavy=True),
        )

        @task(map_index_template="{{ product_code }}", retries=0, outlets=[BANKS],
              execution_timeout=timedelta(minutes=10), **queue_args(settings))
        def publish(product: dict) -> dict:
            context = get_current_context()
            context["product_code"] = product["product_code"]
            with fail_permanent_errors():
                try:
                    result = pipeline.publish_product(current_run(), product)
                except NothingToDo as refused:  # not approved
                    raise AirflowSkipException(str(refused)) from None
            # One asset event per published bank, even if another product of the run fails.
            context["outlet_events"][BANKS].add(
                Asset(name=f"patchcore_bank_{product['product_code']}", group="patchcore_bank"),
                extra={k: result.get(k) for k in ("version", "path", "bank_size", "feature_dim", "tau", "auroc",
                                                  "accuracy_at_tau")})
            return result

        published = publish(product)
        env >> build >> published
        build >> approve >> published

    @task(trigger_rule="all_done", execution_timeout=timedelta(minutes=5), **queue_args(settings))
    def register() -> dict:
        outcome = pipeline.register(current_run())
        leave_run_note(get_current_context(), outcome["message"])  # e.g. "3 products unchanged, nothing published"
        return fail_unless_completed(outcome)

    product_pipeline.expand(product=list_products()) >> register()
