"""The stage registry: a stage declared once, on its class, takes its place in the chain without any change to lvd.

A toy "aesthetic" filter (tests/curation/toy_stage.py, order 25) goes between filter and hash by naming its class in
the config's stage list; the hash stage then reads the toy's kept keys from the filter's tars, and every URL still
ends as a kept image or a drop row naming its stage and reason.
"""

from __future__ import annotations

import copy
import shutil

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from curation.pipeline import accounting
from curation import stages as registry
from curation.config import ConfigError, load_config
from curation.pipeline.layout import RunLayout
from curation.pipeline.runner import run_pipeline
from curation.pipeline.storage import read_tables
from tests.curation.conftest import base_config

TOY = "tests.curation.toy_stage:BrightnessStage"


@pytest.fixture
def isolated_registry(monkeypatch):
    """Registrations made by the test are undone after it (other tests see the built-in chain only)."""
    registry.stage_order()  # the built-ins, loaded into the real registry first
    monkeypatch.setattr(registry, "_registered", dict(registry._registered))


def test_a_stage_named_by_class_path_joins_the_chain_at_its_order(tmp_path, isolated_registry):
    cfg = load_config(data={"run_root": str(tmp_path / "run"), "input": {"url_list": __file__},
                            "stages": ["hash", TOY, "filter", "download"]})
    assert cfg.stages == ["download", "filter", "brightness", "hash"]
    assert registry.stage_order()[:4] == ("download", "filter", "brightness", "hash")
    layout = RunLayout.of(cfg)
    assert layout.input_ledger_stage("hash") == "brightness"  # the toy's kept keys ...
    assert layout.pool_tar_stage("hash") == "filter"  # ... of the filter's images (the toy writes no tars)
    assert RunLayout(tmp_path, ["download", "filter", "hash"]).input_ledger_stage("hash") == "filter"


def test_a_stage_that_takes_a_place_or_name_already_taken_is_refused(isolated_registry):
    from tests.curation.toy_stage import BrightnessStage

    class Twin(BrightnessStage):
        name = "twin"

    class Impostor(BrightnessStage):
        order = 26
        name = "hash"

    class Unconfigured(BrightnessStage):
        order, name, section = 27, "unconfigured", "aesthetics"

    registry.register_stage(BrightnessStage)
    assert registry.register_stage(BrightnessStage) is BrightnessStage  # again: a no-op
    with pytest.raises(ValueError, match="order 25 is taken by stage 'brightness'"):
        registry.register_stage(Twin)
    with pytest.raises(ValueError, match="stage name 'hash' is taken"):
        registry.register_stage(Impostor)
    with pytest.raises(ValueError, match="config section 'aesthetics' does not exist"):
        registry.register_stage(Unconfigured)
    with pytest.raises(ConfigError, match="stages.0: .*no module 'nowhere'"):
        load_config(data={"run_root": "r", "input": {"url_list": __file__}, "stages": ["nowhere.mod:Stage"]})


def test_a_run_with_a_stage_between_filter_and_hash_accounts_for_every_url(demo_download, tmp_path,
                                                                           isolated_registry):
    root = tmp_path / "run"
    shutil.copytree(demo_download["root"], root)
    (root / "config.yaml").unlink()
    cfg = base_config(demo_download["corpus"], root, stages=["download", "filter", TOY, "hash"])
    cfg["filter"] = {**cfg["filter"], "detector": "none"}
    run_pipeline(load_config(data=copy.deepcopy(cfg)), progress=False)

    toy = accounting.read_ledger(root, "brightness")
    filtered = accounting.kept_keys(root, "filter")
    assert sorted(toy["key"].to_pylist()) == filtered["key"].to_pylist()  # it judged every key filter kept, once
    dropped = toy.filter(pc.invert(toy["kept"]))
    assert 0 < dropped.num_rows < toy.num_rows and set(dropped["reason"].to_pylist()) == {"too_dark"}
    # hash received the toy's kept keys, read from the filter's tars
    hashed = read_tables(RunLayout(root).hash_parts(), "hashes")["key"].to_pylist()
    assert sorted(hashed) == accounting.kept_keys(root, "brightness")["key"].to_pylist()
    # every URL: kept by the last ledger stage, or one drop row naming stage and reason
    drops = pq.read_table(RunLayout(root).stats("drops"))
    urls = accounting.read_ledger(root, "download")["key"].to_pylist()
    assert sorted(drops["key"].to_pylist() + hashed) == sorted(urls)
    assert drops.filter(pc.equal(drops["stage"], "brightness")).num_rows == dropped.num_rows
    funnel = pq.read_table(RunLayout(root).stats("funnel")).sort_by("order").to_pylist()
    assert [r["stage"] for r in funnel] == ["download", "filter", "brightness"]
    assert funnel[2]["rows_in"] == funnel[1]["kept"] and funnel[2]["kept"] == len(hashed)
    accounting.check_invariants(root)
