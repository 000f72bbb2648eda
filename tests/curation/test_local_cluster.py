"""A local Ray head stops exactly its own processes: another cluster on the same machine keeps running.

(`ray stop --force`, which the helper used before, kills every Ray process on the machine: another test session's,
or a user's own cluster when `make demo` finished.)"""

from __future__ import annotations

import subprocess

import pytest

from curation.local_cluster import LocalRayHead, _ray_bin, processes_of_cluster, ray_env


def _status(head: LocalRayHead) -> subprocess.CompletedProcess:
    return subprocess.run([_ray_bin(), "status", "--address", head.address], env=ray_env(),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_stopping_one_local_head_leaves_another_running():
    with LocalRayHead(num_cpus=1) as keeper:
        first = LocalRayHead(num_cpus=1).start()
        first_marks = [first.temp_dir, f":{first.gcs_port} "]
        assert processes_of_cluster(first_marks), "the started head's processes are found"
        first.stop()
        assert processes_of_cluster(first_marks) == []
        kept = _status(keeper)
        assert kept.returncode == 0, kept.stdout + kept.stderr
        assert processes_of_cluster([keeper.temp_dir])
    assert processes_of_cluster([keeper.temp_dir]) == []
