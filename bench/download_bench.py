"""Peak memory of the download stage against hostile big bodies, served from 127.0.0.1.

    python bench/download_bench.py --threads 4 8 --max-mb 16 --body-mb 256 --urls 24

A loopback server answers every URL with a big body (a third with an honest Content-Length, a third streamed
without one, a third just under ``download.max_bytes`` so it is read whole and then found undecodable).  For each
thread count the download stage runs in a fresh child process (in-process executor, one shard); the child prints
one JSON line: its RSS after a warm-up run (``baseline_mb``), its peak RSS (``peak_mb``), the bound
``threads x max_bytes`` and the drop reasons.  Before the download streamed bodies, each was buffered whole (peak ~ threads x
body size).
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHUNK = bytes(range(256)) * 4096  # 1 MiB, not an image


class _Big(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    body_mb = 256
    under_mb = 15

    def do_GET(self):  # noqa: N802
        kind = self.path.split("/")[1]
        mb = self.under_mb if kind == "under" else 0 if kind == "tiny" else self.body_mb
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if kind in ("declared", "under", "tiny"):
            self.send_header("Content-Length", str(mb << 20))
        self.end_headers()
        try:
            for _ in range(mb):
                self.wfile.write(CHUNK)
        except OSError:
            pass  # the client hung up at max_bytes

    def log_message(self, *args):
        pass


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args) -> None:
    """Run the download stage once in this (fresh) process and print one JSON line."""
    sys.path.insert(0, str(REPO))
    from curation.config import load_config
    from curation.pipeline.runner import run_pipeline

    # The baseline is taken after a warm-up run on two tiny bodies: the stage imports img2dataset (and its stack)
    # lazily, and the first run also loads PIL plugins, pyarrow kernels and per-thread malloc arenas.

    def config(name, url_list):
        return {"run_root": str(Path(args.tmp) / f"{name}-{args.threads[0]}"), "input": {"url_list": url_list},
                "ray": {"local": True}, "stages": ["download"],
                "download": {"shard_size": 10_000, "threads": args.threads[0], "timeout_s": 30.0,
                             "max_bytes": args.max_mb << 20, "allow_networks": ["127.0.0.1/32"]}}

    run_pipeline(load_config(data=config("warmup", args.warmup_list)), progress=False)
    baseline = _rss_mb()
    cfg = config("run", args.url_list)
    t0 = time.perf_counter()
    run_pipeline(load_config(data=cfg), progress=False)
    seconds = time.perf_counter() - t0
    import pyarrow.parquet as pq

    reasons: dict[str, int] = {}
    for r in pq.read_table(Path(cfg["run_root"]) / "stats" / "drops.parquet").to_pylist():
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    peak = _rss_mb()
    print(json.dumps({
        "bench": "download_peak_rss", "threads": args.threads[0], "urls": args.urls, "body_mb": args.body_mb,
        "max_bytes_mb": args.max_mb, "baseline_mb": round(baseline, 1), "peak_mb": round(peak, 1),
        "growth_mb": round(peak - baseline, 1), "threads_x_max_bytes_mb": args.threads[0] * args.max_mb,
        "seconds": round(seconds, 2), "reasons": reasons,
    }), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--max-mb", type=int, default=16, help="download.max_bytes in MiB")
    ap.add_argument("--body-mb", type=int, default=256, help="size of the oversized bodies in MiB")
    ap.add_argument("--urls", type=int, default=24)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--url-list", help=argparse.SUPPRESS)
    ap.add_argument("--warmup-list", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    _Big.body_mb, _Big.under_mb = args.body_mb, max(1, args.max_mb - 1)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Big)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    kinds = ("declared", "streamed", "under")
    with tempfile.TemporaryDirectory() as tmp:
        url_list, warmup = Path(tmp) / "urls.csv", Path(tmp) / "warmup.csv"
        url_list.write_text("url\n" + "".join(f"{base}/{kinds[i % 3]}/{i}\n" for i in range(args.urls)))
        warmup.write_text("url\n" + "".join(f"{base}/tiny/{i}\n" for i in range(2)))
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        for threads in args.threads:
            cmd = [sys.executable, __file__, "--worker", "--threads", str(threads), "--max-mb", str(args.max_mb),
                   "--body-mb", str(args.body_mb), "--urls", str(args.urls), "--url-list", str(url_list),
                   "--warmup-list", str(warmup), "--tmp", tmp]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            if out.returncode or not lines:
                print(out.stdout[-2000:], out.stderr[-3000:], file=sys.stderr)
                return 1
            print(lines[-1], flush=True)
    srv.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
