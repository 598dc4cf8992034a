"""Real receivers for the HTTP side's tests: a webhook endpoint (http.server) and an SMTP server (aiosmtpd)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class WebhookReceiver:
    """A local HTTP server that records every POSTed JSON body (and its Authorization header)."""

    def __init__(self, status: int = 200) -> None:
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.status = status
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                receiver.headers.append(dict(self.headers))
                receiver.bodies.append(json.loads(body))
                self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def events(self) -> list[str]:
        return [b["event"] for b in self.bodies]

    def wait_for(self, event: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for b in self.bodies:
                if b["event"] == event:
                    return b
            time.sleep(0.1)
        raise AssertionError(f"no {event} notification within {timeout} s; got {self.events()}")

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
