"""The demo run's outputs, table by table, against a checked-in snapshot (tests/curation/snapshots/demo_run.json).

Refactors must not change what the pipeline produces: every ledger, statistics table, descriptor table, retrieval
table, manifest and the final shards' members are compared (see tests/curation/run_snapshot.py for what is
normalised).  A deliberate change of behaviour regenerates the snapshot with

    LVD_UPDATE_SNAPSHOT=1 make test PYTEST_ARGS=tests/curation/test_demo_outputs.py

and the diff of the JSON file shows, in review, exactly which rows changed.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest

from curation.config import load_config
from curation.pipeline.runner import run_pipeline
from tests.curation.conftest import later_stages
from tests.curation.run_snapshot import differences, snapshot
from tests.tolerance import rounding_tol

SNAPSHOT = Path(__file__).parent / "snapshots" / "demo_run.json"

# Tolerance of a float column (tests/tolerance.py): depth * n_terms * eps(float32) * the column's largest |value|.
# The float32 reductions behind a compared value, longest first: the embed pixel descriptor's 4 x 4 average pool of
# a 224-px crop (56 * 56 = 3,136 pixels per cell), its normalisation and the similarities' dot products over its
# 12**3 + 51 = 1,779 elements (the sscd pixel descriptor and the histogram counts are shorter or exact); at most
# three of them chained (pool, normalise, dot product). N_TERMS * DEPTH = 12,288 covers 3,136 + 2 * 1,779 with room.
# A vector is compared through its float64 row sum and norm, with the same bound scaled to the column's largest
# value. For the norms (1 or 0) and the embed descriptor's sums (non-negative histogram bins dominate) that is the
# size of the summed terms. For the sscd pixel descriptor (signed, 1,728 elements) sum |x_i| <= sqrt(1728) ~ 42 can
# exceed the largest |sum| (2.3-5.8) tenfold, so its sum tolerance is not a proven worst case (no sum |x_i| recorded).
N_TERMS = 4096
DEPTH = 3


def _tol(values: list[float]) -> float:
    return rounding_tol(max((abs(v) for v in values), default=1.0), n_terms=N_TERMS, depth=DEPTH)


@pytest.mark.slow
def test_demo_outputs_match_the_snapshot(demo_cleaned, demo_server, tmp_path):
    corpus = demo_cleaned["corpus"]
    root = tmp_path / "run"
    shutil.copytree(demo_cleaned["root"], root)
    (root / "config.yaml").unlink()
    cfg = copy.deepcopy(demo_cleaned["config"])
    cfg["run_root"] = str(root)
    cfg.pop("stages")
    cfg.update(later_stages(corpus))
    run_pipeline(load_config(data=cfg), progress=False)

    actual = snapshot(root, {str(demo_cleaned["root"]): "RUN", str(corpus): "CORPUS", demo_server.base_url: "URL"})
    if os.environ.get("LVD_UPDATE_SNAPSHOT") == "1":
        SNAPSHOT.write_text(json.dumps(actual, indent=0, sort_keys=True) + "\n")
    expected = json.loads(SNAPSHOT.read_text())
    problems = differences(actual, expected, _tol)
    assert not problems, "the demo run's outputs changed:\n" + "\n".join(problems)
    # the snapshot is not empty or trivially small: it holds every stage's ledger and the final shards
    assert {"download/_ledger", "filter/_ledger", "dedup/_ledger", "retrieve/_ledger", "stats/funnel.parquet",
            "shards/*.tar"} <= set(expected)
