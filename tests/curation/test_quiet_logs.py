"""Log noise a newcomer meets on a first run: faiss loader lines, DataLoader worker warnings, Ray uploading
.git/.venv with a job, the Ray job client's chatter, a progress bar in a log file."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from curation.config import load_config
from curation.pipeline.runner import run_pipeline
from curation.cluster.workers import loader_workers, usable_cpus
from tests.curation.fakerun import make_run, random_images

REPO = Path(__file__).resolve().parents[2]


def test_faiss_loader_lines_silenced_under_info_logging():
    code = ("import logging; logging.basicConfig(level=logging.INFO); import curation.engine.knn; import faiss; "
            "logging.getLogger('lvd').info('still logging')")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "faiss.loader" not in res.stderr and "Could not load library" not in res.stderr, res.stderr
    assert "still logging" in res.stderr  # only faiss's loader is quieted


def test_importing_img2dataset_does_not_phone_home():
    """img2dataset imports albumentations, whose import asks pypi.org for its latest version unless
    NO_ALBUMENTATIONS_UPDATE is set: the download stage's import of img2dataset sets it, whatever the caller's
    environment.  The probe records (and refuses) every connection; that it sees the check when the check runs
    shows it would see one at import."""
    code = textwrap.dedent("""
        import socket, sys, warnings
        tried = []
        def refuse(address, *args, **kwargs):
            tried.append(address[0])
            raise OSError("no network in this test")
        socket.create_connection = refuse
        from curation.stages.download import img2dataset_downloader
        img2dataset_downloader()
        assert "albumentations" in sys.modules
        print("import:", tried)
        from albumentations.check_version import check_for_updates
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check_for_updates()
        print("check:", tried)
    """)
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert "import: []" in res.stdout, res.stdout
    assert "check: ['pypi.org']" in res.stdout, res.stdout


def test_embed_stage_starts_no_more_workers_than_cpus(tmp_path, recwarn):
    cpus = usable_cpus()
    assert loader_workers(cpus + 3) == cpus and loader_workers(0) == 0 and loader_workers(1) == 1
    cfg = make_run(tmp_path, random_images(12, seed=1), stages=["embed"])
    cfg["embed"]["num_workers"] = cpus + 2
    run_pipeline(load_config(data=cfg), progress=False)
    assert (tmp_path / "run" / "embed" / "pool" / "part-00000.parquet").exists()
    noisy = [str(w.message) for w in recwarn if "worker processes in total" in str(w.message)]
    assert not noisy, noisy[0]


def test_ray_job_upload_skips_git_and_venv():
    from ray._private.runtime_env.packaging import get_excludes_from_ignore_files

    # .rayignore alone (as when RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 turns .gitignore off)
    excludes = get_excludes_from_ignore_files(REPO, include_gitignore=False)
    assert excludes, "no .rayignore at the repository root"

    def excluded(rel: str) -> bool:
        return any(f(REPO / rel) for f in excludes)

    for rel in (".git", ".venv", ".git/objects/pack/pack-1.pack", ".venv/lib/python3.11/site-packages/torch/lib/libtorch.so",
                "demo-run/run/download/00000.tar"):
        assert excluded(rel), rel
    for rel in ("curation/pipeline/runner.py", "pipelines/curate.py", "pipelines/configs/demo.yaml", "schemas/tables.py"):
        assert not excluded(rel), rel


def test_report_component_plot_logs_nothing(tmp_path, caplog):
    """Component sizes are numbers: plotted as string categories, matplotlib logs "Using categorical units" twice
    in every run's log."""
    import logging

    import pandas as pd

    from curation.report import plot_components

    comp = pd.DataFrame({"component_size": [1, 2, 5], "components": [40, 6, 1], "images": [40, 12, 5],
                         "with_eval": [0, 1, 0]})
    with caplog.at_level(logging.INFO):
        png = plot_components(comp, tmp_path)
    assert png and (tmp_path / png).exists()
    assert "categorical units" not in caplog.text


def test_ray_job_client_keeps_the_jobs_log_and_one_line_each_for_submission_and_end():
    from curation.cluster.local_cluster import quiet_job_line

    raw = [
        "2026-12-07 11:02:58,751\tINFO cli.py:42 -- Job submission server address: http://127.0.0.1:36001",
        "2026-12-07 11:02:58,751\tWARNING working_dir.py:101 -- Directory '.git' is now ignored by default when "
        "packaging the working directory. To disable this behavior, set the ...",
        "2026-12-07 11:02:58,752\tINFO packaging.py:385 -- Ignoring upload to cluster for these files: [...]",
        "2026-12-07 11:02:58,782\tINFO dashboard_sdk.py:371 -- Uploading package gcs://_ray_pkg_03cb.zip.",
        "2026-12-07 11:03:00,203\tSUCC cli.py:66 -- -------------------------------------------------------",
        "2026-12-07 11:03:00,207\tSUCC cli.py:67 -- Job 'raysubmit_q' submitted successfully",
        "2026-12-07 11:03:00,211\tINFO cli.py:331 -- Query the logs of the job:",
        "2026-12-07 11:03:00,211\tINFO cli.py:333 -- ray job logs raysubmit_q",
        "2026-12-07 11:02:59,872\tINFO job_manager.py:581 -- Runtime env is setting up.",
        "Running entrypoint for job raysubmit_q: python pipelines/curate.py --config own.yaml",
        "[download] 2 units, 0 already complete",
        "2026-12-07 11:03:01,000\tWARNING worker.py:1 -- something lvd did not expect",
        "2026-12-07 11:03:49,422\tINFO sdk.py:520 -- WebSocket closed for job raysubmit_q with close code 1000",
        "2026-12-07 11:03:49,429\tSUCC cli.py:67 -- Job 'raysubmit_q' succeeded",
    ]
    kept = [line.rstrip("\n") for line in map(quiet_job_line, (r + "\n" for r in raw)) if line is not None]
    assert kept == ["ray: job raysubmit_q submitted (ray job stop raysubmit_q ends it)",
                    "[download] 2 units, 0 already complete",
                    "ray warning: something lvd did not expect",
                    "ray: job raysubmit_q succeeded"]


def test_a_run_logged_to_a_file_prints_one_line_per_stage_and_a_summary(tmp_path):
    """Without a terminal (a Ray job's log, a redirect) there is no progress bar, whose every refresh would be a
    line of its own."""
    from tests.curation.test_newcomer import outage_site

    with outage_site(tmp_path) as site:
        site["server"].up()
        res = subprocess.run([sys.executable, "pipelines/curate.py", "--config", str(site["config"]), "--local",
                              "--stages", "download,filter"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    log = (res.stdout + res.stderr).splitlines()
    stage_lines = [line for line in log if line.startswith("[") and not line.endswith(" units done")]  # heartbeats
    assert [line.split("]")[0] for line in stage_lines] == ["[download", "[filter"], log  # (a minute apart) aside
    assert not any("%|" in line for line in log), log
    assert sum(line.startswith("ran 4 units of 2 stages") for line in log) == 1, log
