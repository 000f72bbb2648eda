"""One driver per run root: a second run refuses in one line naming the holder; a lock left by a killed run is
taken over with a message."""

import json
import socket
import subprocess
import sys

import pytest

from curation.config import ConfigError, load_config
from curation.pipeline.runner import run_pipeline


def _cfg(tmp_path):
    (tmp_path / "u.csv").write_text("url\n")
    return load_config(data={"run_root": str(tmp_path / "run"), "input": {"url_list": [str(tmp_path / "u.csv")]},
                             "ray": {"local": True}, "stages": ["download"]})


def _lock_file(tmp_path):
    return tmp_path / "run" / "_markers" / "run.lock"


def _hold(tmp_path, pid: int, host: str | None = None):
    from curation.pipeline.runlock import process_start

    path = _lock_file(tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid, "start": process_start(pid),
                                "started": "2026-12-07T10:00:00"}))


def test_a_second_run_on_a_held_run_root_refuses_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        _hold(tmp_path, holder.pid)
        with pytest.raises(ConfigError) as info:
            run_pipeline(_cfg(tmp_path), progress=False)
        message = str(info.value)
        assert "\n" not in message and str(holder.pid) in message and socket.gethostname() in message, message
        assert "2026-12-07T10:00:00" in message and str(_lock_file(tmp_path)) in message, message
        assert not (tmp_path / "run" / "download").exists()  # nothing was done twice
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_on_another_host_is_never_taken_over(tmp_path):
    _hold(tmp_path, 1, host="some-other-node")
    with pytest.raises(ConfigError) as info:
        run_pipeline(_cfg(tmp_path), progress=False)
    assert "some-other-node" in str(info.value) and "delete" in str(info.value)


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _hold(tmp_path, gone.pid)
    run_pipeline(_cfg(tmp_path), progress=False)
    out = capsys.readouterr().out
    assert "stale" in out and str(gone.pid) in out, out
    assert not _lock_file(tmp_path).exists()  # released at the end of the run


def test_the_lock_is_held_while_the_run_works(tmp_path):
    seen = {}
    import curation.pipeline.runner as runner

    original = runner.run_stage

    def spy(stage, *a, **kw):
        seen["lock"] = json.loads(_lock_file(tmp_path).read_text())
        return original(stage, *a, **kw)

    runner.run_stage = spy
    try:
        run_pipeline(_cfg(tmp_path), progress=False)
    finally:
        runner.run_stage = original
    import os

    assert seen["lock"]["pid"] == os.getpid() and seen["lock"]["host"] == socket.gethostname()
