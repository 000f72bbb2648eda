"""``lvd train`` / ``pipelines/train.py``: the trainer's command line.

Parses the arguments and loads the config (a bad key or value fails with one line naming its path), checks what
would otherwise fail late (the eval folders; the data too when the run goes to Ray workers), then trains in this
process (``training.train.train``; under torchrun, one rank per process) or on Ray Train workers
(``training.ray_launch.run_ray_train``), and with ``--export`` writes the teacher backbone. Exit status: 0 done,
2 bad arguments, config or data, 3 the run diverged (non-finite loss, exploding norms).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .checkpoint import export_backbone
from .config import ConfigError, load_config
from .divergence import DivergenceError
from .evaluate import check_eval_folders
from .ray_launch import run_ray_train
from .shard_check import DataError, check_sources
from .train import NonFiniteLossError, train

__all__ = ["main", "build_parser"]


def build_parser(prog: str = "lvd train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="DINOv2 pretraining (EMA teacher, DINO + iBOT + KoLeo losses) on WebDataset shards or an image "
                    "folder. Resumes automatically from the newest checkpoint in --output.",
        epilog="Overrides are dotted YAML keys, e.g. optim.base_lr=0.002 crops.local_crops_number=6 "
               "model.arch=vit_small_patch14. Several processes: torchrun --nproc-per-node N pipelines/train.py ..., or "
               "Ray Train with --ray-workers N (also as a Ray job: ray job submit --working-dir . -- python "
               "pipelines/train.py --ray-workers N ...).")
    p.add_argument("--config", required=True, help="YAML config (see pipelines/configs/train_*.yaml)")
    p.add_argument("--data", required=True, help="shard dir, glob / brace pattern of .tar shards, or image folder")
    p.add_argument("--output", default="runs/train", help="output dir: checkpoints/, metrics.jsonl, config.yaml")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after N iterations of the config's schedules, which are NOT shortened: lr, wd, "
                   "teacher momentum and temperature are where the full run has them at step N (lr still high); "
                   "rerun without it to continue the same run. To train a shorter run, use --total-steps")
    p.add_argument("--total-steps", type=int, default=None,
                   help="train N iterations in total with every schedule fitted to them: optim.epochs, "
                   "optim.warmup_epochs, optim.freeze_last_layer_epochs, teacher.warmup_teacher_temp_epochs and "
                   "high_res.iterations scaled by N / (epochs x iters_per_epoch), so lr, wd, teacher momentum and "
                   "temperature reach their final values at step N")
    p.add_argument("--eval-train-dir", default=None, help="labelled folder (class subfolders) for k-NN / linear probe")
    p.add_argument("--eval-val-dir", default=None, help="labelled validation folder (default: split of train dir)")
    p.add_argument("--export", default=None, help="after training, export the teacher backbone to this .pth")
    p.add_argument("--ray-workers", type=int, default=0,
                   help="train on N Ray Train workers (TorchTrainer; GPUs when the cluster has them, else CPU)")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join with --ray-workers (default: the "
                   "job's cluster under `ray job submit`, else a local Ray instance)")
    p.add_argument("overrides", nargs="*", help="key.path=value config overrides")
    return p


def fitted_schedule(cfg, steps: int) -> list[str]:
    """Overrides that make a run of `steps` iterations the whole schedule of `cfg`: every length given in epochs
    (and the high-resolution phase, the schedules' final part) scaled by steps / total iterations, so each
    schedule keeps its shape (warmup share, frozen last layer share) and ends at its final value at `steps`."""
    f = steps / cfg.total_iters
    o, t = cfg.optim, cfg.teacher
    out = [f"optim.epochs={o.epochs * f!r}", f"optim.warmup_epochs={o.warmup_epochs * f!r}",
           f"optim.freeze_last_layer_epochs={o.freeze_last_layer_epochs * f!r}",
           f"teacher.warmup_teacher_temp_epochs={t.warmup_teacher_temp_epochs * f!r}"]
    if cfg.high_res.iterations:
        out.append(f"high_res.iterations={min(max(1, round(cfg.high_res.iterations * f)), steps - 1)}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"max_steps={args.max_steps}")
    if args.eval_train_dir:
        overrides.append(f"eval.train_dir={args.eval_train_dir}")
    if args.eval_val_dir:
        overrides.append(f"eval.val_dir={args.eval_val_dir}")
    try:
        cfg = load_config(args.config, overrides)
        if args.total_steps is not None:
            if args.total_steps < 1:
                raise ConfigError(f"config error: --total-steps: must be at least 1 (got {args.total_steps})")
            if args.total_steps != cfg.total_iters:
                cfg = load_config(args.config, overrides + fitted_schedule(cfg, args.total_steps))
    except (ConfigError, FileNotFoundError) as e:
        print(str(e), file=sys.stderr)
        return 2
    try:  # what would fail late (after training, or inside Ray workers) fails now, with one line
        if cfg.eval.train_dir:
            check_eval_folders(cfg.eval.train_dir, cfg.eval.val_dir)
        if args.ray_workers > 0:
            check_sources(args.data)
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if args.ray_workers > 0:
            summary = run_ray_train(cfg, args.data, args.output, args.ray_workers, args.ray_address)
        else:
            summary = train(cfg, args.data, args.output)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, DivergenceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (ConfigError, FileNotFoundError) as e:  # found while setting up (distill teacher, high_res phase)
        print(str(e) if isinstance(e, ConfigError) else f"error: {e}", file=sys.stderr)
        return 2
    if summary.get("rank", 0) != 0:
        return 0  # torchrun: rank 0 exports and prints the summary
    if args.export:
        path = export_backbone(args.output, args.export)
        summary["export"] = str(path)
        for name in cfg.distill.students:  # every further student's EMA beside it: OUT_<name>.pth (+ .json)
            out = Path(args.export)
            path = export_backbone(args.output, out.with_name(f"{out.stem}_{name}{out.suffix}"), f"teacher_{name}")
            summary[f"export_{name}"] = str(path)
    print(json.dumps({k: v for k, v in summary.items() if k != "last"} | {"loss": summary["last"].get("loss")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
