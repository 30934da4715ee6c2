"""Counts in log lines and deployment records agree with the lists beside them, in good English."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from inspection_refresh.progress import counted
from inspection_refresh.storage import SyncResult
from inspection_refresh.storage.sync import _log_skipped
from inspection_refresh.tasks.clip_index import published_message
from inspection_refresh.tasks.common import cap_list


@pytest.mark.parametrize("count, expected", [(0, "0 objects"), (1, "1 object"), (2, "2 objects")])
def test_counted_uses_the_singular_for_one(count, expected):
    assert counted(count, "object") == expected


def test_counted_takes_an_irregular_plural():
    assert counted(1, "more object", "more objects") == "1 more object"
    assert counted(3, "index", "indexes") == "3 indexes"


def test_sync_summary_counts_are_the_lengths_of_its_lists():
    result = SyncResult(prefix="images/normal/", local_dir=Path("/tmp/x"),
                        skipped=[(f"images/normal/{i}.txt", "not an image") for i in range(60)],
                        failed=[("images/normal/a.jpg", "503")])
    summary = result.summary()
    assert (summary["num_skipped"], summary["num_failed"]) == (60, 1)
    assert len(summary["skipped"]) == 60 and len(summary["failed"]) == 1
    # a record that shortens the list still carries the exact count
    assert len(cap_list(summary["skipped"])) == 51 and summary["num_skipped"] == 60


def test_the_log_counts_the_skipped_objects_it_does_not_name(caplog):
    with caplog.at_level(logging.WARNING, logger="inspection_refresh.storage"):
        _log_skipped([(f"k{i}", "not an image") for i in range(21)])
    assert caplog.records[-1].getMessage() == "... and 1 more object skipped (see the deployment record)"


def result_data(**overrides) -> dict:
    data = {"index_type": "normal", "version": "v1", "num_images": 12, "embedding_dim": 512, "embedded": 3,
            "cached": 9, "random_weights": False, "skipped_objects": [], "num_skipped_objects": 0,
            "unreadable_images": [], "num_unreadable_images": 0, "missing_images": [], "num_missing_images": 0}
    return data | overrides


def test_an_unreadable_image_is_not_reported_as_a_skipped_object():
    """The old message said "1 objects skipped" beside an empty skipped_objects list."""
    data = result_data(unreadable_images=[["images/normal/2/corrupt.jpg", "corrupt"]], num_unreadable_images=1)
    message = published_message(data)
    assert "skipped" not in message
    assert message == ("normal index version v1 published: 12 images (3 embedded, 9 cached, "
                       "1 image unreadable (see unreadable_images)), dim 512")


def test_each_count_in_the_message_is_the_count_of_its_list():
    skipped = [[f"images/normal/{i}.txt", "not an image"] for i in range(120)]
    data = result_data(num_images=1, skipped_objects=cap_list(skipped), num_skipped_objects=len(skipped),
                       missing_images=["images/normal/1/a.jpg"], num_missing_images=1, random_weights=True)
    message = published_message(data)
    assert message == ("normal index version v1 published: 1 image (3 embedded, 9 cached, "
                       "120 objects skipped (see skipped_objects), "
                       "1 MISSING (could not be downloaded; see missing_images)), dim 512"
                       " — RANDOM weights (demo/test only)")


def test_one_skipped_object_is_singular():
    data = result_data(skipped_objects=[["images/normal/1/notes.txt", "not an image"]], num_skipped_objects=1)
    assert "1 object skipped (see skipped_objects)" in published_message(data)
