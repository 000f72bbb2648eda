"""Kill the curate driver with SIGKILL mid-download, rerun: finished shards are not fetched again and the final
tables equal an uninterrupted run's; and kill -9 at random points of the whole pipeline (plus resumes after
lost inputs, deleted ledgers and altered outputs)."""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from curation.pipeline import accounting
from curation.config import load_config
from curation.pipeline.runner import run_pipeline
from tests.curation.conftest import base_config

REPO = Path(__file__).resolve().parents[2]


def _tables(root: Path) -> dict:
    out = {}
    for p in sorted((root / "download").glob("*.parquet")) + [root / "stats" / "drops.parquet",
                                                              root / "stats" / "funnel.parquet"]:
        out[p.relative_to(root).as_posix()] = pq.read_table(p).to_pylist()
    return out


@pytest.mark.slow
def test_sigkill_then_resume(demo_download, tmp_path):
    corpus = demo_download["corpus"]
    root = tmp_path / "run"
    cfg = base_config(corpus, root, stages=["download"])
    cfg["ray"] = {"max_in_flight": 1}  # a real (in-process) Ray driver, one shard at a time
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, str(REPO / "pipelines" / "curate.py"), "--config", str(cfg_path), "--no-progress"]
    ledgers = root / "download" / "_ledger"
    n_units = len(list(yaml.safe_load(Path(demo_download["root"], "download/_inputs/plan.json").read_text())["shards"]))

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        done = [p for p in ledgers.glob("0*.parquet")] if ledgers.exists() else []
        if len(done) >= 1 or proc.poll() is not None:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything in its process group
    proc.wait()
    # A Ray worker outside the group may finish the shard it was running before it notices the driver is gone:
    # wait until the set of finished shards is stable.
    last, stable_since = None, time.time()
    while time.time() - stable_since < 5:
        now = sorted(p.name for p in ledgers.glob("0*.parquet"))
        if now != last:
            last, stable_since = now, time.time()
        time.sleep(0.25)
    finished = sorted(p.stem for p in ledgers.glob("0*.parquet"))
    assert 1 <= len(finished) < n_units, f"kill came too late or too early: {finished} of {n_units}"
    stamps = {s: os.stat(root / "download" / f"{s}.tar").st_mtime_ns for s in finished}

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"{n_units} units, {len(finished)} already complete" in rerun.stdout
    for s, stamp in stamps.items():  # finished shards were not downloaded again
        assert os.stat(root / "download" / f"{s}.tar").st_mtime_ns == stamp
    assert _tables(root) == _tables(demo_download["root"])

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert f"{n_units} units, {n_units} already complete" in again.stdout


# -- kill -9 at random points of the whole pipeline ------------------------------------------------------------

# 18 seeded trials in the suite (and one kill in each stage that starts worker processes); LVD_KILL_TRIALS /
# LVD_KILL_SEED run more, or others
KILL_TRIALS = int(os.environ.get("LVD_KILL_TRIALS", "18"))
#: the stages whose units start processes (DataLoader decode workers); every other stage runs in the driver's own
#: process and threads (img2dataset's fetch threads, FAISS/OpenMP, ONNX Runtime)
WORKER_STAGES = ("sscd", "embed")
KILL_SEED = int(os.environ.get("LVD_KILL_SEED", "13"))


