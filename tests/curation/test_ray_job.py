"""`ray job submit` of pipelines/curate.py to a real local Ray head, as a user on a cluster would: the whole
pipeline on the served demo corpus, reconciled URL by URL."""

import io
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml
from PIL import Image

from curation.pipeline import accounting
from curation.cluster.local_cluster import LocalRayHead
from tests.curation.conftest import base_config, later_stages

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_head():
    with LocalRayHead(num_cpus=2) as head:
        yield head


@pytest.mark.slow
def test_whole_pipeline_via_ray_job_submit(ray_head, demo_download, tmp_path):
    corpus = demo_download["corpus"]
    root = tmp_path / "run"
    cfg = base_config(corpus, root)  # every stage
    cfg.pop("ray")
    cfg["sscd"] = {"descriptor": "pixels", "num_workers": 1, "batch_size": 64}
    cfg.update(later_stages(corpus))
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    rc, log = ray_head.submit(["python", "pipelines/curate.py", "--config", str(cfg_path), "--no-progress"],
                              working_dir=str(REPO), timeout=600)
    assert rc == 0, log[-4000:]
    assert "succeeded" in log

    # the download funnel equals the in-process run's
    funnel = {r["stage"]: r for r in pq.read_table(root / "stats" / "funnel.parquet").to_pylist()}
    ref = {r["stage"]: r for r in pq.read_table(demo_download["root"] / "stats" / "funnel.parquet").to_pylist()}
    def download_reasons(run_root):
        rows = pq.read_table(run_root / "stats" / "drops.parquet").to_pylist()
        return sorted((r["reason"], r["key"]) for r in rows if r["stage"] == "download")

    assert download_reasons(root) == download_reasons(demo_download["root"])
    assert funnel["download"] == ref["download"]
    accounting.check_invariants(root)

    # every input URL is either in the final shards or in exactly one drop row
    truth = demo_download["truth"]
    drops = pq.read_table(root / "stats" / "drops.parquet")
    dropped = drops["key"].to_pylist()
    assert len(dropped) == len(set(dropped))
    shard_keys = []
    for sample in wds.WebDataset([str(p) for p in sorted((root / "shards").glob("*.tar"))], shardshuffle=False):
        shard_keys.append(sample["__key__"])
        assert Image.open(io.BytesIO(sample["jpg"])).mode == "RGB"
    pool_keys = [k for k in shard_keys if k.isdigit()]
    assert len(shard_keys) == len(set(shard_keys))
    assert sorted(pool_keys + dropped) == [f"{i:010d}" for i in range(truth.num_rows)]
    assert funnel["retrieve"]["kept"] == len(pool_keys)
    assert (root / "stats" / "report.html").exists()
