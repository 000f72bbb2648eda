"""A local HTTP server for the demo corpus, bound to a loopback address only.

Routes (GET and HEAD):

- ``/status/<code>``   answers with that HTTP status (e.g. 404, 500) and a short text body.
- ``/slow/<name>``     waits ``slow_seconds`` (bounded to [0, 120]) before sending anything, then serves
                       ``www/slow/<name>``: a download timeout shorter than that sees a read timeout.
- ``/redirect/<name>`` answers 302 with the ``Location`` from the corpus's routes table (e.g. the cloud metadata
                       address).  The server only sends the header; nothing ever connects there.
- ``/noai/...``        serves the file with ``X-Robots-Tag: noai`` (or the routes table's header for that path).
- anything else        a file under ``www/``, with a content type by extension unless the routes table overrides it
                       (the HTML page planted as an image is served as ``image/jpeg``).

Use it as a context manager::

    with DemoServer(corpus_dir, slow_seconds=2) as srv:
        write_url_list(corpus_dir, srv.base_url)

or from the command line: ``lvd serve-demo --out DIR`` (see :func:`main`).
"""

from __future__ import annotations

import argparse
import http.server
import ipaddress
import json
import socket
import sys
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

from curation.demo.corpus import REDIRECTS, content_type_for, generate_corpus, write_url_list

MAX_SLOW_SECONDS = 120.0
DEFAULT_OUT = "demo-corpus"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() must not wait for a request sleeping in /slow/
    # socketserver's default listen backlog is 5: with several download shards of 16+ threads connecting at once the
    # kernel drops SYNs, clients retry after 1 s then 3 s, and healthy images time out. Loopback can take many more.
    request_queue_size = 512

    def handle_error(self, request, client_address):  # a client that hangs up early is not an error worth printing
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "lvd-demo/1"
    protocol_version = "HTTP/1.0"  # one request per connection: simple and what img2dataset expects

    def log_message(self, format, *args):  # quiet: no stderr line per request
        pass

    def do_HEAD(self):
        self._dispatch(head=True)

    def do_GET(self):
        self._dispatch(head=False)

    # -- routing -----------------------------------------------------------------------------------------------
    def _dispatch(self, head: bool) -> None:
        demo: DemoServer = self.server.demo  # type: ignore[attr-defined]
        path = unquote(urlsplit(self.path).path)
        parts = path.split("/")
        if len(parts) >= 3 and parts[1] == "status":
            try:
                code = int(parts[2])
            except ValueError:
                code = 400
            if not 200 <= code <= 599:
                code = 400
            self._send(code, f"status {code}\n".encode(), "text/plain; charset=utf-8", head=head)
            return
        if len(parts) == 3 and parts[1] == "redirect":
            target = demo.redirects.get(parts[2])
            if target is None:
                self._send(404, b"no such redirect\n", "text/plain; charset=utf-8", head=head)
                return
            self._send(302, b"", "text/plain; charset=utf-8", head=head, headers={"Location": target})
            return
        if len(parts) >= 3 and parts[1] == "slow":
            if demo.stopping.wait(demo.slow_seconds):  # woken by stop(): give up without answering
                return
        file = demo.resolve(path)
        if file is None:
            self._send(404, b"not found\n", "text/plain; charset=utf-8", head=head)
            return
        route = demo.files.get(path, {})
        headers = {}
        if parts[1] == "noai":
            headers["X-Robots-Tag"] = "noai"
        headers.update(route.get("headers", {}))
        ctype = route.get("content_type") or content_type_for(path)
        self._send(200, file.read_bytes(), ctype, head=head, headers=headers)

    def _send(self, code: int, body: bytes, ctype: str, head: bool, headers: dict | None = None) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if not head and body:
                self.wfile.write(body)
        except (ConnectionError, TimeoutError):
            pass


class DemoServer:
    """Serve ``corpus_dir/www`` on a loopback address in a daemon thread (port 0: any free port)."""

    def __init__(self, corpus_dir, host: str = "127.0.0.1", port: int = 0, slow_seconds: float = 6.0):
        if not _is_loopback(host):
            raise ValueError(f"the demo server binds loopback addresses only (got {host!r})")
        self.corpus_dir = Path(corpus_dir)
        self.www = (self.corpus_dir / "www").resolve()
        if not self.www.is_dir():
            raise FileNotFoundError(f"{self.www} does not exist: generate the corpus first")
        self.host = "127.0.0.1" if host == "localhost" else host
        self.requested_port = int(port)
        self.slow_seconds = min(max(float(slow_seconds), 0.0), MAX_SLOW_SECONDS)
        routes_file = self.corpus_dir / "routes.json"
        routes = json.loads(routes_file.read_text()) if routes_file.exists() else {}
        self.files: dict[str, dict] = routes.get("files", {})
        self.redirects: dict[str, str] = {**REDIRECTS, **routes.get("redirects", {})}
        self.stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def resolve(self, path: str) -> Path | None:
        """The file under www/ that `path` names, or None (missing, a folder, or outside www/)."""
        try:
            f = (self.www / path.lstrip("/")).resolve()
        except (OSError, ValueError):
            return None
        if not f.is_relative_to(self.www) or not f.is_file():
            return None
        return f

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> "DemoServer":
        if self._httpd is not None:
            return self
        self.stopping.clear()
        cls = _Server6 if ":" in self.host else _Server
        self._httpd = cls((self.host, self.requested_port), _Handler)
        self._httpd.demo = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"lvd-demo-server:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self.stopping.set()  # wakes requests waiting in /slow/
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> "DemoServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------------------------
# command line


