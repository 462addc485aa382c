"""A minimal reverse proxy that serves a backend under a path prefix and strips it, as nginx's
`location /lab/ { proxy_pass http://backend/; }` does: what `--root-path` is for. Streams
response bodies as they come (server-sent events), one connection per request."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization"}


def handler_for(prefix: str, backend_port: int) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # the body ends when the connection closes: no re-chunking

        def log_message(self, *args: object) -> None:
            pass

        def _forward(self) -> None:
            if not (self.path == prefix or self.path.startswith(prefix + "/")):
                self.send_error(404, "outside the proxied prefix")
                return
            path = self.path[len(prefix):] or "/"
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP | {"host"}}
            upstream = http.client.HTTPConnection("127.0.0.1", backend_port, timeout=300)
            upstream.request(self.command, path, body=body, headers=headers)
            response = upstream.getresponse()
            self.send_response(response.status, response.reason)
            for key, value in response.getheaders():
                if key.lower() not in HOP_BY_HOP | {"content-length"}:
                    self.send_header(key, value)
            self.send_header("Connection", "close")
            self.end_headers()
            while chunk := response.read1(65536):
                self.wfile.write(chunk)
                self.wfile.flush()
            upstream.close()

        do_GET = do_POST = do_PUT = do_DELETE = _forward

    return Handler


@contextmanager
def prefix_proxy(prefix: str, backend_port: int) -> Iterator[str]:
    """Serve http://127.0.0.1:<port><prefix>/... from the backend's /...; yields the proxy's base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(prefix, backend_port))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="prefix-proxy", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
