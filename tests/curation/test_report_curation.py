"""The report's "What curation did" section: selection shares per anchor set (by source host and by cluster) and
the embedder's leave-one-out k-NN on a labelled evaluation set, from real run tables (Parquet written with the
project's schemas) and a real image folder."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from curation.pipeline.layout import RunLayout
from curation.report import eval_set_knn, loo_knn_top1, selection_shares, write_report
from curation.data.samples import iter_image_set
from curation.pipeline.storage import write_table
from curation.data.vectors import descriptor_table


def test_leave_one_out_knn_counts_each_image_against_the_others():
    # two tight classes: every image's neighbours are its own class
    X = np.array([[1, 0.01], [1, -0.01], [1, 0.02], [0.01, 1], [-0.01, 1], [0.02, 1]])
    assert loo_knn_top1(X, list("aaabbb"), k=2) == 1.0
    # a stray of class b among the a's (nearest: the a at angle -0.01, 0.04 away; no a is nearer to it than to
    # another a): with k=1 it alone is wrong
    X2 = np.vstack([X[:3], [[1, -0.05]], X[3:5]])
    assert loo_knn_top1(X2, list("aaabbb"), k=1) == pytest.approx(5 / 6)


def _selection(rows):
    cols = {f.name: [r.get(f.name) for r in rows] for f in __import__("schemas").tables.SELECTION}
    return pa.table(cols)


def test_report_shows_selection_shares_and_embedder_knn(tmp_path):
    root = tmp_path / "run"
    layout = RunLayout(root)
    rows = ([{"key": f"{i:04d}", "source": "pool", "url": f"http://a.test/{i}.jpg", "anchor_set": "near",
              "anchor_key": "x", "rank": 0, "similarity": 0.9} for i in range(6)]
            + [{"key": f"1{i:03d}", "source": "pool", "url": f"https://b.test/{i}.jpg", "anchor_set": "near",
                "anchor_key": "x", "rank": 1, "similarity": 0.8} for i in range(2)]
            + [{"key": f"2{i:03d}", "source": "pool", "url": f"http://a.test/c{i}.jpg", "anchor_set": "groups",
                "cluster": i % 3 if i < 9 else 7} for i in range(10)])
    write_table(layout.retrieve_selection, _selection(rows), "selection")
    shares = selection_shares(layout, top_clusters=2)
    got = {(r.anchor_set, r.by, r.value): (r.images, r.share) for r in shares.itertuples()}
    assert got[("near", "source", "a.test")] == (6, 0.75) and got[("near", "source", "b.test")] == (2, 0.25)
    assert got[("groups", "source", "a.test")] == (10, 1.0)
    # clusters 0, 1, 2 hold 3 each, cluster 7 one: the two largest, then the other two as one row
    assert sorted(v for (s, b, v) in got if s == "groups" and b == "cluster") == ["0", "1", "2 other clusters"]
    assert got[("groups", "cluster", "2 other clusters")] == (4, 0.4)

    ev = tmp_path / "eval"
    for c in ("cat", "dog"):
        (ev / c).mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(ev / c / f"{i}.png")
    keys = [s.key for s in iter_image_set(ev)]
    cls = {s.key: s.meta["class"] for s in iter_image_set(ev)}
    rng = np.random.default_rng(0)
    centre = {"cat": rng.normal(size=16), "dog": rng.normal(size=16)}
    X = np.stack([centre[cls[k]] + 0.05 * rng.normal(size=16) for k in keys]).astype(np.float32)
    write_table(layout.vectors_dir("embed", "eval", "ev") / "part-00000.parquet",
                descriptor_table(keys, X, "eval/ev"), "descriptors")
    sets = [SimpleNamespace(name="ev", path=ev, format="auto")]
    knn = eval_set_knn(layout, sets)
    assert knn.to_dict("records") == [{"eval_set": "ev", "images": 24, "classes": 2, "knn_top1": 1.0,
                                       "binomial_sd": 0.0}]
    page = write_report(layout, eval_sets=sets).read_text()
    assert "id='what-curation-did'" in page and "id='embedder-knn'" in page and "b.test" in page
    # without labels (a flat folder) or embeddings there is no k-NN table
    assert eval_set_knn(layout, [SimpleNamespace(name="other", path=ev, format="auto")]) is None
    assert "embedder-knn" not in write_report(layout).read_text()


def test_report_renders_an_ablation_table_with_binomial_deviations(tmp_path):
    import math

    import pandas as pd

    from curation.report import ABLATION, ABLATION_SCHEMA, ablation_summary
    from tests.tolerance import assert_close

    layout = RunLayout(tmp_path / "run")
    assert "curation-ablation" not in write_report(layout).read_text()  # no table: no section
    n = 1000
    runs = pd.DataFrame({"seed": [2, 0, 1], "eval_set": "fashion_test", "eval_images": n, "train_images": 650,
                         "curated_knn_top1": [0.71, 0.70, 0.72], "random_knn_top1": [0.64, 0.60, 0.62],
                         "raw_pixels_knn_top1": 0.78, "curated_target_share": 0.95,
                         "random_target_share": [0.19, 0.20, 0.21]})
    write_table(layout.stats(ABLATION), pa.Table.from_pandas(runs, preserve_index=False), ABLATION_SCHEMA)
    s = ablation_summary(runs)
    assert s["seed"].tolist() == ["0", "1", "2", "mean of 3"]
    # seed 0: 0.70 +- sqrt(0.7 * 0.3 / 1000), 0.60 +- sqrt(0.6 * 0.4 / 1000), difference 0.10 +- both in quadrature
    sd = lambda p: math.sqrt(p * (1 - p) / n)  # noqa: E731
    first = s.iloc[0]
    assert_close([first.curated_sd, first.random_sd, first.difference, first.difference_sd, first.z],
                 [sd(0.7), sd(0.6), 0.1, math.hypot(sd(0.7), sd(0.6)), 0.1 / math.hypot(sd(0.7), sd(0.6))],
                 n_terms=4, depth=4, magnitude=5.0)
    assert math.isnan(first.seed_se)
    # the mean: curated 0.71, random 0.62, differences 0.10, 0.10, 0.07 -> mean 0.09, sample sd sqrt(0.0003),
    # standard error sqrt(0.0003 / 3) = 0.01; z divides by the binomial and the seed deviation in quadrature
    mean = s.iloc[-1]
    dsd = math.hypot(sd(0.71), sd(0.62))
    assert_close([mean.curated, mean.random, mean.difference, mean.difference_sd, mean.seed_se, mean.z],
                 [0.71, 0.62, 0.09, dsd, 0.01, 0.09 / math.hypot(dsd, 0.01)], n_terms=4, depth=4, magnitude=5.0)
    page = write_report(layout).read_text()
    section = page[page.index("id='curation-ablation'"):]
    assert "fashion_test" in section and "1,000" in section and "mean of 3" in section
    assert f"curated beat the random subset by +0.090 k-NN top-1, {0.09 / math.hypot(dsd, 0.01):.1f}" in section
    assert "<td>0.710</td>" in section and f"<td>{sd(0.71):.3f}</td>" in section
