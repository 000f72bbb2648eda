"""Anchor and evaluation sets are checked before any work: at ``--check`` and when a run starts, an unreadable,
wrongly typed or empty set is one line naming the set, its path and why (it used to pass ``--check`` and fail in
a decode worker with a traceback, or, when empty, end with zero selected and exit 0)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from curation.config import ConfigError, load_config
from curation.pipeline.runner import run_pipeline
from curation.data.samples import image_set_problem, image_set_problems

REPO = Path(__file__).resolve().parents[2]


def jpeg(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(path, "JPEG")
    return path


def test_readable_sets_have_no_problem(tmp_path):
    jpeg(tmp_path / "folder" / "cls" / "a.jpg")
    pq.write_table(pa.table({"path": ["folder/cls/a.jpg"]}), tmp_path / "list.parquet")
    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "00000.tar", "w") as t:
        data = (tmp_path / "folder" / "cls" / "a.jpg").read_bytes()
        info = tarfile.TarInfo("a.jpg")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    for path in (tmp_path / "folder", tmp_path / "list.parquet", tmp_path / "shards"):
        assert image_set_problem(path) is None, path


def test_each_unusable_set_is_named_with_its_reason(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "readme.txt").write_text("no images here")
    pq.write_table(pa.table({"path": pa.array([1, 2], pa.int64())}), tmp_path / "int_paths.parquet")
    pq.write_table(pa.table({"file": ["a.jpg"]}), tmp_path / "no_path.parquet")
    pq.write_table(pa.table({"path": pa.array([], pa.string())}), tmp_path / "no_rows.parquet")
    (tmp_path / "tars").mkdir()
    with tarfile.open(tmp_path / "tars" / "00000.tar", "w") as t:
        info = tarfile.TarInfo("a.txt")
        info.size = 2
        t.addfile(info, io.BytesIO(b"hi"))
    expected = {
        "empty": "holds no image (a folder without image files",
        "texts": "holds no image (a folder without image files",
        "int_paths.parquet": "column 'path' is int64, not text",
        "no_path.parquet": "no column 'path' (columns: ['file'])",
        "no_rows.parquet": "holds no image (a Parquet list without rows)",
        "tars": "holds no image (tar shards without an image member)",
    }
    for name, reason in expected.items():
        problem = image_set_problem(tmp_path / name)
        assert problem is not None and reason in problem and str(tmp_path / name) in problem, (name, problem)
        assert "\n" not in problem


def _config(tmp_path: Path, anchors: Path) -> dict:
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"]}), urls)
    return {"run_root": str(tmp_path / "run"), "input": {"url_list": str(urls)}, "ray": {"local": True},
            "download": {"allow_networks": ["127.0.0.1/32"]}, "sscd": {"descriptor": "pixels"},
            "embed": {"model": "pixels"},
            "retrieve": {"anchor_sets": [{"name": "mine", "path": str(anchors), "method": "sample"}]}}


def test_an_empty_anchor_folder_stops_a_run_before_any_file_and_is_an_error_of_check(tmp_path):
    anchors = tmp_path / "anchors"
    anchors.mkdir()
    cfg = load_config(data=_config(tmp_path, anchors))
    assert image_set_problems(cfg, ["download"]) == []  # the download reads no image set
    with pytest.raises(ConfigError) as info:
        run_pipeline(cfg, progress=False)
    line = str(info.value)
    assert "\n" not in line and "retrieve.anchor_sets[0] ('mine')" in line and str(anchors) in line
    assert "holds no image" in line
    assert not (tmp_path / "run").exists()  # refused before the run root was made

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path, anchors)))
    for extra in (["--check"], ["--local"]):
        proc = subprocess.run([sys.executable, "pipelines/curate.py", "--config", str(path), *extra], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 2, proc.stderr
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("config error")]
        assert len(errors) == 1 and "holds no image" in errors[0] and "Traceback" not in proc.stderr, proc.stderr
