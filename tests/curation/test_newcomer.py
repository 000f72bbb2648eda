"""A newcomer's own-data walkthrough: images on a local HTTP server, a CSV of URLs with captions, the pipeline
in-process, captions read back from the curated shards with the webdataset library and with Ray Data.  Also what
`--check` says (face blurring, errors before the config); the README's cluster recipe run as written (`ray job
submit` to a real local Ray head, the captions checked in its shards too); an image server that goes down mid-run
and `--retry-failed`; an unfinished run named by `lvd funnel` / `lvd report`; the report's reasons rendered in
headless Chromium."""

from __future__ import annotations

import contextlib
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
        "images": {"max_side": 64},
        "download": {"shard_size": 10, "threads": 4, "timeout_s": 10, "allow_networks": ["127.0.0.1/32"]},
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
    from curation.models.detectors import detector_available
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


# --------------------------------------------------------------------------------------------------------------
# An image server that goes down in the middle of a run and comes back; --retry-failed; an unfinished run; the
# cluster recipe of the README, run as written.

N_OUTAGE = 6  # images served; the server goes down after OUTAGE_AFTER of them
OUTAGE_AFTER = 3


class _CountingServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def process_request(self, request, client_address):
        self.accepted += 1  # counted when the connection is accepted, in the serving loop
        super().process_request(request, client_address)


class OutageServer:
    """A folder served on a fixed 127.0.0.1 port.  `up(budget)`: listen, and after `budget` accepted connections
    close the listening socket (the next connection is refused: the server is down in the middle of a run, at the
    same URL count every time, whatever the timing); `up()` serves until `stop()`."""

    def __init__(self, directory: Path):
        from curation.cluster.local_cluster import free_port

        self.directory, self.port = directory, free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._srv = self._thread = None

    def up(self, budget: int | None = None) -> "OutageServer":
        self.stop()
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(self.directory))
        handler.log_message = lambda *a, **k: None
        _CountingServer.allow_reuse_address = True  # the same port again after the outage
        srv = _CountingServer(("127.0.0.1", self.port), handler)
        srv.accepted, srv.timeout, srv.stopping = 0, 0.2, False

        def loop():
            while not srv.stopping and (budget is None or srv.accepted < budget):
                srv.handle_request()
            srv.server_close()

        self._srv, self._thread = srv, threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    @property
    def accepted(self) -> int:
        """Connections accepted since the last `up()`."""
        return self._srv.accepted if self._srv is not None else 0

    def stop(self) -> None:
        if self._srv is not None:
            self._srv.stopping = True
            self._thread.join(timeout=60)
            self._srv = None


@pytest.fixture
def outage(tmp_path):
    with outage_site(tmp_path) as site:
        yield site


