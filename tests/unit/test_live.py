"""``inspection_refresh.live.Releases``: the local root's word without a channel; with one, the channel's,
memoised per instance, giving up at once after the first storage error."""

from __future__ import annotations

import os

import pytest
from inspection_refresh.channel import ReleaseChannel
from inspection_refresh.live import Releases
from inspection_refresh.publish import Publisher
from inspection_refresh.storage import StorageError


def publish(publisher: Publisher, name: str, version: str, files: dict[str, bytes]) -> None:
    staging = publisher.stage(name)
    for rel, data in files.items():
        (staging / rel).write_bytes(data)
    publisher.publish(name, staging, version)


def test_without_a_channel_the_local_root_is_the_truth(tmp_path):
    publisher = Publisher(tmp_path / "root")
    publish(publisher, "BRKT01", "20261101T000000000000Z", {"tau.json": b"{}"})
    publish(publisher, "BRKT01", "20261102T000000000000Z", {"tau.json": b'{"image": 2}'})
    releases = Releases(publisher)
    assert releases.channel is None and releases.names() == ["BRKT01"]
    assert releases.current("BRKT01") == "20261102T000000000000Z"
    assert releases.versions("BRKT01") == ["20261101T000000000000Z", "20261102T000000000000Z"]
    assert releases.pinned("BRKT01") is None
    assert releases.read_file("BRKT01", "20261101T000000000000Z", "tau.json") == b"{}"
    assert releases.read_file("BRKT01", "20261101T000000000000Z", "bank_config.json") is None
    # A file that links out of its version is not part of it.
    secret = tmp_path / "secret"
    secret.write_bytes(b"not yours")
    os.symlink(secret, publisher.releases / "BRKT01" / "20261101T000000000000Z" / "link.json")
    assert releases.read_file("BRKT01", "20261101T000000000000Z", "link.json") is None
    assert releases.local_copy("BRKT01", "20261102T000000000000Z") == publisher.releases / "BRKT01" / "20261102T000000000000Z"
    assert releases.local_copy("BRKT01", "20261103T000000000000Z") is None


class UnreachableStorage:
    """Object storage whose endpoint refuses every request; counts them."""

    bucket = "dm-obs"
    max_transfers = 1

    def __init__(self) -> None:
        self.requests = 0
        storage = self

        class Client:
            def get_object(self, **kwargs):
                storage.requests += 1
                raise ConnectionRefusedError("connection refused")

        self.client = Client()

    def explain(self, exc: Exception, what: str, key: str | None = None) -> StorageError:
        return StorageError(f"{what} s3://{self.bucket}/{key} failed: cannot reach the endpoint", transient=True)


def test_with_a_channel_one_storage_error_ends_the_instances_reads(tmp_path):
    storage = UnreachableStorage()
    publisher = Publisher(tmp_path / "root", channel=ReleaseChannel(storage, "patchcore"))  # type: ignore[arg-type]
    releases = Releases(publisher)
    assert releases.where == "s3://dm-obs/deployments/patchcore/"
    with pytest.raises(StorageError, match="cannot reach"):
        releases.current("BRKT01")
    for read in (lambda: releases.current("GEAR02"), lambda: releases.pinned("BRKT01"),
                 lambda: releases.read_file("BRKT01", "20261101T000000000000Z", "tau.json")):
        with pytest.raises(StorageError, match="cannot reach"):
            read()
    assert storage.requests == 1 and releases.unreachable is not None
    # The next page (a new instance) tries again.
    with pytest.raises(StorageError):
        Releases(publisher).pinned("BRKT01")
    assert storage.requests == 2


def test_a_version_file_path_must_stay_inside_the_version(tmp_path):
    channel = ReleaseChannel(UnreachableStorage(), "clip")  # type: ignore[arg-type]
    for bad in ("../current.json", "/etc/passwd", "a//b", "./x", ""):
        with pytest.raises(Exception, match="is not a path inside version"):
            channel.read_version_file("normal", "20261101T000000000000Z", bad)
