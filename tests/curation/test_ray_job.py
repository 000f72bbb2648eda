"""`ray job submit` of pipelines/curate.py to a real local Ray head, as a user on a cluster would."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from curation.local_cluster import LocalRayHead
from tests.curation.conftest import base_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_head():
    with LocalRayHead(num_cpus=2) as head:
        yield head


@pytest.mark.slow
def test_curate_job_via_ray_job_submit(ray_head, demo_download, tmp_path):
    corpus = demo_download["corpus"]
    root = tmp_path / "run"
    cfg = base_config(corpus, root, stages=["download"])
    cfg.pop("ray")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    rc, log = ray_head.submit(["python", "pipelines/curate.py", "--config", str(cfg_path), "--no-progress"],
                              working_dir=str(REPO), timeout=400)
    assert rc == 0, log[-4000:]
    assert "succeeded" in log
    funnel = {r["stage"]: r for r in pq.read_table(root / "stats" / "funnel.parquet").to_pylist()}
    truth = demo_download["truth"]
    assert funnel["download"]["rows_in"] == truth.num_rows
    ref = {r["stage"]: r for r in pq.read_table(demo_download["root"] / "stats" / "funnel.parquet").to_pylist()}
    assert funnel == ref