def _run_files(root: Path) -> dict:
    """Every file of a run root (temporaries must be gone), compared by what it means: Parquet as rows, tars as
    {member: bytes} (a download shard holds its samples in the order img2dataset's threads finished, and every
    file derived from it follows that order: filter tars, their member offsets, checksums), markers as their
    outputs' names and sizes (the shards plan's size follows its tar paths), config.yaml without run_root, the shards plan without tar paths and offsets; img2dataset's own timing files are left out."""
    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name.endswith("_stats.json"):
            continue
        rel = p.relative_to(root).as_posix()
        if rel.startswith("_tarindex/"):
            out[rel] = sorted((r["key"], r["ext"], r["size"]) for r in pq.read_table(p).to_pylist())
        elif rel == "shards_meta/_plan.parquet":  # where each image is: its run root's tar, at an order-dependent offset
            out[rel] = pq.read_table(p).drop_columns(["tar", "offset", "json_offset"]).to_pylist()
        elif p.suffix == ".parquet":
            out[rel] = pq.read_table(p).to_pylist()
        elif p.suffix == ".tar":
            with tarfile.open(p) as tar:
                out[rel] = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        elif rel.startswith("_markers/"):
            marker = json.loads(p.read_text())
            out[rel] = (marker["complete"], {k: None if k == "shards_meta/_plan.parquet" else v["size"]
                                             for k, v in marker["outputs"].items()})
        elif "_partitioned/" in rel and p.name == "plan.json":  # a global step's resume check: the same search,
            plan = json.loads(p.read_text())                   # its inputs' signature (paths, mtimes) left out
            out[rel] = {k: v for k, v in plan.items() if k not in ("db", "queries")}
        elif rel == "config.yaml":
            out[rel] = {k: v for k, v in yaml.safe_load(p.read_text()).items() if k != "run_root"}
        else:
            out[rel] = p.read_bytes()
    return out


def _small_pipeline_config(corpus: Path, tmp_path: Path) -> dict:
    """The demo corpus cut to 100 URLs (no slow route), shards of 25: every stage but the report, in-process."""
    urls = pq.read_table(corpus / "urls.parquet")
    urls = urls.filter(pa.array(["/slow" not in u for u in urls["url"].to_pylist()])).slice(0, 100)
    pq.write_table(urls, tmp_path / "urls.parquet")
    stages = ["download", "filter", "hash", "sscd", "dedup", "embed", "retrieve", "shards"]
    cfg = base_config(corpus, tmp_path / "unused", stages=stages,
                      sscd={"descriptor": "pixels", "num_workers": 0, "batch_size": 32},
                      embed={"model": "pixels", "num_workers": 0, "batch_size": 32},
                      shards={"samples_per_shard": 20})
    cfg["input"] = {"url_list": str(tmp_path / "urls.parquet")}
    cfg["download"] = {**cfg["download"], "shard_size": 25}
    cfg["filter"] = {**cfg["filter"], "detector": "none"}
    cfg["retrieve"] = {"anchor_sets": [
        {"name": "objects", "path": str(corpus / "anchors" / "objects"), "method": "sample", "k": 3},
        {"name": "scenes", "path": str(corpus / "anchors" / "scenes"), "method": "cluster", "clusters": 4,
         "min_anchors_per_cluster": 1, "per_cluster": 10},
    ]}
    return cfg


def _without_worker_counts(files: dict) -> dict:
    """`_run_files` with the decode worker counts left out of config.yaml (results do not depend on them)."""
    cfg = copy.deepcopy(files["config.yaml"])
    for section in ("sscd", "embed"):
        cfg[section].pop("num_workers")
    return {**files, "config.yaml": cfg}


