"""The PatchCore build's floor, and where the build's time goes; run as a subprocess by ``bench_patchcore.py``.

``bare``: the bare torchvision ResNet-50 forward (eval, ``torch.inference_mode``, plain
``resnet50(weights=None)`` run only as deep as the deepest layer used) over the images a
build extracts, decoded and resized beforehand (untimed), in the builder's batches (its
stages -- calibration, held out, defect -- cut into ``batch_size`` runs). Prints
``BARE_FORWARD {json}``. It does no pooling, no decoding and no copying. Then, on the same
tensors, the builder's own prepared backbone (BatchNorm folded into the convolutions,
channels_last; stages only): ``prepared_backbone_seconds``, the stricter floor.

``build``: ``python -m inspection_refresh.patchcore.build`` unchanged, with timers around its
stages (the extraction generator's own time, the coreset picks, calibration, bank writing,
model set-up, scoring against the calibration bank, the suspected-defect scores). Prints the builder's
``PATCHCORE_SUMMARY`` line and ``BUILD_STAGES {json}``.

Both set ``OMP_WAIT_POLICY=PASSIVE`` before torch loads, as the builder's CLI does, and use
torch's default thread count: the same threads for both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: what build.main sets

STAGE_TIMES: dict[str, float] = defaultdict(float)
STAGE_CALLS: dict[str, int] = defaultdict(int)


def stage_sizes(normals: int, defects: int, holdout: float) -> list[int]:
    """Images per extraction stage, as ``product._split`` divides them (calibration, held out, defect)."""
    held = min(normals - 1, max(1, round(holdout * normals)))
    return [normals - held, held, defects]


def bare_forward(ok_dir: Path, defect_dir: Path | None, layers: list[str], batch_size: int, shorter: int,
                 holdout: float) -> dict:
    import torch
    import torchvision

    from inspection_refresh.patchcore.features import IMAGENET_MEAN, IMAGENET_STD, PatchFeatureExtractor
    from inspection_refresh.patchcore.images import list_images, load_rgb

    normals = list_images(ok_dir)
    defects = list_images(defect_dir) if defect_dir else []
    paths = normals + defects
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = [(torch.from_numpy(load_rgb(p, shorter)).permute(2, 0, 1)[None] - mean) / std for p in paths]
    batches, start = [], 0
    for size in stage_sizes(len(normals), len(defects), holdout):
        stage = pixels[start : start + size]
        batches += [torch.cat(stage[i : i + batch_size]).contiguous() for i in range(0, size, batch_size)]
        start += size
    model = torchvision.models.resnet50(weights=None).eval()
    deepest = max(int(name[-1]) for name in layers)
    stages = [model.conv1, model.bn1, model.relu, model.maxpool] + [getattr(model, f"layer{i}")
                                                                   for i in range(1, deepest + 1)]
    cpu_before = time.process_time()
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            x = batch
            for stage in stages:
                x = stage(x)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_before
    # The builder's own prepared backbone (BatchNorm folded, channels_last), stages only: no pooling, no decode.
    prepared = PatchFeatureExtractor(model, layers, stride=2).stages.values()
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            x = batch.contiguous(memory_format=torch.channels_last)
            for stage in prepared:
                x = stage(x)
    return {"images": len(paths), "batches": len(batches), "batch_size": batch_size, "seconds": round(seconds, 3),
            "cpu_seconds": round(cpu_seconds, 3), "threads": torch.get_num_threads(),
            "input": list(batches[0].shape[1:]), "deepest_layer": f"layer{deepest}",
            "prepared_backbone_seconds": round(time.perf_counter() - started, 3)}


def _timed(owner: object, name: str, stage: str) -> None:
    """Replace ``owner.name`` by a wrapper adding its wall time to ``STAGE_TIMES[stage]``."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            STAGE_TIMES[stage] += time.perf_counter() - started
            STAGE_CALLS[stage] += 1

    setattr(owner, name, wrapper)


def _timed_generator(original: Callable[..., Iterator], stage: str) -> Callable[..., Iterator]:
    """A generator function timing only its own ``next()`` calls (not what the consumer does meanwhile)."""

    def wrapper(*args, **kwargs):
        generator = original(*args, **kwargs)
        while True:
            started, cpu_started = time.perf_counter(), time.process_time()  # CPU: every thread of the process
            try:
                item = next(generator)
            except StopIteration:
                item = None
            STAGE_TIMES[stage] += time.perf_counter() - started
            STAGE_TIMES[f"{stage} (CPU)"] += time.process_time() - cpu_started
            if item is None:
                return
            STAGE_CALLS[stage] += 1
            yield item

    return wrapper


def timed_build(argv: list[str]) -> int:
    import torch

    from inspection_refresh.patchcore import bank, build, features, product, reservoir, scoring

    product._extract = _timed_generator(product._extract, "extraction")  # STAGE_CALLS: images extracted
    _timed(product, "_select", "coreset")
    _timed(product, "_calibration", "calibration")
    _timed(bank, "write_bank", "writing (bank files, histogram)")
    _timed(features, "load_resnet50", "model (weights)")
    _timed(features.PatchFeatureExtractor, "__init__", "model (fold, channels_last)")
    _timed(scoring.ReferenceScorer, "patch_distances", "scoring against the calibration bank")
    _timed(scoring.ReferenceScorer, "score_features", "scoring against the calibration bank")
    _timed(reservoir.PatchReservoir, "add", "reservoir")
    try:  # the suspected-defect scores (patchcore/quality.py), where the builder has them
        from inspection_refresh.patchcore import quality
    except ImportError:
        quality = None
    for name in ("leave_one_image_out_distances", "scores_by_source", "quality_record"):
        if quality is not None and hasattr(quality, name):
            _timed(quality, name, "quality (out-of-sample scores)")
    started, cpu_before = time.perf_counter(), time.process_time()
    status = build.main(argv)
    print("BUILD_STAGES " + json.dumps({
        "main_seconds": round(time.perf_counter() - started, 3),
        "main_cpu_seconds": round(time.process_time() - cpu_before, 3),
        "threads": torch.get_num_threads(),
        "seconds": {name: round(value, 3) for name, value in STAGE_TIMES.items()},
        "calls": dict(STAGE_CALLS)}), flush=True)
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    bare = sub.add_parser("bare")
    bare.add_argument("--ok_dir", type=Path, required=True)
    bare.add_argument("--defect_dir", type=Path)
    bare.add_argument("--layers", default="layer2,layer3")
    bare.add_argument("--batch_size", type=int, default=4)
    bare.add_argument("--shorter", type=int, default=512)
    bare.add_argument("--holdout", type=float, default=0.2)
    sub.add_parser("build", add_help=False)
    args, rest = parser.parse_known_args()
    if args.command == "build":
        return timed_build(rest)
    result = bare_forward(args.ok_dir, args.defect_dir, args.layers.split(","), args.batch_size, args.shorter,
                          args.holdout)
    print("BARE_FORWARD " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
