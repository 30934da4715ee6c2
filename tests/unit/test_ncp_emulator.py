"""The emulator's fault injection: reproducible, per key, only where it is asked for."""

from __future__ import annotations

from collections import Counter

import pytest

from inspection_refresh.dev.ncp_emulator import Faults, object_key

KEYS = [f"images/normal/1/{i:03d}.jpg" for i in range(400)]


def draws(faults: Faults, keys: list[str], rounds: int = 3) -> dict[tuple[str, int], str | None]:
    return {(key, n): faults.object_fault(key) for n in range(rounds) for key in keys}


def test_the_same_seed_gives_the_same_faults_whatever_order_the_keys_come_in():
    first = draws(Faults(slowdown_rate=0.1, cut_rate=0.1, seed=7), KEYS)
    second = draws(Faults(slowdown_rate=0.1, cut_rate=0.1, seed=7), list(reversed(KEYS)))
    assert first == second
    assert first != draws(Faults(slowdown_rate=0.1, cut_rate=0.1, seed=8), KEYS)


def test_rates_are_roughly_the_share_of_faulty_gets():
    counts = Counter(draws(Faults(slowdown_rate=0.1, cut_rate=0.2, seed=1), KEYS).values())
    total = sum(counts.values())
    assert counts["slowdown"] / total == pytest.approx(0.1, abs=0.03)
    assert counts["cut"] / total == pytest.approx(0.2, abs=0.03)


def test_always_failing_keys_fail_every_get_and_others_never_do():
    faults = Faults(always_fail=["1/007.jpg"])
    assert {faults.object_fault("images/normal/1/007.jpg") for _ in range(20)} == {"cut"}
    assert {faults.object_fault("images/normal/1/008.jpg") for _ in range(20)} == {None}
    faults.update({"always_fail": []})
    assert faults.object_fault("images/normal/1/007.jpg") is None


@pytest.mark.parametrize(("path", "key"), [
    ("/bucket/images/normal/1/a%20b.jpg?X-Amz-Signature=x", "images/normal/1/a b.jpg"),
    ("/bucket?prefix=images/&marker=", None),
    ("/bucket/", None),
    ("/bucket", None),
])
def test_only_object_requests_name_a_key(path, key):
    assert object_key(path) == key


def test_slow_uploads_hold_only_puts_of_matching_keys_and_can_be_switched_off():
    faults = Faults(slow_upload={"deployments/clip/normal/v3/": 1.5, "deployments/": 0.1})
    assert faults.upload_delay("deployments/clip/normal/v3/faiss_index.bin") == 1.5  # the longest match
    assert faults.upload_delay("deployments/clip/normal/v2/faiss_index.bin") == 0.1
    assert faults.upload_delay("images/normal/1/a.jpg") == 0.0
    faults.update({"slow_upload": {}})
    assert faults.upload_delay("deployments/clip/normal/v3/faiss_index.bin") == 0.0