@pytest.mark.slow
def test_kill9_at_random_points_resumes_to_identical_output(demo_server, demo_corpus, tmp_path):
    """18 seeded kill points over every atomic commit and stage boundary of download..shards (so also between a
    unit's last output and its completion marker, and between img2dataset consuming its input and the ledger):
    each killed run, rerun, ends with exactly the files of an uninterrupted run.

    And a kill -9 in each stage that starts worker processes, while its decode workers exist (held inside their
    first read, as on a stalled filesystem, so the kill cannot miss them): not one process below the killed
    driver outlives it (they die with it, Linux's parent-death signal and a watch of the parent), and the rerun
    ends with the same files."""
    spec = {"work": str(tmp_path), "seed": KILL_SEED, "trials": KILL_TRIALS, "stage_kills": list(WORKER_STAGES),
            "config": _small_pipeline_config(demo_corpus, tmp_path)}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("LVD_CRASH_AT", None)
    proc = subprocess.run([sys.executable, "-m", "tests.curation.killrun", str(tmp_path / "spec.json"),
                           str(tmp_path / "out.json")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["reference"] == "exit 0", (tmp_path / "reference.log").read_text()[-3000:]
    assert len(result["trials"]) == KILL_TRIALS
    reference = _run_files(tmp_path / "reference")
    assert any(k.startswith("shards/") and k.endswith(".tar") for k in reference)
    for t in result["trials"]:
        log = Path(t["log"]).read_text()[-3000:]
        assert t["killed"] == "killed", f"kill point {t['kill_at']}: {t['killed']}\n{log}"
        assert t["resumed"] == "exit 0", f"kill point {t['kill_at']}: resume {t['resumed']}\n{log}"
        got = _run_files(Path(t["root"]))
        assert sorted(got) == sorted(reference), f"kill point {t['kill_at']}: files differ"
        differ = [k for k in reference if got[k] != reference[k]]
        assert not differ, f"kill point {t['kill_at']}: contents differ: {differ}"
    assert [t["stage"] for t in result["stage_kills"]] == list(WORKER_STAGES)
    reference = _without_worker_counts(reference)
    for t in result["stage_kills"]:
        log = Path(t["log"]).read_text()[-3000:]
        assert t["held"], f"{t['stage']}: the run ended ({t['killed']}) before its decode workers started\n{log}"
        assert set(t["held"]) <= set(t["descendants"]) and t["killed"] == "killed", t
        assert not t["left"], f"{t['stage']}: processes {t['left']} outlived their killed driver"
        assert t["resumed"] == "exit 0", f"{t['stage']}: resume {t['resumed']}\n{log}"
        got = _without_worker_counts(_run_files(Path(t["root"])))
        assert sorted(got) == sorted(reference), f"{t['stage']}: files differ"
        differ = [k for k in reference if got[k] != reference[k]]
        assert not differ, f"killed in {t['stage']}: contents differ: {differ}"


# -- lost inputs, deleted ledgers, altered outputs ---------------------------------------------------


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "config.yaml").unlink()  # it names the original run_root
    return dst


def _rerun(cfg: dict, root: Path, capsys=None, **kw) -> str:
    cfg = {**copy.deepcopy(cfg), "run_root": str(root)}
    run_pipeline(load_config(data=cfg), progress=False, **kw)
    return capsys.readouterr().out if capsys else ""


def _ledger_rows(root: Path) -> dict:
    return {s: sorted(map(str, accounting.read_ledger(root, s).to_pylist()))
            for s in accounting.completed_ledger_stages(root)}


def test_download_inputs_outlive_their_unit(demo_download, tmp_path):
    """img2dataset deletes the shard file it is given; a kill after that delete and before the ledger, or a deleted
    ledger, used to make every rerun fail with `No such file ... _inputs/00000.arrow`."""
    src = demo_download["root"]
    plan = json.loads((src / "download" / "_inputs" / "plan.json").read_text())
    assert all((src / "download" / "_inputs" / f"{s}.arrow").exists() for s, _ in plan["shards"])
    root = _copy_run(src, tmp_path / "run")
    for unit in ("00000", "00002"):  # the state of a run killed inside these units' completion window
        accounting.ledger_path(root, "download", unit).unlink()
    _rerun(demo_download["config"], root)
    assert _tables(root) == _tables(src)


def test_lost_download_input_is_planned_again(demo_download, tmp_path):
    """A run left by the old code (input consumed, ledger missing) resumes: planning is redone, identically."""
    root = _copy_run(demo_download["root"], tmp_path / "run")
    (root / "download" / "_inputs" / "00001.arrow").unlink()
    accounting.ledger_path(root, "download", "00001").unlink()
    _rerun(demo_download["config"], root)
    assert _tables(root) == _tables(demo_download["root"])


def test_deleted_precheck_is_recomputed_not_lost(demo_download, tmp_path):
    """Deleting download/_ledger/precheck.parquet used to shrink the funnel silently (252 of 261 rows)."""
    root = _copy_run(demo_download["root"], tmp_path / "run")
    refused = accounting.read_ledger(root, "download").filter(pa.compute.invert(
        accounting.read_ledger(root, "download")["kept"])).num_rows
    accounting.ledger_path(root, "download", "precheck").unlink()
    _rerun(demo_download["config"], root)
    assert _tables(root) == _tables(demo_download["root"])
    assert refused > 0 and pq.read_table(root / "stats" / "funnel.parquet")["rows_in"][0].as_py() == \
        demo_download["truth"].num_rows


def test_truncated_plan_output_is_recomputed(demo_download, tmp_path, capsys):
    """The download's planning outputs (input shards, precheck ledger, plan) are checked like a unit's: a truncated
    precheck ledger used to stop every rerun with an Arrow error; now planning is redone."""
    root = _copy_run(demo_download["root"], tmp_path / "run")
    precheck = accounting.ledger_path(root, "download", "precheck")
    precheck.write_bytes(precheck.read_bytes()[:100])
    out = _rerun(demo_download["config"], root, capsys)
    assert "[download] plan is redone: download/_ledger/precheck.parquet has 100 bytes" in out
    assert _tables(root) == _tables(demo_download["root"])


def test_missing_download_ledger_fails_loudly(demo_download, tmp_path):
    """The accounting refuses a download ledger that does not hold one row per planned URL."""
    root = _copy_run(demo_download["root"], tmp_path / "run")
    accounting.ledger_path(root, "download", "precheck").unlink()
    with pytest.raises(accounting.AccountingError, match="ledger rows for 261 input URLs"):
        accounting.check_invariants(root)


def test_deleted_later_stage_ledgers_are_recomputed(demo_cleaned, tmp_path):
    """A deleted filter ledger part, the hash stage's groups and a dedup ledger part are redone; the run used to
    stop with `input differs from the previous stage's kept keys (60 never judged)`."""
    src = demo_cleaned["root"]
    root = _copy_run(src, tmp_path / "run")
    for stage, unit in (("filter", "00002"), ("dedup", "00001")):
        accounting.ledger_path(root, stage, unit).unlink()
    (root / "hash" / "groups.parquet").unlink()
    _rerun(demo_cleaned["config"], root)
    assert _ledger_rows(root) == _ledger_rows(src)
    assert pq.read_table(root / "hash" / "groups.parquet") == pq.read_table(src / "hash" / "groups.parquet")
    assert pq.read_table(root / "stats" / "funnel.parquet") == pq.read_table(src / "stats" / "funnel.parquet")


def test_altered_outputs_are_detected_and_redone(demo_download, tmp_path, capsys):
    """A truncated shard is noticed by its size on every resume, a same-size alteration by its sha256 with
    verify=True (`--verify`); both units are redone and the shards hold the same samples again."""
    src = demo_download["root"]
    root = _copy_run(src, tmp_path / "run")
    cfg = demo_download["config"]
    members = lambda p: sorted((m.name, m.size) for m in tarfile.open(p))  # noqa: E731
    truncated, altered = root / "download" / "00000.tar", root / "download" / "00001.tar"
    truncated.write_bytes(truncated.read_bytes()[:5000])
    data = bytearray(altered.read_bytes())
    data[2000] ^= 0xFF  # inside the first image: same size, other content
    altered.write_bytes(bytes(data))

    out = _rerun(cfg, root, capsys)
    assert "unit 00000 is redone: download/00000.tar has 5000 bytes" in out
    assert "00001" not in out  # the size matches: only --verify reads the content
    assert members(truncated) == members(src / "download" / "00000.tar")

    out = _rerun(cfg, root, capsys, verify=True)
    assert "unit 00001 is redone: download/00001.tar changed since it was written (sha256)" in out
    assert members(altered) == members(src / "download" / "00001.tar")
    assert _tables(root) == _tables(src)
    assert "redone" not in _rerun(cfg, root, capsys, verify=True)


def test_ctrl_c_says_rerun_to_resume(tmp_path):
    """SIGINT while a download is in flight, in-process: see :func:`check_ctrl_c_stops_and_resumes`."""
    check_ctrl_c_stops_and_resumes(tmp_path, {"ray": {"local": True}})


@pytest.mark.slow
def test_ctrl_c_on_a_ray_cluster_stops_and_resumes(tmp_path):
    """SIGINT to a driver whose download runs in an actor of a running Ray head: the actor is killed with the
    driver's interrupt (the held connection is let go, the unit stays unfinished) and the rerun on the same head
    finishes it.  The driver is given only the head's address, as a user would: Ray on Linux rewrites 127.0.0.1 to
    the machine's own address, where a head bound to loopback does not listen, and the runner must see that and
    join it as a loopback head (else ray.init retries for minutes and the download never starts)."""
    from curation.cluster.local_cluster import LOOPBACK_ENV, LocalRayHead, _proc_table, processes_of_cluster, ray_env

    def stage_actors(marks: list[str]) -> list[int]:
        table = _proc_table()
        return [p for p in processes_of_cluster(marks) if "StageWorker" in table.get(p, (0, ""))[1]]

    with LocalRayHead(num_cpus=1) as head:
        env = ray_env({"RAY_ADDRESS": head.address})
        for name in LOOPBACK_ENV:
            env.pop(name, None)
        check_ctrl_c_stops_and_resumes(tmp_path, {"ray": {"max_in_flight": 1}}, env)
        marks = [head.temp_dir, f":{head.gcs_port} "]
        deadline = time.time() + 120  # a guard against a hang: the runs' actors are killed as their drivers end
        while time.time() < deadline and stage_actors(marks):
            time.sleep(0.5)
        left = stage_actors(marks)
        assert not left, f"stage actors {left} outlived their drivers"


def check_ctrl_c_stops_and_resumes(tmp_path, run_cfg: dict, env: dict | None = None) -> None:
    """SIGINT while a download is in flight: one line "interrupted; rerun to resume", exit 130, no traceback; the
    interrupted unit is left unfinished (no marker, no ledger row: never a drop), and the rerun then finishes it.
    `run_cfg` says where the units run (in-process, or on a Ray cluster's workers).

    No timing: the interrupt is sent once the server holds the request (the fetch is provably in flight), and the
    server holds it until the fetching process lets go of the connection (abandoned by the interrupt, or the
    process is gone: a Ray worker ended with the driver), so the unit can only end unfinished, or, if the fetch
    lived on, as a drop when its read times out: the files are checked only once the fetcher has let go.
    The run starts with SIGINT ignored, as a process started from a background shell job is (a test suite run with
    `make test &`): a Ctrl-C or `kill -INT` must still stop it."""
    import http.server
    import select
    import socket
    import threading

    asked, released = threading.Event(), threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path == "/hold" and not released.is_set():
                asked.set()
                # until the client closes its end (a hang guard bounds it: never the expected path)
                readable, _, _ = select.select([self.connection], [], [], 300)
                if readable and not self.connection.recv(1, socket.MSG_PEEK):
                    released.set()
                self.close_connection = True
                return
            self.send_response(404)
            self.end_headers()

        def log_message(self, *_):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        urls = tmp_path / "urls.csv"
        urls.write_text(f"url\nhttp://127.0.0.1:{port}/hold\n")
        cfg = {"run_root": str(tmp_path / "run"), "input": {"url_list": str(urls)}, "stages": ["download"],
               "download": {"allow_networks": ["127.0.0.1/32"], "timeout_s": 120}, **run_cfg}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        cmd = [sys.executable, str(REPO / "pipelines" / "curate.py"), "--config", str(tmp_path / "c.yaml"),
               "--no-progress"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        assert asked.wait(300), "the download never reached the server"
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=240)  # hang guard: the held fetch must be abandoned
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        assert proc.returncode == 130, err[-2000:]
        assert err.strip().splitlines()[-1] == "interrupted; rerun to resume" and "Traceback" not in err, err
        assert released.wait(300), "the interrupted fetch lived on after its run exited"
        run = tmp_path / "run"
        assert not list((run / "_markers" / "download").glob("0*.json")), "the interrupted unit was marked done"
        assert not list((run / "download" / "_ledger").glob("0*.parquet")), "the interrupted fetch became a drop"
        rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert "download           1         0         1  http_error 1" in rerun.stdout
    finally:
        released.set()
        server.shutdown()
