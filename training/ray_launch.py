"""``--ray-workers N``: run ``train()`` on N Ray Train workers (``ray.train.torch.TorchTrainer``).

Ray Train creates the process group (gloo on CPU workers, NCCL when the workers get GPUs) and sets RANK,
WORLD_SIZE and LOCAL_RANK; ``train()`` joins that group. GPUs are requested when the cluster has at least one
(and ``device`` is not ``cpu``). Ray Train's own storage (run state, no model checkpoints: the trainer writes its
checkpoints itself) is ``OUTPUT/ray_train``; all workers write into OUTPUT, which must therefore be on a
filesystem every worker sees (true on one machine).

Usable as a Ray job: ``ray job submit --working-dir . -- python pipelines/train.py --ray-workers 2 ...``
(the job's working directory is on the workers' import path); a plain ``python pipelines/train.py --ray-workers 2``
starts a local Ray instance, or joins ``--ray-address``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from curation.cluster.local_cluster import prepare_to_join

from .config import TrainConfig
from .train import train

log = logging.getLogger("lvd.train")
__all__ = ["run_ray_train"]

_REPO = Path(__file__).resolve().parents[1]


def _worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point: one rank of ``train()``."""
    import ray.train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ctx = ray.train.get_context()
    os.environ["LOCAL_RANK"] = str(ctx.get_local_rank())
    cfg = TrainConfig.model_validate(config["cfg"])
    summary = train(cfg, config["data"], config["output"])
    last = summary.get("last") or {}
    ray.train.report({"iterations": summary["iterations"], "loss": last.get("loss"),
                      "world_size": summary["world_size"], "strategy": summary["strategy"]})


def run_ray_train(cfg: TrainConfig, data: str, output: str, num_workers: int,
                  address: str | None = None) -> dict[str, Any]:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = Path(output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        in_job = "RAY_ADDRESS" in os.environ  # set by `ray job submit` (whose working dir the workers import from)
        runtime_env = None if in_job or address else {"env_vars": {"PYTHONPATH": str(_REPO)}}
        note = prepare_to_join(address or os.environ.get("RAY_ADDRESS"))
        if note:
            log.info("%s", note)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    use_gpu = cfg.device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1
    if not use_gpu and cfg.device == "cuda":
        raise RuntimeError("device=cuda but the Ray cluster has no GPU")
    data_arg = str(Path(data).resolve()) if os.path.exists(data) else data
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "data": data_arg, "output": str(out)},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(name="ray_train", storage_path=str(out)),
    )
    log.info("Ray Train: %d worker(s), use_gpu=%s, output %s", num_workers, use_gpu, out)
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    return {"iterations": metrics.get("iterations"), "last": {"loss": metrics.get("loss")}, "eval": None,
            "output_dir": str(out), "world_size": metrics.get("world_size"), "strategy": metrics.get("strategy")}
