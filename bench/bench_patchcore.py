"""PatchCore benchmarks; writes ``bench/results/patchcore.json``.

(a) ``build``: full builds of 4 products x 60 normal ~900x900 JPEGs (plus 6 labelled defect
    images each, which the builder scores for its calibration AUROC, as the DAG passes them)
    with ``--weights random``, with the old ``build_bank.py`` settings (layer2-4, coreset 0.02),
    with layer2-3 at coreset 0.1 (this package's previous defaults) and with its defaults. Every product is built in its own subprocess,
    exactly as ``build_patchcore.sh`` runs it; its wall time and peak RSS (``os.wait4`` rusage of
    that child) are recorded. Each published bank is then scored, untimed, by
    ``ReferenceScorer`` (the service's query path, FAISS) on a test set the build never saw
    (8 normal + 9 defect images per product): image AUROC and accuracy at tau.
    Targets: each setting's 4 products in <= 90 s in total, every build's peak RSS < 2 GB.
    The floor, in the same run (issue #17): before each build, ``patchcore_floor.py bare`` times
    the bare torchvision ResNet-50 forward (eval, no grad, batches of 4 pre-decoded 512-short-side
    tensors, up to the deepest layer used) over the images that build extracts; the build runs
    through ``patchcore_floor.py build`` (the CLI unchanged, with timers around its stages).
    Targets: extraction throughput >= 0.9 of the bare forward's, build (``build_product``) <= 1.5x
    its time. Absolute seconds do not carry between machines; these ratios do.
(b) ``coreset``: greedy k-center selection on 100,000 x 3,584 float32 random features at
    ratio 0.02, in a subprocess. Targets: <= 15 s, peak RSS < 2 GB.

Random weights (no pretrained download here): AUROC compares settings on these synthetic
textures only; it says nothing about ImageNet features on real parts.

Usage::

    .venv/bin/python bench/bench_patchcore.py                 # both parts
    .venv/bin/python bench/bench_patchcore.py --part coreset  # one part (the other's results are kept)
    .venv/bin/python bench/bench_patchcore.py --part build --settings old_build_bank,defaults

Timings depend on what else runs on the machine; the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "patchcore.json"
GB = 1024**3
BUILD_TARGETS = {"total_seconds": 90.0, "peak_rss_bytes": 2 * GB}
SETTINGS = {
    "old_build_bank": ["--layers", "layer2,layer3,layer4", "--coreset", "0.02"],
    "layer2_3_coreset_0.1": ["--layers", "layer2,layer3", "--coreset", "0.1"],  # the previous defaults
    "defaults": [],
}
TEST_NORMALS, TEST_DEFECTS = 8, 9
FLOOR = Path(__file__).resolve().parent / "patchcore_floor.py"
CPU_BATCH_SIZE = 4  # the builder's default batch on CPU (BuildOptions.batch_size 0)
FLOOR_TARGETS = {"extraction_ratio_at_least": 0.9, "build_ratio_at_most": 1.5}
CORESET_TARGETS = {"seconds": 15.0, "peak_rss_bytes": 2 * GB}


def run_measured(command: list[str], env: dict[str, str] | None = None, log_path: Path | None = None) -> dict:
    """Run ``command``; return wall seconds, peak RSS of the child (bytes), exit code and stdout."""
    stderr = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115 -- closed below
    with tempfile.TemporaryFile("w+") as stdout:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        output = stdout.read()
    if log_path:
        stderr.close()
    return {"seconds": round(wall, 2), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_bytes": usage.ru_maxrss * 1024, "returncode": child.returncode, "stdout": output}


def make_dataset(root: Path, products: int, normals: int, defects: int) -> float:
    """Write ``{root}/P{i}/{ok,defect}`` (build input) and ``{root}/P{i}/test/{ok,defect}``; returns seconds."""
    from inspection_refresh.dev.samples import DEFECT_TYPES, render_defect, render_normal

    started = time.perf_counter()
    for product in range(products):
        base = root / f"P{product}"
        sets = [(base / "ok", range(normals), None), (base / "defect", range(10_000, 10_000 + defects), True),
                (base / "test" / "ok", range(5_000, 5_000 + TEST_NORMALS), None),
                (base / "test" / "defect", range(20_000, 20_000 + TEST_DEFECTS), True)]
        for directory, seeds, defect in sets:
            directory.mkdir(parents=True)
            for number, seed in enumerate(seeds):
                kind = DEFECT_TYPES[number % len(DEFECT_TYPES)]
                image = render_defect(product, seed, kind) if defect else render_normal(product, seed)
                image.save(directory / f"P{product}_{kind if defect else 'ok'}_{seed:05d}.jpg", quality=90)
    return time.perf_counter() - started


def score_test_set(bank_dir: Path, test_dir: Path) -> dict:
    """The service's scoring of images the build never saw: AUROC and accuracy at tau."""
    from inspection_refresh.patchcore.calibration import accuracy_at_tau, auroc
    from inspection_refresh.patchcore.scoring import ReferenceScorer

    scorer = ReferenceScorer.from_bank_dir(bank_dir, device="cpu")
    normal = [scorer.score(p).score for p in sorted((test_dir / "ok").iterdir())]
    defect = [scorer.score(p).score for p in sorted((test_dir / "defect").iterdir())]
    return {"test_normal_images": len(normal), "test_defect_images": len(defect),
            "auroc": round(auroc(normal, defect), 4),
            "accuracy_at_tau": round(accuracy_at_tau(normal, defect, scorer.tau["image"]), 4)}