@contextlib.contextmanager
def outage_site(tmp_path: Path, extras: bool = False):
    """N_OUTAGE distinct photos behind an OutageServer, urls.csv, and anchors: a crop of every photo, so that each
    anchor's nearest pool image is its own photo and a complete run keeps every URL."""
    www, anchors = tmp_path / "www", tmp_path / "anchors"
    www.mkdir()
    anchors.mkdir()
    rng = np.random.default_rng(5)
    lines = ["url,caption"]
    server = OutageServer(www)
    yy, xx = np.mgrid[0:72, 0:96]
    for i in range(N_OUTAGE):  # stripes of another angle and frequency each: no two are near duplicates
        angle, freq = np.pi * i / N_OUTAGE, 0.08 + 0.03 * i
        wave = np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)))[..., None]
        tint = np.array([(40 * i) % 256, (90 * i + 60) % 256, (150 + 50 * i) % 256])
        arr = np.clip(tint * 0.5 + 60 + 90 * wave + rng.normal(0, 10, (72, 96, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(www / f"p{i}.jpg", quality=92)
        Image.fromarray(arr[4:-4, 4:-4]).save(anchors / f"a{i}.jpg", quality=90)
        lines.append(f"{server.base}/p{i}.jpg,photo {i}")
    if extras:  # a drop of each kind of stage: a 404 (download), too small (filter), the same bytes again (dedup)
        Image.fromarray(np.full((20, 24, 3), 90, np.uint8)).save(www / "small.jpg")
        (www / "copy.jpg").write_bytes((www / "p0.jpg").read_bytes())
        lines += [f"{server.base}/missing.jpg,gone", f"{server.base}/small.jpg,tiny",
                  f"{server.base}/copy.jpg,photo 0 again"]
    (tmp_path / "urls.csv").write_text("\n".join(lines) + "\n")
    cfg = {
        "run_root": str(tmp_path / "run"),
        "input": {"url_list": str(tmp_path / "urls.csv")},
        "images": {"max_side": 64},
        # one thread per shard: its URLs are fetched in row order (shards themselves may run side by side)
        "download": {"shard_size": 4, "threads": 1, "timeout_s": 10, "allow_networks": ["127.0.0.1/32"]},
        "filter": {"min_side": 32, "detector": "none"},
        "hash": {"method": "phash"},  # a PCA hash fitted on a handful of images would group them all
        "sscd": {"descriptor": "pixels"},
        "embed": {"model": "pixels", "batch_size": 16, "num_workers": 0},
        "retrieve": {"anchor_sets": [{"name": "mine", "path": str(anchors), "method": "sample", "k": 1}]},
        "shards": {"samples_per_shard": 4},
    }
    path = tmp_path / "own.yaml"
    path.write_text(yaml.safe_dump(cfg))
    try:
        urls = [line.split(",")[0] for line in lines[1:]]
        yield {"server": server, "config": path, "root": tmp_path / "run", "urls": urls}
    finally:
        server.stop()


def curated_captions(root: Path) -> list[tuple[str, str]]:
    """Sorted (url, caption: the .txt member) of every pool image in the curated shards, read with webdataset."""
    import webdataset as wds

    tars = sorted(str(p) for p in (root / "shards").glob("*.tar"))
    return sorted((meta["url"], txt) for txt, meta in
                  wds.WebDataset(tars, shardshuffle=False).decode().to_tuple("txt", "json") if meta["source"] == "pool")


def curated_urls(root: Path) -> list[str]:
    return [url for url, _ in curated_captions(root)]


def download_drops(root: Path) -> list[tuple[str, str]]:
    import pyarrow.parquet as pq

    rows = pq.read_table(root / "stats" / "drops.parquet").to_pylist()
    return sorted((r["key"], r["reason"]) for r in rows if r["stage"] == "download")


def check_outage_then_retry(outage: dict, run, plain_rerun: bool = True) -> None:
    """`run(extra_args)` runs the curate command (in-process or as a Ray job); the server goes down after
    OUTAGE_AFTER images, the run finishes with those, the server comes back, --retry-failed keeps every URL."""
    from curation.pipeline import accounting

    root = outage["root"]
    outage["server"].up(budget=OUTAGE_AFTER)
    run([])
    # Which OUTAGE_AFTER URLs the server answered before it went down is the downloader threads' order (it varies
    # with load): the count, the reason and the split between drops and curated images are what is fixed.
    lost = download_drops(root)
    assert len(lost) == N_OUTAGE - OUTAGE_AFTER and {r for _, r in lost} == {"network_error"}  # transient
    served = [u for i, u in enumerate(outage["urls"]) if f"{i:010d}" not in {k for k, _ in lost}]
    assert curated_urls(root) == sorted(served)
    outage["server"].up()  # back
    if plain_rerun:
        run([])  # a plain rerun changes nothing: the outage's drops stay (the run is finished)
        assert download_drops(root) == lost
    run(["--retry-failed"])
    assert outage["server"].accepted == N_OUTAGE - OUTAGE_AFTER  # only the failed URLs were fetched again
    assert download_drops(root) == []
    assert curated_urls(root) == sorted(outage["urls"])  # every URL kept, down to the curated shards
    accounting.check_invariants(root)
    funnel = {r["stage"]: r for r in accounting.update_stats(root)[0].to_pylist()}
    assert funnel["download"]["kept"] == funnel["retrieve"]["kept"] == N_OUTAGE
    assert accounting.unfinished_line(root) is None
    assert not (root / "download" / "_retry").exists()


@pytest.mark.slow
def test_retry_failed_fetches_what_an_outage_dropped_in_process(outage):
    from pipelines.curate import main

    def run(extra):
        assert main(["--config", str(outage["config"]), "--local", "--no-progress", *extra]) == 0

    check_outage_then_retry(outage, run)


def test_transient_reasons_are_the_ones_a_retry_can_change():
    from curation.stages.download import is_transient

    assert is_transient("network_error", "<urlopen error [Errno 111] Connection refused>")
    assert is_transient("timeout", "timed out")
    assert is_transient("http_error", "HTTP Error 503: Service Unavailable")
    assert is_transient("http_error", "HTTP Error 429: Too Many Requests")
    assert not is_transient("http_error", "HTTP Error 404: Not Found")
    assert not is_transient("undecodable", "cannot identify image file")
    assert not is_transient("private_address", "127.0.0.1 is loopback")


def test_unfinished_run_is_named_by_funnel_and_report(outage, capsys):
    from pipelines.lvd import main as lvd
    from pipelines.curate import main

    outage["server"].up()
    assert main(["--config", str(outage["config"]), "--local", "--no-progress", "--stages", "download"]) == 0
    capsys.readouterr()
    want = "unfinished: 1 of 9 stages finished (download); next: filter"
    for command in (["funnel", str(outage["root"])], ["report", str(outage["root"])]):
        assert lvd(command) == 0
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith(want), err


def test_a_python_without_lvds_dependencies_gets_one_line(tmp_path):
    """`python -S` has no site-packages: the Python a job gets when `ray start` ran outside the venv."""
    import subprocess
    import sys

    for script in ("pipelines/curate.py", "pipelines/train.py"):
        r = subprocess.run([sys.executable, "-S", script, "--config", str(tmp_path / "x.yaml")], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: this Python") and "pyarrow" in lines[0], r.stderr
        assert "source .venv/bin/activate" in lines[0] and script in lines[0]


def test_check_prints_problems_first_and_the_config_only_when_asked(own_urls, tmp_path, capsys):
    from pipelines.curate import main

    cfg = own_config(own_urls, tmp_path / "run")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(path), "--check"]) == 0
    out = capsys.readouterr()
    assert out.out.strip().splitlines() == [f"config ok: {path} (1 warnings; --show-config prints it resolved)"]
    assert main(["--config", str(path), "--check", "--show-config"]) == 0
    out = capsys.readouterr()
    assert "run_root:" in out.out and len(out.out.splitlines()) > 50
    (tmp_path / "bad.csv").write_text("link,caption\nhttp://127.0.0.1/x.jpg,x\n")
    cfg["input"]["url_list"] = str(tmp_path / "bad.csv")
    path.write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(path), "--check"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "no column 'url'" in out.err.splitlines()[0]


def readme_cluster_recipe() -> list[str]:
    """The command lines of the README's cluster recipe, as written there."""
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- cluster recipe -->")[1].split("<!-- end cluster recipe -->")[0]
    return [line.strip() for line in block.strip().splitlines() if line.strip()]


@pytest.mark.slow
def test_walkthrough_readme_cluster_recipe_outage_and_retry(outage):
    """The README's cluster recipe run line by line in bash from a shell without the venv on the PATH (ports made
    free, and a private temp dir so that only this head is stopped); a job with a Python lacking lvd's packages
    answers in one line; the image server goes down in the middle of the job and comes back; --retry-failed as a
    second job keeps every URL, captions included."""
    import os
    import shutil
    import subprocess
    import tempfile

    from curation.cluster.local_cluster import _node_args, free_port, stop_cluster_processes

    lines = readme_cluster_recipe()
    submit = next(line for line in lines if line.startswith("ray job submit"))
    start = next(line for line in lines if " ray start " in f" {line} ")
    setup = [line for line in lines if line not in (submit, start)]  # source the venv, the token
    assert setup[0] == "source .venv/bin/activate" and "export RAY_AUTH_MODE=token" in setup
    gcs, dashboard = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="lvdray-", dir="/tmp")
    start = (start.replace("--port=6379", f"--port={gcs}").replace("8265", str(dashboard))
             + f" --temp-dir={temp} --ray-client-server-port={free_port()} --num-cpus=2 "
             + " ".join(_node_args(None, None)))  # beside other heads on this machine: their own agent ports
    submit = submit.replace("8265", str(dashboard)).replace("~/own.yaml", str(outage["config"]))
    venv_bin = str(REPO / ".venv" / "bin")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and Path(p).resolve() != Path(venv_bin).resolve())

    def bash(*commands: str) -> subprocess.CompletedProcess:
        script = "\n".join(["set -e", *setup, *commands])
        return subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=900)  # only against a hang

    try:
        r = bash(start)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        r = bash(submit.replace("-- python ", "-- python -S "))  # no site-packages: the system Python's case
        log = r.stdout + r.stderr
        assert r.returncode != 0 and "error: this Python" in log and "lacks lvd's dependencies" in log, log[-3000:]
        assert "Traceback" not in log, log[-3000:]

        def run(extra):
            r = bash(" ".join([submit, *extra]))
            assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
            assert "succeeded" in r.stdout

        check_outage_then_retry(outage, run, plain_rerun=False)
        # the captions of urls.csv came through the Ray job into the curated shards
        assert curated_captions(outage["root"]) == sorted((u, f"photo {i}") for i, u in enumerate(outage["urls"]))
    finally:
        stop_cluster_processes([temp, f":{gcs} "])
        shutil.rmtree(temp, ignore_errors=True)


