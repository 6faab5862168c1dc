"""/metrics, /healthz and /readyz over HTTP, in a daemon thread.

/healthz: the relay loop made progress recently (it is not stuck).
/readyz: PostgreSQL and Kafka answer now (checked at most once a second).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)


class HealthServer:
    def __init__(
        self,
        host: str,
        port: int,
        registry,
        seconds_since_progress: Callable[[], float],
        readiness: Callable[[], dict[str, str | None]],
        stuck_after: float,
    ):
        self._registry = registry
        self._since = seconds_since_progress
        self._readiness = readiness
        self._stuck_after = stuck_after
        self._ready_cache: tuple[float, dict[str, str | None]] = (0.0, {})
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # http.server's name
                path = self.path.split("?")[0]
                if path == "/metrics":
                    self._send(200, generate_latest(server._registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    since = server._since()
                    ok = since < server._stuck_after
                    body: dict[str, object] = {
                        "status": "ok" if ok else "stuck",
                        "seconds_since_progress": round(since, 3),
                    }
                    self._send(200 if ok else 503, json.dumps(body).encode())
                elif path == "/readyz":
                    checks = server.ready()
                    ok = all(v is None for v in checks.values())
                    body = {
                        "status": "ready" if ok else "not ready",
                        "checks": {k: v or "ok" for k, v in checks.items()},
                    }
                    self._send(200 if ok else 503, json.dumps(body).encode())
                else:
                    self._send(404, b'{"status": "not found"}')

            def _send(self, code: int, body: bytes, ctype: str = "application/json"):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # keep probes out of the logs
                pass

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="outbox-health", daemon=True
        )

    def ready(self) -> dict[str, str | None]:
        with self._lock:
            at, checks = self._ready_cache
            if time.monotonic() - at > 1.0:
                checks = self._readiness()
                self._ready_cache = (time.monotonic(), checks)
            return checks

    def start(self) -> HealthServer:
        self._thread.start()
        log.info("metrics and health on port %d (/metrics, /healthz, /readyz)", self.port)
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
