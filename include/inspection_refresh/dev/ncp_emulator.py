"""A local stand-in for NCP Object Storage, for the demo, the tests and the benchmarks.

moto's S3 server (a real S3 implementation over HTTP) runs behind a small proxy
that behaves the way NCP does where it differs from AWS:

* ``ListObjectsV2`` (``GET /bucket?list-type=2``) is refused, as NCP refuses it;
* requests signed with another access key get ``403 InvalidAccessKeyId``;

and that can inject the faults and delays the tests and benchmarks need
(added latency per request, a connection cut in the middle of a body, 503
SlowDown, objects that fail on every GET, slow uploads of chosen keys). Faults are
set at start-up (CLI options, :class:`Faults` arguments) or at run time with
``POST /__emulator__/faults`` (JSON), so one server serves a whole test session.
Only GET object requests get faults and only PUTs are slowed (``slow_upload``);
listing and HEAD stay healthy.

Run: ``python -m inspection_refresh.dev.ncp_emulator --port 9000 --access-key KEY``
(add ``--fault-slowdown-rate 0.1 --fault-cut-rate 0.1 --fault-seed 7`` for a flaky
store, ``--fault-always images/normal/1/`` for objects that never download).
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import random
import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

log = logging.getLogger("ncp_emulator")

CONTROL_PATH = "/__emulator__/faults"
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-authorization", "proxy-authenticate"}
_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/")


class Faults:
    """Fault settings, given at start-up and changed through the control endpoint.

    :param latency_ms: delay added to every request.
    :param slowdown_rate: share of GET object requests answered ``503 SlowDown``.
    :param cut_rate: share of GET object responses cut off after the headers and half the body.
    :param always_fail: key substrings whose GETs are cut off every time.
    :param slow_upload: key substring -> seconds each PUT (upload or copy) of a matching key is held
        before it reaches the store, e.g. ``{"deployments/clip/normal/2026...": 2}``: a slow upload
        that a test can overtake with a rollback.
    :param seed: makes the random faults reproducible: whether the n-th GET of a
        key fails depends only on (seed, key, n), not on the bucket or on the order
        threads ask in.
    """

    def __init__(
        self,
        latency_ms: float = 0.0,
        slowdown_rate: float = 0.0,
        cut_rate: float = 0.0,
        always_fail: list[str] | tuple[str, ...] = (),
        seed: int = 0,
        slow_upload: dict[str, float] | None = None,
    ) -> None:
        self.lock = threading.Lock()
        self.latency_ms = latency_ms
        self.slowdown_rate = slowdown_rate
        self.cut_rate = cut_rate
        self.always_fail = list(always_fail)
        self.seed = seed
        self.cut_body: dict[str, int] = {}  # key substring -> GETs still to cut
        self.slow_upload: dict[str, float] = dict(slow_upload or {})
        self._gets: Counter[str] = Counter()  # object key -> GETs seen, for the seeded draws

    def update(self, spec: dict) -> None:
        with self.lock:
            if "latency_ms" in spec:
                self.latency_ms = float(spec["latency_ms"])
            if "cut_body" in spec:
                self.cut_body = {str(k): int(v) for k, v in spec["cut_body"].items()}
            for name in ("slowdown_rate", "cut_rate"):
                if name in spec:
                    setattr(self, name, float(spec[name]))
            if "always_fail" in spec:
                self.always_fail = [str(fragment) for fragment in spec["always_fail"]]
            if "slow_upload" in spec:
                self.slow_upload = {str(k): float(v) for k, v in spec["slow_upload"].items()}
            if "seed" in spec:
                self.seed = int(spec["seed"])
                self._gets.clear()

    def upload_delay(self, key: str) -> float:
        """Seconds to hold a PUT of object ``key`` (the longest matching ``slow_upload`` entry)."""
        with self.lock:
            return max((delay for fragment, delay in self.slow_upload.items() if fragment in key), default=0.0)

    def take_cut(self, key: str) -> bool:
        with self.lock:
            for fragment, remaining in self.cut_body.items():
                if remaining > 0 and fragment in key:
                    self.cut_body[fragment] = remaining - 1
                    return True
        return False

    def object_fault(self, key: str) -> str | None:
        """``"slowdown"``, ``"cut"`` or ``None`` for this GET of object ``key``."""
        with self.lock:
            if any(fragment in key for fragment in self.always_fail):
                return "cut"
            self._gets[key] += 1
            draw = random.Random(f"{self.seed}\0{key}\0{self._gets[key]}").random()
            slowdown_rate, cut_rate = self.slowdown_rate, self.cut_rate
        if draw < slowdown_rate:
            return "slowdown"
        if draw < slowdown_rate + cut_rate:
            return "cut"
        return "cut" if self.take_cut(key) else None


def object_key(path: str) -> str | None:
    """The key a path-style ``/bucket/key`` request names; ``None`` for ``/bucket`` or ``/bucket/``."""
    parts = unquote(urlsplit(path).path).lstrip("/").split("/", 1)
    return parts[1] if len(parts) == 2 and parts[1] else None


def _error_xml(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            f"<Message>{message}</Message></Error>").encode()


def make_handler(upstream: tuple[str, int], access_key: str | None, faults: Faults):
    local = threading.local()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet: one line per request is noise
            log.debug(fmt, *args)

        def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for name, value in (headers or {"Content-Type": "application/xml"}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline().strip():
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _access_key_ok(self) -> bool:
            if access_key is None:
                return True
            auth = self.headers.get("Authorization", "")
            match = _CREDENTIAL.search(auth)
            if match:
                return match.group(1) == access_key
            query = parse_qs(urlsplit(self.path).query)
            credential = query.get("X-Amz-Credential", [""])[0]
            return unquote(credential).split("/")[0] == access_key

        def _handle(self) -> None:
            body = self._read_body()
            if self.path.startswith(CONTROL_PATH):
                faults.update(json.loads(body or b"{}"))
                self._reply(200, b"{}", {"Content-Type": "application/json"})
                return
            if faults.latency_ms:
                time.sleep(faults.latency_ms / 1000.0)
            if not self._access_key_ok():
                self._reply(403, _error_xml("InvalidAccessKeyId",
                                            "The access key Id you provided does not exist in our records."))
                return
            if "list-type=2" in urlsplit(self.path).query:
                self._reply(400, _error_xml("NotImplemented", "ListObjectsV2 is not supported; use ListObjects"))
                return
            if self.command == "PUT" and (put_key := object_key(self.path)) is not None:
                time.sleep(faults.upload_delay(put_key))
            key = object_key(self.path) if self.command == "GET" else None
            fault = faults.object_fault(key) if key is not None else None
            if fault == "slowdown":
                self._reply(503, _error_xml("SlowDown", "Please reduce your request rate."))
                return
            if not hasattr(local, "conn"):
                local.conn = http.client.HTTPConnection(*upstream, timeout=120)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            try:
                local.conn.request(self.command, self.path, body=body or None, headers=headers)
                response = local.conn.getresponse()
                payload = response.read()
            except (http.client.HTTPException, OSError):
                local.conn.close()
                del local.conn
                raise
            out_headers = {k: v for k, v in response.getheaders()
                           if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length"}
            if fault == "cut" and response.status == 200:
                # Promise the whole body, send half, then drop the connection.
                self.send_response(200)
                for name, value in out_headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self.send_response(response.status)
            for name, value in out_headers.items():
                self.send_header(name, value)
            if self.command == "HEAD":
                length = response.getheader("Content-Length")
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                return
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler


class NcpEmulator:
    """moto S3 + the NCP-like proxy, both in this process; ``endpoint_url`` is the proxy."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, access_key: str | None = None, faults: Faults | None = None,
    ) -> None:
        from moto.server import ThreadedMotoServer

        probe = socket.socket()
        probe.bind((host, 0))
        moto_port = probe.getsockname()[1]
        probe.close()
        self._moto = ThreadedMotoServer(ip_address=host, port=moto_port, verbose=False)
        self.faults = faults or Faults()
        self._server = ThreadingHTTPServer((host, port), make_handler((host, moto_port), access_key, self.faults))
        self._server.daemon_threads = True
        self.endpoint_url = f"http://{host}:{self._server.server_address[1]}"

    def start(self) -> "NcpEmulator":
        self._moto.start()
        threading.Thread(target=self._server.serve_forever, name="ncp-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._moto.stop()


def set_faults(endpoint_url: str, **spec) -> None:
    """Change a running emulator's faults, e.g. ``set_faults(url, latency_ms=40)``."""
    import urllib.request

    request = urllib.request.Request(endpoint_url + CONTROL_PATH, data=json.dumps(spec).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=10):
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--access-key", default=None, help="only accept requests signed with this access key")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--fault-slowdown-rate", type=float, default=0.0, metavar="R",
                        help="answer 503 SlowDown to this share of GET object requests")
    parser.add_argument("--fault-cut-rate", type=float, default=0.0, metavar="R",
                        help="cut this share of GET object responses off after the headers and half the body")
    parser.add_argument("--fault-always", action="append", default=[], metavar="KEY_SUBSTRING",
                        help="cut every GET of objects whose key contains this (repeatable)")
    parser.add_argument("--fault-seed", type=int, default=0, help="seed of the random faults (reproducible runs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    faults = Faults(latency_ms=args.latency_ms, slowdown_rate=args.fault_slowdown_rate, cut_rate=args.fault_cut_rate,
                    always_fail=args.fault_always, seed=args.fault_seed)
    emulator = NcpEmulator(args.host, args.port, args.access_key, faults).start()
    log.info("NCP-like object storage listening on %s (ListObjectsV2 refused; faults: slowdown %.0f%%, cut %.0f%%, "
             "always failing %s, seed %d)", emulator.endpoint_url, 100 * faults.slowdown_rate,
             100 * faults.cut_rate, faults.always_fail or "none", faults.seed)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        emulator.stop()


if __name__ == "__main__":
    main()
