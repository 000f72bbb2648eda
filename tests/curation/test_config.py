"""Bad configs fail before any work with one line naming the key path; resume with another config is refused."""

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from curation.config import ConfigError, load_config
from curation.pipeline.runner import prepare_run_root

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
        prepare_run_root(load_config(data={**base, "images": {"max_side": 256}}))
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
    lvd = subprocess.run([sys.executable, "-m", "pipelines.lvd", "--help"], capture_output=True, text=True,
                         check=True)
    for command in ("curate", "train", "export", "report", "funnel", "serve-demo"):
        assert command in lvd.stdout


# -- strict values, one-line errors, warnings before the work ----------


def one_line(text: str) -> str:
    text = text.strip()
    assert text and "\n" not in text and "Traceback" not in text, text
    return text


@pytest.mark.parametrize("yaml_patch, key", [
    ("download: {threads: true}", "download.threads: Input should be a valid integer"),
    (f"seed: {2**70}", "seed: Input should be less than or equal to 4294967295"),
    ("seed: -1", "seed: Input should be greater than or equal to 0"),
    ("download: {timeout_s: .inf}", "download.timeout_s: Input should be a finite number"),
    ("download: {timeout_s: .nan}", "download.timeout_s: Input should be a finite number"),
    ("download: {timeout_s: 1e12}", "download.timeout_s: Input should be less than or equal to 3600"),
    ("download: {drop_animated: 1}", "download.drop_animated: Input should be a valid boolean"),
    ("dedup: {k: '8'}", "dedup.k: Input should be a valid integer"),
])
def test_strict_types_and_real_bounds(base, yaml_patch, key, tmp_path):
    """`threads: true` used to become 1, seed 2**70 failed after writing files, timeout_s .inf/1e12 turned every
    URL into network_error: all are refused up front (the YAML text as a user writes it, 1e12 included)."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base) + yaml_patch + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert key in one_line(str(info.value))


def test_ints_still_fill_float_fields(base):
    cfg = load_config(data={**base, "download": {"timeout_s": 3}, "dedup": {"threshold": 1}})
    assert cfg.download.timeout_s == 3.0 and cfg.dedup.threshold == 1.0


def test_unusable_run_roots_fail_in_one_line(base, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for root, words in ((a_file, "is a file, not a folder"), (a_file / "run", "lies under a file"),
                        (Path("/proc/self/fdinfo"), "is not usable")):
        with pytest.raises(ConfigError) as info:
            prepare_run_root(load_config(data={**base, "run_root": str(root)}))
        assert words in one_line(str(info.value))


def test_read_only_run_root_fails_in_one_line(base, tmp_path):
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o555)
    try:
        if os.access(root, os.W_OK):
            pytest.skip("this user may write into read-only folders (root); /proc/self/fdinfo covers it above")
        with pytest.raises(ConfigError) as info:
            prepare_run_root(load_config(data={**base, "run_root": str(root)}))
        assert "is not usable: Permission denied" in one_line(str(info.value))
    finally:
        root.chmod(0o755)


def test_config_path_that_is_a_folder_or_binary(tmp_path):
    with pytest.raises(ConfigError, match="is not a file"):
        load_config(tmp_path)
    binary = tmp_path / "model.pt"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError) as info:
        load_config(binary)
    assert "is not a text file" in one_line(str(info.value))


def test_override_value_that_is_not_yaml(base):
    with pytest.raises(ConfigError) as info:
        load_config(data=base, overrides=["download.threads=[1,"])
    assert "override 'download.threads=[1,': the value is not valid YAML" in one_line(str(info.value))


def test_override_indexes_lists(base, tmp_path):
    sets = [{"name": "a", "path": str(tmp_path)}, {"name": "b", "path": str(tmp_path)}]
    data = {**base, "retrieve": {"anchor_sets": sets}}
    cfg = load_config(data=data, overrides=["retrieve.anchor_sets.1.k=8"])
    assert [a.k for a in cfg.retrieve.anchor_sets] == [4, 8]
    assert "k" not in sets[1]  # the caller's data is not altered
    with pytest.raises(ConfigError) as info:
        load_config(data=data, overrides=["retrieve.anchor_sets.2.k=8"])
    assert "retrieve.anchor_sets is a list of 2, '2' is not an index of it" in one_line(str(info.value))


def test_relative_run_root_refused_inside_a_ray_job(base, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(data={**base, "run_root": "runs/a"})
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray's job supervisor gives a job's driver
    with pytest.raises(ConfigError) as info:
        prepare_run_root(cfg)
    assert "run_root 'runs/a' is relative: inside a Ray job" in one_line(str(info.value))
    assert not (tmp_path / "runs").exists()
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert prepare_run_root(cfg) == Path("runs/a")  # outside a job, relative to the current folder


def test_driver_says_which_ray_it_uses(monkeypatch):
    from curation.pipeline.runner import describe_ray_target

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert describe_ray_target("10.1.2.3:6379") == "ray: connecting to the cluster at 10.1.2.3:6379 (from ray.address)"
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    assert "(from RAY_ADDRESS)" in describe_ray_target("10.1.2.3:6379")


def test_check_warns_about_likely_mistakes(tmp_path):
    from curation.checks import preflight_warnings

    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\nhttp://127.0.0.1:8000/a.jpg,a\nhttp://localhost/b.jpg,b\nhttps://example.com/c,c\n")
    data = {"run_root": str(tmp_path / "run"), "input": {"url_list": str(urls)}}
    warnings = preflight_warnings(load_config(data=data))
    assert len(warnings) == 3, warnings
    assert warnings[0].startswith("sscd.weights is null")
    assert warnings[1].startswith("embed.checkpoint is null: the embedder 'vit_huge_patch14_224'")
    assert warnings[2].startswith("2 URLs point at loopback/private addresses (e.g. http://127.0.0.1:8000/a.jpg")
    quiet = {**data, "download": {"allow_networks": ["127.0.0.1/32"]}, "sscd": {"descriptor": "pixels"},
             "embed": {"model": "pixels"}}
    assert preflight_warnings(load_config(data=quiet)) == []


def test_run_stops_when_nothing_survives_download(tmp_path):
    """Every URL refused before any fetch (private addresses, nothing allowed): the run stops after download with
    the reasons instead of running the later stages on nothing."""
    from curation.pipeline.runner import StageFailed, run_pipeline

    urls = tmp_path / "urls.csv"
    urls.write_text("url\nhttp://10.0.0.1/a.jpg\nhttp://192.168.1.1/b.jpg\nnot a url\n")
    cfg = load_config(data={"run_root": str(tmp_path / "run"), "input": {"url_list": str(urls)},
                            "ray": {"local": True}, "stages": ["download", "filter", "hash"]})
    with pytest.raises(StageFailed) as info:
        run_pipeline(cfg, progress=False)
    assert one_line(str(info.value)).startswith("nothing survived download (private_address 2, bad_url 1); later "
                                               "stages were not run")
    assert not (tmp_path / "run" / "filter").exists()
    assert pq.read_table(tmp_path / "run" / "stats" / "funnel.parquet")["rows_in"].to_pylist() == [3]


def test_funnel_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    from pipelines.lvd import main

    assert main(["funnel", str(tmp_path)]) == 2
    assert one_line(capsys.readouterr().err) == f"lvd funnel: {tmp_path} is not a run root (no config.yaml)"
    assert not (tmp_path / "stats").exists()
    assert main(["funnel", str(tmp_path / "nope")]) == 2
    assert "does not exist" in one_line(capsys.readouterr().err)


def test_cli_errors_are_one_line(base, tmp_path):
    """A config path that is a folder, and a run_root under a file, through the real command (exit 2)."""
    script = str(REPO / "pipelines" / "curate.py")
    proc = subprocess.run([sys.executable, script, "--config", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "is not a file" in one_line(proc.stderr)
    (tmp_path / "a_file").write_text("x")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**base, "run_root": str(tmp_path / "a_file" / "run")}))
    proc = subprocess.run([sys.executable, script, "--config", str(cfg), "--local"], capture_output=True, text=True)
    assert proc.returncode == 2 and "lies under a file" in one_line(proc.stderr)


# -- one config base, shared settings stated once, keys that moved -------------------------------


@pytest.mark.parametrize("old, value, where", [
    ("dedup.descriptor", "pixels", "moved to sscd.descriptor"),
    ("sscd.bf16", False, "was replaced by sscd.precision"),
    ("ray.cpus_per_task", 1.0, "was removed"),
    ("download.jpeg_quality", 90, "moved to images.jpeg_quality"),
    ("filter.jpeg_quality", 90, "moved to images.jpeg_quality"),
    ("shards.jpeg_quality", 90, "moved to images.jpeg_quality"),
    ("download.max_image_pixels", 1000, "moved to images.max_image_pixels"),
    ("filter.max_image_pixels", 1000, "moved to images.max_image_pixels"),
])
def test_moved_keys_say_where_they_went(base, tmp_path, old, value, where):
    section, key = old.split(".")
    assert f"{old} {where}" in error_for({**base, section: {key: value}})
    assert f"{old} {where}" in one_line(str(pytest.raises(ConfigError, load_config, data=base,
                                                          overrides=[f"{old}={value}"]).value))
    path = tmp_path / "old.yaml"  # a config file written for the earlier layout
    path.write_text(yaml.safe_dump({**base, section: {key: value}}))
    assert f"{old} {where}" in one_line(str(pytest.raises(ConfigError, load_config, path).value))


def test_every_moved_key_is_named_in_one_line(base):
    text = error_for({**base, "dedup": {"descriptor": "pixels"}, "filter": {"jpeg_quality": 90, "min_side": 8}})
    assert "dedup.descriptor moved to sscd.descriptor" in text and "filter.jpeg_quality moved to images" in text


def test_shared_settings_are_stated_once(base):
    cfg = load_config(data={**base, "images": {"max_image_pixels": 1000, "jpeg_quality": 80},
                            "sscd": {"descriptor": "pixels", "precision": "fp32"}})
    assert (cfg.images.max_image_pixels, cfg.images.jpeg_quality) == (1000, 80)
    assert (cfg.sscd.descriptor, cfg.sscd.precision) == ("pixels", "fp32")
    default = load_config(data=base)
    assert (default.images.max_image_pixels, default.images.jpeg_quality) == (89_478_485, 95)
    assert (default.sscd.descriptor, default.sscd.precision, default.embed.precision) == ("sscd", "auto", "auto")
    assert "sscd.precision" in error_for({**base, "sscd": {"precision": "fp16"}})
    assert "images.jpeg_quality" in error_for({**base, "images": {"jpeg_quality": 101}})


def test_download_decodes_and_encodes_with_the_images_settings():
    """The download stage's decoder takes its bomb limit and JPEG quality from ``images``."""
    import io

    import numpy as np
    from PIL import Image

    from curation.config import DownloadConfig, ImagesConfig
    from curation.stages.download import ImageNormalizer, reason_from_error

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(buf, "PNG")
    png = buf.getvalue()
    dl = DownloadConfig()
    *_, err = ImageNormalizer(dl, ImagesConfig(max_image_pixels=40 * 50 - 1))(io.BytesIO(png))
    assert reason_from_error(err)[0] == "decompression_bomb"
    sizes = {}
    for q in (30, 95):
        jpeg, w, h, *_, err = ImageNormalizer(dl, ImagesConfig(max_image_pixels=40 * 50, jpeg_quality=q))(
            io.BytesIO(png))
        assert err is None and (w, h) == (50, 40)
        sizes[q] = len(jpeg)
    assert sizes[30] < sizes[95]  # random pixels: a lower quality drops most of the detail


