"""The PatchCore bank builder's command line, compatible with the old ``build_bank.py``.

Usage::

    python -m inspection_refresh.patchcore.build --ok_dir DIR --out_dir DIR [--defect_dir DIR ...]
    python -m inspection_refresh.patchcore.build --root /data/patchCore   # every {root}/{product}/ok

(also installed as ``inspection-build-bank``). People read progress lines on stderr;
stdout gets one ``PATCHCORE_SUMMARY {json}`` line per product. The exit status is
non-zero when any product failed.

The build itself is :mod:`.product`; :func:`build_product`, :func:`build_root` and
:func:`run_product` stay importable from here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from inspection_refresh.patchcore.options import OLD_BUILD_BANK_DEFAULTS, BankBuildError, BuildOptions
from inspection_refresh.patchcore.product import build_product, build_root, run_product
from inspection_refresh.progress import progress_file_from_env, reporting_progress

__all__ = ["SUMMARY_PREFIX", "build_product", "build_root", "main", "run_product"]

log = logging.getLogger(__name__)

SUMMARY_PREFIX = "PATCHCORE_SUMMARY"


def _parser() -> argparse.ArgumentParser:
    defaults = BuildOptions()
    parser = argparse.ArgumentParser(
        prog="python -m inspection_refresh.patchcore.build",
        description="Build PatchCore memory banks (memory_bank.pt, bank_config.json, tau.json, score_histogram.png) "
                    "with the inspection service's own feature extraction (OpenCV decoding, ResNet-50 IMAGENET1K_V2).",
        epilog="Defaults next to the old build_bank.py's (chosen from measurements, see the README):\n"
               + "\n".join(f"  --{name:<14} {_shown(getattr(defaults, name)):<22} old: {old}"
                           for name, old in OLD_BUILD_BANK_DEFAULTS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--root", type=Path, help="build every {root}/{product}/ok into {root}/{product}/")
    where.add_argument("--ok_dir", type=Path, help="one product's normal images (needs --out_dir)")
    parser.add_argument("--out_dir", type=Path, help="where the bank files are written (with --ok_dir)")
    parser.add_argument("--product", help="product code for logs and the summary (with --ok_dir)")
    parser.add_argument("--defect_dir", type=Path, action="append", default=[],
                        help="labelled defect images, only for held-out AUROC and the histogram (repeatable)")
    parser.add_argument("--shorter", type=int, default=defaults.shorter, help="short side resize (default %(default)s)")
    parser.add_argument("--stride", type=int, default=defaults.stride,
                        help="patch sampling stride on the first layer's grid (default %(default)s)")
    parser.add_argument("--layers", nargs="+", default=[",".join(defaults.layers)],
                        help="resnet50 layers, comma- or space-separated (default %(default)s)")
    parser.add_argument("--coreset", type=float, default=defaults.coreset,
                        help="ratio of patches in (0, 1], or a patch count > 1 (default %(default)s)")
    parser.add_argument("--reservoir_max", type=int, default=defaults.reservoir_max,
                        help="patches kept per product (in a temporary file beside the output) before reservoir "
                             "sampling (default %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="default %(default)s")
    pct_help = ("percentile of held-out normal {} for tau.{}: a quantile in (0, 1] as the old build_bank.py "
                "took it (0.995 = 99.5th percentile) or a percentile in (1, 100] (default %(default)s)")
    parser.add_argument("--pixel_pct", type=float, default=defaults.pixel_pct,
                        help=pct_help.format("patch distances", "pixel"))
    parser.add_argument("--image_pct", type=float, default=defaults.image_pct,
                        help=pct_help.format("image scores", "image"))
    parser.add_argument("--holdout", type=float, default=defaults.holdout,
                        help="share of normal images held out to calibrate tau (default %(default)s)")
    parser.add_argument("--weights", default=defaults.weights,
                        help="imagenet (torchvision IMAGENET1K_V2, the service's) | random (offline demo/tests) | "
                             "path to a resnet50 state_dict "
                             "(default %(default)s)")
    parser.add_argument("--device", default=defaults.device, help="auto | cpu | cuda (default %(default)s)")
    parser.add_argument("--batch_size", type=int, default=defaults.batch_size,
                        help="images per forward pass; 0 = 4 on CPU, 8 on CUDA (default %(default)s)")
    parser.add_argument("--projection_dim", type=int, default=defaults.projection_dim,
                        help="random projection dims for the coreset search (default %(default)s)")
    parser.add_argument("--final_coreset", choices=["extend", "fresh"], default=defaults.final_coreset,
                        help="extend: continue the calibration bank's greedy over all patches; fresh: restart it "
                             "(default %(default)s)")
    parser.add_argument("--feature_cache", default=defaults.feature_cache,
                        help="directory of the per-image patch-feature cache (kept between builds, safe to delete): "
                             "a rebuild extracts only images it has not seen; the bank is the same (default: none)")
    parser.add_argument("--feature_cache_gb", type=float, default=defaults.feature_cache_gb,
                        help="size bound of --feature_cache, least recently used entries go first; 0 = off "
                             "(default %(default)s)")
    parser.add_argument("--log_level", default="INFO", help="default %(default)s")
    return parser


def _shown(value: Any) -> str:
    return ",".join(value) if isinstance(value, list) else f"{value:,}" if isinstance(value, int) else str(value)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 when every product completed)."""
    # Before torch loads OpenMP: idle threads sleep instead of spinning, so a build sharing its
    # CPUs with other work slows down in proportion instead of collapsing (measured 2.7x under load).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("faiss.loader", "matplotlib"):  # library start-up chatter, not progress
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.ok_dir is not None and args.out_dir is None:
        parser.error("--ok_dir needs --out_dir")
    if args.root is not None and (args.out_dir is not None or args.defect_dir or args.product):
        parser.error("--out_dir, --defect_dir and --product go with --ok_dir, not --root")
    try:
        options = BuildOptions(
            shorter=args.shorter, stride=args.stride, layers=args.layers, coreset=args.coreset,
            reservoir_max=args.reservoir_max, seed=args.seed, pixel_pct=args.pixel_pct, image_pct=args.image_pct,
            weights=args.weights, device=args.device, batch_size=args.batch_size, holdout=args.holdout,
            projection_dim=args.projection_dim, final_coreset=args.final_coreset,
            feature_cache=args.feature_cache, feature_cache_gb=args.feature_cache_gb,
        )
        with reporting_progress(progress_file_from_env()):  # the build task relays $PROGRESS_FILE to the console
            if args.root is not None:
                summaries = build_root(args.root, options)
            else:
                summaries = [run_product(args.ok_dir, args.out_dir, options, args.defect_dir, args.product)]
    except BankBuildError as exc:
        log.error("PatchCore build FAILED: %s", exc)
        return 1
    for summary in summaries:
        print(f"{SUMMARY_PREFIX} {json.dumps(summary)}", flush=True)
    return 0 if all(s["status"] == "completed" for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
