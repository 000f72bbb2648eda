"""Multi-process training on CPU (gloo): 2 ranks against 1 process, DCP checkpoints across world sizes, launchers.

Ranks are started with ``torch.multiprocessing.spawn`` (the process group is created here and ``train()`` /
``Trainer`` join it, as under Ray Train), with ``torchrun`` (the CLI creates the group from the environment) and
as a Ray job (``--ray-workers 2``).
"""
import copy
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lvd_train_testutils import (REPO, TINY_CFG, read_metrics, shards_and_config, subprocess_env, tiny_tol, write_shards,
                                 write_yaml)

from tests.tolerance import approx, assert_close, rounding_tol
from training.checkpoint import export_backbone, find_latest_checkpoint, load_checkpoint
from training.config import load_config
from training.distributed import DistInfo, init_distributed, shard_batch
from training.train import Trainer, train

WORLD = 2
B = 4  # images per rank; the single process gets WORLD * B
N_STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_group(rank: int, world: int, port: int) -> DistInfo:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    return init_distributed()


def _spawn(fn, *args):
    mp.spawn(fn, args=(WORLD, _free_port(), *args), nprocs=WORLD, join=True)


# ---------------------------------------------------------------------- 2 ranks == 1 process
def _equality_cfg(**changes):
    raw = copy.deepcopy(TINY_CFG)
    # per-rank by design, so off for the comparison: KoLeo (within each rank's batch, as the reference) and
    # drop-path (per-rank RNG)
    raw["model"]["drop_path_rate"] = 0.0
    raw["loss"] = {"koleo_weight": 0.0}
    raw["teacher"].update({"momentum_teacher": 0.9})  # a visible EMA in 4 steps
    raw["optim"].update({"epochs": 1, "iters_per_epoch": N_STEPS, "base_lr": 0.01, "clip_grad": 0.05,
                         "freeze_last_layer_epochs": 0.5})  # clipping active, prototypes frozen for 2 steps
    raw.update({"device": "cpu", "precision": "fp32"})
    for key, value in changes.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    return raw


CASES = {
    "fsdp_centering": _equality_cfg(distributed__strategy="fsdp"),
    "fsdp_sinkhorn_separate_ibot_head": _equality_cfg(
        distributed__strategy="fsdp", loss__centering="sinkhorn_knopp", head__ibot_separate_head=True,
        head__ibot_n_prototypes=96, head__ibot_hidden_dim=64, head__ibot_bottleneck_dim=32),
    "ddp_allreduce_centering": _equality_cfg(distributed__strategy="ddp_allreduce"),
    # the paper's mixed precision: backbone all-gathered, computed and reduce-scattered in bf16, heads in fp32
    "fsdp_bf16_backbone": _equality_cfg(
        distributed__strategy="fsdp",
        distributed__mixed_precision={"backbone": {"param_dtype": "bf16", "reduce_dtype": "bf16"}}),
}


def _global_batches(g: int = WORLD * B, n_tokens: int = 4):
    """Deterministic collated global batches (crop-major rows). Step 1 masks only the first half of the images
    (rank 1 has no masked patch: iBOT, its centre and Sinkhorn-Knopp must still match); step 3 masks none."""
    gen = torch.Generator().manual_seed(123)
    for step in range(N_STEPS):
        masks = torch.rand(2 * g, n_tokens, generator=gen) < 0.4
        masks[0, 0] = masks[g + 1, 3] = True
        if step == 1:
            masks[:] = False
            masks[[0, 1, g, g + 2], [1, 2, 0, 3]] = True
        if step == 3:
            masks[:] = False
        batch = {"global_crops": torch.randn(2 * g, 3, 28, 28, generator=gen),
                 "local_crops": torch.randn(2 * g, 3, 14, 14, generator=gen), "masks": masks, "batch_size": g}
        yield shard_batch(batch, 0, 1)  # mask indices / weights / counts of the whole batch


