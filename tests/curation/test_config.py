"""Bad configs fail before any work with one line naming the key path; resume with another config is refused."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from curation.config import ConfigError, load_config
from curation.runner import prepare_run_root

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def base(tmp_path):
    urls = tmp_path / "urls.csv"
    urls.write_text("url\nhttp://example.com/a.jpg\n")
    return {"run_root": str(tmp_path / "run"), "input": {"url_list": str(urls)}}


def error_for(data):
    with pytest.raises(ConfigError) as info:
        load_config(data=data)
    text = str(info.value)
    assert "\n" not in text, text
    assert text.startswith("config error: ")
    return text


def test_valid_config_has_defaults(base):
    cfg = load_config(data=base)
    assert cfg.dedup.threshold == 0.6 and cfg.dedup.eval_threshold == 0.45 and cfg.dedup.k == 64
    assert cfg.stages[0] == "download"


@pytest.mark.parametrize(
    "patch, key",
    [
        ({"download": {"timout_s": 3}}, "download.timout_s: unknown key"),
        ({"download": {"threads": "many"}}, "download.threads"),
        ({"dedup": {"threshold": 1.5}}, "dedup.threshold"),
        ({"dedup": {"k": 0}}, "dedup.k"),
        ({"filter": {"nsfw_threshold": -0.1}}, "filter.nsfw_threshold"),
        ({"download": {"allow_networks": ["300.1.1.1/8"]}}, "download.allow_networks"),
        ({"stages": ["download", "embedd"]}, "stages.1"),
        ({"retrieve": {"anchor_sets": [{"name": "a", "path": "/nonexistent/anchors"}]}},
         "retrieve.anchor_sets.0.path: Value error, path does not exist"),
    ],
)
def test_bad_values_name_the_key(base, patch, key):
    data = {**base, **patch}
    assert key in error_for(data)


def test_missing_paths_and_keys(base, tmp_path):
    assert "input.url_list.0: Value error, path does not exist" in error_for(
        {**base, "input": {"url_list": str(tmp_path / "nope.parquet")}})
    assert "input: required key is missing" in error_for({"run_root": "x"})


def test_override_syntax(base):
    cfg = load_config(data=base, overrides=["download.threads=7", "dedup.eval_threshold=0.5"])
    assert cfg.download.threads == 7 and cfg.dedup.eval_threshold == 0.5
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(data=base, overrides=["download.threads"])


def test_resume_with_changed_config_is_refused_with_a_diff(base):
    prepare_run_root(load_config(data=base))
    # run-time choices may change
    prepare_run_root(load_config(data={**base, "stages": ["download"], "ray": {"max_in_flight": 2}}))
    with pytest.raises(ConfigError) as info:
        prepare_run_root(load_config(data={**base, "download": {"max_side": 256}}))
    assert "-  max_side: 512" in str(info.value) and "+  max_side: 256" in str(info.value)


def test_cli_reports_bad_config_in_one_line(base, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({**base, "hash": {"bits": 0}}))
    proc = subprocess.run([sys.executable, str(REPO / "pipelines" / "curate.py"), "--config", str(cfg)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "hash.bits" in proc.stderr


def test_help_documents_every_option():
    proc = subprocess.run([sys.executable, str(REPO / "pipelines" / "curate.py"), "--help"],
                          capture_output=True, text=True, check=True)
    for option in ("--config", "--run-root", "--stages", "--set", "--local", "--ray-address", "--check",
                   "--no-progress"):
        assert option in proc.stdout
    lvd = subprocess.run([sys.executable, "-m", "curation.cli", "--help"], capture_output=True, text=True,
                         check=True)
    for command in ("curate", "train", "export", "report", "funnel", "serve-demo"):
        assert command in lvd.stdout
