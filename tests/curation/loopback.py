"""A real HTTP server on 127.0.0.1 for tests: `with serve(Handler) as (base_url, port): ...`."""

from __future__ import annotations

import contextlib
import http.server
import threading


@contextlib.contextmanager
def serve(handler_class):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()