def _run_steps(raw: dict, info: DistInfo) -> dict:
    raw = copy.deepcopy(raw)
    raw["optim"]["batch_size_per_gpu"] = B * WORLD // info.world
    trainer = Trainer(load_config(raw=raw), info)
    dtypes = {}  # dtypes seen inside the forward (parameters unsharded by FSDP2)

    def record(name):
        def hook(module, args, output):
            dtypes[name] = (module.weight.dtype, args[0].dtype, output.dtype)
        return hook

    trainer.student["backbone"].blocks[0].mlp.fc1.register_forward_hook(record("block"))
    trainer.student["dino_head"].last_layer.register_forward_hook(record("head"))
    rows = []
    for it, gb in enumerate(_global_batches()):
        batch = shard_batch(gb, info.rank, info.world) if info.world > 1 else gb
        rows.append(trainer.train_step(batch, it))
    cls_token = trainer.student["backbone"].cls_token
    return {"rows": rows, "dtypes": dtypes, "grad_dtype": cls_token.grad.dtype, "param_dtype": cls_token.dtype, "teacher": trainer.full_state_dict("teacher"), "student": trainer.full_state_dict("student"),
            "dino_center": trainer.dino_loss.center.clone(), "ibot_center": trainer.ibot_loss.center.clone(),
            "sharded": type(cls_token).__name__ == "DTensor", "strategy": trainer.strategy}


def _equality_rank(rank, world, port, out):
    info = _join_group(rank, world, port)
    results = {name: _run_steps(raw, info) for name, raw in CASES.items()}
    if rank == 0:
        torch.save(results, out)
    dist.barrier()  # neither rank tears the group down while the other may still have collective work in flight
    dist.destroy_process_group()


