"""A dedup or retrieve stage killed (SIGKILL) in the middle of its partitioned work resumes from the
query blocks (and k-means results) it had finished, which are not computed again, and ends with the same output
as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from curation.pipeline import accounting, storage
from curation.config import load_config
from curation.pipeline.runner import run_pipeline
import pyarrow.parquet as pq

from tests.curation import test_scale_dedup as scale_dedup
from tests.curation import test_scale_retrieve as scale_retrieve

REPO = Path(__file__).resolve().parents[2]

CHILD = """
import json, sys
from pathlib import Path
from curation.pipeline import storage
from curation.config import load_config
from curation.pipeline.runner import run_pipeline
storage._crash_count = 0  # count the pipeline's commits only, as the parent does
run_pipeline(load_config(data=json.loads(Path(sys.argv[1]).read_text())), progress=False)
"""


def _dedup_case(tmp: Path) -> dict:  # 4 partitions, 4 query blocks (test_scale_dedup)
    gb = 3 * scale_dedup.SHARD * scale_dedup.D * 4 * 3 / 2**30
    return load_config(data=scale_dedup.dedup_inputs(tmp, worker_memory_gb=gb)[0]).model_dump(mode="json")


def _retrieve_case(tmp: Path) -> dict:  # 3 partitions; two anchor sets, one with Lloyd k-means
    cfg, _ = scale_retrieve.retrieve_inputs(tmp, scale_retrieve.three_partitions_gb())
    return load_config(data=cfg).model_dump(mode="json")


def _dedup_output(root: Path) -> list:
    return sorted((r["key"], r["kept"], r["reason"], r["detail"]) for r in accounting.read_ledger(root, "dedup").to_pylist())


def _retrieve_output(root: Path) -> list:
    out = [sorted(map(str, accounting.read_ledger(root, "retrieve").to_pylist()))]
    for name in ("neighbors", "selection"):
        out.append(sorted(map(str, pq.read_table(root / "retrieve" / f"{name}.parquet").to_pylist())))
    return out


def _finished_work(root: Path, stage: str) -> dict[str, int]:
    """Finished resumable work of a stage: search blocks (not partial waves; a block's edge file is written
    before the block, so a block killed in between is unfinished and its edges are written again) and k-means
    results, path -> inode (work computed again is a new file)."""
    out = {}
    for p in sorted((root / stage).rglob("*")):
        rel = p.relative_to(root / stage).as_posix()
        if p.is_file() and rel.startswith(("_partitioned/", "_kmeans/")) and p.suffix in (".parquet", ".npz") \
                and ".w" not in p.name and ".tmp" not in p.name and "/edges/" not in rel:
            out[rel] = p.stat().st_ino
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage,case,output", [("dedup", _dedup_case, _dedup_output),
                                               ("retrieve", _retrieve_case, _retrieve_output)])
def test_killed_partitioned_stage_resumes_from_its_finished_work(tmp_path, stage, case, output):
    ref_cfg = case(tmp_path / "ref")
    storage._crash_count = 0
    run_pipeline(load_config(data=ref_cfg), progress=False)
    points = storage._crash_count
    reference = output(Path(ref_cfg["run_root"]))
    total = len(_finished_work(Path(ref_cfg["run_root"]), stage))
    assert total >= 2

    # kill points spread over the run; at least one must land between the first and the last finished piece
    for i, at in enumerate(sorted({points * f // 8 for f in range(2, 7)})):
        cfg = case(tmp_path / f"killed{i}")
        root = Path(cfg["run_root"])
        spec = tmp_path / f"cfg{i}.json"
        spec.write_text(json.dumps(cfg))
        env = {**os.environ, "PYTHONPATH": str(REPO), storage.CRASH_ENV: str(at)}
        proc = subprocess.run([sys.executable, "-c", CHILD, str(spec)], env=env, cwd=REPO, capture_output=True,
                              timeout=600)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
        finished = _finished_work(root, stage)
        if not 0 < len(finished) < total:
            continue
        run_pipeline(load_config(data=cfg), progress=False)
        after = _finished_work(root, stage)
        assert {rel: after.get(rel) for rel in finished} == finished  # finished work was not done again
        assert len(after) == total
        assert output(root) == reference
        return
    pytest.fail(f"no kill point among {points} commits landed inside the partitioned work")
