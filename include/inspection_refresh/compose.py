"""Builds the package's parts from settings and Airflow connections: the one place that knows both.

Below this module nothing imports Airflow or reads settings: the object-storage client, the
publishers, the release channels, the run stores and the deployment registry take what they need
as arguments. The Airflow-facing code (tasks, operators, listeners, console, the publish CLI)
asks here for them.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from functools import cache, cached_property
from typing import Any

from inspection_refresh.channel import ReleaseChannel
from inspection_refresh.config import Settings, get_settings
from inspection_refresh.publish import LockFactory, Publisher
from inspection_refresh.registry import DeploymentRegistry
from inspection_refresh.runstore import RunStore
from inspection_refresh.signing import ManifestSigner, SignatureError
from inspection_refresh.storage import ObjectStorage
from inspection_refresh.storage.sources import Problem


class AirflowConnectionSource:
    """Storage clients from an Airflow connection (type ``aws``) through Airflow's S3 hook.

    The connection's ``extra.endpoint_url`` / ``region_name`` point the hook at NCP, its
    ``extra.config_kwargs`` override any of the NCP-safe defaults, and its
    ``extra.service_config.s3.bucket_name`` names the bucket. Credentials come from the
    connection only.
    """

    def __init__(self, conn_id: str) -> None:
        self.conn_id = conn_id
        self.label = f"connection {conn_id!r}"

    @cached_property
    def hook(self) -> Any:
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        return S3Hook(aws_conn_id=self.conn_id)

    def configured_bucket(self) -> str | None:
        return self.hook.conn_config.get_service_config("s3").get("bucket_name")

    def client(self, defaults: Any) -> Any:
        from botocore.config import Config

        overrides = self.hook.conn_config.botocore_config or Config()
        return self.hook.get_client_type(config=defaults.merge(overrides))

    def hint(self, problem: Problem, *, bucket: str, code: str = "") -> str:
        conn = self.conn_id
        return {
            "no_credentials": f"no credentials: set the access key and secret key on Airflow connection {conn!r}",
            "rejected": (f"the storage rejected the credentials ({code}): check the access key and secret key "
                         f"of Airflow connection {conn!r}"),
            "no_bucket": (f"bucket {bucket!r} does not exist: check INSPECTION_BUCKET or the bucket_name "
                          f"in connection {conn!r}"),
            "unreachable": f"cannot reach the storage endpoint: check endpoint_url of connection {conn!r}",
        }[problem]


def object_storage(conn_id: str | None = None, bucket: str | None = None, *, settings: Settings | None = None,
                   max_transfers: int | None = None, **options: Any) -> ObjectStorage:
    """The object storage of Airflow connection ``conn_id`` (default ``INSPECTION_STORAGE_CONN_ID``).

    :param bucket: default: the connection's ``bucket_name``, else ``INSPECTION_BUCKET``.
    :param max_transfers: default ``INSPECTION_MAX_TRANSFERS``.
    :param options: more :class:`~inspection_refresh.storage.ObjectStorage` keywords (``attempts``, ...).
    """
    settings = settings or get_settings()
    return ObjectStorage(AirflowConnectionSource(conn_id or settings.storage_conn_id), bucket,
                         default_bucket=settings.bucket, max_transfers=max_transfers or settings.max_transfers,
                         **options)


def release_channel(kind: str, settings: Settings | None = None) -> ReleaseChannel | None:
    """The release channel of ``kind`` (``clip``, ``patchcore``), or ``None`` when
    ``INSPECTION_PUBLISH_TARGETS`` is ``local``."""
    settings = settings or get_settings()
    if settings.publish_targets == "local":
        return None
    storage = object_storage(settings.channel_conn_id or settings.storage_conn_id, settings.channel_bucket,
                             settings=settings)
    return ReleaseChannel(storage, kind, settings.channel_prefix, keep=settings.keep_versions,
                          signer=manifest_signer(settings))


def manifest_signer(settings: Settings | None = None) -> ManifestSigner | None:
    """What signs the channel's manifests: the Ed25519 private key (PEM) in the password of the Airflow
    connection ``INSPECTION_SIGNING_CONN_ID``, read at the first signature; ``None`` when that is unset.

    A connection, not a file: it comes from the metadata DB or the secrets backend every worker already
    reads (encrypted there), so no key file has to be copied onto each worker.
    """
    conn_id = (settings or get_settings()).signing_conn_id
    if not conn_id:
        return None
    source = f"Airflow connection {conn_id!r} (INSPECTION_SIGNING_CONN_ID)"

    def private_key() -> str:
        from airflow.sdk import BaseHook

        try:
            password = BaseHook.get_connection(conn_id).password
        except Exception as exc:  # not found, secrets backend down: the message names no secret
            raise SignatureError(f"cannot read {source}: {exc}") from None
        if not password:
            raise SignatureError(f"{source} has no password: put the PEM private key from "
                                 "'inspection-publish keygen' there")
        return password

    return ManifestSigner(private_key, source)


def publisher(kind: str, root: str | os.PathLike, releases: str | os.PathLike | None = None,
              settings: Settings | None = None) -> Publisher:
    """The Airflow side's :class:`Publisher` of ``root`` for ``kind`` (``clip``, ``patchcore``): with the
    release channel of ``INSPECTION_PUBLISH_TARGETS`` and, with a channel, the deployment database's
    artefact lock (:func:`artefact_lock`)."""
    settings = settings or get_settings()
    channel = release_channel(kind, settings)
    return Publisher(root, keep=settings.keep_versions, releases=releases, channel=channel,
                     lock=artefact_lock(channel, settings) if channel is not None else None)


def artefact_lock(channel: ReleaseChannel, settings: Settings | None = None) -> LockFactory:
    """The lock every Airflow host takes to change what is live of an artefact of ``channel``: a named lock
    (``GET_LOCK``) of the deployment database (``INSPECTION_DB_CONN_ID``), which every Airflow host
    already shares; named after the artefact's place in the bucket. Without a channel the publisher's own
    file lock is enough: only one host publishes."""
    registry = deployment_registry(settings=settings)

    def lock(name: str) -> AbstractContextManager[None]:
        return registry.named_lock(f"inspection-refresh {channel.url(channel.name_prefix(name))}",
                                   purpose=f"{channel.label(name)} (publish, rollback, pin or prune)")

    return lock


def index_publisher(settings: Settings | None = None) -> Publisher:
    """Publishes the CLIP indexes (``normal``, ``defect``) under ``INSPECTION_INDEX_ROOT``."""
    settings = settings or get_settings()
    return publisher("clip", settings.index_root, settings.index_releases, settings)


def patchcore_publisher(settings: Settings | None = None) -> Publisher:
    """Publishes the PatchCore banks (one name per product code) under ``INSPECTION_PATCHCORE_ROOT``."""
    settings = settings or get_settings()
    return publisher("patchcore", settings.patchcore_root, settings.patchcore_releases, settings)


def deployment_registry(conn_id: str | None = None, settings: Settings | None = None) -> DeploymentRegistry:
    """The service's ``deployment_logs`` through Airflow MySQL connection ``conn_id``
    (default ``INSPECTION_DB_CONN_ID``); the connection is opened per statement, never at construction."""
    conn_id = conn_id or (settings or get_settings()).db_conn_id

    @cache
    def hook() -> Any:  # made on first use: building a registry reads no connection
        from airflow.providers.mysql.hooks.mysql import MySqlHook

        return MySqlHook(mysql_conn_id=conn_id)

    return DeploymentRegistry(lambda: hook().get_conn(), conn_id)


def run_store(pipeline: str, run_id: str, settings: Settings | None = None, *,
              storage: ObjectStorage | None = None) -> RunStore:
    """The run store of ``run_id`` of ``pipeline`` as ``INSPECTION_RUN_STORE`` says (``storage``: in the
    storage connection's bucket unless ``storage`` is given)."""
    settings = settings or get_settings()
    if settings.run_store == "storage" and storage is None:
        storage = object_storage(settings.storage_conn_id, settings=settings)
    return RunStore.for_run(pipeline, run_id, settings, storage=storage)
