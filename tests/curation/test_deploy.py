"""docker/: the cluster image and the KubeRay manifests parse, and every file they name exists in the repository
(and in the image, which copies curation/, training/, pipelines/, schemas/ to its working directory /opt/lvd)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "docker" / "kuberay"


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]


def _repo_files(command: str) -> list[str]:
    """Repository-relative paths (pipelines/...) named in a shell command line."""
    words = shlex.split(command.replace("&&", " "))
    return [w for w in words if re.match(r"^(pipelines|curation|training|schemas)/", w)]


def test_manifests_parse_and_wire_together():
    (pvc,) = _docs("storage.yaml")
    (cluster,) = _docs("raycluster.yaml")
    (job,) = _docs("rayjob.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    assert cluster["apiVersion"] == job["apiVersion"] == "ray.io/v1"
    assert (cluster["kind"], job["kind"]) == ("RayCluster", "RayJob")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    pods = [cluster["spec"]["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in cluster["spec"]["workerGroupSpecs"]]
    for pod in pods:  # every pod mounts the shared claim at /data
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert claims[mounts["/data"]] == pvc["metadata"]["name"]
        assert "command" not in container  # KubeRay supplies its own `ray start` line
    assert any("nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
               for g in cluster["spec"]["workerGroupSpecs"])
    # the ray version in the manifest is the locked one
    lock = (REPO / "requirements.lock").read_text()
    assert f"ray=={cluster['spec']['rayVersion']}" in lock


def test_rayjob_runs_curation_then_training_on_shared_storage():
    (job,) = _docs("rayjob.yaml")
    entry = job["spec"]["entrypoint"]
    inner = shlex.split(entry)[2] if entry.startswith("bash -c") else entry
    files = _repo_files(inner)
    assert files, entry
    for f in files:
        assert (REPO / f).is_file(), f"rayjob.yaml names {f}, which is not in the repository"
    assert inner.index("pipelines/curate.py") < inner.index("pipelines/train.py")
    assert re.search(r"--ray-workers \d+", inner)
    assert "cd /opt/lvd" in inner  # the image's working directory, where the files above are copied
    # the trainer reads the curated shards the curation config writes
    cfg = yaml.safe_load((REPO / "pipelines" / "configs" / "cluster.yaml").read_text())
    data = re.search(r"--data (\S+)", inner).group(1)
    assert data == f"{cfg['run_root']}/shards"


def test_cluster_config_is_valid_once_its_data_exists(tmp_path):
    """pipelines/configs/cluster.yaml, with /data replaced by a folder holding the files it names, loads."""
    from curation.config import load_config

    text = (REPO / "pipelines" / "configs" / "cluster.yaml").read_text()
    data = tmp_path / "data"
    for path in sorted(set(re.findall(r"/data/[\w./-]+", text))):
        p = data / path[len("/data/"):]
        if p.suffix in (".pt", ".pth"):
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"")
        else:
            p.mkdir(parents=True, exist_ok=True)
    cfg = load_config(data=yaml.safe_load(text.replace("/data/", f"{data}/")))
    assert cfg.filter.detector == "nudenet" and cfg.sscd.weights is not None and cfg.embed.checkpoint is not None


def test_dockerfile_runs_commands_as_given():
    """No `lvd` entrypoint: `docker run IMAGE ray start ...` must run `ray start`; the code lands in /opt/lvd."""
    text = (REPO / "docker" / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if ln and not ln.lstrip().startswith("#")]
    entry = [ln for ln in lines if ln.startswith("ENTRYPOINT")]
    assert entry == ['ENTRYPOINT ["/usr/bin/tini", "--"]']  # passes the command through unchanged
    assert "WORKDIR /opt/lvd" in lines
    for d in ("curation", "training", "pipelines", "schemas"):
        assert f"COPY {d} {d}" in lines and (REPO / d).is_dir()
    base = re.search(r"ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.(\d+)", text)
    lock = (REPO / "requirements.lock").read_text()
    cuda = re.search(r"^nvidia-cuda-runtime==(\d+)\.(\d+)", lock, re.M)
    assert base and cuda and base.groups() == cuda.groups()  # the base image's CUDA is the locked torch's
    assert "nudenet" in text  # the detector extra
