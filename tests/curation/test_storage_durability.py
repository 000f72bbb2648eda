"""A unit that fails leaves none of its temporaries behind; every rename of a finished file (outputs, completion
markers) is made durable: the file's data, then its directory's entry, are fsynced (power loss, not only kill -9)."""

import errno
import os
import stat

import pytest

from curation.pipeline import storage
from curation.config import load_config
from curation.pipeline.runner import execute_unit
from curation.stages.base import Stage, Unit


class _FullDisk(Stage):
    """A stage whose unit writes part of a tar shard and a table, then meets a full disk."""

    name = "download"
    section = "download"

    def run_unit(self, unit):
        writer = storage.TarShardWriter(self.dir / f"{unit.id}.tar")
        writer.write("k0", {"txt": "x" * 1000})
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failing_unit_removes_its_temporaries(tmp_path):
    cfg = load_config(data={"run_root": str(tmp_path / "run"), "input": {"url_list": [str(tmp_path)]},
                            "ray": {"local": True}})
    stage = _FullDisk(cfg, tmp_path / "run")
    stage.dir.mkdir(parents=True)
    other = stage.dir / f"00009.tar{storage.TMP_MARK}999999-abcd"  # another process's file: not ours to remove
    other.write_bytes(b"")
    with pytest.raises(OSError):
        execute_unit(stage, Unit("00000", {}))
    left = sorted(p.name for p in (tmp_path / "run").rglob(f"*{storage.TMP_MARK}*"))
    assert left == [other.name]


def test_commits_fsync_the_file_and_its_directory(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def recording_fsync(fd):  # the real fsync, recording what it was given
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    storage.write_json(tmp_path / "m.json", {"a": 1})
    assert synced == [False, True]
