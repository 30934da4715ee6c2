"""Each image's patch features on disk, so a rebuild extracts only the images it has not seen.

A product's bank is a coreset of all its normal images' patch features; when a few images are
added or removed, the other images' features are the same as last time. :class:`FeatureCache`
keeps them, one file per image, under ``<cache dir>/<fingerprint[:16]>/<sha[:2]>/<sha>.f32``:

* **Key** = sha256 of the image file's bytes (a renamed or re-uploaded identical file is a hit,
  an edited one a miss) within a directory named by :func:`extraction_fingerprint`, a sha256 of
  everything that shapes the features (see there).
* **Exact**: the features are stored as the float32 the extractor returned, byte for byte, so
  a cached image gives the bank exactly what extracting it again would (where the extraction is
  deterministic: same machine class and libraries, which the fingerprint pins).
* **Safe to lose**: written to a temporary file and renamed into place (a reader never sees
  half a file); each entry carries the fingerprint's digest, its shape and a CRC-32 of shape and
  data, so a truncated, corrupt or foreign file is ignored, logged (once per build), deleted and
  extracted again. Deleting the directory costs one full extraction. A failed write (disk full,
  read-only) only warns: the cache never fails a build.
* **Bounded**: after each product, entries are deleted least recently used first (a hit sets
  the entry's access time, whatever the mount's atime policy) until the cache holds at most
  ``max_bytes``, across all fingerprints (entries of old settings age out).

Several builds on one worker may share the directory: writes are atomic renames, and an entry
evicted by another build between lookup and read is simply extracted again.

Only the standard library and numpy at import (the task side names the directory without torch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from inspection_refresh.manifests import file_sha256

log = logging.getLogger("inspection_refresh.patchcore.build")  # the builder's log lines, as product.py

CACHE_SUBDIR = "patchcore_features"
DEFAULT_CACHE_GB = 4.0  # BuildOptions.feature_cache_gb
"""Default bound: about 500 images' features at the defaults (512 px short side, stride 2, 1,536 dims)."""
_MAGIC = b"PCFEAT01"
_HEADER = struct.Struct("<8s32sIII")  # magic, fingerprint digest, rows, dim, CRC-32 of (rows, dim, data)
_SUFFIX = ".f32"
_STALE_TEMP_SECONDS = 3600.0  # a temporary file this old belongs to a build that died
GB = 1024**3

Pair = tuple[Any, np.ndarray]  # (ImageInfo, float32 [P, D])


def default_feature_cache_dir(cache_root: str | os.PathLike[str]) -> Path:
    """``<cache_root>/patchcore_features``: where the DAG's builds keep this worker's feature cache."""
    return Path(cache_root) / CACHE_SUBDIR


def extraction_fingerprint(*, weights_sha256: str, layers: list[str], shorter: int, stride: int, device: str,
                           extractor_version: str, decoder: str, resize_method: str) -> str:
    """sha256 of everything that decides an image's patch features, besides the image's bytes.

    * ``weights_sha256``, ``layers``, ``shorter``, ``stride``: the network and the patch grid;
    * ``extractor_version``, ``decoder``, ``resize_method``: the pipeline's code (bumped on any
      change of pooling or normalisation) and how pixels are decoded and resized;
    * OpenCV's version: its bundled JPEG/PNG decoders decide the pixels;
    * torch's version, the device class (``cpu``, or ``cuda`` and the GPU's name) and float32: the
      convolution kernels, hence the float rounding (~1e-7). Without them a cached feature could
      differ from a fresh one in the last bits and the promise "a cached build equals a build
      from scratch" would depend on where each image happened to be extracted first.

    Not included: the batch size. oneDNN/cuDNN may round a batched convolution differently from
    a single one; a build from scratch already batches by whatever same-size neighbours an image
    has, so keying on it would only make the cache miss without making builds more exact.
    """
    import cv2
    import torch

    where = "cpu"
    if device.startswith("cuda"):
        where = f"cuda {torch.cuda.get_device_name(torch.device(device))}"
    record = {"weights_sha256": weights_sha256, "layers": list(layers), "shorter": shorter, "stride": stride,
              "extractor_version": extractor_version, "decoder": decoder, "resize": resize_method,
              "opencv": cv2.__version__, "torch": torch.__version__, "device": where, "dtype": "float32"}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def for_build(options: Any, weights: dict[str, Any], feature_dim: int, device: str) -> FeatureCache | None:
    """The cache a build with ``options`` uses (``options.feature_cache``), or ``None`` when it has none."""
    from inspection_refresh.patchcore.images import DECODER, RESIZE_METHOD
    from inspection_refresh.patchcore.options import EXTRACTOR_VERSION

    if not options.feature_cache or options.feature_cache_gb <= 0:
        return None
    fingerprint = extraction_fingerprint(
        weights_sha256=weights["sha256"], layers=options.layers, shorter=options.shorter, stride=options.stride,
        device=device, extractor_version=EXTRACTOR_VERSION, decoder=DECODER, resize_method=RESIZE_METHOD)
    return FeatureCache(options.feature_cache, fingerprint, feature_dim, int(options.feature_cache_gb * GB))


