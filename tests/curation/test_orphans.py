"""The decode workers of sscd and embed (DataLoader worker processes of curation.models.describe, the one decode pipeline
both stages use) die with their driver: a kill -9 of the driver leaves no child behind, even while a worker is
blocked reading an image (where torch's own check, run between two fetches, never looks)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from curation.cluster.local_cluster import process_alive

REPO = Path(__file__).resolve().parents[2]

DRIVER = """
import sys, time
import torch
from curation.models.describe import make_loader
from curation.models.embedder import PixelEmbedder

def blocked_samples():  # a sample source stuck like a read from a stalled filesystem
    time.sleep(3600)
    yield from ()

loader = make_loader(PixelEmbedder(8, 32, torch.device("cpu")), blocked_samples, batch_size=1, num_workers=2)
it = iter(loader)
print(" ".join(str(w.pid) for w in it._workers), flush=True)
time.sleep(3600)
"""


def test_decode_workers_die_with_a_killed_driver():
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        workers = [int(p) for p in proc.stdout.readline().split()]
        assert len(workers) == 2 and all(process_alive(p) for p in workers)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 60  # a guard against a hang: the kernel kills them at once
        while any(process_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [p for p in workers if process_alive(p)]
        for p in left:
            os.kill(p, signal.SIGKILL)
        assert not left, f"decode workers {left} outlived their killed driver"
    finally:
        proc.kill()
