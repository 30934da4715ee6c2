"""Benchmark: download the demo's ~100 MB image set from the local S3 server.

Compares ``ObjectStorage.sync_prefix`` (10 concurrent transfers) with a sequential
loop over the same objects, without and with ~40 ms of added latency per request
(what a remote object store adds). Writes ``bench/results/storage.json``.

Targets (issue #2): 100 MB well under 60 s; >= 5x faster than sequential at 40 ms latency.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from inspection_refresh import compose

RESULTS = Path(__file__).resolve().parent / "results" / "storage.json"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(port: int) -> None:
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("emulator did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--normal-per-product", type=int, default=90, help="demo set: 4 products x this")
    parser.add_argument("--latency-ms", type=float, default=40.0)
    parser.add_argument("--transfers", type=int, default=10)
    args = parser.parse_args()

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "inspection_refresh.dev.ncp_emulator", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workdir = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    try:
        wait_for(port)
        os.environ["AIRFLOW_CONN_NCP_OBJECT_STORAGE"] = json.dumps({
            "conn_type": "aws", "login": "bench", "password": "bench",
            "extra": {"endpoint_url": endpoint, "region_name": "kr-standard"}})
        os.environ["INSPECTION_BUCKET"] = "dm-obs"
        os.environ.setdefault("AIRFLOW_HOME", str(workdir / "airflow"))
        import logging

        logging.basicConfig(level=logging.WARNING)
        from inspection_refresh.dev.demo import seed_storage
        from inspection_refresh.dev.ncp_emulator import set_faults
        from inspection_refresh.images import reject_reason

        print("Seeding the demo image set ...", flush=True)
        seeded = seed_storage(normal_per_product=args.normal_per_product)
        storage = compose.object_storage(max_transfers=args.transfers)
        objects = [o for o in storage.list_objects("images/") if reject_reason(o) is None]
        total_mb = sum(o.size for o in objects) / 1e6
        print(f"{len(objects)} images, {total_mb:.1f} MB", flush=True)

        def concurrent(tag: str) -> float:
            target = workdir / tag
            started = time.perf_counter()
            result = storage.sync_prefix("images/", target, accept=reject_reason)
            seconds = time.perf_counter() - started
            assert result.downloaded == len(objects) and not result.failed, result.summary()
            shutil.rmtree(target)
            return seconds

        def sequential(tag: str) -> float:
            target = workdir / tag
            started = time.perf_counter()
            for obj in objects:
                storage.download_file(obj.key, target / obj.key, expected_size=obj.size)
            seconds = time.perf_counter() - started
            shutil.rmtree(target)
            return seconds

        figures = {}
        for latency in (0.0, args.latency_ms):
            set_faults(endpoint, latency_ms=latency)
            conc, seq = concurrent(f"c{latency}"), sequential(f"s{latency}")
            figures[f"latency_{latency:g}ms"] = {
                "concurrent_seconds": round(conc, 2), "concurrent_mb_per_s": round(total_mb / conc, 1),
                "sequential_seconds": round(seq, 2), "sequential_mb_per_s": round(total_mb / seq, 1),
                "speedup": round(seq / conc, 2),
            }
            print(f"latency {latency:g} ms: {args.transfers} transfers {conc:.2f}s, sequential {seq:.2f}s, "
                  f"speedup {seq / conc:.1f}x", flush=True)
        at_latency = figures[f"latency_{args.latency_ms:g}ms"]
        report = {
            "benchmark": "object storage download (demo image set)",
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "images": len(objects), "total_mb": round(total_mb, 1), "transfers": args.transfers,
            "seeded": seeded, "figures": figures,
            "targets": {
                "download_100mb_under_s": 60,
                "speedup_at_40ms_at_least": 5.0,
            },
            "pass": {
                "download_100mb_well_under_60s": max(f["concurrent_seconds"] for f in figures.values())
                * (100.0 / total_mb) < 60,
                "speedup_at_40ms": at_latency["speedup"] >= 5.0,
            },
        }
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {RESULTS}")
        return 0
    finally:
        server.terminate()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
