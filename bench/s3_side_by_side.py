"""Helpers of ``bench_storage.py``, each run as its own process.

``server``: one moto S3 server behind two proxies of the NCP emulator
(:mod:`inspection_refresh.dev.ncp_emulator`) sharing one fault setting, so both clients see
the same added latency per request:

* ``ncp``: the emulator's proxy as the project meets it (ListObjectsV2 refused);
* ``v2``: the same proxy, letting ListObjectsV2 through: ``aws s3 cp --recursive`` lists
  with V2 only, and NCP's refusal of it would stop the reference before it starts.

Prints ``ENDPOINTS {"ncp": url, "v2": url}`` and serves until killed.

``sync``: one ``sync_prefix`` in a fresh interpreter, the way the serving hosts' agent makes
its client (boto3's chain, no Airflow); prints ``SYNC {json}`` with the call's own seconds.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from http.server import ThreadingHTTPServer


def serve() -> None:
    from moto.server import ThreadedMotoServer

    from inspection_refresh.dev.ncp_emulator import Faults, make_handler

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        moto_port = probe.getsockname()[1]
    ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False).start()
    faults = Faults()
    ncp_handler = make_handler(("127.0.0.1", moto_port), None, faults)

    class V2Handler(ncp_handler):
        def _pass_v2(self) -> None:
            # The proxy refuses "list-type=2"; percent-encoded, moto still reads it as 2.
            self.path = self.path.replace("list-type=2", "list-type=%32")
            self._handle()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _pass_v2

    servers = {}
    for name, handler in (("ncp", ncp_handler), ("v2", V2Handler)):
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        servers[name] = server
    for server in servers.values():
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ENDPOINTS " + json.dumps({name: f"http://127.0.0.1:{s.server_address[1]}" for name, s in servers.items()}),
          flush=True)
    while True:
        time.sleep(3600)


def sync_once(endpoint: str, bucket: str, prefix: str, dest: str, transfers: int) -> dict:
    from inspection_refresh.images import reject_reason
    from inspection_refresh.storage import Boto3Source, ObjectStorage

    started = time.perf_counter()
    storage = ObjectStorage(Boto3Source(endpoint_url=endpoint), bucket, max_transfers=transfers)
    result = storage.sync_prefix(prefix, dest, accept=reject_reason)
    seconds = time.perf_counter() - started
    if result.failed:
        raise SystemExit(f"sync_prefix failed for {len(result.failed)} objects: {result.failed[:3]}")
    return {"seconds": round(seconds, 3), "downloaded": result.downloaded, "bytes": result.bytes_downloaded}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("server")
    sync = sub.add_parser("sync")
    for name in ("endpoint", "bucket", "prefix", "dest"):
        sync.add_argument(f"--{name}", required=True)
    sync.add_argument("--transfers", type=int, default=10)
    args = parser.parse_args()
    if args.command == "server":
        serve()
        return 0
    print("SYNC " + json.dumps(sync_once(args.endpoint, args.bucket, args.prefix, args.dest, args.transfers)),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
