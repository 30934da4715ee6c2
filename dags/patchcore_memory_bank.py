"""PatchCore memory-bank DAG: one bank per product, built by ``build_patchcore.sh``.

Wiring, params and docs only; the work is in ``inspection_refresh.tasks.patchcore``.
"""

from __future__ import annotations

from datetime import timedelta

from inspection_refresh.airflow_support import DEFAULT_ARGS, START_DATE, fail_permanent_errors, run_identity
from inspection_refresh.config import get_settings
from inspection_refresh.tasks import patchcore as pipeline

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG, Asset, AssetAlias, Param, get_current_context, task, task_group

try:
    from airflow.sdk.exceptions import AirflowFailException
except ImportError:  # older Task SDKs
    from airflow.exceptions import AirflowFailException

# The script's stdout and stderr also go to a per-product log file: publish reads
# the builder's PATCHCORE_SUMMARY line from it, register the error of a failed build.
BUILD_COMMAND = 'set -o pipefail; bash "$PATCHCORE_SCRIPT" 2>&1 | tee "$PATCHCORE_LOG"'

DOC_MD = """
### PatchCore memory banks

Regenerates the PatchCore memory bank of every active product (or those chosen in **products**) and
deploys each to `INSPECTION_PATCHCORE_ROOT/<product_code>/` (`memory_bank.pt`, `bank_config.json`,
`tau.json`, `ok/`, `score_histogram.png`).

Per product (the `product` group is mapped, one row per product code in the UI):
1. **prepare** — mirrors `images/normal/<product_id>/` (and labelled defects, used only for the held-out
   AUROC) and creates a staging directory.
2. **build** — runs `build_patchcore.sh` (or the script in **script**) with the product's paths in its
   environment: `PRODUCT_CODE`, `OK_DIR`, `OUT_DIR`, `DEFECT_DIRS`, `PATCHCORE_SHORTER`, `PATCHCORE_STRIDE`,
   `PATCHCORE_LAYERS`, `PATCHCORE_CORESET`, `PATCHCORE_WEIGHTS`, `PATCHCORE_DEVICE`, `PYTHON`.
   Builds share the pool `patchcore_build` (create it with `airflow pools set patchcore_build 1 ...`).
3. **publish** — validates the bank (the service's extraction and the requested weights recorded, shapes, finite values,
   sane tau, config as requested) and publishes it
   atomically. A product whose build fails keeps its previous bank; the others still publish.

**register** writes one `patchcore_create` row in `deployment_logs` with per-product results, `completed`
only if every product published. Roll back a product with
`inspection-publish rollback --root $INSPECTION_PATCHCORE_ROOT --name <product_code>`.
"""

settings = get_settings()
BANKS = AssetAlias(name="patchcore_banks")

with DAG(
    dag_id="patchcore_memory_bank",
    description="Rebuild and deploy the PatchCore memory bank of each product",
    doc_md=DOC_MD,
    schedule=settings.patchcore_schedule,
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["patchcore", "anomaly-detection", "deployment"],
    params={
        "products": Param([], type="array", items={"type": "string"}, title="Products",
                          description="Product codes or ids to rebuild; empty = every active product."),
        "coreset": Param(0.1, type="number", exclusiveMinimum=0, title="Coreset size",
                         description="Share of patch features kept in the bank (0-1], or a count above 1."),
        "shorter": Param(512, type="integer", minimum=32, maximum=2048, title="Short side (px)"),
        "stride": Param(2, type="integer", minimum=1, maximum=8, title="Patch stride"),
        "layers": Param(["layer2", "layer3"], type="array",
                        items={"type": "string", "enum": list(pipeline.LAYERS)}, title="ResNet-50 layers"),
        "weights": Param(settings.patchcore_weights, type="string", title="Backbone weights",
                         description="imagenet (torchvision IMAGENET1K_V2, as the service), a checkpoint path, "
                                     "or random (offline demo only)."),
        "device": Param("auto", type="string", enum=["auto", "cpu", "cuda"], title="Device"),
        "script": Param("", type="string", title="Build script",
                        description="Path of another build script (same environment contract); "
                                    "empty = the bundled build_patchcore.sh."),
    },
) as dag:

    def current_run() -> pipeline.PatchcoreRun:
        context = get_current_context()
        params = context["params"]
        run_id, scheduled, deployed_by = run_identity(context)
        return pipeline.PatchcoreRun(
            run_id=run_id, products=tuple(str(p) for p in params["products"]), coreset=float(params["coreset"]),
            shorter=int(params["shorter"]), stride=int(params["stride"]), layers=tuple(params["layers"]),
            script=params["script"], weights=params["weights"], device=params["device"],
            scheduled=scheduled, deployed_by=deployed_by,
        )

    @task(execution_timeout=timedelta(minutes=5))
    def list_products() -> list[dict]:
        with fail_permanent_errors():
            return pipeline.list_products(current_run())

    @task_group(group_id="product")
    def product_pipeline(product: dict):
        @task(map_index_template="{{ product_code }}", execution_timeout=timedelta(minutes=30))
        def prepare(product: dict) -> dict:
            get_current_context()["product_code"] = product["product_code"]
            with fail_permanent_errors():
                return pipeline.prepare_product(current_run(), product)

        env = prepare(product)
        build = BashOperator(
            task_id="build",
            bash_command=BUILD_COMMAND,
            env=env,
            append_env=True,
            pool=settings.patchcore_pool,
            retries=1,
            execution_timeout=timedelta(minutes=60),
            map_index_template="{{ task.env['PRODUCT_CODE'] }}",
        )

        @task(map_index_template="{{ product_code }}", retries=0, outlets=[BANKS],
              execution_timeout=timedelta(minutes=10))
        def publish(product: dict) -> dict:
            context = get_current_context()
            context["product_code"] = product["product_code"]
            with fail_permanent_errors():
                result = pipeline.publish_product(current_run(), product)
            # One asset event per published bank, even if another product of the run fails.
            context["outlet_events"][BANKS].add(
                Asset(name=f"patchcore_bank_{product['product_code']}", group="patchcore_bank"),
                extra={k: result.get(k) for k in ("version", "path", "bank_size", "feature_dim", "tau", "auroc",
                                                  "accuracy_at_tau")})
            return result

        env >> build >> publish(product)

    @task(trigger_rule="all_done", execution_timeout=timedelta(minutes=5))
    def register() -> dict:
        outcome = pipeline.register(current_run())
        if outcome["status"] != "completed":
            raise AirflowFailException(outcome["message"])
        return outcome

    product_pipeline.expand(product=list_products()) >> register()
