"""Build PatchCore banks: one product end to end, or every product under a root.

Flow for one product (features are extracted once per image and reused):

1. list the normal images of ``ok_dir``; split them (seeded) into a calibration-bank
   set and a held-out set (``holdout``, at least one image each);
2. extract the calibration-bank images' patches into a bounded reservoir (each row
   remembering its image) and build a coreset of them (the *calibration bank*); score each
   calibration image against the bank rows of the *other* images (:mod:`.quality`);
3. extract the held-out images, score their patches against the calibration bank
   (never against their own patches), and add them to the reservoir;
4. extract any labelled defect images and score them the same way (AUROC, histogram;
   they never enter a bank);
5. tau from the held-out scores; the published bank is a greedy k-center coreset of the
   reservoir, i.e. of all normal images' patches (uniformly subsampled past
   ``reservoir_max``), by default continuing from the calibration bank's centers;
6. list the normal images whose out-of-sample score is above tau (suspected defects) and
   write the bank files and ``quality.json`` atomically (:mod:`.bank`).

The command line over this is :mod:`.build`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from inspection_refresh import __version__
from inspection_refresh.patchcore.images import (
    DECODER, RESIZE_METHOD, ImageDecodeError, ImageInfo, list_images, load_rgb, probe)
from inspection_refresh.patchcore.options import EXTRACTOR_VERSION, BankBuildError, BuildOptions
from inspection_refresh.progress import Progress

# The name these lines had before the build left patchcore/build.py (the CLI): log filters keep working.
log = logging.getLogger("inspection_refresh.patchcore.build")


def build_product(
    ok_dir: Path | str,
    out_dir: Path | str,
    options: BuildOptions | None = None,
    defect_dirs: list[Path | str] | tuple[Path | str, ...] = (),
    product: str | None = None,
) -> dict[str, Any]:
    """Build the bank for the normal images in ``ok_dir`` into ``out_dir``; returns the summary.

    ``defect_dirs``: labelled defect images, used only for the held-out AUROC and the
    histogram. ``product`` names the product in logs and the summary (default: the
    parent's name when ``ok_dir`` is called ``ok``, else ``ok_dir``'s name).
    Returns ``{"product", "status": "completed", "num_images", "num_skipped", "num_defect_images",
    "bank_size", "feature_dim", "tau": {"pixel", "image"}, "auroc" (or None), "seconds", "out_dir",
    "weights", "suspected_defects"}`` (see :mod:`.quality`). Raises ``BankBuildError`` with a
    message naming the file or directory.
    """
    from inspection_refresh.patchcore.bank import write_bank
    from inspection_refresh.patchcore.calibration import image_score, plot_histogram
    from inspection_refresh.patchcore.coreset import KCenterGreedy
    from inspection_refresh.patchcore.coreset_memory import CoresetMemory, layout_of
    from inspection_refresh.patchcore.quality import (
        QUALITY_FILE, leave_one_image_out_distances, log_suspects, quality_record, scores_by_source)
    from inspection_refresh.patchcore.feature_cache import for_build as open_feature_cache
    from inspection_refresh.patchcore.features import (
        PatchFeatureExtractor, load_resnet50, patch_grid, resolve_device)
    from inspection_refresh.patchcore.reservoir import PatchReservoir
    from inspection_refresh.patchcore.scoring import ReferenceScorer

    started = time.monotonic()
    options = options or BuildOptions()
    ok_dir, out_dir = Path(ok_dir), Path(out_dir)
    product = product or (ok_dir.parent.name if ok_dir.name == "ok" else ok_dir.name)
    tag = f"[{product}]"

    normals, skipped = _readable_images(ok_dir, options.shorter, "normal")
    if len(normals) < 2:
        raise BankBuildError(
            f"{ok_dir} has {len(normals)} readable normal image(s); at least 2 are needed "
            "(some are held out to calibrate tau): add the product's normal images there"
        )
    calib, holdout = _split(normals, options.holdout, options.seed)
    defects = [info for d in defect_dirs for info in _readable_images(Path(d), options.shorter, "defect", True)[0]]
    log.info("%s %d normal images (%d calibration-bank, %d held out), %d skipped, %d defect images",
             tag, len(normals), len(calib), len(holdout), skipped, len(defects))

    device = resolve_device(options.device)
    backbone, weights = load_resnet50(options.weights, options.seed, options.layers)
    extractor = PatchFeatureExtractor(backbone, options.layers, options.stride, copy=False).to(device)
    del backbone
    batch_size = options.batch_size or (8 if device.type == "cuda" else 4)
    # Features of images seen by an earlier build (same bytes, same extraction) come from disk, unchanged.
    feature_cache = open_feature_cache(options, weights, extractor.feature_dim, str(device))
    # The previous build's coreset picks (beside the cache): the greedy searches only for what changed.
    memory = CoresetMemory.for_build(feature_cache, product, options, tag)

    def layout(held: Any, counts: list[int]) -> Any:  # which image and row each reservoir row is, when known
        infos = extracted["calibration bank"] + extracted.get("held out", [])
        return layout_of(held, [feature_cache.keys.get(i.path) for i in infos], counts) if memory else None

    def extract(images: list[ImageInfo], stage: str) -> Iterator[np.ndarray]:
        def fresh(todo: list[ImageInfo]) -> Iterator[tuple[ImageInfo, np.ndarray]]:
            return _extract(extractor, todo, options.shorter, batch_size, device, f"{tag} features ({stage})")
        pairs = feature_cache.through(images, fresh) if feature_cache else fresh(images)
        return _recorded(pairs, extracted.setdefault(stage, []))

    extracted: dict[str, list[ImageInfo]] = {}  # per stage, the images whose features were yielded, in order

    expected = sum(int(np.prod(patch_grid(*info.size, options.layers[0], options.stride))) for info in normals)
    # Patch features wait for the coreset search in a temporary file beside the output (page cache, not
    # process memory); the search itself holds only their 128-d projection.
    spill_dir = out_dir.parent if out_dir.parent.is_dir() else None
    reservoir = PatchReservoir(options.reservoir_max, extractor.feature_dim, options.seed, expected=expected,
                               spill_dir=spill_dir)
    sampler = KCenterGreedy(options.projection_dim, options.seed)

    # 1. Calibration-bank images -> reservoir -> calibration bank (a coreset of them only).
    used_calib, row_counts = 0, []
    for feats in extract(calib, "calibration bank"):
        reservoir.add(feats, source=used_calib)  # the row's image: for out-of-sample scoring (.quality)
        used_calib += 1
        row_counts.append(len(feats))
    if not used_calib:
        raise BankBuildError(f"none of the calibration images in {ok_dir} could be decoded; check the files")
    # Count-mode coresets scale with the share of images, so both banks have the same density.
    calib_size = _coreset_size(options, reservoir.size, used_calib / len(normals))
    calib_layout = layout(reservoir, row_counts)
    calib_rows = _select(sampler, reservoir.features, calib_size, f"{tag} coreset (calibration)",
                         seeds=memory.seeds("calibration", calib_layout) if memory else None)
    if memory:
        memory.remember("calibration", calib_layout, calib_rows)
    calib_bank = reservoir.features[calib_rows]
    # Each calibration image against the calibration-bank rows of the other images (before held-out rows
    # can replace its rows in the reservoir): its score out of sample, for the suspected-defect list.
    quality_started = time.monotonic()
    calib_oos_scores = scores_by_source(
        leave_one_image_out_distances(reservoir.features, reservoir.sources, calib_bank,
                                      reservoir.sources[calib_rows]), reservoir.sources, used_calib)
    quality_seconds = time.monotonic() - quality_started
    # The service's scoring, against the calibration bank (no tau yet: it is what we calibrate).
    scorer = ReferenceScorer(extractor, calib_bank, options.shorter, device=device, search="matmul")
    # 2. Held-out normals: scored against the calibration bank, then pooled for the final bank.
    holdout_distances = []
    for feats in extract(holdout, "held out"):
        holdout_distances.append(scorer.patch_distances(feats))
        reservoir.add(feats)
        row_counts.append(len(feats))
    if not holdout_distances:
        raise BankBuildError(f"none of the held-out images in {ok_dir} could be decoded; check the files")
    # 3. Defect images: scored only, never pooled.
    defect_scores = [scorer.score_features(feats) for feats in extract(defects, "defect")]
    cache_counts = feature_cache.finish(tag) if feature_cache else None  # the "[P] features: n of m ..." line
    calibration = _calibration(options, used_calib, calib_bank.shape[0], holdout_distances, defect_scores)
    # 4. The published bank: a greedy k-center coreset of all normal images' patches.
    bank_layout = layout(reservoir, row_counts)
    bank, bank_rows = _final_bank(sampler, reservoir.features, calib_bank, calib_rows,
                                  _coreset_size(options, reservoir.size, 1.0), options.final_coreset,
                                  f"{tag} coreset (bank)", memory.seeds("bank", bank_layout) if memory else None)
    if memory:
        memory.remember("bank", bank_layout, bank_rows)

    num_images = used_calib + len(holdout_distances)
    config = {
        "layers": extractor.layers,
        "shorter": options.shorter,
        "stride": options.stride,
        **_extraction_record(weights, extractor.feature_dim, device.type),
        "bank_size": int(bank.shape[0]),
        "coreset": {
            "method": "greedy_k_center", "coreset": options.coreset, "projection": "gaussian",
            "projection_dim": options.projection_dim, "seed": options.seed, "candidates": int(reservoir.size),
            "patches_seen": int(reservoir.seen), "reservoir_max": options.reservoir_max,
            "reservoir_sampled": reservoir.sampled, "final": options.final_coreset,
            "final_method": _FINAL_METHODS[options.final_coreset],
        },
        "calibration": calibration,
        "product": product,
        "num_images": num_images,
        "num_skipped_images": skipped + (len(normals) - num_images),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "builder": f"inspection_refresh {__version__}",
    }
    reservoir.close()
    del reservoir, scorer
    tau, score_auroc = calibration["tau"], calibration["auroc"]
    normal_scores = [image_score(d) for d in holdout_distances]
    # Every normal image's out-of-sample score against tau: held-out ones as calibrated, the others above.
    quality_started = time.monotonic()
    quality = quality_record(
        {info.path.name: float(score) for info, score in zip(extracted["calibration bank"], calib_oos_scores)},
        {info.path.name: score for info, score in zip(extracted["held out"], normal_scores)},
        tau["image"], quality_seconds + time.monotonic() - quality_started, options.image_pct)
    config["quality"] = {"method": quality["method"], "images_scored": quality["images_scored"],
                         "suspected": len(quality["suspected_defects"]), "file": QUALITY_FILE}
    log_suspects(tag, quality)
    title = f"{product}: held-out image scores" + (f", AUROC {score_auroc:.3f}" if score_auroc is not None else "")
    write_bank(out_dir, bank, config, tau,
               lambda path: plot_histogram(path, normal_scores, defect_scores, tau["image"], title),
               side_files={QUALITY_FILE: quality})
    if memory:
        memory.save()
    summary = {
        "product": product, "status": "completed", "num_images": num_images,
        "num_skipped": config["num_skipped_images"], "num_defect_images": len(defect_scores),
        "bank_size": int(bank.shape[0]), "feature_dim": extractor.feature_dim, "tau": tau, "auroc": score_auroc,
        "accuracy_at_tau": calibration["accuracy_at_tau"],
        "seconds": round(time.monotonic() - started, 2), "out_dir": str(out_dir), "weights": weights["name"],
        "feature_cache": cache_counts, "suspected_defects": quality["suspected_defects"],
    }
    log.info("%s bank of %d x %d written to %s in %.1fs (tau pixel %.4f, image %.4f, AUROC %s)",
             tag, bank.shape[0], bank.shape[1], out_dir, summary["seconds"], tau["pixel"], tau["image"],
             "n/a" if score_auroc is None else f"{score_auroc:.3f}")
    return summary


def _extraction_record(weights: dict[str, Any], feature_dim: int, device: str) -> dict[str, Any]:
    """How features were extracted, beyond ``layers``/``shorter``/``stride``, for ``bank_config.json``."""
    import cv2

    from inspection_refresh.patchcore.features import IMAGENET_MEAN, IMAGENET_STD, POOLING

    return {
        "backbone": "resnet50",
        "backbone_source": "torchvision",
        "weights": weights,
        "feature_dim": feature_dim,
        "dtype": "float32",
        "extractor_version": EXTRACTOR_VERSION,
        "decoder": DECODER,
        "opencv_version": cv2.__version__,
        "input": {"color": "BGR decoded, converted to RGB", "range": [0.0, 1.0], "resize": RESIZE_METHOD,
                  "normalize_mean": list(IMAGENET_MEAN), "normalize_std": list(IMAGENET_STD)},
        "feature_pooling": POOLING,
        "inference": f"float32 on {device}; BatchNorm folded into convolutions and channels_last memory "
                     "format (same function, float rounding differences only)",
    }


def _calibration(options: BuildOptions, calib_images: int, calib_bank_size: int,
                 holdout_distances: list[np.ndarray], defect_scores: list[float]) -> dict[str, Any]:
    """tau, AUROC and how they were obtained, for ``bank_config.json``."""
    from inspection_refresh.patchcore.calibration import accuracy_at_tau, auroc, calibrate_tau, image_score

    normal_scores = [image_score(d) for d in holdout_distances]
    tau = calibrate_tau(holdout_distances, options.pixel_pct, options.image_pct)
    return {
        "method": "held-out normal images scored against a coreset of the other normal images",
        "scorer": "inspection_refresh.patchcore.scoring.ReferenceScorer (the service's query path)",
        "distance": "L2 to nearest bank patch: FAISS IndexFlatL2's formula (|q|^2 + |b|^2 - 2 q.b, sqrt) computed "
                    "with torch matmul; equal to FAISS up to float rounding",
        "image_score": "numpy.percentile(patch distances, 99)",
        "holdout_fraction": options.holdout,
        "num_calibration_bank_images": calib_images,
        "num_holdout_images": len(holdout_distances),
        "calibration_bank_size": int(calib_bank_size),
        "pixel_pct": options.pixel_pct,
        "image_pct": options.image_pct,
        "tau": tau,
        "holdout_image_scores": _describe(normal_scores),
        "num_defect_images": len(defect_scores),
        "defect_image_scores": _describe(defect_scores) if defect_scores else None,
        "auroc": auroc(normal_scores, defect_scores) if defect_scores else None,
        "accuracy_at_tau": accuracy_at_tau(normal_scores, defect_scores, tau["image"]),
    }


def build_root(root: Path | str, options: BuildOptions | None = None) -> list[dict[str, Any]]:
    """Build every product under ``root`` (each ``{root}/{product}/ok``, written into ``{root}/{product}/``).

    Returns one summary per product; a failed product gets ``status: "failed"`` and
    ``error`` and does not stop the others.
    """
    from inspection_refresh.releases_dir import is_published_root

    root = Path(root)
    if not root.is_dir():
        raise BankBuildError(f"--root {root} is not a directory")
    if is_published_root(root):
        raise BankBuildError(
            f"--root {root} is a published PatchCore root (its product directories are releases the service "
            "is reading): building there would rewrite live files in place. Build into a copy "
            "(--ok_dir/--out_dir or --root on another directory) and publish it with the DAG")
    products = sorted(p for p in root.iterdir() if (p / "ok").is_dir())
    if not products:
        raise BankBuildError(f"no product directories with an ok/ folder under {root} (expected {root}/<product>/ok)")
    return [run_product(p / "ok", p, options, product=p.name) for p in products]


def run_product(ok_dir: Path, out_dir: Path, options: BuildOptions | None, defect_dirs: list[Path] | tuple = (),
                product: str | None = None) -> dict[str, Any]:
    """:func:`build_product`, but a failure is logged and returned as a ``status: "failed"`` summary."""
    started = time.monotonic()
    name = product or (ok_dir.parent.name if ok_dir.name == "ok" else ok_dir.name)
    try:
        return build_product(ok_dir, out_dir, options, defect_dirs, product=name)
    except BankBuildError as exc:
        log.error("[%s] PatchCore build FAILED: %s", name, exc)
        error = str(exc)
    except Exception as exc:  # an unexpected bug or resource error: keep the traceback in the log
        log.exception("[%s] PatchCore build FAILED unexpectedly", name)
        error = f"{type(exc).__name__}: {exc}"
    return {"product": name, "status": "failed", "error": error, "num_images": None, "bank_size": None,
            "feature_dim": None, "tau": None, "auroc": None,
            "seconds": round(time.monotonic() - started, 2), "out_dir": str(out_dir)}


def _readable_images(directory: Path, shorter: int, kind: str,
                     allow_empty: bool = False) -> tuple[list[ImageInfo], int]:
    """Images in ``directory`` whose headers PIL reads, and how many image files were skipped."""
    try:
        paths = list_images(directory)
    except OSError as exc:
        raise BankBuildError(f"cannot read the {kind} image directory: {exc}") from exc
    if not paths and not allow_empty:
        raise BankBuildError(f"{directory} contains no {kind} images (jpg/jpeg/png/bmp/tif/webp); add some there")
    if not paths:
        log.warning("%s contains no %s images; it is ignored", directory, kind)
    infos = probe(paths, shorter)
    if paths and not infos:
        raise BankBuildError(f"none of the {len(paths)} {kind} image files in {directory} can be read; check them")
    return infos, len(paths) - len(infos)


def _split(images: list[ImageInfo], holdout: float, seed: int) -> tuple[list[ImageInfo], list[ImageInfo]]:
    """Seeded split into (calibration-bank, held-out) images; each side non-empty, each sorted for batching."""
    count = min(len(images) - 1, max(1, round(holdout * len(images))))
    chosen = set(np.random.default_rng([seed, 3]).permutation(len(images))[:count].tolist())
    by_size = lambda info: (info.size, info.path.name)  # noqa: E731 -- same-size neighbours batch together
    calib = sorted((img for i, img in enumerate(images) if i not in chosen), key=by_size)
    held = sorted((img for i, img in enumerate(images) if i in chosen), key=by_size)
    return calib, held


def _coreset_size(options: BuildOptions, candidates: int, share: float) -> int:
    if options.coreset > 1:
        return max(1, min(candidates, int(np.ceil(options.coreset * share))))
    return options.coreset_size(candidates)


_FINAL_METHODS = {
    "extend": "greedy continued over all normal patches from the calibration bank's centers (each pick the "
              "patch farthest from all picks so far)",
    "fresh": "greedy over all normal patches from scratch",
}


def _select(sampler: Any, features: np.ndarray, size: int, label: str,
            initial: np.ndarray | None = None, seeds: np.ndarray | None = None) -> np.ndarray:
    progress = Progress(label, total=size, unit="picks", logger=log)
    indices = sampler.select(features, size, progress=progress, initial=initial, seeds=seeds)
    progress.finish()
    return indices


def _final_bank(sampler: Any, features: np.ndarray, calib_bank: np.ndarray, calib_rows: np.ndarray, size: int,
                mode: str, label: str, seeds: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``size`` rows covering ``features`` (all normal patches held), and the rows of ``features`` picked
    (beyond the calibration bank's, with ``extend``); ``seeds``: warm-start rows (:mod:`.coreset_memory`).

    ``extend`` keeps the calibration bank (a greedy coreset of the calibration images' patches)
    and continues the same greedy over all patches: the picks are still each the farthest
    patch from everything chosen, so it is a greedy k-center coreset of all patches, and the
    first ``len(calib_bank)`` picks need not be searched again (measured on product images:
    the same covering radius as ``fresh`` to three decimals, in about a third of the time).
    """
    if size >= len(features):
        return features.copy(), np.arange(len(features), dtype=np.int64)
    if mode == "fresh" or len(calib_bank) >= size:
        rows = _select(sampler, features, size, label, seeds=seeds)
        return features[rows], rows
    if seeds is not None:  # the calibration bank is in already
        seeds = seeds[~np.isin(seeds, calib_rows)]
    extra = _select(sampler, features, size - len(calib_bank), label, initial=calib_bank, seeds=seeds)
    return np.concatenate([calib_bank, features[extra]]), extra


