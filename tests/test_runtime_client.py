"""The worker's side of the runtime's control calls, against a real HTTP server."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from deployments.runtime import client
from deployments.runtime.client import RuntimeUnavailable


class CrashingRuntime(BaseHTTPRequestHandler):
    """What an ASGI server answers when the app raised: a plain-text 500."""

    def do_POST(self):
        self.send_response(500)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.end_headers()
        self.wfile.write(b"Internal Server Error")

    def log_message(self, *args):
        pass


def test_a_runtime_that_crashed_on_load_is_a_clear_refusal_not_a_json_error(settings):
    server = ThreadingHTTPServer(("127.0.0.1", 0), CrashingRuntime)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings.SERVEML_RUNTIME_INTERNAL_URL = f"http://127.0.0.1:{server.server_port}"
    try:
        with pytest.raises(RuntimeUnavailable) as refused:
            client.load("0f0e0d0c-0000-4000-8000-000000000000")
    finally:
        server.shutdown()
    assert "could not load the model" in str(refused.value) and "500 'Internal Server Error'" in str(refused.value)
    assert "runtime's log" in str(refused.value)
