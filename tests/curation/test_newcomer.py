"""A newcomer's own-data walkthrough (issue 14): images on a local HTTP server, a CSV of URLs with captions, the
pipeline (in-process, and as `ray job submit` to a real local Ray head), captions read back from the curated shards
with the webdataset library and with Ray Data.  Also what `--check` says about face blurring."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
N_IMAGES = 24


@pytest.fixture(scope="module")
def own_urls(tmp_path_factory):
    """24 distinct images served from a folder by a plain http.server on 127.0.0.1, listed in urls.csv with
    captions (as a newcomer's own data would be), plus a folder of 4 anchors near the first four images."""
    tmp = tmp_path_factory.mktemp("own")
    www, anchors = tmp / "www", tmp / "anchors" / "mine"
    www.mkdir()
    anchors.mkdir(parents=True)
    rng = np.random.default_rng(11)
    for i in range(N_IMAGES):
        base = rng.integers(0, 255, (3,))
        arr = np.clip(base + rng.normal(0, 60, (72, 96, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(www / f"photo_{i:02d}.jpg", quality=92)
        if i < 4:
            Image.fromarray(arr[4:-4, 4:-4]).save(anchors / f"a{i}.jpg", quality=90)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    captions = {f"photo_{i:02d}.jpg": f"my photo number {i}, a test, with \"quotes\"" for i in range(N_IMAGES)}
    import csv

    with open(tmp / "urls.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "caption"])
        for name, cap in captions.items():
            w.writerow([f"{base}/{name}", cap])
    try:
        yield {"tmp": tmp, "urls": tmp / "urls.csv", "anchors": anchors, "base": base,
               "captions": {f"{base}/{n}": c for n, c in captions.items()}}
    finally:
        server.shutdown()
        server.server_close()


def own_config(own: dict, run_root: Path) -> dict:
    """The config a newcomer writes for own URLs on localhost (the README's recipe, with weight-free descriptors
    so the test needs no model files)."""
    return {
        "run_root": str(run_root),
        "input": {"url_list": str(own["urls"]), "url_col": "url", "caption_col": "caption"},
        "download": {"shard_size": 10, "threads": 4, "timeout_s": 10, "max_side": 64,
                     "allow_networks": ["127.0.0.1/32"]},
        "filter": {"min_side": 32, "detector": "none"},
        "sscd": {"descriptor": "pixels"},
        "embed": {"model": "pixels", "batch_size": 16, "num_workers": 0},
        "retrieve": {"anchor_sets": [
            {"name": "mine", "path": str(own["anchors"]), "method": "sample", "k": 3},
            {"name": "keep", "path": str(own["anchors"]), "method": "as_is"}]},
        "shards": {"samples_per_shard": 8},
    }


def check_captions(own: dict, run_root: Path) -> int:
    """Captions (and urls) from the curated shards, via webdataset and via Ray Data; returns the pool samples."""
    import ray
    import webdataset as wds

    shards = run_root / "shards"
    tars = sorted(str(p) for p in shards.iterdir())
    assert tars and all(t.endswith(".tar") for t in tars)
    pool = 0
    by_key = {}
    for key, txt, meta in wds.WebDataset(tars, shardshuffle=False).decode().to_tuple("__key__", "txt", "json"):
        assert meta["key"] == key
        if meta["source"] == "pool":
            assert txt == own["captions"][meta["url"]] == meta["caption"]
            pool += 1
        else:
            assert txt == "" and key.startswith("keep_")
        by_key[key] = txt
    assert pool >= 4  # the k=3 neighbours of 4 anchors
    started = not ray.is_initialized()
    if started:  # a private local instance, stopped by ray.shutdown() (never `ray stop`)
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        rows = ray.data.read_webdataset(str(shards), decoder=None).take_all()
    finally:
        if started:
            ray.shutdown()
    assert {r["__key__"]: r["txt"].decode() for r in rows} == by_key
    return pool


def test_check_says_plainly_when_faces_are_not_blurred(own_urls, tmp_path, capsys):
    from curation.detectors import detector_available
    from pipelines.curate import main

    cfg = own_config(own_urls, tmp_path / "run")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(path), "--check"]) == 0
    assert "warning: filter.detector is 'none': faces are NOT blurred" in capsys.readouterr().err
    cfg["filter"]["detector"] = "nudenet"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(path), "--check"]) == 0
    err = capsys.readouterr().err
    if detector_available("nudenet"):
        assert "NOT blurred" not in err
    else:
        assert "pip install 'lvd[detect]'): faces are NOT blurred" in err


@pytest.mark.slow
def test_own_urls_walkthrough_in_process(own_urls, tmp_path):
    from pipelines.curate import main

    root = tmp_path / "run"
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(own_config(own_urls, root)))
    assert main(["--config", str(path), "--local", "--no-progress"]) == 0
    pool = check_captions(own_urls, root)
    manifest = json.loads((root / "shards_meta" / "manifest.json").read_text())
    assert manifest["by_source"]["pool"] == pool and manifest["by_source"]["anchors/keep"] == 4


@pytest.mark.slow
def test_own_urls_walkthrough_via_ray_job_submit(own_urls, tmp_path):
    """The same run as `ray job submit` to a real local Ray head (starts and stops its own head: run it alone)."""
    from curation.local_cluster import LocalRayHead

    root = tmp_path / "run"
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(own_config(own_urls, root)))
    with LocalRayHead(num_cpus=2) as head:
        rc, log = head.submit(["python", "pipelines/curate.py", "--config", str(path), "--no-progress"],
                              working_dir=str(REPO), timeout=600)
    assert rc == 0, log[-4000:]
    assert "succeeded" in log
    check_captions(own_urls, root)