def test_image_sets_lists_eval_and_anchor_sets(base, tmp_path):
    a, b, e = (tmp_path / n for n in ("a", "b", "e"))
    for d in (a, b, e):
        d.mkdir()
    cfg = load_config(data={**base, "dedup": {"eval_sets": [{"name": "heldout", "path": str(e)}]},
                            "retrieve": {"anchor_sets": [{"name": "objects", "path": str(a), "method": "sample"},
                                                         {"name": "in1k", "path": str(b), "method": "as_is"}]}})
    sets = {role: [(s.name, s.path) for s in found] for role, found in cfg.image_sets().items()}
    assert sets == {"eval": [("heldout", e)], "anchors": [("objects", a), ("in1k", b)]}
    assert load_config(data=base).image_sets() == {"eval": [], "anchors": []}


def test_demo_config_loads_with_its_paths_made_absolute(tmp_path):
    """pipelines/configs/demo.yaml as pipelines/demo.py submits it (demo-run/ under --out) loads, with the weight-free
    copy descriptor in its new place (a key left in its old place would fail here)."""
    from pipelines.demo import _absolutise

    cfg = _absolutise(yaml.safe_load((REPO / "pipelines" / "configs" / "demo.yaml").read_text()), tmp_path)
    Path(cfg["input"]["url_list"]).parent.mkdir(parents=True)
    Path(cfg["input"]["url_list"]).write_bytes(b"")
    for s in cfg["dedup"]["eval_sets"] + cfg["retrieve"]["anchor_sets"]:
        Path(s["path"]).mkdir(parents=True)
    loaded = load_config(data=cfg)
    assert loaded.sscd.descriptor == "pixels" and loaded.embed.model == "pixels"
    assert [s.name for s in loaded.image_sets()["anchors"]] == ["objects", "scenes"]


@pytest.mark.parametrize("command", [["pipelines/curate.py", "--check"],
                                     ["pipelines/train.py", "--data", "DATA", "--output", "OUT"]])
@pytest.mark.parametrize("where", ["file", "override"])
def test_deeply_nested_yaml_is_one_line(tmp_path, command, where):
    """A list nested 5,000 deep exceeds Python's recursion limit while it is parsed (or validated): the user gets
    one line, as for every other bad config, from both the curation and the trainer command."""
    deep = "[" * 5000 + "]" * 5000
    cfg = tmp_path / "deep.yaml"
    cfg.write_text(f"a: {deep}\n" if where == "file" else "{}\n")
    flag = ["--set"] if "curate" in command[0] else []  # the trainer takes overrides as positional arguments
    extra = [] if where == "file" else [*flag, f"a={deep}"]
    args = [str(tmp_path / a) if a in ("DATA", "OUT") else a for a in command[1:]]
    proc = subprocess.run([sys.executable, str(REPO / command[0]), "--config", str(cfg), *args, *extra],
                          capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "nested" in lines[0] and len(lines[0]) < 400, lines[0]
