"""Benchmark: ``sync_prefix`` against ``aws s3 cp --recursive``, side by side; writes ``bench/results/storage.json``.

One run, one S3 server (moto behind the NCP emulator's proxy, :mod:`s3_side_by_side`), one
object set: 650 objects of ~150 KB, 100 MB (random bytes named ``.jpg``, in the service's
``images/normal/{product}/`` layout). At each added latency (0 ms, and ~40 ms per request as a
remote store adds) the two clients download the whole prefix into an empty directory,
alternately (``--rounds`` each, the order flipped every round), each in a fresh process with 10
transfers at once (aws-cli's default ``max_concurrent_requests``; ``sync_prefix`` with
``max_transfers=10``, the DAGs' default). Then one sequential ``download_file`` loop (the
``speedup`` of issue #2).

* aws-cli (the ``awscli`` package) lives in ``bench/.venv-awscli``, its own venv so its pins do
  not touch the project's; it is created here when missing (needs PyPI). Dummy credentials
  in its environment, ``--endpoint-url`` the proxy that lets its ListObjectsV2 through.
* ``sync_prefix`` runs as the serving hosts' agent makes its client (boto3's credential chain,
  no Airflow), against the proxy that refuses ListObjectsV2, as NCP does.

Figures: each client's median wall time over the rounds (interpreter start included for both),
``ratio`` = aws-cli's / ``sync_prefix``'s (>= 1.0: at least as fast), and ``sync_prefix``'s
own call time (client creation, listing, downloads), which the sequential loop's time (in this
process, after its listing) is compared with. Targets: ratio >= 1.0 at both latencies; 100 MB in < 60 s (issue #2's floor);
>= 5x faster than sequential at 40 ms. Timings depend on what else runs: the load average is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results" / "storage.json"
AWSCLI_VENV = BENCH / ".venv-awscli"
BUCKET, PREFIX = "dm-obs", "images/"


def ensure_awscli() -> Path:
    aws = AWSCLI_VENV / "bin" / "aws"
    if not aws.exists():
        print(f"Creating {AWSCLI_VENV} with awscli (bench only) ...", flush=True)
        subprocess.run(["python3", "-m", "venv", str(AWSCLI_VENV)], check=True)
        subprocess.run([str(AWSCLI_VENV / "bin" / "pip"), "install", "-q", "awscli"], check=True)
    return aws


def start_server() -> tuple[subprocess.Popen, dict[str, str]]:
    server = subprocess.Popen([sys.executable, str(BENCH / "s3_side_by_side.py"), "server"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = server.stdout.readline()
    if not line.startswith("ENDPOINTS "):
        server.kill()
        raise SystemExit(f"the bench S3 server did not start (said {line!r})")
    return server, json.loads(line.split(" ", 1)[1])


def seed(endpoint: str, objects: int, total_bytes: int) -> int:
    from inspection_refresh.storage import Boto3Source, ObjectStorage

    storage = ObjectStorage(Boto3Source(endpoint_url=endpoint), BUCKET)
    storage.client.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "kr-standard"})
    size, written = total_bytes // objects, 0
    for number in range(objects):
        body = os.urandom(size)
        storage.client.put_object(Bucket=BUCKET, Key=f"{PREFIX}normal/{number % 4 + 1}/BENCH_OK_{number:04d}.jpg",
                                  Body=body)
        written += len(body)
    return written


def timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{command[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds, done.stdout


def count_files(directory: Path) -> tuple[int, int]:
    files = [p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")]
    return len(files), sum(p.stat().st_size for p in files)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=650)
    parser.add_argument("--total-mb", type=float, default=100.0)
    parser.add_argument("--latency-ms", type=float, default=40.0)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each client per latency (median kept)")
    parser.add_argument("--transfers", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    aws = ensure_awscli()
    aws_version = subprocess.run([str(aws), "--version"], capture_output=True, text=True, check=True).stdout.strip()
    server, endpoints = start_server()
    workdir = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    load_before = os.getloadavg()
    try:
        from inspection_refresh.dev.ncp_emulator import set_faults

        (workdir / "aws-config").write_text("")
        # Dummy credentials and an empty config for both clients: nothing of the user's is read or recorded.
        dummy = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "kr-standard",
                 "AWS_CONFIG_FILE": str(workdir / "aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(workdir / "aws-config"),
                 "AWS_EC2_METADATA_DISABLED": "true"}
        os.environ.update(dummy)
        aws_env = {"PATH": os.environ.get("PATH", ""), "HOME": str(workdir), **dummy}
        sync_env = dict(os.environ)
        print(f"Seeding {args.objects} objects, {args.total_mb:g} MB ...", flush=True)
        total = seed(endpoints["ncp"], args.objects, int(args.total_mb * 1e6))
        clients = {
            "aws_cli": lambda dest: timed([str(aws), "s3", "cp", f"s3://{BUCKET}/{PREFIX}", str(dest), "--recursive",
                                           "--only-show-errors", "--endpoint-url", endpoints["v2"]], aws_env)[0],
            "sync_prefix": lambda dest: _sync(dest, endpoints["ncp"], args.transfers, sync_env),
        }
        figures = {}
        for latency in (0.0, args.latency_ms):
            set_faults(endpoints["ncp"], latency_ms=latency)
            runs: dict[str, list[float]] = {"aws_cli": [], "sync_prefix": [], "sync_prefix_call": []}
            for round_number in range(args.rounds):
                order = list(clients) if round_number % 2 == 0 else list(reversed(clients))
                for name in order:
                    dest = workdir / f"{name}-{latency:g}-{round_number}"
                    seconds = clients[name](dest)
                    if name == "sync_prefix":
                        seconds, call_seconds = seconds
                        runs["sync_prefix_call"].append(call_seconds)
                    files, nbytes = count_files(dest)
                    if (files, nbytes) != (args.objects, total):
                        raise SystemExit(f"{name} left {files} files / {nbytes} bytes in {dest}, "
                                         f"expected {args.objects} / {total}")
                    runs[name].append(round(seconds, 3))
                    shutil.rmtree(dest)
            aws_s, sync_s = statistics.median(runs["aws_cli"]), statistics.median(runs["sync_prefix"])
            sequential = _sequential(endpoints["ncp"], workdir / f"seq-{latency:g}")
            figures[f"latency_{latency:g}ms"] = {
                "ratio_aws_cli_over_sync_prefix": round(aws_s / sync_s, 3),
                "aws_cli_seconds": round(aws_s, 2), "sync_prefix_seconds": round(sync_s, 2),
                "sync_prefix_mb_per_s": round(total / 1e6 / sync_s, 1),
                "sync_prefix_call_seconds": round(statistics.median(runs["sync_prefix_call"]), 2),
                "sequential_seconds": round(sequential, 2),
                "speedup_over_sequential": round(sequential / statistics.median(runs["sync_prefix_call"]), 2),
                "runs": runs,
            }
            print(f"latency {latency:g} ms: aws-cli {aws_s:.2f}s, sync_prefix {sync_s:.2f}s -> ratio "
                  f"{aws_s / sync_s:.2f}; sequential {sequential:.2f}s", flush=True)
        at_latency = figures[f"latency_{args.latency_ms:g}ms"]
        report = {
            "benchmark": "object storage download: sync_prefix vs aws s3 cp --recursive, side by side",
            "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "load_average_before_after": [load_before, os.getloadavg()],
            "objects": args.objects, "total_mb": round(total / 1e6, 1), "transfers": args.transfers,
            "rounds": args.rounds, "aws_cli": aws_version,
            "setup": "one moto S3 server in its own process behind the NCP emulator's proxy; both clients in fresh "
                     "processes, timed from start to exit; medians over the rounds, order alternating",
            "figures": figures,
            "targets": {"ratio_at_least": 1.0, "download_100mb_under_s": 60, "speedup_at_40ms_at_least": 5.0},
            "pass": {
                **{f"ratio_{name}": f["ratio_aws_cli_over_sync_prefix"] >= 1.0 for name, f in figures.items()},
                "download_100mb_under_60s": max(f["sync_prefix_seconds"] for f in figures.values())
                * (100e6 / total) < 60,
                "speedup_at_40ms": at_latency["speedup_over_sequential"] >= 5.0,
            },
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
        return 0
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def _sync(dest: Path, endpoint: str, transfers: int, env: dict[str, str]) -> tuple[float, float]:
    seconds, stdout = timed([sys.executable, str(BENCH / "s3_side_by_side.py"), "sync", "--endpoint", endpoint,
                             "--bucket", BUCKET, "--prefix", PREFIX, "--dest", str(dest),
                             "--transfers", str(transfers)], env)
    inner = json.loads(next(line for line in stdout.splitlines() if line.startswith("SYNC ")).split(" ", 1)[1])
    return seconds, inner["seconds"]


def _sequential(endpoint: str, dest: Path) -> float:
    """One ``download_file`` after another over the same objects (in this process)."""
    from inspection_refresh.storage import Boto3Source, ObjectStorage

    storage = ObjectStorage(Boto3Source(endpoint_url=endpoint), BUCKET)
    objects = list(storage.list_objects(PREFIX))
    started = time.perf_counter()
    for obj in objects:
        storage.download_file(obj.key, dest / obj.key, expected_size=obj.size)
    seconds = time.perf_counter() - started
    shutil.rmtree(dest)
    return seconds


if __name__ == "__main__":
    sys.exit(main())