class FeatureCache:
    """Per-image patch features under ``directory`` for one extraction ``fingerprint``, at most ``max_bytes``.

    Counts what it did for the build's log line: ``hits``, ``extracted`` (misses stored),
    ``corrupt`` (entries ignored and extracted again), ``evicted``.
    """

    def __init__(self, directory: str | os.PathLike[str], fingerprint: str, feature_dim: int,
                 max_bytes: int = int(DEFAULT_CACHE_GB * GB)) -> None:
        self.root = Path(directory)
        self.fingerprint = fingerprint
        self.dir = self.root / fingerprint[:16]
        self.feature_dim = feature_dim
        self.max_bytes = max_bytes
        self._digest = bytes.fromhex(fingerprint)
        self.hits = self.extracted = self.corrupt = self.evicted = 0
        self.keys: dict[Path, str] = {}  # image path -> sha256, of every image looked up (coreset_memory's ids)
        self._write_failed = False

    def entry(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}{_SUFFIX}"

    def load(self, key: str) -> np.ndarray | None:
        """The stored ``float32 [P, D]`` features, or ``None`` (absent, or unusable: then deleted and logged)."""
        path = self.entry(key)
        try:
            with open(path, "rb") as handle:
                header = handle.read(_HEADER.size)
                data = bytearray(max(0, os.fstat(handle.fileno()).st_size - _HEADER.size))
                got = handle.readinto(data) if data else 0
                mtime = os.fstat(handle.fileno()).st_mtime
        except FileNotFoundError:  # evicted meanwhile (another build on this worker)
            return None
        except OSError as exc:
            return self._unusable(path, f"unreadable ({exc})")
        try:  # the LRU clock, whatever the mount's atime policy (mtime kept: when the entry was written)
            os.utime(path, (time.time(), mtime))
        except OSError:  # evicted meanwhile, or a cache this user may not write: the entry is still good
            pass
        if len(header) < _HEADER.size:
            return self._unusable(path, "shorter than its header")
        magic, digest, rows, dim, crc = _HEADER.unpack(header)
        if magic != _MAGIC or digest != self._digest or dim != self.feature_dim:
            return self._unusable(path, "not an entry of this extraction fingerprint")
        if got != rows * dim * 4 or len(data) != got:
            return self._unusable(path, f"truncated ({got} of {rows * dim * 4} data bytes)")
        if zlib.crc32(data, zlib.crc32(struct.pack("<II", rows, dim))) != crc:
            return self._unusable(path, "CRC-32 mismatch")
        return np.frombuffer(data, dtype=np.float32).reshape(rows, dim)

    def store(self, key: str, feats: np.ndarray) -> None:
        """Write ``feats`` atomically; a failure (disk full, read-only) warns once and is otherwise ignored."""
        feats = np.ascontiguousarray(feats, dtype=np.float32)
        rows, dim = feats.shape
        data = feats.tobytes()
        crc = zlib.crc32(data, zlib.crc32(struct.pack("<II", rows, dim)))
        path = self.entry(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 -- closed below, then renamed into place
                dir=path.parent, prefix=f".{key[:16]}.", suffix=".tmp", delete=False)
            try:
                with handle:
                    handle.write(_HEADER.pack(_MAGIC, self._digest, rows, dim, crc))
                    handle.write(data)
                os.replace(handle.name, path)
            except BaseException:
                Path(handle.name).unlink(missing_ok=True)
                raise
        except OSError as exc:
            if not self._write_failed:
                log.warning("feature cache %s: could not store %s (%s); this build continues without storing "
                            "features there (free space or fix the permissions)", self.root, path.name, exc)
            self._write_failed = True

    def through(self, images: list[Any], extract: Callable[[list[Any]], Iterable[Pair]]) -> Iterator[Pair]:
        """``(info, features)`` for ``images`` in order, as ``extract`` would give them, extracting only misses.

        ``extract(infos)`` yields ``(info, features)`` in the order given and leaves out files it
        cannot decode (so do these). Misses are extracted in one call (batched, decoded ahead) and
        stored; an entry that turns out unusable when read is extracted alone, then.
        """
        keys: dict[Path, str] = {}
        for info in images:
            try:
                keys[info.path] = file_sha256(info.path)  # the cache key of an image
            except OSError:  # unreadable: the extractor logs it by name and skips it
                pass
        self.keys.update(keys)
        cached = {path for path, key in keys.items() if self.entry(key).is_file()}
        fresh = iter(extract([info for info in images if info.path not in cached]))
        pending: Pair | None = None
        for info in images:
            if info.path in cached:
                feats = self.load(keys[info.path])
                if feats is not None:
                    self.hits += 1
                    yield info, feats
                    continue
                for pair in extract([info]):
                    yield self._keep(keys, pair)
                continue
            if pending is None:
                pending = next(fresh, None)
            if pending is not None and pending[0] == info:  # else this file could not be decoded: skipped
                yield self._keep(keys, pending)
                pending = None
        for _ in fresh:  # nothing is left; run the extractor to its end (its progress line's last report)
            pass

    def _keep(self, keys: dict[Path, str], pair: Pair) -> Pair:
        info, feats = pair
        self.extracted += 1
        if info.path in keys:
            self.store(keys[info.path], feats)
        return pair

    def _unusable(self, path: Path, why: str) -> None:
        self.corrupt += 1
        if self.corrupt == 1:  # once per build: the count is in the build's feature line
            log.warning("feature cache entry %s is %s; ignoring it and extracting that image again", path, why)
        try:
            path.unlink(missing_ok=True)  # the fresh features are stored in its place
        except OSError:
            pass

    def entries(self) -> list[tuple[Path, os.stat_result]]:
        """Every entry file under the cache root (all fingerprints), with its ``stat``."""
        found = []
        for path in self.root.glob(f"*/*/*{_SUFFIX}"):
            try:
                found.append((path, path.stat()))
            except FileNotFoundError:
                pass
        return found

    def evict(self) -> int:
        """Delete least recently used entries until the cache holds at most ``max_bytes``; returns its size then.

        Also removes temporary files left by builds that died while writing.
        """
        now = time.time()
        for temp in self.root.glob("*/*/.*.tmp"):
            try:
                if now - temp.stat().st_mtime > _STALE_TEMP_SECONDS:
                    temp.unlink()
            except FileNotFoundError:
                pass
        entries = sorted(self.entries(), key=lambda item: item[1].st_atime)
        total = sum(stat.st_size for _, stat in entries)
        for path, stat in entries:
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= stat.st_size
            self.evicted += 1
        return total

    def finish(self, tag: str) -> dict[str, Any]:
        """Evict down to the bound and log the build's one feature line; returns the counts for the summary."""
        size = self.evict()
        seen = self.hits + self.extracted
        log.info("%s features: %d of %d images from the cache, %d extracted%s (cache %s: %s of %s%s)",
                 tag, self.hits, seen, self.extracted,
                 f", {self.corrupt} unusable entries re-extracted" if self.corrupt else "",
                 self.root, _size(size), _size(self.max_bytes), f", {self.evicted} evicted" if self.evicted else "")
        return {"dir": str(self.root), "hits": self.hits, "extracted": self.extracted, "corrupt": self.corrupt,
                "evicted": self.evicted, "bytes": size, "max_bytes": self.max_bytes}


def _size(num_bytes: int) -> str:
    return f"{num_bytes / GB:.2f} GB" if num_bytes >= GB // 10 else f"{num_bytes / 1024**2:.1f} MB"
