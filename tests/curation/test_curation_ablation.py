"""bench/curation_ablation.py at tiny settings: the pool is built with its planted kinds, the curation stages run,
both arms train the same recipe on the same number of images, the table is well-formed (one row per seed and
a mean, accuracies in [0, 1] with their binomial standard deviations), and the curated run holds the table as
stats/ablation.parquet with its report page showing the ablation section.  Needs Debian's dataset-fashion-mnist."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.debian import ensure_package

REPO = Path(__file__).resolve().parents[2]
FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def _bench():
    spec = importlib.util.spec_from_file_location("curation_ablation", REPO / "bench" / "curation_ablation.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["curation_ablation"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
@pytest.mark.skipif(not ensure_package("dataset-fashion-mnist", FASHION),
                    reason="Debian's dataset-fashion-mnist is not installed (/usr/share/datasets/fashion-mnist) "
                    "and could not be (apt-get install needs root and the Debian archive)")
def test_curation_ablation_runs_and_prints_its_table(tmp_path, capsys):
    bench = _bench()
    args = ["--out", str(tmp_path / "abl"), "--target", "120", "--distractors", "1", "--anchors", "30",
            "--knn-train", "100", "--knn-val", "60", "--steps", "4", "--seeds", "0,1", "--clusters", "4",
            "--per-cluster", "8", "--threads", "1"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out.splitlines()
    import json

    result = json.loads(out[-1])
    # the pool: 120 Fashion-MNIST images, 40 of each distractor kind, 10 % planted duplicates of those 240
    assert result["pool"] == 240 + 24 and result["fashion_share_pool"] == pytest.approx(0.5, abs=0.1)
    assert 0 < result["curated"] < result["pool"]
    assert result["fashion_share_curated"] > result["fashion_share_pool"]  # pixel retrieval finds clothes
    assert [r["seed"] for r in result["runs"]] == [0, 1]
    for r in result["runs"] + [{"curated": result["raw_pixels_knn_top1"], "random": 0.0}]:
        assert 0.0 <= r["curated"] <= 1.0 and 0.0 <= r["random"] <= 1.0
    rows = [line for line in out if line.startswith("| ") and not line.startswith(("| seed", "| ---"))]
    assert len(rows) == 3 and rows[-1].startswith("| mean of 2 |")
    cell = re.compile(r"(\d\.\d{3}) \+- (\d\.\d{3})")
    for line, r in zip(rows, result["runs"]):
        (c, c_sd), (u, u_sd) = cell.findall(line)[:2]
        n = result["knn_val"]
        assert float(c) == pytest.approx(r["curated"], abs=5e-4)
        assert float(c_sd) == pytest.approx(np.sqrt(r["curated"] * (1 - r["curated"]) / n), abs=5e-4)
        assert float(u_sd) == pytest.approx(np.sqrt(r["random"] * (1 - r["random"]) / n), abs=5e-4)
    # the curated run holds the table and its report shows it
    from curation.pipeline.layout import RunLayout
    from curation.pipeline.storage import read_table

    run_root = tmp_path / "abl" / "curate" / "run"
    stored = read_table(RunLayout(run_root).stats("ablation"), "ablation").to_pylist()
    assert [r["seed"] for r in stored] == [0, 1]
    assert all(r["eval_images"] == 60 and r["train_images"] == result["curated"] for r in stored)
    assert [r["curated_knn_top1"] for r in stored] == [r["curated"] for r in result["runs"]]
    assert [r["random_target_share"] for r in stored] == [r["fashion_share_random"] for r in result["runs"]]
    page = Path(result["report"])
    assert page == RunLayout(run_root).report_html
    section = page.read_text()[page.read_text().index("id='curation-ablation'"):]
    assert "fashion-mnist test" in section and "mean of 2" in section
