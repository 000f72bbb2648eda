"""The demo corpus generator and its 127.0.0.1 server: determinism, planted truth, and what is really served."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.demo.corpus import EDITS, HASH_EDITS, MANIFEST_SCHEMA, generate_corpus, write_url_list
from curation.demo.server import DemoServer, generate_main, main
from curation.stages import drop_reasons

ROOT = Path(__file__).resolve().parents[2]


def _hashes(d: Path) -> dict[str, str]:
    files = [p for p in sorted(d.rglob("*")) if p.is_file()]
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _rows(corpus: Path) -> list[dict]:
    return pq.read_table(corpus / "manifest.parquet").to_pylist()


def _served(corpus: Path, row: dict) -> bytes:
    return (corpus / "www" / row["path"].lstrip("/")).read_bytes()


def _thumb(data: bytes, size: int = 16) -> np.ndarray:
    im = Image.open(io.BytesIO(data)).convert("L").resize((size, size), Image.Resampling.BILINEAR)
    a = np.asarray(im, np.float32)
    return a - a.mean()  # brightness-invariant, like a perceptual hash


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """A small private corpus (scale 0.3) that tests may write URL lists into."""
    out = tmp_path_factory.mktemp("demo_small") / "a"
    generate_corpus(out, seed=0, scale=0.3)
    return out


def test_generation_is_deterministic(small, tmp_path):
    generate_corpus(tmp_path / "b", seed=0, scale=0.3)
    generate_corpus(tmp_path / "c", seed=1, scale=0.3)
    a = {k: v for k, v in _hashes(small).items() if not k.startswith(("urls.", "truth."))}
    b, c = _hashes(tmp_path / "b"), _hashes(tmp_path / "c")
    assert a == b
    assert a != c
    assert sum(a.get(k) == v for k, v in c.items()) < len(c) // 2  # another seed: most files differ


def test_rows_by_role_and_reason(demo_corpus):
    table = pq.read_table(demo_corpus / "manifest.parquet")
    assert table.schema.equals(MANIFEST_SCHEMA)
    rows = table.to_pylist()
    assert [r["row_id"] for r in rows] == list(range(len(rows)))
    roles = Counter(r["role"] for r in rows)
    assert roles == {"anchor_near": 120, "distractor": 60, "exact_duplicate": 15, "near_duplicate": 30,
                     "eval_copy": 10, "special_kept": 3, "bad_input": 23}
    reasons = Counter((r["expected_stage"], r["expected_reason"]) for r in rows)
    assert reasons[(None, None)] == 120 + 60 + 3
    assert reasons[("dedup", "exact_duplicate")] == 15
    assert reasons[("dedup", "near_duplicate")] == 15 and reasons[("dedup", "copy_duplicate")] == 15
    assert reasons[("dedup", "eval_contamination")] == 10
    assert reasons[("filter", "bad_aspect")] == 1 and reasons[("filter", "too_small")] == 1
    for reason in ("http_error", "timeout", "undecodable", "truncated", "empty", "decompression_bomb", "animated",
                   "private_address", "opted_out", "blocked_domain", "bad_url", "duplicate_url"):
        assert reasons[("download", reason)] >= 1, reason
    for r in rows:  # every expected reason is in the stage's closed vocabulary
        assert (r["expected_stage"] is None) == (r["expected_reason"] is None)
        if r["expected_stage"]:
            assert r["expected_reason"] in drop_reasons(r["expected_stage"])
        assert (r["path"] is None) != (r["absolute_url"] is None)
        assert r["path"] is None or r["path"].startswith("/")
    edits = Counter(r["edit"] for r in rows if r["role"] == "near_duplicate")
    assert set(edits) == set(EDITS) and all(n == 5 for n in edits.values())
    for r in rows:
        if r["role"] == "near_duplicate":
            assert r["expected_reason"] == ("near_duplicate" if r["edit"] in HASH_EDITS else "copy_duplicate")
    info = json.loads((demo_corpus / "corpus.json").read_text())
    assert info["rows"] == len(rows) and info["seed"] == 0


def test_duplicates_follow_their_surviving_originals(demo_corpus):
    rows = _rows(demo_corpus)
    originals = Counter()
    for r in rows:
        if r["dup_of_row"] is not None:
            o = rows[r["dup_of_row"]]
            assert o["row_id"] < r["row_id"]
            assert o["expected_stage"] is None and o["role"] in ("anchor_near", "distractor")
            originals[o["row_id"]] += 1
        if r["role"] in ("exact_duplicate", "near_duplicate"):
            assert r["dup_of_row"] is not None and r["concept"] == rows[r["dup_of_row"]]["concept"]
    assert max(originals.values()) == 1  # duplicate groups are pairs
    dup_urls = [r for r in rows if r["expected_reason"] == "duplicate_url"]
    assert len(dup_urls) == 2
    for r in dup_urls:
        assert r["path"] == rows[r["dup_of_row"]]["path"]
    paths = Counter(r["path"] for r in rows if r["path"] and r["expected_reason"] != "duplicate_url")
    assert max(paths.values()) == 1


def test_bad_inputs_are_what_they_claim(demo_corpus):
    rows = _rows(demo_corpus)
    by = {}
    for r in rows:
        if r["role"] in ("bad_input", "special_kept") and r["path"]:
            by.setdefault(r["path"], r)
    html = _served(demo_corpus, by["/files/not_an_image.jpg"])
    assert html.lstrip().startswith(b"<!DOCTYPE html")
    with pytest.raises(Image.UnidentifiedImageError):
        Image.open(io.BytesIO(html))
    assert _served(demo_corpus, by["/files/empty.jpg"]) == b""
    with pytest.raises(Image.UnidentifiedImageError):
        Image.open(io.BytesIO(b""))
    trunc = Image.open(io.BytesIO(_served(demo_corpus, by["/files/truncated.jpg"])))
    assert trunc.format == "JPEG"
    with pytest.raises(OSError):
        trunc.load()
    bomb = _served(demo_corpus, by["/files/bomb.png"])
    assert len(bomb) < 10_000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(bomb))
    w, h = int.from_bytes(bomb[16:20], "big"), int.from_bytes(bomb[20:24], "big")
    assert w * h > 2 * Image.MAX_IMAGE_PIXELS
    gif = Image.open(io.BytesIO(_served(demo_corpus, by["/files/animated.gif"])))
    assert gif.format == "GIF" and gif.n_frames >= 3 and gif.is_animated
    modes = {p: Image.open(io.BytesIO(_served(demo_corpus, by[p]))).mode
             for p in ("/files/cmyk.jpg", "/files/gray16.png", "/files/alpha.png")}
    assert modes == {"/files/cmyk.jpg": "CMYK", "/files/gray16.png": "I;16", "/files/alpha.png": "RGBA"}
    alpha = np.asarray(Image.open(io.BytesIO(_served(demo_corpus, by["/files/alpha.png"]))))[..., 3]
    assert alpha.min() == 0 and alpha.max() == 255
    wide = Image.open(io.BytesIO(_served(demo_corpus, by["/files/wide.jpg"])))
    assert max(wide.size) / min(wide.size) >= 5
    assert Image.open(io.BytesIO(_served(demo_corpus, by["/files/tiny.jpg"]))).size == (32, 32)
    fixed = {r["absolute_url"]: r["expected_reason"] for r in rows if r["absolute_url"]}
    assert fixed == {
        "http://10.0.0.1/a.jpg": "private_address", "http://169.254.169.254/latest/meta-data/iam": "private_address",
        "http://blocked.example/cat.jpg": "blocked_domain", "http://ads.blocked.example/x.jpg": "blocked_domain",
        "htp://broken": "bad_url", "http//missing-colon.jpg": "bad_url", "not a url": "bad_url",
    }


def test_served_images_match_their_rows(demo_corpus):
    rows = _rows(demo_corpus)
    for r in rows:
        if r["role"] in ("anchor_near", "distractor", "near_duplicate", "eval_copy"):
            data = _served(demo_corpus, r)
            assert hashlib.sha256(data).hexdigest() == r["sha256"]
            im = Image.open(io.BytesIO(data))
            assert im.size == (r["width"], r["height"]) and im.mode == "RGB"
            assert im.format == {"image/jpeg": "JPEG", "image/png": "PNG"}[r["content_type"]]
            assert min(im.size) >= 100 and max(im.size) / min(im.size) <= 2.0
    assert sum(r["content_type"] == "image/png" for r in rows if r["role"] in ("anchor_near", "distractor")) >= 5


def test_exact_and_near_duplicates(demo_corpus):
    rows = _rows(demo_corpus)
    for r in rows:
        if r["role"] == "exact_duplicate":
            o = rows[r["dup_of_row"]]
            assert r["path"] != o["path"] and _served(demo_corpus, r) == _served(demo_corpus, o)
    # near duplicates: other bytes, but close in a 16x16 grey thumbnail (flip compared mirrored); closer than two
    # different pool images near the same anchor (which must not look like duplicates of each other)
    sibling = []
    by_anchor = {}
    for r in rows:
        if r["role"] == "anchor_near" and r["expected_stage"] is None:
            by_anchor.setdefault(r["anchor_id"], []).append(r)
    for group in by_anchor.values():
        a, b = _thumb(_served(demo_corpus, group[0])), _thumb(_served(demo_corpus, group[1]))
        sibling.append(float(np.abs(a - b).mean()))
    for r in rows:
        if r["role"] != "near_duplicate":
            continue
        o = rows[r["dup_of_row"]]
        data, orig = _served(demo_corpus, r), _served(demo_corpus, o)
        assert data != orig
        t, to = _thumb(data), _thumb(orig)
        if r["edit"] == "flip":
            t = t[:, ::-1]
        diff = float(np.abs(t - to).mean())
        limit = 6.0 if r["edit"] in HASH_EDITS else 12.0  # grey levels, mean absolute difference
        assert diff < limit, (r["edit"], diff)
        assert diff < 0.75 * np.median(sibling), (r["edit"], diff, np.median(sibling))
    for r in rows:
        if r["role"] == "eval_copy":
            assert (demo_corpus / "eval" / "heldout" / f"{r['dup_of_eval']}.jpg").is_file() and r["edit"] in EDITS


def test_anchor_and_eval_sets(demo_corpus):
    anchors = pq.read_table(demo_corpus / "anchors.parquet").to_pylist()
    sets = Counter(a["anchor_set"] for a in anchors)
    assert sets == {"objects": 12, "scenes": 8}
    concepts = {s: {a["concept"] for a in anchors if a["anchor_set"] == s} for s in sets}
    assert not concepts["objects"] & concepts["scenes"]
    for a in anchors:
        p = demo_corpus / a["path"]
        assert p.is_file() and p.parent.name == a["class"] and p.parent.parent.name == a["anchor_set"]
    rows = _rows(demo_corpus)
    unanchored = {r["concept"] for r in rows if r["role"] == "distractor"}
    assert unanchored and not unanchored & (concepts["objects"] | concepts["scenes"])
    evals = pq.read_table(demo_corpus / "eval.parquet").to_pylist()
    assert len(evals) == 12 and all((demo_corpus / e["path"]).is_file() for e in evals)

    # a colour-histogram descriptor puts most pool images nearest to the anchor they were drawn from
    def hist(path):
        x = np.asarray(Image.open(path).convert("RGB").resize((48, 48))) // 32
        h = np.bincount((x[..., 0] * 64 + x[..., 1] * 8 + x[..., 2]).ravel(), minlength=512).astype(np.float64)
        return h / np.linalg.norm(h)

    ah = np.stack([hist(demo_corpus / a["path"]) for a in anchors])
    near = [r for r in rows if r["role"] == "anchor_near"]
    hits = sum(anchors[int(np.argmax(ah @ hist(demo_corpus / "www" / r["path"].lstrip("/"))))]["anchor_id"]
               == r["anchor_id"] for r in near)
    assert hits >= 0.8 * len(near)


def test_url_list_and_truth(small):
    base = "http://127.0.0.1:8123"
    path = write_url_list(small, base + "/")
    assert path == small / "urls.parquet"
    urls = pq.read_table(path)
    assert urls.column_names == ["url", "caption"]
    truth = pq.read_table(small / "truth.parquet").to_pylist()
    assert [t["url"] for t in truth] == urls["url"].to_pylist()
    for t in truth:
        assert t["url"] == (base + t["path"] if t["path"] else t["absolute_url"])
    first = path.read_bytes()
    assert write_url_list(small, base).read_bytes() == first
    csv_path = write_url_list(small, base, fmt="csv")
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "url,caption" and len(lines) == len(truth) + 1


def _get(url: str, method: str = "GET", timeout: float = 5.0):
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def test_server_serves_the_corpus_on_loopback(demo_corpus):
    rows = _rows(demo_corpus)
    with DemoServer(demo_corpus, slow_seconds=0.6) as srv:
        assert srv.base_url.startswith("http://127.0.0.1:") and srv.port > 0
        base = srv.base_url
        for r in [r for r in rows if r["role"] in ("anchor_near", "special_kept")][:5] + \
                 [r for r in rows if r["content_type"] == "image/png" and r["role"] == "distractor"][:1]:
            status, headers, body = _get(base + r["path"])
            assert status == 200 and body == _served(demo_corpus, r)
            assert headers["Content-Type"] == r["content_type"]
        assert _get(base + "/status/404")[0] == 404
        assert _get(base + "/status/500")[0] == 500
        assert _get(base + "/img/no-such-file.jpg")[0] == 404
        assert _get(base + "/../manifest.parquet")[0] == 404
        assert _get(base + "/%2e%2e/manifest.parquet")[0] == 404
        status, headers, body = _get(base + "/files/not_an_image.jpg")
        assert status == 200 and headers["Content-Type"] == "image/jpeg" and body.startswith(b"<!DOCTYPE html")
        status, headers, body = _get(base + "/files/empty.jpg")
        assert status == 200 and body == b"" and headers["Content-Length"] == "0"
        assert _get(base + "/files/animated.gif")[1]["Content-Type"] == "image/gif"
        assert _get(base + "/noai/optout-0.jpg")[1]["X-Robots-Tag"] == "noai"
        status, headers, body = _get(base + "/noai/optout-1.jpg", method="HEAD")
        assert status == 200 and headers["X-Robots-Tag"] == "noimageai" and body == b""
        # redirects: read the Location without following it
        for name, target in (("metadata", "http://169.254.169.254/latest/meta-data/"),
                             ("private10", "http://10.0.0.7/x.jpg")):
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
            conn.request("GET", f"/redirect/{name}")
            resp = conn.getresponse()
            assert resp.status == 302 and resp.getheader("Location") == target
            conn.close()
        # slow: answers after slow_seconds; a shorter client timeout times out
        t0 = time.monotonic()
        status, headers, body = _get(base + "/slow/slow-0.jpg")
        assert status == 200 and time.monotonic() - t0 >= 0.55 and body[:2] == b"\xff\xd8"
        with pytest.raises((socket.timeout, TimeoutError, urllib.error.URLError)):
            _get(base + "/slow/slow-0.jpg", timeout=0.2)
    # stopped: the port no longer answers
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv.requested_port or int(base.rsplit(":", 1)[1])), timeout=1).close()


def test_server_refuses_other_addresses_and_stops_while_a_slow_request_waits(demo_corpus):
    with pytest.raises(ValueError):
        DemoServer(demo_corpus, host="0.0.0.0")
    srv = DemoServer(demo_corpus, slow_seconds=30).start()
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    sock.sendall(b"GET /slow/slow-0.jpg HTTP/1.0\r\nHost: x\r\n\r\n")
    time.sleep(0.2)
    t0 = time.monotonic()
    srv.stop()
    assert time.monotonic() - t0 < 3
    sock.close()


def test_cli_help_and_generate(small, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--out", "--seed", "--scale", "--host", "--port", "--slow-seconds"):
        assert opt in text
    before = (small / "manifest.parquet").stat().st_mtime_ns
    assert generate_main(["--out", str(small), "--seed", "0", "--scale", "0.3"]) == 0  # same seed/scale: reused
    assert (small / "manifest.parquet").stat().st_mtime_ns == before
    with pytest.raises(SystemExit):
        main(["--out", str(small), "--host", "0.0.0.0"])


def test_serve_demo_command(small):
    """serve-demo serves, and stops on SIGINT (also when started with SIGINT ignored, as from a background shell
    job).  No timing: it is awaited line by line and on exit; the deadlines only guard against a hang."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.lvd", "serve-demo", "--out", str(small), "--seed", "0", "--scale", "0.3",
         "--port", "0", "--slow-seconds", "1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        base = None
        while base is None:  # readline blocks until the server prints its address, or exits
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("base url:"):
                base = line.split(":", 1)[1].strip()
        assert base and base.startswith("http://127.0.0.1:"), proc.stderr.read() if proc.poll() is not None else base
        urls = pq.read_table(small / "urls.parquet")["url"].to_pylist()
        served = [u for u in urls if u.startswith(base + "/img/")]
        assert served and _get(served[0])[0] == 200
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=300)  # hang guard only
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