# Tolerances (tests/tolerance.py): fp32 runs differ by the rounding of the tiny model's reductions (tiny_tol in
# lvd_train_testutils: 4 x 48 terms, 8 chained reductions per step); a sum split over 2 ranks is one of them.
# bf16 backbone (parameters and activations; fp32 accumulation inside each matmul, as CPU and GPU bf16 kernels
# do): every stage rounds its two operands and its output to bf16, a relative error of 3 u = 1.5 eps(bf16) per
# stage that does not grow with the reduction length. The forward has 2 blocks x (norm, qkv, attention, proj, norm,
# fc1, fc2) + patch embedding + final norm = 16 such stages, the backward as many again.
BF16_STAGES = 2 * 7 + 2
BF16_LOSS = {"n_terms": 1, "dtype": torch.bfloat16, "depth": 3 * BF16_STAGES // 2}
BF16_GRAD = {"n_terms": 1, "dtype": torch.bfloat16, "depth": 3 * 2 * BF16_STAGES // 2}
# After an optimizer step, bf16 and fp32 weights are not elementwise comparable: Adam's first steps are ~lr x
# sign(g), and a gradient that is small next to its bf16 rounding can flip sign. What holds is Adam's step bound,
# |step| <= lr (1 - beta1) / sqrt(1 - beta2) per iteration, so two runs differ by at most twice its sum.
ADAM_STEP_BOUND = (1 - 0.9) / (1 - 0.999) ** 0.5


def _compare_rows(name: str, ref_rows: list[dict], rows: list[dict]) -> None:
    for step, (r, g) in enumerate(zip(ref_rows, rows)):
        assert ("ibot_loss" in r) == ("ibot_loss" in g) == (step != 3), (name, step)
        if "bf16" in name and step > 0:  # trajectories part (see ADAM_STEP_BOUND); the weights are bounded below
            assert all(math.isfinite(g[k]) for k in r if k.endswith("loss")), (name, step)
            continue
        for k, v in r.items():
            if k.endswith("_loss") or k == "loss" or k.startswith("teacher_") and k.endswith("entropy"):
                tol = BF16_LOSS if "bf16" in name else tiny_tol(step + 1)
            elif k.startswith("grad_norm_"):
                tol = BF16_GRAD if "bf16" in name else tiny_tol(step + 1)
            else:
                continue
            assert g[k] == approx(v, **tol), (name, step, k)


def test_two_ranks_match_one_process_on_the_same_global_batch(tmp_path):
    out = tmp_path / "ranks.pt"
    _spawn(_equality_rank, str(out))
    got = torch.load(out, weights_only=False)
    refs = {}
    for name, raw in CASES.items():
        # the same single-process fp32 run for every strategy and precision (both are no-ops on 1 process)
        key = (raw["loss"].get("centering"), raw["head"].get("ibot_separate_head"))
        if key not in refs:
            refs[key] = _run_steps(raw, DistInfo())
        ref, res = refs[key], got[name]
        assert res["strategy"] == name.split("_")[0].replace("ddp", "ddp_allreduce")
        assert res["sharded"] == name.startswith("fsdp")
        bf16 = "bf16" in name
        # inside the forward: block parameters and activations in bf16 under the policy, heads (and the
        # backbone's output they receive) always fp32; the shards the optimizer updates and their gradients fp32
        assert res["dtypes"]["block"] == ((torch.bfloat16,) * 3 if bf16 else (torch.float32,) * 3), name
        assert res["dtypes"]["head"] == (torch.float32,) * 3, name
        assert res["param_dtype"] == res["grad_dtype"] == torch.float32
        _compare_rows(name, ref["rows"], res["rows"])
        if bf16:  # the policy changed the arithmetic (the comparison is not fp32 against itself)
            assert ref["rows"][0]["loss"] != res["rows"][0]["loss"]
            adam_bound = 2 * ADAM_STEP_BOUND * sum(r["lr"] for r in ref["rows"])
        for which in ("teacher", "student"):
            assert ref[which].keys() == res[which].keys()
            for k, v in ref[which].items():
                if bf16:
                    assert (res[which][k] - v).abs().max() <= adam_bound, (name, which, k)
                else:
                    assert_close(res[which][k], v, **tiny_tol(N_STEPS), msg=f"{name} {which} {k}")
        if not bf16:
            for c in ("dino_center", "ibot_center"):
                assert_close(res[c], ref[c], **tiny_tol(N_STEPS), msg=f"{name} {c}")
        # training moved the weights far beyond the fp32 tolerance (the comparison is not vacuous)
        moved = ref["teacher"]["backbone.pos_embed"] - ref["student"]["backbone.pos_embed"]
        assert moved.abs().max() > 10 * rounding_tol(ref["teacher"]["backbone.pos_embed"].abs().max(),
                                                     **tiny_tol(N_STEPS))


# ---------------------------------------------------------------------- checkpoints across world sizes
def _resume_cfg():
    raw = copy.deepcopy(TINY_CFG)  # drop-path on: per-rank RNG states are checkpointed
    raw.update({"deterministic": True, "device": "cpu"})
    return raw


def _train_rank(rank, world, port, data, out):
    info = _join_group(rank, world, port)
    cfg = load_config(raw=_resume_cfg())
    train(cfg.model_copy(update={"max_steps": 2}), data, out)  # writes checkpoint_00000002/ (DCP)
    train(cfg.model_copy(update={"max_steps": 4}), data, out)  # resumes it on 2 ranks
    assert info.world == WORLD and dist.is_initialized()  # train() left the caller's group alone
    dist.destroy_process_group()


def _losses(out):
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl")]


@pytest.mark.slow
def test_dcp_checkpoints_resume_on_two_ranks_and_on_one(tmp_path):
    data, cfg_path = shards_and_config(tmp_path, _resume_cfg())

    # uninterrupted 2-rank run with torchrun (process group from the environment), exported by rank 0
    ref = tmp_path / "ref"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(REPO / "pipelines" / "train.py"), "--config", str(cfg_path), "--data", str(data),
                        "--output", str(ref), "--max-steps", "4", "--export", str(tmp_path / "ref.pth")],
                       capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count('"iterations": 4') == 1  # one summary line (rank 0)
    assert (tmp_path / "ref.pth").exists()

    # stopped at 2 and resumed on 2 ranks: the same losses step for step (per-rank RNG and data position restored)
    out = tmp_path / "out"
    _spawn(_train_rank, str(data), str(out))
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1, 2, 3]
    for got, want in zip(_losses(out), _losses(ref)):
        assert got == approx(want, **tiny_tol(4))
    ck_dir = out / "checkpoints"
    assert sorted(p.name for p in ck_dir.iterdir()) == ["checkpoint_00000002", "checkpoint_00000004"]
    latest = find_latest_checkpoint(out)
    assert latest == ck_dir / "checkpoint_00000004" and (latest / "rng_rank1.pt").exists()

    # read without a process group: full tensors, exportable, identical to the torchrun run's checkpoint
    ck = load_checkpoint(latest)
    assert ck["iteration"] == 4 and ck["data_position"]["world_size"] == 2 and ck["world_size"] == 2
    ck_ref = load_checkpoint(find_latest_checkpoint(ref))
    for k, v in ck["teacher"].items():
        assert_close(v, ck_ref["teacher"][k], **tiny_tol(4), msg=k)
    exported = export_backbone(out, tmp_path / "b.pth")
    sd = torch.load(exported, weights_only=True)
    assert torch.equal(sd["pos_embed"], ck["teacher"]["backbone.pos_embed"])  # a copy

    # the 2-rank checkpoint loads exactly into one process (DCP reshards), optimizer state included
    trainer = Trainer(load_config(raw=_resume_cfg()))
    meta = trainer.load(latest)
    assert meta["iteration"] == 4
    for k, v in trainer.teacher.state_dict().items():
        assert torch.equal(v, ck["teacher"][k]), k
    assert torch.equal(trainer.dino_loss.center, ck["dino_center"])
    name = "backbone.blocks.1.mlp.fc1.weight"
    param = dict(trainer.student.named_parameters())[name]
    assert torch.equal(trainer.optimizer.state[param]["exp_avg"], ck["optimizer"]["state"][name]["exp_avg"])

    # ... and training continues there on 1 rank
    summary = train(load_config(raw=_resume_cfg()).model_copy(update={"max_steps": 6}), str(data), out)
    assert summary["iterations"] == 6 and summary["world_size"] == 1
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert sorted(p.name for p in ck_dir.iterdir()) == ["checkpoint_00000004", "checkpoint_00000006.pt"]
    assert load_checkpoint(ck_dir / "checkpoint_00000006.pt")["iteration"] == 6


