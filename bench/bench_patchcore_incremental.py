"""Incremental PatchCore builds; writes ``bench/results/patchcore_incremental.json``.

One product at the builder's defaults (60 normal 900x900 JPEGs + 6 labelled defect images, as the
DAG passes them, ``--weights random``), every build in its own subprocess exactly as
``build_patchcore.sh`` runs it:

1. ``warm-up``: a build of the 60 images with an empty ``--feature_cache`` (fills it);
2. 6 new normal images (+10 %) are added;
3. ``full``: a build of the 66 images from scratch (no cache);
4. ``incremental``: the same 66 images with the warm cache (extracts the 6 new ones only);
5. ``no change``: the same again (extracts nothing).

Ratios of ``incremental`` and ``no change`` to ``full``: wall time of the process (what the DAG's
build task waits for: interpreter, imports and all), its CPU time (less sensitive to other load on
the machine), and the builder's own seconds (``build_product``, without interpreter and imports).
Target: the incremental build <= 0.25 of the full one (wall). The incremental bank (its coreset
warm-started from the previous build's picks, :mod:`inspection_refresh.patchcore.coreset_memory`) must
be as good as the full one: same rows count, same held-out AUROC, tau within
``coreset_memory.TAU_RELATIVE_TOLERANCE`` (relative); the no-change bank must equal the warm-up's
picks' bank (it is the same images) -- recorded as ``no_change_bank_equals_incremental``.

Usage::

    .venv/bin/python bench/bench_patchcore_incremental.py [--normals 60] [--workdir DIR]

Timings depend on what else runs on the machine; the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "patchcore_incremental.json"
TARGET_RATIO = 0.25
from inspection_refresh.patchcore.coreset_memory import TAU_RELATIVE_TOLERANCE as TAU_TOLERANCE  # noqa: E402


def run_build(args: list[str], log_path: Path) -> dict:
    """One ``python -m inspection_refresh.patchcore.build`` process: wall and CPU seconds, its summary."""
    with open(log_path, "w") as stderr, tempfile.TemporaryFile("w+") as stdout:
        started = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "inspection_refresh.patchcore.build", *args],
                                 stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        stdout.seek(0)
        lines = [line for line in stdout.read().splitlines() if line.startswith("PATCHCORE_SUMMARY ")]
    if os.waitstatus_to_exitcode(status) != 0 or not lines:
        sys.exit(f"build failed ({' '.join(args)}); its log: {log_path}\n{log_path.read_text()[-3000:]}")
    summary = json.loads(lines[-1].split(" ", 1)[1])
    return {"wall_seconds": round(wall, 2), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
            "build_seconds": summary["seconds"], "stage_seconds": stage_seconds(log_path.read_text()),
            "summary": summary}


_FINISHED = re.compile(r"\] (?P<stage>[^:\]]+): \d+/\d+ \w+ \(100%\).*elapsed (?P<time>(?:\d+h)?(?:\d+m)?\d+s)")


def stage_seconds(log_text: str) -> dict[str, int]:
    """Seconds of each stage that logged progress (extraction, coreset), from its last progress line."""
    stages = {}
    for match in _FINISHED.finditer(log_text):
        parts = re.findall(r"(\d+)([hms])", match["time"])
        stages[match["stage"]] = sum(int(n) * {"h": 3600, "m": 60, "s": 1}[unit] for n, unit in parts)
    return stages


def make_images(directory: Path, seeds: range, defect: bool = False) -> None:
    from inspection_refresh.dev.samples import DEFECT_TYPES, render_defect, render_normal

    directory.mkdir(parents=True, exist_ok=True)
    for number, seed in enumerate(seeds):
        kind = DEFECT_TYPES[number % len(DEFECT_TYPES)]
        image = render_defect(0, seed, kind) if defect else render_normal(0, seed)
        image.save(directory / f"P0_{kind if defect else 'ok'}_{seed:05d}.jpg", quality=90)


def bench(root: Path, normals: int, defects: int) -> dict:
    new = max(1, round(normals / 10))
    ok, defect, later, cache = root / "ok", root / "defect", root / "later", root / "feature_cache"
    generation = time.perf_counter()
    make_images(ok, range(normals))
    make_images(later, range(normals, normals + new))
    make_images(defect, range(10_000, 10_000 + defects), defect=True)
    generation = time.perf_counter() - generation

    def build(name: str, cached: bool) -> dict:
        args = ["--product", "P0", "--ok_dir", str(ok), "--out_dir", str(root / f"bank-{name}"),
                "--defect_dir", str(defect), "--weights", "random"]
        result = run_build(args + (["--feature_cache", str(cache)] if cached else []), root / f"{name}.log")
        print(f"{name}: wall {result['wall_seconds']:.1f}s, cpu {result['cpu_seconds']:.1f}s, "
              f"build {result['build_seconds']:.1f}s, cache {result['summary']['feature_cache']}", flush=True)
        return result

    warm_up = build("warm-up", cached=True)
    for path in later.iterdir():
        shutil.move(path, ok / path.name)
    full = build("full", cached=False)
    incremental = build("incremental", cached=True)
    unchanged = build("no-change", cached=True)

    def ratios(run: dict) -> dict:
        return {key: round(run[key] / full[key], 3) for key in ("wall_seconds", "cpu_seconds", "build_seconds")}

    a, b = full["summary"], incremental["summary"]
    same = {"bank_size": a["bank_size"] == b["bank_size"], "auroc": a["auroc"] == b["auroc"],
            "tau_within_tolerance": all(abs(a["tau"][k] - b["tau"][k]) <= TAU_TOLERANCE * abs(a["tau"][k])
                                        for k in ("pixel", "image"))}
    incremental_ratios = ratios(incremental)
    same["no_change_bank_equals_incremental"] = _bank_bytes(root / "bank-no-change") == _bank_bytes(
        root / "bank-incremental")
    return {
        "setup": {"normal_images": normals, "new_images": new, "defect_images": defects, "image_size": [900, 900],
                  "format": "JPEG q90", "weights": "random (offline)", "options": "builder defaults",
                  "dataset_generation_seconds": round(generation, 2)},
        "runs": {"warm_up": warm_up, "full": full, "incremental": incremental, "no_change": unchanged},
        "incremental_ratio": incremental_ratios,
        "no_change_ratio": ratios(unchanged),
        "incremental_bank_equally_good": same,
        "target": {"incremental_wall_ratio_at_most": TARGET_RATIO, "tau_relative_tolerance": TAU_TOLERANCE},
        "pass": {"ratio": incremental_ratios["wall_seconds"] <= TARGET_RATIO, "bank": all(same.values())},
    }


def _bank_bytes(out_dir: Path) -> bytes:
    import torch

    return torch.load(out_dir / "memory_bank.pt").numpy().tobytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--normals", type=int, default=60)
    parser.add_argument("--defects", type=int, default=6)
    parser.add_argument("--workdir", type=Path, help="keep the images, banks and logs here (default: a temp dir)")
    parser.add_argument("--note", default="", help="recorded with the results (e.g. what else loads the machine)")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_patchcore_incremental_") as tmp:
        root = args.workdir or Path(tmp)
        results = bench(root, args.normals, args.defects)
    results["machine"] = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "python": platform.python_version()}
    results["load_average_before_after"] = [load_before, os.getloadavg()]
    results["note"] = args.note
    results["measured"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({key: results[key] for key in ("incremental_ratio", "no_change_ratio",
                                                    "incremental_bank_equally_good", "pass")}, indent=1))
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