def _extract(extractor: Any, images: list[ImageInfo], shorter: int, batch_size: int, device: Any,
             label: str) -> Iterator[tuple[ImageInfo, np.ndarray]]:
    """Yield ``(info, float32 [P, D] features)`` per decodable image, in order; the next batch is decoded meanwhile.

    Consecutive images of equal size share a forward pass (at most ``batch_size``).
    Undecodable files are logged with their name and skipped.
    """
    import torch

    if not images:
        return
    batches: list[list[ImageInfo]] = []
    for info in images:
        if batches and len(batches[-1]) < batch_size and batches[-1][0].size == info.size:
            batches[-1].append(info)
        else:
            batches.append([info])
    progress = Progress(label, total=len(images), unit="images", logger=log)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="patchcore-read") as pool:
        pending: Future = pool.submit(_load_batch, batches[0], shorter)
        for number in range(len(batches)):
            loaded = pending.result()
            if number + 1 < len(batches):
                pending = pool.submit(_load_batch, batches[number + 1], shorter)
            progress.update(len(batches[number]) - len(loaded))
            if not loaded:
                continue
            for group in _same_shape_runs(loaded):
                pixels = torch.from_numpy(np.stack([array for _, array in group])).permute(0, 3, 1, 2)
                for (info, _), image_feats in zip(group, extractor(pixels.to(device)).cpu().numpy()):
                    yield info, image_feats
                    progress.update(1)
    progress.finish()