# ---------------------------------------------------------------------- exact resume on another world size
def _keys_cfg(batch_per_rank: int):
    raw = copy.deepcopy(TINY_CFG)
    raw["optim"]["batch_size_per_gpu"] = batch_per_rank
    raw["data"].update({"log_sample_keys": True, "shuffle_buffer": 7})  # windows across shard boundaries
    raw.update({"device": "cpu"})
    return raw


def _keys_rank(rank, world, port, data, ref, out):
    _join_group(rank, world, port)
    cfg = load_config(raw=_keys_cfg(B))
    train(cfg.model_copy(update={"max_steps": 4}), data, ref)  # uninterrupted, 2 ranks
    train(cfg.model_copy(update={"max_steps": 2}), data, out)  # stopped after the checkpoint at step 2
    dist.destroy_process_group()


def _step_keys(out):
    return [r["sample_keys"] for r in read_metrics(out / "metrics.jsonl")]


def test_resume_on_one_process_continues_the_two_rank_sample_order(tmp_path):
    """2 ranks x B images stop at step 2; 1 process with 2 B images resumes: steps 2 and 3 consume exactly the
    samples of the uninterrupted 2-rank run (the global order is a function of the global step alone)."""
    data = tmp_path / "shards"
    write_shards(data, n_shards=3, per_shard=5)  # 15 samples: 4 steps x 8 wrap into a second data epoch
    ref, out = tmp_path / "ref", tmp_path / "out"
    _spawn(_keys_rank, str(data), str(ref), str(out))
    want = _step_keys(ref)
    assert len(want) == 4 and all(len(k) == WORLD * B for k in want)
    assert len({k for step in want[:2] for k in step}) == 2 * WORLD * B - 1  # 15 distinct, then a new pass
    assert _step_keys(out) == want[:2]
    summary = train(load_config(raw=_keys_cfg(WORLD * B)).model_copy(update={"max_steps": 4}), str(data), out)
    assert summary["world_size"] == 1 and summary["iterations"] == 4
    assert _step_keys(out) == want


