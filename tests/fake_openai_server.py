"""A misbehaving OpenAI-compatible server, for the failure-mode tests only.

The main path is always tested against llama.cpp's real server (``llama_server.py``); a real server
cannot be made to answer 429, drop a stream halfway or hang on cue, so this one does exactly that,
one behaviour at a time (``FakeServer.mode``).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "fake-model"
OTHER_MODEL = "fake-model-large"
PARTIAL = ["Half ", "a ", "reply"]


class FakeServer:
    """``mode``: "ok", a status code as a string ("401", "429", ...), "drop" (stream stops mid-reply, no end),
    "error-event" (an error object inside the stream) or "hang" (headers never come)."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.requests: list[dict] = []
        self.release = threading.Event()  # set at shutdown so a hanging handler returns
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self._json(200, {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "fake"}
                                                              for name in (MODEL, OTHER_MODEL)]})
                else:
                    self._json(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"body": body, "authorization": self.headers.get("Authorization")})
                mode = server.mode
                if mode == "hang":
                    server.release.wait(30)
                    return
                if mode.isdigit():
                    status = int(mode)
                    messages = {401: "Invalid API key", 403: "Forbidden", 404: f"The model `{body.get('model')}` does not exist.",
                                429: "Too many requests", 500: "Internal error", 503: "Overloaded"}
                    headers = {"Retry-After": "7"} if status == 429 else {}
                    self._json(status, {"error": {"message": messages.get(status, "error"), "code": status}}, headers)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                for piece in PARTIAL:
                    self._event({"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
                    time.sleep(0.01)
                if mode == "drop":
                    self.close_connection = True
                    return
                if mode == "error-event":
                    self._event({"error": {"message": "the engine ran out of KV blocks"}})
                    return
                self._event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                # usage without prompt_tokens_details: a server that does not report its cache
                self._event({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}})
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()

            def _event(self, data: dict) -> None:
                self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")
                self.wfile.flush()

            def _json(self, status: int, data: dict, headers: dict | None = None) -> None:
                payload = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "FakeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