def bench_build(products: int, normals: int, defects: int, workdir: Path | None, settings: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_patchcore_") as tmp:
        root = workdir or Path(tmp)
        generation = make_dataset(root, products, normals, defects)
        results = {"dataset_generation_seconds": round(generation, 2)}
        for setting in settings:
            results[setting] = bench_setting(root, products, setting, SETTINGS[setting])
    results["setup"] = {"products": products, "normal_images_per_product": normals,
                        "defect_images_per_product": defects, "image_size": [900, 900], "format": "JPEG q90",
                        "test_set_per_product": {"normal": TEST_NORMALS, "defect": TEST_DEFECTS},
                        "weights": "random (offline)"}
    return results


def bench_setting(root: Path, products: int, setting: str, extra_args: list[str]) -> dict:
    """Per product, in this order: the bare forward (the floor), then the build, each in its own subprocess."""
    from inspection_refresh.patchcore.options import BuildOptions, parse_layers

    defaults = BuildOptions()
    layers = ",".join(parse_layers(extra_args[extra_args.index("--layers") + 1] if "--layers" in extra_args
                                   else defaults.layers))
    runs = []
    for product in range(products):
        name = f"P{product}"
        bank_dir = root / name / f"bank-{setting}"
        bare_command = [sys.executable, str(FLOOR), "bare", "--ok_dir", str(root / name / "ok"),
                        "--defect_dir", str(root / name / "defect"), "--layers", layers,
                        "--batch_size", str(CPU_BATCH_SIZE), "--shorter", str(defaults.shorter),
                        "--holdout", str(defaults.holdout)]
        bare_run = run_measured(bare_command, log_path=root / f"{name}-{setting}-bare.log")
        bare = _tagged_line(bare_run["stdout"], "BARE_FORWARD")
        command = [sys.executable, str(FLOOR), "build", "--product", name,
                   "--ok_dir", str(root / name / "ok"), "--out_dir", str(bank_dir),
                   "--defect_dir", str(root / name / "defect"), "--weights", "random", *extra_args]
        result = run_measured(command, log_path=root / f"{name}-{setting}.log")
        summary = _tagged_line(result["stdout"], "PATCHCORE_SUMMARY")
        stages = _tagged_line(result["stdout"], "BUILD_STAGES")
        for run, log_name in ((bare_run, f"{name}-{setting}-bare.log"), (result, f"{name}-{setting}.log")):
            if run["returncode"] != 0:
                print((root / log_name).read_text()[-3000:], file=sys.stderr)
        scored = score_test_set(bank_dir, root / name / "test") if result["returncode"] == 0 else None
        runs.append({"product": name, "returncode": result["returncode"], "wall_seconds": result["seconds"],
                     "cpu_seconds": result["cpu_seconds"], "peak_rss_mb": round(result["peak_rss_bytes"] / 2**20, 1),
                     "peak_rss_bytes": result["peak_rss_bytes"], "bare_forward": bare, "stages": stages,
                     "reference_scorer_test_set": scored, "summary": summary})
        if bare and stages and summary:
            print(f"{setting} {name}: bare forward {bare['seconds']:.1f}s, extraction "
                  f"{stages['seconds']['extraction']:.1f}s, build {summary['seconds']:.1f}s "
                  f"(process {result['seconds']:.1f}s, peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MB), "
                  f"test AUROC {scored and scored['auroc']}", flush=True)
    total = sum(r["wall_seconds"] for r in runs)
    peak = max(r["peak_rss_bytes"] for r in runs)
    ok = all(r["returncode"] == 0 and r["bare_forward"] and r["stages"] for r in runs)
    return {
        "options": " ".join(extra_args) or "defaults",
        "layers": layers,
        "products": runs,
        "total_seconds": round(total, 2),
        "max_peak_rss_mb": round(peak / 2**20, 1),
        "mean_test_auroc": round(sum(r["reference_scorer_test_set"]["auroc"] for r in runs) / len(runs), 4) if ok
        else None,
        "floor": floor_ratios(runs) if ok else None,
        "targets": {"total_seconds": BUILD_TARGETS["total_seconds"],
                    "peak_rss_mb": BUILD_TARGETS["peak_rss_bytes"] / 2**20, **FLOOR_TARGETS},
        "pass": {"all_completed": ok, "total_seconds": ok and total <= BUILD_TARGETS["total_seconds"],
                 "peak_rss": peak < BUILD_TARGETS["peak_rss_bytes"],
                 "extraction_ratio": ok and floor_ratios(runs)["extraction_ratio"] >= FLOOR_TARGETS[
                     "extraction_ratio_at_least"],
                 "build_ratio": ok and floor_ratios(runs)["build_ratio"] <= FLOOR_TARGETS["build_ratio_at_most"]},
    }


def floor_ratios(runs: list[dict]) -> dict:
    """The setting's builds against the bare forward over the same images, summed over its products.

    ``extraction_ratio``: the extraction stage's throughput over the bare forward's (same images:
    bare seconds / extraction seconds). ``build_ratio``: the build's time (``build_product``: decode,
    extraction, coreset, calibration, writing; the summary's seconds) over the bare forward's.
    ``process_ratio`` adds the interpreter and imports (the subprocess's wall time).
    """
    bare = sum(r["bare_forward"]["seconds"] for r in runs)
    bare_cpu = sum(r["bare_forward"]["cpu_seconds"] for r in runs)
    prepared = sum(r["bare_forward"]["prepared_backbone_seconds"] for r in runs)
    extraction = sum(r["stages"]["seconds"]["extraction"] for r in runs)
    build = sum(r["summary"]["seconds"] for r in runs)
    stages: dict[str, float] = {}
    for run in runs:
        for stage, seconds in run["stages"]["seconds"].items():
            stages[stage] = round(stages.get(stage, 0.0) + seconds, 2)
    extraction_cpu = stages.pop("extraction (CPU)", None)
    images = sum(r["bare_forward"]["images"] for r in runs)
    extracted = sum(r["stages"]["calls"].get("extraction", 0) for r in runs)
    return {
        "images": images, "images_extracted_by_builds": extracted,
        "threads": sorted({r["stages"]["threads"] for r in runs} | {r["bare_forward"]["threads"] for r in runs}),
        "bare_forward_seconds": round(bare, 2), "extraction_seconds": round(extraction, 2),
        "build_seconds": round(build, 2), "process_seconds": round(sum(r["wall_seconds"] for r in runs), 2),
        "extraction_ratio": round(bare / extraction, 3), "build_ratio": round(build / bare, 3),
        "process_ratio": round(sum(r["wall_seconds"] for r in runs) / bare, 3),
        "prepared_backbone_seconds": round(prepared, 2),
        "extraction_ratio_to_prepared_backbone": round(prepared / extraction, 3),
        "cpu": {"bare_forward_cpu_seconds": round(bare_cpu, 2),
                "build_cpu_seconds": round(sum(r["stages"]["main_cpu_seconds"] for r in runs), 2),
                "build_cpu_ratio": round(sum(r["stages"]["main_cpu_seconds"] for r in runs) / bare_cpu, 3),
                "extraction_cpu_seconds": extraction_cpu,
                "extraction_cpu_ratio": round(bare_cpu / extraction_cpu, 3) if extraction_cpu else None},
        "build_stage_seconds": stages,
        "build_seconds_outside_timed_stages": round(build - sum(stages.values()), 2),
    }


def _tagged_line(stdout: str, tag: str) -> dict | None:
    return next((json.loads(line.split(" ", 1)[1]) for line in stdout.splitlines() if line.startswith(tag + " ")),
                None)


def coreset_worker(rows: int, dim: int, ratio: float) -> None:
    """Runs in the measured subprocess: random features, then one timed selection; prints JSON."""
    import numpy as np

    from inspection_refresh.patchcore.coreset import KCenterGreedy

    features = np.random.default_rng(0).standard_normal((rows, dim), dtype=np.float32)
    size = int(np.ceil(ratio * rows))
    started = time.perf_counter()
    picked = KCenterGreedy(projection_dim=128, seed=0).select(features, size)
    seconds = time.perf_counter() - started
    print(json.dumps({"select_seconds": round(seconds, 3), "selected": len(picked),
                      "input_bytes": features.nbytes, "distinct": len(set(picked.tolist()))}))


def bench_coreset(rows: int, dim: int, ratio: float) -> dict:
    command = [sys.executable, __file__, "--_coreset_worker", str(rows), str(dim), str(ratio)]
    result = run_measured(command)
    if result["returncode"] != 0:
        raise SystemExit(f"coreset worker failed with exit {result['returncode']}")
    inner = json.loads(result["stdout"].strip().splitlines()[-1])
    print(f"coreset {rows}x{dim} @ {ratio}: select {inner['select_seconds']:.2f}s, process "
          f"{result['seconds']:.1f}s, peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MB", flush=True)
    return {
        "setup": {"rows": rows, "dim": dim, "ratio": ratio, "projection_dim": 128, "dtype": "float32"},
        "select_seconds": inner["select_seconds"],
        "selected": inner["selected"],
        "process_seconds_including_data_generation": result["seconds"],
        "input_mb": round(inner["input_bytes"] / 2**20, 1),
        "peak_rss_mb": round(result["peak_rss_bytes"] / 2**20, 1),
        "targets": {"seconds": CORESET_TARGETS["seconds"], "peak_rss_mb": CORESET_TARGETS["peak_rss_bytes"] / 2**20},
        "pass": {"seconds": inner["select_seconds"] <= CORESET_TARGETS["seconds"],
                 "peak_rss": result["peak_rss_bytes"] < CORESET_TARGETS["peak_rss_bytes"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["all", "build", "coreset"], default="all")
    parser.add_argument("--products", type=int, default=4)
    parser.add_argument("--images", type=int, default=60, help="normal images per product")
    parser.add_argument("--defects", type=int, default=6, help="defect images per product (AUROC only)")
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help="comma-separated, of: %(default)s")
    parser.add_argument("--workdir", type=Path, help="keep the generated images and banks here (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--_coreset_worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._coreset_worker:
        rows, dim, ratio = args._coreset_worker
        coreset_worker(int(rows), int(dim), float(ratio))
        return

    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results["machine"] = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "python": platform.python_version()}
    parts = {"coreset": lambda: bench_coreset(100_000, 3_584, 0.02),
             "build": lambda: bench_build(args.products, args.images, args.defects, args.workdir,
                                          args.settings.split(","))}
    for name, run in parts.items():
        if args.part in ("all", name):
            load_before = os.getloadavg()  # other work on the machine skews timings: keep the evidence
            results[name] = run()
            results[name]["measured"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            results[name]["load_average_before_after"] = [load_before, os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