def _recorded(pairs: Iterator[tuple[ImageInfo, np.ndarray]], infos: list[ImageInfo]) -> Iterator[np.ndarray]:
    """The features of ``pairs``, appending each one's image to ``infos`` as it is yielded."""
    for info, feats in pairs:
        infos.append(info)
        yield feats


def _same_shape_runs(loaded: list[tuple[ImageInfo, np.ndarray]]) -> Iterator[list[tuple[ImageInfo, np.ndarray]]]:
    """Consecutive (info, array) pairs whose arrays have one shape (a header's size can differ from the
    decoded one: EXIF, odd files)."""
    run: list[tuple[ImageInfo, np.ndarray]] = []
    for pair in loaded:
        if run and run[0][1].shape != pair[1].shape:
            yield run
            run = []
        run.append(pair)
    if run:
        yield run


def _load_batch(batch: list[ImageInfo], shorter: int) -> list[tuple[ImageInfo, np.ndarray]]:
    loaded = []
    for info in batch:
        try:
            array = load_rgb(info.path, shorter)
        except (ImageDecodeError, OSError, ValueError) as exc:
            log.warning("skipping undecodable image %s: %s", info.path, exc)
            continue
        loaded.append((info, array))
    return loaded


def _describe(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"min": float(array.min()), "median": float(np.median(array)), "max": float(array.max())}
