"""Where an :class:`~inspection_refresh.storage.ObjectStorage` gets its boto3 client.

NCP Object Storage speaks S3 with three quirks every client here absorbs:

* only ``ListObjects`` (V1, marker paging) works, so listing never uses V2;
* boto3 >= 1.36 adds CRC checksums that S3-compatible stores reject or mangle, so
  checksums are calculated/validated only ``when_required``;
* buckets are addressed path-style.

A source makes the client with those defaults (:data:`NCP_SAFE_CLIENT_CONFIG`) and
says, in its own terms, what to fix when the storage refuses it. On Airflow hosts the
source is an Airflow connection (:class:`inspection_refresh.compose.AirflowConnectionSource`);
on hosts without Airflow it is boto3's own credential chain (:class:`Boto3Source`).
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Protocol

log = logging.getLogger(__name__)

NCP_SAFE_CLIENT_CONFIG: dict[str, Any] = {
    "s3": {"addressing_style": "path"},
    "request_checksum_calculation": "when_required",
    "response_checksum_validation": "when_required",
    "retries": {"mode": "standard", "max_attempts": 3},
    "connect_timeout": 10,
    "read_timeout": 60,
}
"""botocore ``Config`` defaults for NCP; a source may let its configuration override them."""

Problem = Literal["no_credentials", "rejected", "no_bucket", "unreachable"]


class ClientSource(Protocol):
    """Makes S3 clients and explains refusals in the words of where its settings live."""

    label: str
    """Where the client's settings come from, for log lines (``connection 'ncp_object_storage'``)."""

    def configured_bucket(self) -> str | None:
        """The bucket the source names, if any."""

    def client(self, defaults: Any) -> Any:
        """A boto3 S3 client with ``defaults`` (a botocore ``Config``) under the source's own overrides."""

    def hint(self, problem: Problem, *, bucket: str, code: str = "") -> str:
        """What to fix: ``problem`` happened on ``bucket`` (``code``: the storage's error code)."""


class Boto3Source:
    """boto3's own credential chain, for hosts without Airflow (the serving hosts' agent).

    Credentials: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (NCP's access key and
    secret key), a profile (``profile`` or ``AWS_PROFILE``), or anything else boto3 finds.
    ``endpoint_url`` (else ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``) points it at NCP;
    the region is ``region_name``, else the environment's or profile's, else ``kr-standard``.
    """

    DEFAULT_REGION = "kr-standard"
    label = "boto3 credential chain"

    def __init__(self, *, endpoint_url: str | None = None, region_name: str | None = None,
                 profile: str | None = None) -> None:
        self.endpoint_url = endpoint_url
        self.region_name = region_name
        self.profile = profile

    def configured_bucket(self) -> str | None:
        return None

    def client(self, defaults: Any) -> Any:
        import boto3

        session = boto3.session.Session(profile_name=self.profile)
        return session.client("s3", endpoint_url=self.endpoint_url, config=defaults,
                              region_name=self.region_name or session.region_name or self.DEFAULT_REGION)

    def hint(self, problem: Problem, *, bucket: str, code: str = "") -> str:
        return {
            "no_credentials": "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or --profile",
            "rejected": f"the storage rejected the credentials ({code}): check the access key, secret key and --region",
            "no_bucket": f"bucket {bucket!r} does not exist: check --bucket",
            "unreachable": "cannot reach the storage endpoint: check --endpoint-url (or AWS_ENDPOINT_URL)",
        }[problem]
