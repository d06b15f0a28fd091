"""A local HTTP server that records Kubeflow Pipelines API calls and answers them minimally
(no KFP cluster can run here)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Recorder:
    def __init__(self):
        self.calls: list[tuple[str, str, dict]] = []


def _handler(recorder: Recorder):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _reply(self, method: str):
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                body = {"raw": raw[:200].decode(errors="replace")}
            path = self.path.split("?")[0]
            recorder.calls.append((method, self.path, body))
            if path.endswith("/healthz"):
                out = {"multi_user": False}
            elif path.endswith("/experiments") and method == "GET":
                out = {"experiments": [], "total_size": 0}
            elif path.endswith("/experiments"):
                out = {"experiment_id": "exp-1", "display_name": body.get("display_name", "x")}
            elif path.endswith("/runs") and method == "POST":
                out = {"run_id": "run-1", "display_name": body.get("display_name"), "experiment_id": "exp-1"}
            elif path.endswith("/recurringruns") and method == "POST":
                out = {"recurring_run_id": "job-1", "display_name": body.get("display_name")}
            else:
                out = {}
            data = json.dumps(out).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._reply("GET")

        def do_POST(self):
            self._reply("POST")

    return Handler


def start() -> tuple[ThreadingHTTPServer, Recorder, str]:
    recorder = Recorder()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(recorder))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, recorder, f"http://127.0.0.1:{server.server_address[1]}"
