"""Shared fixtures: the generated demo corpus, served from a real HTTP server on 127.0.0.1, and one download of it.

Session-scoped so the corpus is generated, served and downloaded once for all curation tests.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curation.config import load_config
from curation.pipeline.runner import run_pipeline

SLOW_SECONDS = 8.0  # the demo server's slow route; the download timeout below is shorter


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory) -> Path:
    from curation.demo.corpus import generate_corpus

    out = tmp_path_factory.mktemp("corpus")
    generate_corpus(out, seed=0, scale=1)
    return out


@pytest.fixture(scope="session")
def demo_server(demo_corpus):
    """The corpus served on 127.0.0.1, with urls.parquet and truth.parquet written for the bound port."""
    from curation.demo.corpus import write_url_list
    from curation.demo.server import DemoServer

    with DemoServer(demo_corpus, slow_seconds=SLOW_SECONDS) as server:
        write_url_list(demo_corpus, server.base_url)
        yield server


def base_config(corpus: Path, run_root: Path, **sections) -> dict:
    """A config dict for the demo corpus that runs in-process (no Ray); sections override whole sections."""
    cfg = {
        "run_root": str(run_root),
        "input": {"url_list": str(corpus / "urls.parquet")},
        "ray": {"local": True},
        "download": {
            "shard_size": 64, "threads": 16, "timeout_s": 4.0,
            "allow_networks": ["127.0.0.1/32"], "blocklist_domains": ["blocked.example"],
        },
        "images": {"max_side": 256},
        "filter": {"min_side": 48, "max_aspect": 4.0},
        # The weight-free pixels descriptor has its own similarity scale (the paper's 0.6 / 0.45 are for SSCD): on the
        # demo corpus copies score >= 0.88 and unrelated images <= 0.70 (siblings) / <= 0.48 (against eval images).
        "dedup": {"threshold": 0.75, "eval_threshold": 0.6,
                  "eval_sets": [{"name": "heldout", "path": str(corpus / "eval" / "heldout")}]},
        "sscd": {"descriptor": "pixels"},
    }
    for name, value in sections.items():
        cfg[name] = value
    return cfg


def later_stages(corpus: Path) -> dict:
    """The embed, retrieve and shards sections of a whole demo run (weight-free embedder, one sample-based and one
    cluster-based anchor set), as the whole-pipeline tests use them."""
    return {
        "embed": {"model": "pixels", "batch_size": 64, "num_workers": 1},
        "retrieve": {"anchor_sets": [
            {"name": "objects", "path": str(corpus / "anchors" / "objects"), "method": "sample", "k": 4},
            {"name": "scenes", "path": str(corpus / "anchors" / "scenes"), "method": "cluster", "clusters": 12,
             "min_anchors_per_cluster": 1, "per_cluster": 25},
        ]},
        "shards": {"samples_per_shard": 50},
    }


@pytest.fixture(scope="session")
def demo_download(demo_server, demo_corpus, tmp_path_factory) -> dict:
    """The download stage run once over the served corpus: {'root', 'corpus', 'config' (dict), 'truth'}."""
    root = tmp_path_factory.mktemp("run") / "run"
    cfg = base_config(demo_corpus, root, stages=["download"])
    run_pipeline(load_config(data=copy.deepcopy(cfg)), progress=False)
    return {"root": root, "corpus": demo_corpus, "config": cfg, "truth": pq.read_table(demo_corpus / "truth.parquet")}


@pytest.fixture(scope="session")
def demo_cleaned(demo_download, tmp_path_factory) -> dict:
    """filter, hash, sscd (pixels descriptor) and dedup run once on a copy of the demo download:
    {'root', 'corpus', 'config' (dict), 'truth'} like demo_download."""
    import shutil

    root = tmp_path_factory.mktemp("cleaned") / "run"
    shutil.copytree(demo_download["root"], root)
    (root / "config.yaml").unlink()
    cfg = base_config(demo_download["corpus"], root, stages=["download", "filter", "hash", "sscd", "dedup"],
                      sscd={"descriptor": "pixels", "num_workers": 1, "batch_size": 64})
    cfg["filter"] = {**cfg["filter"], "detector": "none"}
    run_pipeline(load_config(data=copy.deepcopy(cfg)), progress=False)
    return {"root": root, "corpus": demo_download["corpus"], "config": cfg, "truth": demo_download["truth"]}
