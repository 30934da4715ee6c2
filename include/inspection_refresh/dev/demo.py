"""Embedded demo set-up and report: sample products in local storage and MariaDB.

``python -m inspection_refresh.dev.demo seed`` creates (idempotently):

* the demo database with the service's ``products`` table and four products;
* the bucket, with ~1 MP JPEGs in the service's key layout: normal images per
  product and defect images (scratch, hole, stain) per product and defect type,
  plus what real buckets also hold: folder markers, a ``.txt``, an empty and a
  corrupt ``.jpg`` (the pipelines must skip them with a log line);
* a random-init CLIP checkpoint, because pretrained weights cannot be
  downloaded offline. Embeddings from it are meaningless, and the output says so.

``python -m inspection_refresh.dev.demo report`` prints where the indexes and
banks were published and the deployment history.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from inspection_refresh import compose
from inspection_refresh.config import get_settings

DEFECT_TYPES = {1: ("SCR", "scratch"), 2: ("HOL", "hole"), 3: ("STN", "stain")}
IMAGE_SIZE = (1152, 864)  # ~1 MP, like the line cameras' crops
# Enough for every step to mean something (32 calibration + 8 held-out normals and 12 defects per
# PatchCore bank) while the demo stays short: 90 normals made the PatchCore DAG alone take 5m50s.
NORMAL_PER_PRODUCT = 40
DEFECTS_PER_TYPE = 4


@dataclass(frozen=True)
class DemoProduct:
    product_id: int
    product_code: str
    product_name: str


PRODUCTS = [
    DemoProduct(1, "BRKT01", "Brushed steel bracket"),
    DemoProduct(2, "FABR02", "Woven filter fabric"),
    DemoProduct(3, "PERF03", "Perforated cover plate"),
    DemoProduct(4, "WOOD04", "Laminated wood panel"),
]


def _mysql_root_connection(database: str | None = None):
    import MySQLdb

    kwargs = dict(host=os.environ.get("INSPECTION_MYSQL_HOST", "127.0.0.1"),
                  port=int(os.environ.get("INSPECTION_MYSQL_PORT", "3306")),
                  user=os.environ.get("INSPECTION_MYSQL_USER", "root"),
                  password=os.environ.get("INSPECTION_MYSQL_PASSWORD", ""))
    if database:
        kwargs["database"] = database
    return MySQLdb.connect(**kwargs)


def seed_database(database: str, products: list[DemoProduct] = PRODUCTS) -> None:
    """Create the demo database and ``products`` rows (existing rows are left alone)."""
    from inspection_refresh.registry import CREATE_DEPLOYMENT_LOGS, CREATE_PRODUCTS

    conn = _mysql_root_connection()
    try:
        cursor = conn.cursor()
        cursor.execute(f"CREATE DATABASE IF NOT EXISTS `{database}`")
        cursor.execute(f"USE `{database}`")
        cursor.execute(CREATE_PRODUCTS)
        cursor.execute(CREATE_DEPLOYMENT_LOGS)
        for product in products:
            cursor.execute(
                "INSERT IGNORE INTO products (product_id, product_code, product_name, is_active) VALUES (%s, %s, %s, 1)",
                (product.product_id, product.product_code, product.product_name),
            )
        conn.commit()
    finally:
        conn.close()


def _jpeg(image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def sample_objects(products: list[DemoProduct], normal_per_product: int, defects_per_type: int,
                   size: tuple[int, int] = IMAGE_SIZE):
    """Yield ``(key, bytes)`` for the demo bucket, in the service's layout."""
    from inspection_refresh.dev.samples import render_defect, render_normal

    for index, product in enumerate(products):
        for seq in range(1, normal_per_product + 1):
            yield (f"images/normal/{product.product_id}/{product.product_code}_OK_{seq:04d}.jpg",
                   lambda i=index, s=seq: _jpeg(render_normal(i, seed=s, size=size)))
        for type_id, (code, defect) in DEFECT_TYPES.items():
            for seq in range(1, defects_per_type + 1):
                yield (f"images/defect/{product.product_id}_{type_id}/{product.product_code}_{code}_{seq:04d}.jpg",
                       lambda i=index, d=defect, s=seq: _jpeg(render_defect(i, seed=1000 + s, defect=d, size=size)))
    # What real buckets also contain: all must be skipped with a clear log line.
    yield "images/normal/1/notes.txt", lambda: b"uploaded by the line PC; not an image\n"
    yield "images/normal/2/empty.jpg", lambda: b""
    yield "images/defect/3_2/corrupt_HOL_9999.jpg", lambda: b"\xff\xd8\xff\xe0 truncated jpeg" + os.urandom(512)


