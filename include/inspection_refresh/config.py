"""Deployment settings, read from the environment in one place.

Every value has a production default that matches the service's layout; the demo
and the tests override them through environment variables. Per-run choices (model,
batch size, products, ...) are DAG params, not settings. Secrets never live here:
credentials come from the Airflow connections named below.

A leaf: it imports nothing of the package. What is built from settings (storage,
publishers, release channels, the registry) is built in :mod:`inspection_refresh.compose`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

ENV_PREFIX = "INSPECTION_"
RELEASES_SUFFIX = ".releases"


def default_releases_dir(root: str | os.PathLike) -> Path:
    """Where the kept versions of ``root`` live unless set: the sibling ``<root>.releases``
    (outside the root the service scans, on the same filesystem)."""
    root = Path(os.path.abspath(root))
    return root.with_name(root.name + RELEASES_SUFFIX)


def _env(name: str, default: str) -> str:
    return os.environ.get(ENV_PREFIX + name, default)


def _env_optional(name: str, default: str | None) -> str | None:
    """Empty string or ``none`` switches an optional setting off (e.g. no schedule)."""
    value = os.environ.get(ENV_PREFIX + name)
    if value is None:
        return default
    return None if value.strip().lower() in ("", "none", "off") else value.strip()


def _positive_or_none(name: str) -> int | None:
    """A count that is off when unset, empty, ``none``/``off`` or 0."""
    value = _env_optional(name, None)
    if value is None:
        return None
    count = int(value)
    if count < 0:
        raise ValueError(f"INSPECTION_{name} must be a count of 0 or more, not {value!r}")
    return count or None


QUALITY_GATE_MODES = ("off", "warn", "approve", "block")
""":data:`inspection_refresh.quality_gate.MODES` (config stays a leaf; a unit test keeps them equal)."""


def _one_of(name: str, choices: tuple[str, ...], default: str) -> str:
    """``INSPECTION_<name>`` lower-cased, or ``ValueError`` naming the variable and its choices."""
    value = _env(name, default).strip().lower()
    if value not in choices:
        raise ValueError(f"INSPECTION_{name} is {value!r}; use one of {', '.join(choices)}")
    return value


PUBLISH_TARGETS = ("local", "channel", "both")


def _email_recipients(smtp_conn_id: str | None) -> tuple[str, ...]:
    """``INSPECTION_NOTIFY_EMAIL_TO``: addresses separated by commas, semicolons or spaces; required
    when e-mail notifications are on (``INSPECTION_NOTIFY_SMTP_CONN_ID`` set)."""
    recipients = tuple(a for a in _env("NOTIFY_EMAIL_TO", "").replace(";", ",").replace(" ", ",").split(",") if a)
    if smtp_conn_id and not recipients:
        raise ValueError(f"INSPECTION_NOTIFY_SMTP_CONN_ID is {smtp_conn_id!r} but INSPECTION_NOTIFY_EMAIL_TO is "
                         "empty: set the recipients (comma-separated addresses) or unset the connection id")
    return recipients


@dataclass(frozen=True)
class Settings:
    storage_conn_id: str
    """Airflow connection (type ``aws``) for NCP Object Storage."""
    bucket: str
    """Bucket holding ``images/normal/...`` and ``images/defect/...``."""
    db_conn_id: str
    """Airflow connection (type ``mysql``) for the service's database."""
    index_root: Path
    """Published CLIP indexes: ``<index_root>/normal/``, ``<index_root>/defect/``."""
    index_releases: Path
    """Kept versions of the CLIP indexes; outside ``index_root``, on its filesystem."""
    patchcore_root: Path
    """Published PatchCore banks: ``<patchcore_root>/<product_code>/``."""
    patchcore_releases: Path
    """Kept versions of the PatchCore banks; outside ``patchcore_root``, on its filesystem."""
    cache_root: Path
    """Downloaded images and embedding caches; safe to delete (costs a re-download)."""
    max_transfers: int
    """Concurrent object downloads across all DAGs (the service's plan caps it at 10): the size of
    ``transfer_pool``, and the threads (= pool slots) of a CLIP download task."""
    transfer_pool: str
    """Airflow pool every downloading task takes ``pool_slots`` = its download threads from."""
    patchcore_transfers: int
    """Download threads (= pool slots) of one PatchCore prepare task; at most ``max_transfers``."""
    keep_versions: int
    """Published versions kept per index type or product for rollback."""
    clip_schedule: str | None
    patchcore_schedule: str | None
    clip_model: str
    clip_pretrained: str
    patchcore_weights: str
    patchcore_pool: str
    patchcore_script: str
    """The default build script ("" = the bundled ``build_patchcore.sh``)."""
    patchcore_scripts: tuple[str, ...]
    """Other build scripts an operator may pick in the DAG's form (``INSPECTION_PATCHCORE_SCRIPTS``,
    colon-separated paths): the allow-list, since a script runs with the worker's rights."""
    approval_timeout: timedelta = timedelta(hours=4)
    """Longest wait of an approval request before publishing (``INSPECTION_APPROVAL_TIMEOUT_MINUTES``);
    it also ends 20 minutes before the run's ``dagrun_timeout``. No answer by then: nothing is published."""
    approve_scheduled_patchcore: bool = True
    """Scheduled PatchCore runs wait for approval before publishing (``INSPECTION_APPROVE_SCHEDULED_PATCHCORE``):
    a new bank and tau change which parts the line rejects, and nobody chose to deploy a scheduled run."""
    notify_smtp_conn_id: str | None = None
    """Airflow connection (type ``smtp``) that e-mails the notifications (``INSPECTION_NOTIFY_SMTP_CONN_ID``): a run
    failed, an approval is waiting, a rollback happened (:mod:`inspection_refresh.notifications`); ``None``: off."""
    notify_email_to: tuple[str, ...] = ()
    """Recipients of the notification e-mails (``INSPECTION_NOTIFY_EMAIL_TO``, comma-separated)."""
    notify_email_from: str | None = None
    """Sender of the notification e-mails (``INSPECTION_NOTIFY_EMAIL_FROM``); ``None``: the connection's
    ``from_email``."""
    notify_apprise_conn_id: str | None = None
    """Airflow connection (type ``apprise``) that posts the same notifications to chat (Slack, Teams, ... by its
    Apprise URL; ``INSPECTION_NOTIFY_APPRISE_CONN_ID``); ``None``: off."""
    run_store: str = "local"
    """Where a run's tasks hand each other files (:class:`inspection_refresh.runstore.RunStore`):
    ``local`` (the run's work directory under ``cache_root``; every task of a run must see that disk)
    or ``storage`` (object storage under ``run_store_prefix``; tasks may run on any worker)."""
    run_store_prefix: str = "airflow-runs/"
    """Key prefix of the ``storage`` run store in the bucket: ``<prefix><pipeline>/<run>/<name>``."""
    run_retention_days: float = 14.0
    """A failed run's intermediate files are swept this many days after they were last written;
    a completed run removes its own at once."""
    heavy_queue: str | None = None
    """Airflow (Celery) queue of the compute-heavy tasks, CLIP ``embed`` and PatchCore ``build``
    (e.g. ``gpu``); ``None`` (empty setting) = ``default_queue``."""
    default_queue: str | None = None
    """Queue of every other task; ``None`` (empty setting) = Airflow's ``[operators] default_queue``."""
    mirror_transfers: int = 4
    """Download threads of a task that fills its worker's image mirror from a run's inventory (``storage``
    run store: CLIP ``embed``, ``index_save``, ``publish``; PatchCore ``build``, ``publish``); at most
    ``max_transfers``. Not counted in ``transfer_pool`` (``INSPECTION_MIRROR_TRANSFERS``)."""
    patchcore_feature_cache_gb: float = 4.0
    """Bound of each worker's PatchCore per-image feature cache (``<cache_root>/patchcore_features``), least
    recently used entries evicted first; a rebuild extracts only new images (``INSPECTION_PATCHCORE_FEATURE_CACHE_GB``,
    0 = off)."""
    heavy_pod_gpus: int | None = None
    """GPUs a KubernetesExecutor pod of a heavy task requests (``nvidia.com/gpu``), through its
    ``executor_config``; ``None`` (empty setting, the default) adds no ``executor_config``."""
    publish_targets: str = "local"
    """Where a publish, rollback, pin or unpin goes (``INSPECTION_PUBLISH_TARGETS``): ``local`` (the roots
    above), ``channel`` (the release channel in object storage that serving hosts pull from; the roots on
    the workers are then only the workers' working copy) or ``both``."""
    channel_prefix: str = "deployments/"
    """Release channel: ``<prefix><clip|patchcore>/<name>/...`` in ``channel_bucket``."""
    channel_conn_id: str | None = None
    """Airflow connection of the release channel; ``None``: ``storage_conn_id``."""
    channel_bucket: str | None = None
    """Bucket of the release channel; ``None``: the storage connection's bucket, else ``bucket``."""
    signing_conn_id: str | None = None
    """Airflow connection whose password holds the Ed25519 private key (PEM) that signs every release
    manifest the channel writes (``INSPECTION_SIGNING_CONN_ID``); ``None`` (unset): manifests are unsigned."""
    quality_gate: str = "approve"
    """The quality gate of scheduled runs (``INSPECTION_QUALITY_GATE``: off, warn, approve, block; manual runs
    choose with the DAG param ``quality_gate``, default ``warn``). ``approve``: a scheduled run whose data or
    result is flagged waits for a person (nobody chose to deploy it); unflagged runs publish unattended."""
    quality_auroc_drop: float = 0.05
    """Gate margin: held-out AUROC below the live bank's by more than this (``INSPECTION_QUALITY_AUROC_DROP``)."""
    quality_tau_factor: float = 2.0
    """Gate margin: image tau outside [live / f, live x f] (``INSPECTION_QUALITY_TAU_FACTOR``)."""
    quality_images_lost: float = 0.20
    """Gate margin: a CLIP index with more than this share of the live one's images fewer
    (``INSPECTION_QUALITY_IMAGES_LOST``)."""
    quality_suspect_ratio: float = 1.05
    quality_similarity_checks: str = "auto"
    """CLIP's embedding-similarity checks (near-duplicates, product outliers; ``INSPECTION_QUALITY_SIMILARITY_CHECKS``):
    ``auto`` runs them with real weights and skips them with random ones (demo/test weights place unrelated
    images side by side, so every pair would look alike), ``on`` always, ``off`` never. Exact duplicates and
    cross-gallery copies (file content) are always checked."""
    """Gate margin: a normal image scoring at least this multiple of tau out of sample flags its bank
    (``INSPECTION_QUALITY_SUSPECT_RATIO``); images between tau and this are reported, not flagged."""

    @classmethod
    def from_env(cls) -> "Settings":
        data_root = Path(_env("DATA_ROOT", "/data/inspection"))
        index_root = Path(_env("INDEX_ROOT", str(data_root / "clip_index")))
        patchcore_root = Path(_env("PATCHCORE_ROOT", "/data/patchCore"))
        max_transfers = max(1, int(_env("MAX_TRANSFERS", "10")))
        return cls(
            storage_conn_id=_env("STORAGE_CONN_ID", "ncp_object_storage"),
            bucket=_env("BUCKET", os.environ.get("NCP_BUCKET", "dm-obs")),
            db_conn_id=_env("DB_CONN_ID", "deploy_db"),
            index_root=index_root,
            index_releases=Path(_env("INDEX_RELEASES", str(default_releases_dir(index_root)))),
            patchcore_root=patchcore_root,
            patchcore_releases=Path(_env("PATCHCORE_RELEASES", str(default_releases_dir(patchcore_root)))),
            cache_root=Path(_env("CACHE_ROOT", str(data_root / "cache"))),
            max_transfers=max_transfers,
            transfer_pool=_env("TRANSFER_POOL", "storage_transfers"),
            # More slots than the pool has would leave the task queued for ever.
            patchcore_transfers=min(max_transfers, max(1, int(_env("PATCHCORE_TRANSFERS", "2")))),
            keep_versions=int(_env("KEEP_VERSIONS", "5")),
            clip_schedule=_env_optional("CLIP_SCHEDULE", "0 2 * * *"),
            patchcore_schedule=_env_optional("PATCHCORE_SCHEDULE", None),
            clip_model=_env("CLIP_MODEL", "ViT-B-32"),
            clip_pretrained=_env("CLIP_PRETRAINED", "openai"),
            patchcore_weights=_env("PATCHCORE_WEIGHTS", "imagenet"),
            patchcore_pool=_env("PATCHCORE_POOL", "patchcore_build"),
            patchcore_script=_env("PATCHCORE_SCRIPT", ""),
            patchcore_scripts=tuple(p for p in _env("PATCHCORE_SCRIPTS", "").split(":") if p.strip()),
            approval_timeout=timedelta(minutes=float(_env("APPROVAL_TIMEOUT_MINUTES", "240"))),
            approve_scheduled_patchcore=_env("APPROVE_SCHEDULED_PATCHCORE", "true").strip().lower()
            not in ("0", "false", "no", "off"),
            notify_smtp_conn_id=_env_optional("NOTIFY_SMTP_CONN_ID", None),
            notify_email_to=_email_recipients(_env_optional("NOTIFY_SMTP_CONN_ID", None)),
            notify_email_from=_env_optional("NOTIFY_EMAIL_FROM", None),
            notify_apprise_conn_id=_env_optional("NOTIFY_APPRISE_CONN_ID", None),
            run_store=_env("RUN_STORE", "local").strip().lower(),
            run_store_prefix=_env("RUN_STORE_PREFIX", "airflow-runs/"),
            run_retention_days=float(_env("RUN_RETENTION_DAYS", "14")),
            heavy_queue=_env_optional("HEAVY_QUEUE", None),
            default_queue=_env_optional("DEFAULT_QUEUE", None),
            mirror_transfers=min(max_transfers, max(1, int(_env("MIRROR_TRANSFERS", "4")))),
            patchcore_feature_cache_gb=max(0.0, float(_env("PATCHCORE_FEATURE_CACHE_GB", "4"))),
            heavy_pod_gpus=_positive_or_none("HEAVY_POD_GPUS"),
            publish_targets=_one_of("PUBLISH_TARGETS", PUBLISH_TARGETS, "local"),
            channel_prefix=_env("CHANNEL_PREFIX", "deployments/"),
            channel_conn_id=_env_optional("CHANNEL_CONN_ID", None),
            channel_bucket=_env_optional("CHANNEL_BUCKET", None),
            signing_conn_id=_env_optional("SIGNING_CONN_ID", None),
            quality_gate=_one_of("QUALITY_GATE", QUALITY_GATE_MODES, "approve"),
            quality_auroc_drop=float(_env("QUALITY_AUROC_DROP", "0.05")),
            quality_tau_factor=float(_env("QUALITY_TAU_FACTOR", "2.0")),
            quality_images_lost=float(_env("QUALITY_IMAGES_LOST", "0.20")),
            quality_suspect_ratio=float(_env("QUALITY_SUSPECT_RATIO", "1.05")),
            quality_similarity_checks=_one_of("QUALITY_SIMILARITY_CHECKS", ("auto", "on", "off"), "auto"),
        )


def get_settings() -> Settings:
    """Settings as the environment says now (read on each call, so tests can change it)."""
    return Settings.from_env()