# ---------------------------------------------------------------------- Ray Train as a Ray job
@pytest.mark.slow
def test_ray_train_two_workers_via_ray_job_submit(tmp_path):
    from curation.cluster.local_cluster import LocalRayHead

    data = tmp_path / "shards"
    write_shards(data, n_shards=2, per_shard=8)
    cfg_path = write_yaml(tmp_path / "cfg.yaml", {**TINY_CFG, "device": "cpu"})
    out = tmp_path / "out"
    with LocalRayHead(num_cpus=2) as head:
        rc, log = head.submit(["python", "pipelines/train.py", "--config", str(cfg_path), "--data", str(data),
                               "--output", str(out), "--max-steps", "2", "--ray-workers", "2"],
                              working_dir=str(REPO), timeout=300)
    assert rc == 0, log[-4000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    latest = find_latest_checkpoint(out)
    assert latest is not None and latest.name == "checkpoint_00000002" and latest.is_dir()
    ck = load_checkpoint(latest)
    assert ck["world_size"] == 2 and ck["strategy"] == "fsdp"


# ---------------------------------------------------------------------- a further role on shards
def _gram_cfg():
    raw = _resume_cfg()
    raw["gram"] = {"enabled": True, "start_iter": 2, "weight": 1.0}  # one snapshot, at the start of iteration 2
    raw["checkpoint"] = {"period_iters": 2, "keep_last": 5}
    return raw


def _gram_rank(rank, world, port, data, ref, out):
    _join_group(rank, world, port)
    cfg = load_config(raw=_gram_cfg())
    train(cfg.model_copy(update={"max_steps": 4}), data, ref)
    train(cfg.model_copy(update={"max_steps": 2}), data, out)
    train(cfg.model_copy(update={"max_steps": 4}), data, out)  # resumes the DCP checkpoint at 2
    dist.destroy_process_group()


@pytest.mark.slow
def test_gram_teacher_is_sharded_saved_and_resumed_in_dcp_checkpoints(tmp_path):
    """The Gram teacher as one more role under FSDP2: its snapshot is a copy of the EMA teacher's local shards,
    saved in the DCP checkpoints, and a 2-rank run resumed before the snapshot ends bit-equal to the uninterrupted one."""
    data, _ = shards_and_config(tmp_path, _gram_cfg())
    ref, out = tmp_path / "ref", tmp_path / "out"
    _spawn(_gram_rank, str(data), str(ref), str(out))
    ck2 = load_checkpoint(ref / "checkpoints" / "checkpoint_00000002")
    ck4 = load_checkpoint(ref / "checkpoints" / "checkpoint_00000004")
    assert "gram_teacher" in ck4["roles"]
    for k, v in ck4["gram_teacher"].items():  # the snapshot at 2 = the teacher after 2 iterations
        assert torch.equal(v, ck2["teacher"][k]), k
    end = load_checkpoint(out / "checkpoints" / "checkpoint_00000004")
    for role in ("student", "teacher", "gram_teacher"):
        for k, v in ck4[role].items():
            assert torch.equal(end[role][k], v), (role, k)
    rows = read_metrics(ref / "metrics.jsonl")
    assert "gram_loss" not in rows[1] and rows[2]["gram_loss"] > 0
    assert [r["loss"] for r in read_metrics(out / "metrics.jsonl")] == [r["loss"] for r in rows]
