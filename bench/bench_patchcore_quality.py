"""What the suspected-defect check costs a PatchCore build; writes ``bench/results/patchcore_quality.json``.

Builds ``--products`` products of 60 normal ~900x900 JPEGs (the build benchmark's data set, plus
6 labelled defect images each) at the builder's defaults with ``--weights random``, each in its
own subprocess as ``build_patchcore.sh`` runs it, and reads from each build the seconds of the
whole build (its summary) and of the out-of-sample scoring (``quality.json``'s ``seconds``: the
leave-one-image-out pass over the calibration images and the list; the held-out scores are the
build's own). The ratio is ``build / (build - quality)``, i.e. the build with the check against
the same build without it, measured in the same process under the same load.
Target: <= 1.15 at the defaults. The load average before and after is recorded.

Usage::

    .venv/bin/python bench/bench_patchcore_quality.py [--products 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_patchcore import make_dataset, run_measured  # noqa: E402 -- the build benchmark's data set and runner

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "patchcore_quality.json"
TARGET_RATIO = 1.15


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=4)
    parser.add_argument("--normals", type=int, default=60)
    args = parser.parse_args()
    load_before = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_patchcore_quality_") as tmp:
        root = Path(tmp)
        make_dataset(root, args.products, args.normals, 6)
        for product in range(args.products):
            name = f"P{product}"
            bank = root / name / "bank"
            command = [sys.executable, "-m", "inspection_refresh.patchcore.build", "--product", name,
                       "--ok_dir", str(root / name / "ok"), "--out_dir", str(bank),
                       "--defect_dir", str(root / name / "defect"), "--weights", "random"]
            result = run_measured(command, log_path=root / f"{name}.log")
            if result["returncode"] != 0:
                sys.exit(f"{name} build failed:\n{(root / f'{name}.log').read_text()[-3000:]}")
            summary = json.loads(next(line.split(" ", 1)[1] for line in result["stdout"].splitlines()
                                      if line.startswith("PATCHCORE_SUMMARY ")))
            quality = json.loads((bank / "quality.json").read_text())
            build, check = summary["seconds"], quality["seconds"]
            runs.append({"product": name, "build_seconds": build, "quality_seconds": check,
                         "ratio": round(build / (build - check), 4), "wall_seconds": result["seconds"],
                         "images_scored": quality["images_scored"],
                         "suspected_defects": len(quality["suspected_defects"]),
                         "max_score_over_tau": max((s["score_over_tau"] for s in quality["suspected_defects"]),
                                                   default=None)})
            print(f"{name}: build {build:.1f}s, quality {check:.2f}s, ratio {runs[-1]['ratio']:.3f}, "
                  f"{runs[-1]['suspected_defects']} suspected", flush=True)
    build_total = sum(r["build_seconds"] for r in runs)
    check_total = sum(r["quality_seconds"] for r in runs)
    ratio = build_total / (build_total - check_total)
    results = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "setup": {"products": args.products, "normal_images_per_product": args.normals,
                  "defect_images_per_product": 6, "image_size": [900, 900], "options": "defaults, --weights random"},
        "products": runs,
        "build_seconds": round(build_total, 2),
        "quality_seconds": round(check_total, 2),
        "ratio": round(ratio, 4),
        "target_ratio": TARGET_RATIO,
        "pass": ratio <= TARGET_RATIO,
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"ratio {ratio:.3f} (target <= {TARGET_RATIO}), written to {RESULTS}")


if __name__ == "__main__":
    main()
