"""report: stats/report.html with its plots and image grids, rendered by headless Chromium."""

from __future__ import annotations

import html
import json
import os
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.config import load_config
from curation.pipeline.runner import run_pipeline
from curation.pipeline.storage import write_table
from tests.curation.chromium import dump_dom, screenshot
from tests.curation.fakerun import corpus_pool, make_run

PROBE = """<script>
window.addEventListener('load', function () {
  var out = [];
  document.querySelectorAll('img').forEach(function (im) {
    out.push(im.getAttribute('src') + '=' + im.naturalWidth + 'x' + im.naturalHeight);
  });
  var p = document.createElement('pre'); p.id = 'probe'; p.textContent = out.join('\\n');
  document.body.appendChild(p);
});
</script></body>"""


@pytest.fixture(scope="module")
def report_run(demo_corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    images, _ = corpus_pool(demo_corpus)
    anchors = demo_corpus / "anchors"
    cfg = make_run(tmp, images, shard_size=64, dropped=["0000099998", "0000099999"],
                   stages=["embed", "retrieve", "shards", "report"],
                   retrieve={"anchor_sets": [
                       {"name": "objects", "path": str(anchors / "objects"), "method": "sample", "k": 4},
                       {"name": "scenes", "path": str(anchors / "scenes"), "method": "cluster", "clusters": 12,
                        "min_anchors_per_cluster": 1, "per_cluster": 25}]},
                   shards={"samples_per_shard": 50}, report={"grid_anchors": 4, "grid_neighbors": 4})
    root = tmp / "run"
    write_table(root / "stats" / "component_sizes.parquet", pa.table({
        "component_size": [1, 2, 3], "components": [150, 20, 2], "images": [150, 40, 6], "with_eval": [0, 3, 1]}),
        "component_sizes")
    run_pipeline(load_config(data=cfg), progress=False)
    return root


def test_report_files_and_links(report_run):
    page = report_run / "stats" / "report.html"
    assert page.exists()
    text = page.read_text()
    srcs = re.findall(r"src='([^']+)'", text)
    assert {"funnel.png", "drops.png", "components.png", "similarity.png", "clusters.png",
            "grid_objects.png", "grid_scenes.png"} <= set(srcs)
    for s in srcs:
        assert "/" not in s and ":" not in s, f"not a relative link: {s}"
        assert (report_run / "stats" / s).stat().st_size > 1000
    assert "<script" not in text
    assert not re.findall(r"src=['\"](?:https?:|/)", text), "only relative links"
    drops = pq.read_table(report_run / "stats" / "drops.parquet")
    urls = set(drops["url"].to_pylist()) | set(drops["survivor_url"].to_pylist())
    for href in re.findall(r"href=['\"]((?:https?:|/)[^'\"]*)", text):  # the examples' source URLs, when clicked
        assert html.unescape(href) in urls, href
    assert "not_selected" in text and "http_error" in text  # drop reasons tabulated


def test_report_renders_in_chromium(report_run, tmp_path):
    stats = report_run / "stats"
    probe = stats / "_probe.html"  # beside the page, so its relative links resolve the same way
    probe.write_text((stats / "report.html").read_text().replace("</body>", PROBE))
    try:
        dom = dump_dom(probe)
    finally:
        probe.unlink()
    m = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert m, dom[-2000:]
    rows = [line.rsplit("=", 1) for line in m.group(1).strip().splitlines()]
    assert len(rows) >= 7
    for src, size in rows:
        w, h = map(int, size.split("x"))
        assert w > 0 and h > 0, f"{src} did not render"
    shot = screenshot(stats / "report.html", tmp_path / "report.png")
    assert shot.stat().st_size > 10_000
    keep = os.environ.get("LVD_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


def test_lvd_report_command(report_run, capsys):
    from pipelines.lvd import main

    (report_run / "stats" / "report.html").unlink()
    assert main(["report", str(report_run)]) == 0
    assert (report_run / "stats" / "report.html").exists()
    assert main(["report", str(report_run / "nope")]) == 2


def test_report_stage_in_funnel_run(report_run):
    manifest = json.loads((report_run / "shards_meta" / "manifest.json").read_text())
    assert manifest["samples"] > 0
    page = (report_run / "stats" / "report.html").read_text()
    assert f"{manifest['samples']:,}</b> images" in page
    assert "degenerate-retrieval" not in page  # the demo's descriptors spread similarities well below 1.0