def ensure_corpus(out: Path, seed: int, scale: float) -> bool:
    """Generate the corpus in `out` unless one with this seed and scale is there; True if it was generated."""
    info_file = out / "corpus.json"
    if (out / "manifest.parquet").exists() and info_file.exists():
        try:
            info = json.loads(info_file.read_text())
        except ValueError:
            info = {}
        if info.get("seed") == seed and float(info.get("scale", -1)) == float(scale):
            from curation.demo.corpus import CORPUS_VERSION

            if info.get("version") == CORPUS_VERSION:
                return False
    generate_corpus(out, seed=seed, scale=scale)
    return True


def _corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path(DEFAULT_OUT),
                   help=f"corpus directory (default: ./{DEFAULT_OUT}); generated there if missing or if its seed/scale "
                        "differ (recorded in DIR/corpus.json)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed; the same seed gives byte-identical files (default 0)")
    p.add_argument("--scale", type=float, default=1,
                   help="multiply the pool, duplicate and evaluation counts by this (default 1: ~260 URL rows)")
    p.add_argument("--format", choices=("parquet", "csv"), default="parquet",
                   help="URL list format: DIR/urls.parquet or DIR/urls.csv, columns url, caption (default parquet)")


def _positive_scale(p: argparse.ArgumentParser, scale: float) -> None:
    if scale <= 0:
        p.error("--scale must be > 0")


def main(argv=None) -> int:
    """``lvd serve-demo``: generate the demo corpus if needed, write its URL list for the bound port, serve."""
    p = argparse.ArgumentParser(
        prog="lvd serve-demo",
        description="Generate the synthetic demo corpus (if needed), write its URL list for this server's address, "
                    "and serve it on a loopback address until Ctrl-C.",
    )
    _corpus_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="loopback address to bind (default 127.0.0.1; other addresses are refused)")
    p.add_argument("--port", type=int, default=8000, help="port to bind (default 8000; 0 picks a free one)")
    p.add_argument("--slow-seconds", type=float, default=6.0,
                   help=f"how long /slow/... waits before answering (default 6, at most {MAX_SLOW_SECONDS:g}); "
                        "set the download timeout below it")
    args = p.parse_args(argv)
    _positive_scale(p, args.scale)
    if not _is_loopback(args.host):
        p.error(f"--host must be a loopback address, got {args.host!r}")
    from curation.pipeline.signals import ctrl_c_stops

    ctrl_c_stops()  # also when started from a background job, which inherits SIGINT ignored
    generated = ensure_corpus(args.out, args.seed, args.scale)
    server = DemoServer(args.out, host=args.host, port=args.port, slow_seconds=args.slow_seconds).start()
    try:
        url_list = write_url_list(args.out, server.base_url, fmt=args.format)
        state = "generated" if generated else "reused"
        print(f"corpus:   {args.out} ({state}, seed {args.seed}, scale {args.scale:g})")
        print(f"url list: {url_list}")
        print(f"truth:    {args.out / 'truth.parquet'}")
        print(f"base url: {server.base_url}")
        print("serving; Ctrl-C to stop", flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        print("\nstopped")
    finally:
        server.stop()
    return 0


def generate_main(argv=None) -> int:
    """Generate the demo corpus only (optionally also the URL list for a given base URL)."""
    p = argparse.ArgumentParser(prog="lvd-demo-generate", description="Generate the synthetic demo corpus.")
    _corpus_args(p)
    p.add_argument("--base-url", default=None,
                   help="also write the URL list and truth.parquet for a server at this base URL "
                        "(e.g. http://127.0.0.1:8000)")
    p.add_argument("--force", action="store_true", help="regenerate even if DIR holds this seed and scale already")
    args = p.parse_args(argv)
    _positive_scale(p, args.scale)
    if args.force:
        generate_corpus(args.out, seed=args.seed, scale=args.scale)
    else:
        ensure_corpus(args.out, args.seed, args.scale)
    info = json.loads((args.out / "corpus.json").read_text())
    print(f"corpus: {args.out} ({info['rows']} URL rows, seed {info['seed']}, scale {info['scale']:g})")
    if args.base_url:
        print(f"url list: {write_url_list(args.out, args.base_url, fmt=args.format)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
