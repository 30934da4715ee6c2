"""A local stand-in for NCP Object Storage, for the demo, the tests and the benchmarks.

moto's S3 server (a real S3 implementation over HTTP) runs behind a small proxy
that behaves the way NCP does where it differs from AWS:

* ``ListObjectsV2`` (``GET /bucket?list-type=2``) is refused, as NCP refuses it;
* requests signed with another access key get ``403 InvalidAccessKeyId``;

and that can inject the faults and delays the tests and benchmarks need
(added latency per request, a connection cut in the middle of a body). Faults
are set at run time with ``POST /__emulator__/faults`` (JSON), so one server
serves a whole test session.

Run: ``python -m inspection_refresh.dev.ncp_emulator --port 9000 --access-key KEY``
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

log = logging.getLogger("ncp_emulator")

CONTROL_PATH = "/__emulator__/faults"
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-authorization", "proxy-authenticate"}
_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/")


class Faults:
    """Run-time fault settings, changed through the control endpoint."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency_ms = 0.0
        self.cut_body: dict[str, int] = {}  # key substring -> GETs still to cut

    def update(self, spec: dict) -> None:
        with self.lock:
            if "latency_ms" in spec:
                self.latency_ms = float(spec["latency_ms"])
            if "cut_body" in spec:
                self.cut_body = {str(k): int(v) for k, v in spec["cut_body"].items()}

    def take_cut(self, path: str) -> bool:
        with self.lock:
            for fragment, remaining in self.cut_body.items():
                if remaining > 0 and fragment in path:
                    self.cut_body[fragment] = remaining - 1
                    return True
        return False


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
            if self.command == "GET" and response.status == 200 and faults.take_cut(self.path):
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

    def __init__(self, host: str = "127.0.0.1", port: int = 0, access_key: str | None = None) -> None:
        from moto.server import ThreadedMotoServer

        probe = socket.socket()
        probe.bind((host, 0))
        moto_port = probe.getsockname()[1]
        probe.close()
        self._moto = ThreadedMotoServer(ip_address=host, port=moto_port, verbose=False)
        self.faults = Faults()
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    emulator = NcpEmulator(args.host, args.port, args.access_key).start()
    emulator.faults.update({"latency_ms": args.latency_ms})
    log.info("NCP-like object storage listening on %s (ListObjectsV2 refused)", emulator.endpoint_url)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        emulator.stop()


if __name__ == "__main__":
    main()
