"""The PatchCore pipeline as plain functions, one per Airflow task of ``patchcore_memory_bank``.

``list_products`` -> per product: ``prepare_product`` (download) -> build (``build_patchcore.sh``
via BashOperator) -> one ``approve`` step for the whole run (``operators.PublishApproval``,
showing :func:`approval_request`; passes at once unless the run requires approval) -> per product:
``publish_product`` (validate + atomic publish) -> ``register``.

Every product has its own stage records, so one product's failure never stops
the others from publishing, and the history row names what failed and why.

Tasks hand each other files through the run's :class:`~inspection_refresh.runstore.RunStore`
(``INSPECTION_RUN_STORE``) and its one interface, never asking which backend it is: with ``local``
(one host) the run's work directory, the image mirror and a staging directory that
``build_patchcore.sh`` writes into, as always; with ``storage`` each task may run on another worker:
``prepare`` records the product's image inventories, the build task fetches them into its own
worker's mirror and the store keeps the bank it built (:func:`fetch_build_inputs`,
:func:`store_build_outputs`), and ``publish`` stages that bank on its own worker.

This package is the DAG's one face (``from inspection_refresh.tasks import patchcore as pipeline``);
inside, one module a part of the run: :mod:`.run` (the run, the script's contract, stage records),
:mod:`.prepare` (list_products, prepare_product), :mod:`.build` (the build task's hooks and log),
:mod:`.publishing` (approval summary, publish_product) and :mod:`.records` (register).
"""

from inspection_refresh.config import get_settings  # the DAG file and tests read the settings through here
from inspection_refresh.tasks.patchcore.build import (
    fetch_build_inputs, parse_build_summary, read_build_log, store_build_outputs, store_failed_build_log,
)
from inspection_refresh.tasks.patchcore.prepare import list_products, prepare_product
from inspection_refresh.tasks.patchcore.publishing import (
    approval_request, nothing_to_approve, publish_product, quality_check,
)
from inspection_refresh.tasks.patchcore.records import register
from inspection_refresh.tasks.patchcore.run import (
    BANK_DIR, BUILD_DEFAULTS, BUILD_LOG, BUNDLED_SCRIPT, DEPLOY_TYPE, INVENTORY, LAYERS, PIPELINE, PRODUCT_PATTERN,
    SCRIPT_ENV_PASSTHROUGH, SUMMARY_MARK, PatchcoreRun, allowed_scripts, script_environment,
)

__all__ = [
    "BANK_DIR", "BUILD_DEFAULTS", "BUILD_LOG", "BUNDLED_SCRIPT", "DEPLOY_TYPE", "INVENTORY", "LAYERS", "PIPELINE",
    "PRODUCT_PATTERN", "SCRIPT_ENV_PASSTHROUGH", "SUMMARY_MARK", "PatchcoreRun", "allowed_scripts", "approval_request",
    "fetch_build_inputs", "get_settings", "list_products", "nothing_to_approve", "parse_build_summary",
    "prepare_product", "publish_product", "quality_check", "read_build_log", "register", "script_environment",
    "store_build_outputs", "store_failed_build_log",
]
