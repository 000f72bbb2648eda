"""Peak memory of planning the download stage of a big URL list (reading, precheck, input shards).

    python bench/urllist_plan_memory.py --rows 1000000 4000000

For each row count a CSV of that many distinct URLs with short captions is written once, then the download stage's
``plan`` runs in a fresh child process on a new run root; the child prints one JSON line with its peak resident
memory (``VmHWM`` of /proc/self/status, Linux), the RSS it had before planning (imports only) and the seconds
planning took.  A streaming plan's peak stays flat as the list grows (a list's rows are held one input shard at a
time, plus 8 bytes per row for the duplicate-URL check).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(csv: str, root: str, shard_size: int) -> None:
    sys.path.insert(0, str(REPO))
    from curation.config import load_config
    from curation.stages import stage_class

    cfg = load_config(data={"run_root": root, "input": {"url_list": [csv]}, "ray": {"local": True},
                            "stages": ["download"], "download": {"shard_size": shard_size}})
    stage = stage_class("download")(cfg, Path(root))
    before = _status_mb("VmRSS")
    t0 = time.time()
    units = stage.plan()
    print(json.dumps({"units": len(units), "rss_before_mb": round(before, 1), "peak_mb": round(_status_mb("VmHWM"), 1),
                      "plan_s": round(time.time() - t0, 1)}))


def write_csv(path: Path, rows: int) -> None:
    with open(path, "w") as f:
        f.write("url,caption\n")
        for i in range(rows):
            f.write(f"http://img{i % 97}.example.com/photos/{i:09d}.jpg,a photo numbered {i}\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 4_000_000])
    p.add_argument("--shard-size", type=int, default=10_000)
    p.add_argument("--tmp", help="folder for the CSV and run roots (default: the system temporary folder)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child, args.shard_size)
        return
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for rows in args.rows:
            csv = Path(tmp) / f"urls-{rows}.csv"
            write_csv(csv, rows)
            out = subprocess.run([sys.executable, __file__, "--shard-size", str(args.shard_size), "--child", str(csv),
                                  str(Path(tmp) / f"run-{rows}")], check=True, capture_output=True, text=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps({"rows": rows, "csv_mb": round(csv.stat().st_size / 2**20, 1), **result}), flush=True)
            csv.unlink()


if __name__ == "__main__":
    main()