def seed_storage(products: list[DemoProduct] = PRODUCTS, normal_per_product: int = NORMAL_PER_PRODUCT,
                 defects_per_type: int = DEFECTS_PER_TYPE, size: tuple[int, int] = IMAGE_SIZE) -> dict[str, int]:
    """Create the bucket and upload the sample objects that are not there yet."""

    storage = compose.object_storage()
    client = storage.client
    existing_buckets = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if storage.bucket not in existing_buckets:
        region = client.meta.region_name
        kwargs = {} if region in (None, "us-east-1") else {"CreateBucketConfiguration": {"LocationConstraint": region}}
        client.create_bucket(Bucket=storage.bucket, **kwargs)
    present = {obj.key for obj in storage.list_objects("images/", include_folders=True)}
    for product in products:
        for folder in (f"images/normal/{product.product_id}/",
                       *(f"images/defect/{product.product_id}_{t}/" for t in DEFECT_TYPES)):
            if folder not in present:
                storage.create_folder(folder)
    uploaded = total_bytes = 0
    for key, make in sample_objects(products, normal_per_product, defects_per_type, size):
        if key in present:
            continue
        body = make()
        client.put_object(Bucket=storage.bucket, Key=key, Body=body)
        uploaded += 1
        total_bytes += len(body)
    return {"uploaded": uploaded, "already_present": len(present), "mb_uploaded": round(total_bytes / 1e6, 1)}


def ensure_clip_checkpoint(path: Path, model: str = "ViT-B-32") -> Path:
    from inspection_refresh.clip.weights import create_random_checkpoint

    if not path.exists():
        create_random_checkpoint(path, model_name=model, seed=0)
    return path


def report() -> str:
    """Where things were published, and the deployment history, for people."""
    from inspection_refresh.publish import Publisher

    settings = get_settings()
    lines = ["", "CLIP indexes (the service reads <root>/<type>/):"]
    clip = Publisher(settings.index_root, releases=settings.index_releases)
    for index_type in ("normal", "defect"):
        live = clip.current(index_type)
        manifest_path = clip.live_path(index_type) / "manifest.json"
        if live and manifest_path.exists():
            manifest = json.loads(manifest_path.read_text())
            lines.append(f"  {clip.live_path(index_type)} -> version {live}: {manifest['count']} images, "
                         f"dim {manifest['dim']}, model {manifest['model']} / {Path(str(manifest['pretrained'])).name}")
        else:
            lines.append(f"  {clip.live_path(index_type)}: not published")
    banks = Publisher(settings.patchcore_root, releases=settings.patchcore_releases)
    registry = compose.deployment_registry()
    latest = next(iter(registry.history(limit=1, deploy_type="patchcore_create")), None)
    built = ((latest or {}).get("result_data") or {}).get("products", {})
    codes = sorted(p.name for p in settings.patchcore_root.glob("*") if p.is_symlink())
    lines.append("PatchCore banks (<root>/<product_code>/). Held-out normal and labelled defect images scored by the "
                 "service's query path (ReferenceScorer) against a bank built without them:")
    if not codes:
        lines.append("  none published")
    for code in codes:
        bank = banks.live_path(code)
        config = json.loads((bank / "bank_config.json").read_text())
        tau = json.loads((bank / "tau.json").read_text())
        calibration = config.get("calibration") or {}
        run = built.get(code, {})
        seconds = f"{run['seconds']:.0f}s" if isinstance(run.get("seconds"), (int, float)) else "n/a"
        weights = (config.get("weights") or {}).get("name", "unknown")
        lines.append(
            f"  {code}: bank {config.get('bank_size')} x {config.get('feature_dim')} ({weights} weights), "
            f"tau image {tau['image']:.4f} / pixel {tau['pixel']:.4f}, build {seconds}, "
            f"AUROC {_figure(calibration.get('auroc'))}, accuracy at tau {_figure(calibration.get('accuracy_at_tau'))} "
            f"({calibration.get('num_holdout_images', 0)} normal + {calibration.get('num_defect_images', 0)} defect "
            f"images), histogram {bank / 'score_histogram.png'}")
    lines.append("Deployment history (deployment_logs, newest first):")
    for row in registry.history(limit=10):
        lines.append(f"  #{row['deploy_id']:<4} {row['deploy_type']:<17} {row['status']:<10} "
                     f"{row['started_at']}  {row['result_message']}")
    return "\n".join(lines)


def _figure(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Seed or report on the embedded demo.")
    parser.add_argument("action", choices=["seed", "report"])
    parser.add_argument("--normal-per-product", type=int, default=NORMAL_PER_PRODUCT)
    parser.add_argument("--defects-per-type", type=int, default=DEFECTS_PER_TYPE)
    args = parser.parse_args(argv)
    settings = get_settings()
    if args.action == "seed":
        database = os.environ.get("INSPECTION_DEMO_DATABASE", "inspection_demo")
        seed_database(database)
        print(f"Database {database}: products table with {len(PRODUCTS)} demo products")
        stats = seed_storage(normal_per_product=args.normal_per_product, defects_per_type=args.defects_per_type)
        print(f"Bucket {settings.bucket}: uploaded {stats['uploaded']} objects ({stats['mb_uploaded']} MB), "
              f"{stats['already_present']} were already there")
        checkpoint = ensure_clip_checkpoint(Path(settings.clip_pretrained))
        print(f"CLIP weights: {checkpoint} is a RANDOM-INIT checkpoint made offline: the demo's embeddings and "
              "similarity scores are meaningless; production uses pretrained='openai' or a real checkpoint path.")
    else:
        print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