def test_report_shows_why_with_example_grids_and_the_descriptors_in_chromium(tmp_path):
    """The report of a run with a drop at download (404), filter (too small) and dedup (the same bytes under
    another URL): per reason the rule and the example images, a duplicate beside its survivor, each image linked
    to its URL and titled with its key; the banner names the demo-only descriptors.  Rendered in headless
    Chromium: the text and the images on the page as a browser builds it."""
    import re

    import pyarrow.parquet as pq

    from pipelines.curate import main
    from tests.curation.chromium import dump_dom, screenshot

    with outage_site(tmp_path, extras=True) as site:
        site["server"].up()
        assert main(["--config", str(site["config"]), "--local", "--no-progress"]) == 0
    root = site["root"]
    drops = {r["reason"]: r for r in pq.read_table(root / "stats" / "drops.parquet").to_pylist()}
    assert set(drops) == {"http_error", "too_small", "exact_duplicate"}, drops
    copy_url, original_url = site["urls"][8], site["urls"][0]
    assert drops["exact_duplicate"]["url"] == copy_url
    assert drops["exact_duplicate"]["survivor_url"] == original_url  # no join needed
    assert drops["http_error"]["survivor_url"] is None and drops["too_small"]["survivor_url"] is None

    dom = dump_dom(root / "stats" / "report.html")
    text = re.sub(r"<[^>]+>", " ", dom)
    assert "Descriptors used" in text and text.count("demo only") == 2
    assert "copy detection (dedup): pixels" in text and "retrieval embedder: pixels" in text
    for reason in ("download: http_error (1)", "filter: too_small (1)", "dedup: exact_duplicate (1)"):
        assert reason in text, reason
    assert "shorter side below filter.min_side = 32 px" in text
    dropped = re.findall(r"<img class=\"dropped\"[^>]*>", dom)
    kept = re.findall(r"<img class=\"survivor\"[^>]*>", dom)
    assert len(dropped) == 2 and len(kept) == 1  # the 404 has no image: a box with its key and URL
    assert dom.count("class=\"noimage\"") == 1
    assert f'href="{copy_url}"' in dom and f'href="{original_url}"' in dom
    assert re.search(r'title="key 0000000008: ' + re.escape(copy_url), dom)
    png = screenshot(root / "stats" / "report.html", tmp_path / "report.png")
    assert png.stat().st_size > 10_000


@pytest.mark.slow
def test_a_retry_killed_midway_is_finished_by_the_next_plain_run(outage):
    """SIGKILL inside the retry's download unit (the fifth atomic commit of the process: after the request, inside
    the refetch), then the same command without --retry-failed: the pending request is finished."""
    import subprocess
    import sys

    from curation.pipeline import accounting
    from pipelines.curate import main

    args = ["--config", str(outage["config"]), "--local", "--no-progress"]
    outage["server"].up(budget=OUTAGE_AFTER)
    assert main(args) == 0
    assert len(download_drops(outage["root"])) == N_OUTAGE - OUTAGE_AFTER
    outage["server"].up()
    env = {**__import__("os").environ, "LVD_CRASH_AT": "5"}
    killed = subprocess.run([sys.executable, "pipelines/curate.py", *args, "--retry-failed"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert (outage["root"] / "download" / "_retry" / "request.json").exists()
    assert main(args) == 0
    assert download_drops(outage["root"]) == []
    assert curated_urls(outage["root"]) == sorted(outage["urls"])
    accounting.check_invariants(outage["root"])
