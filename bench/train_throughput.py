"""DINOv2 training-step throughput and MFU: an optimised step against a naive one, in the same process.

    python bench/train_throughput.py                                  # GPU: ViT-S/14, B/14, L/14, batch 64
    python bench/train_throughput.py --arch vit_large_patch14 --batch 64 --compile --out vitl.json
    python bench/train_throughput.py --device cpu --arch vit_tiny_patch14 --batch 2 --steps 2   # CPU smoke run

One step is ``training.train.Trainer.train_step`` (the trainer's own code): teacher forward on the 2 global
crops (backbone, DINO head on CLS, iBOT head on the masked patches), student forward on 2 global + 8 local crops
through backbone, DINO and iBOT heads, DINO + iBOT + KoLeo losses, backward, per-module gradient clipping,
AdamW step, EMA update. The batch (random pixels, iBOT masks from the trainer's collate) is built once and put on
the device beforehand, so data loading is not measured. Two configurations run one after the other:

* *optimised*: bf16 autocast (CUDA), packed multi-crop attention (``model.packed_attention``), fused AdamW,
  optionally ``torch.compile`` of every transformer block (``--compile``);
* *naive*: eager fp32, crop groups one after the other, the trainer's default AdamW.

Reported per configuration: step time, images/s (an image = its 2 global + 8 local crops), peak memory
(``torch.cuda.max_memory_allocated``), model TFLOP/s and MFU = model FLOP/s / the device's peak dense bf16
FLOP/s (table below, or ``--peak-tflops``; none on CPU unless given). Model FLOPs are counted analytically by
:func:`train_step_flops` (linear layers, attention matmuls, patch embedding, heads; backward = 2x forward; the
blocks' branches only on the images that stochastic depth keeps, as the efficient drop-path computes them, so
FLOPs that are never executed do not count; norms, activations, losses and the optimizer are left out; the JSON
also gives the count without drop path). Prints a table; ``--out`` writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.models.layers import swiglu_hidden  # noqa: E402
from training.models.vision_transformer import ARCHS  # noqa: E402

# peak dense bf16 tensor-core FLOP/s by device-name substring (first match wins)
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("A100", 312e12),
]


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS if k in name), None)


# ---------------------------------------------------------------------- analytic FLOPs
def block_forward_flops(n_tokens: int, dim: int, ffn_weights: int) -> int:
    """One transformer block, one image: qkv + proj (4 D^2) and FFN weights per token, 2 FLOPs per
    multiply-add, plus QK^T and AV (2 * 2 * N^2 * D)."""
    return 2 * n_tokens * (4 * dim * dim + ffn_weights) + 4 * n_tokens * n_tokens * dim


def ffn_weights(dim: int, mlp_ratio: float = 4.0, ffn_layer: str = "mlp") -> int:
    """Weights of one FFN (= multiply-adds per token): 2 r D^2 for the MLP, 3 D H for SwiGLU."""
    if ffn_layer == "mlp":
        return 2 * dim * int(dim * mlp_ratio)
    return 3 * dim * swiglu_hidden(dim, mlp_ratio)


def backbone_forward_flops(n_images: int, img_size: int, dim: int, depth: int, mlp_ratio: float = 4.0,
                           ffn_layer: str = "mlp", patch_size: int = 14, num_register_tokens: int = 0,
                           drop_path_rate: float = 0.0) -> int:
    """Forward FLOPs of the backbone on ``n_images`` square crops. With ``drop_path_rate`` > 0 the blocks count
    only the ``max(int(B * (1 - p)), 1)`` images whose branches are computed (efficient stochastic depth)."""
    grid = img_size // patch_size
    n = 1 + num_register_tokens + grid * grid
    kept = max(int(n_images * (1.0 - drop_path_rate)), 1) if drop_path_rate > 0 else n_images
    patch = 2 * grid * grid * (3 * patch_size * patch_size) * dim * n_images
    return patch + depth * kept * block_forward_flops(n, dim, ffn_weights(dim, mlp_ratio, ffn_layer))


def head_forward_flops(n_vectors: int, in_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                       n_prototypes: int = 65536, nlayers: int = 3) -> int:
    """DINO / iBOT head (MLP then the prototype layer) on ``n_vectors`` vectors."""
    if nlayers == 1:
        mac = in_dim * bottleneck_dim
    else:
        mac = in_dim * hidden_dim + (nlayers - 2) * hidden_dim * hidden_dim + hidden_dim * bottleneck_dim
    return 2 * n_vectors * (mac + bottleneck_dim * n_prototypes)


def train_step_flops(batch: int, dim: int, depth: int, mlp_ratio: float = 4.0, ffn_layer: str = "mlp",
                     patch_size: int = 14, num_register_tokens: int = 0, n_global: int = 2, n_local: int = 8,
                     global_size: int = 224, local_size: int = 98, n_masked: int = 0, hidden_dim: int = 2048,
                     bottleneck_dim: int = 256, n_prototypes: int = 65536, nlayers: int = 3,
                     drop_path_rate: float = 0.0) -> dict[str, int]:
    """Model FLOPs of one training step on ``batch`` images (``n_masked`` masked global-crop patches in all).

    student = 3 x forward (forward + backward at 2x) over all crops and both heads; teacher = forward on the
    global crops (no drop path) and both heads."""
    bb = dict(dim=dim, depth=depth, mlp_ratio=mlp_ratio, ffn_layer=ffn_layer, patch_size=patch_size,
              num_register_tokens=num_register_tokens)
    hd = dict(in_dim=dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim, n_prototypes=n_prototypes,
              nlayers=nlayers)
    g, loc = n_global * batch, n_local * batch
    heads = head_forward_flops(g + loc, **hd) + head_forward_flops(n_masked, **hd)
    student_fwd = (backbone_forward_flops(g, global_size, drop_path_rate=drop_path_rate, **bb)
                   + (backbone_forward_flops(loc, local_size, drop_path_rate=drop_path_rate, **bb) if loc else 0)
                   + heads)
    teacher_fwd = (backbone_forward_flops(g, global_size, **bb) + head_forward_flops(g, **hd)
                   + head_forward_flops(n_masked, **hd))
    return {"student_forward": student_fwd, "student": 3 * student_fwd, "teacher": teacher_fwd,
            "total": 3 * student_fwd + teacher_fwd}


# ---------------------------------------------------------------------- one configuration
def make_config(args, arch: str, batch: int, optimised: bool, device: torch.device):
    from training.config import TrainConfig

    iters = args.warmup + args.steps + 1
    return TrainConfig.model_validate({
        "model": {"arch": arch, "drop_path_rate": args.drop_path, "packed_attention": optimised,
                  "compile": bool(optimised and args.compile),
                  **({"embed_dim": args.embed_dim} if args.embed_dim else {}),
                  **({"depth": args.depth} if args.depth else {})},
        "head": {"n_prototypes": args.n_prototypes},
        "optim": {"epochs": 1, "iters_per_epoch": iters, "batch_size_per_gpu": batch, "warmup_epochs": 0,
                  "freeze_last_layer_epochs": 0, "fused_adamw": optimised},
        "teacher": {"warmup_teacher_temp_epochs": 0},
        "crops": {"global_crops_size": args.global_size, "local_crops_size": args.local_size,
                  "local_crops_number": args.local_crops},
        "device": device.type, "precision": "bf16" if optimised else "fp32", "progress_bar": False,
    })


def make_batch(cfg, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """A collated multi-crop batch of random pixels with the trainer's iBOT masks, already on ``device``."""
    import random

    from training.masking import MaskingGenerator, collate_multicrop

    c = cfg.crops
    gen = torch.Generator().manual_seed(seed)
    samples = [{"global_crops": [torch.randn(3, c.global_crops_size, c.global_crops_size, generator=gen)
                                 for _ in range(2)],
                "local_crops": [torch.randn(3, c.local_crops_size, c.local_crops_size, generator=gen)
                                for _ in range(c.local_crops_number)]}
               for _ in range(cfg.optim.batch_size_per_gpu)]
    mask_gen = MaskingGenerator(c.global_crops_size // cfg.model.patch_size,
                                min_num_patches=cfg.masking.min_num_patches, min_aspect=cfg.masking.min_aspect)
    batch = collate_multicrop(samples, mask_gen, random.Random(seed), tuple(cfg.masking.mask_ratio_min_max),
                              cfg.masking.mask_probability)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_config(args, arch: str, batch: int, optimised: bool, device: torch.device) -> dict[str, Any]:
    from training.train import Trainer

    cfg = make_config(args, arch, batch, optimised, device)
    name = "optimised" if optimised else "naive"
    row: dict[str, Any] = {"arch": arch, "mode": name, "batch": batch, "device": _device_name(device),
                           "precision": "bf16" if optimised and device.type == "cuda" else "fp32",
                           "packed_attention": optimised, "fused_adamw": optimised,
                           "compile": bool(optimised and args.compile)}
    trainer = None
    try:
        trainer = Trainer(cfg)
        data = make_batch(cfg, device, args.seed)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for it in range(args.warmup + args.steps):
            _sync(device)
            t0 = time.perf_counter()
            out = trainer.train_step(data, it)
            _sync(device)
            if it >= args.warmup:
                times.append(time.perf_counter() - t0)
        step_s = sorted(times)[len(times) // 2]  # median
        bb = trainer.student["backbone"]
        mlp_ratio = cfg.model.mlp_ratio or ARCHS[arch].get("mlp_ratio", 4.0)
        shape = (batch, bb.embed_dim, bb.depth, mlp_ratio, bb.ffn_layer, bb.patch_size, bb.num_register_tokens,
                 2, cfg.crops.local_crops_number, cfg.crops.global_crops_size, cfg.crops.local_crops_size,
                 int(data["n_masked_patches"]), cfg.head.hidden_dim, cfg.head.bottleneck_dim,
                 cfg.head.n_prototypes, cfg.head.nlayers)
        flops = train_step_flops(*shape, drop_path_rate=cfg.model.drop_path_rate)
        peak = peak_flops(device, args.peak_tflops)
        row.update({
            "step_s": step_s, "step_s_all": times, "images_per_s": batch / step_s,
            "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "model_flops_per_step": flops["total"], "tflops_per_s": flops["total"] / step_s / 1e12,
            # for comparison only: what the step would cost without stochastic depth (not used for MFU)
            "model_flops_per_step_without_drop_path": train_step_flops(*shape)["total"],
            "peak_tflops": peak / 1e12 if peak else None,
            "mfu": flops["total"] / step_s / peak if peak else None,
            "loss": float(out["loss"]), "n_masked_patches": int(data["n_masked_patches"]),
        })
    except torch.cuda.OutOfMemoryError as e:
        row["error"] = f"out of memory: {str(e).splitlines()[0]}"
    finally:
        del trainer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'arch':<20} {'mode':<10} {'batch':>5} {'step ms':>9} {'img/s':>9} {'peak GB':>8} {'TFLOP/s':>8} {'MFU':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['arch']:<20} {r['mode']:<10} {r['batch']:>5}  {r['error'][:60]}")
            continue
        mem = f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        lines.append(f"{r['arch']:<20} {r['mode']:<10} {r['batch']:>5} {1000 * r['step_s']:>9.1f} "
                     f"{r['images_per_s']:>9.2f} {mem:>8} {r['tflops_per_s']:>8.3f} {mfu:>7}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["vit_small_patch14", "vit_base_patch14", "vit_large_patch14"],
                    choices=sorted(ARCHS))
    ap.add_argument("--batch", type=int, default=64, help="images per step (each: 2 global + N local crops)")
    ap.add_argument("--baseline-batch", type=int, default=None, help="batch of the naive run (default: --batch)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--compile", action="store_true", help="torch.compile every block in the optimised run")
    ap.add_argument("--no-baseline", action="store_true", help="skip the naive run")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak dense bf16 TFLOP/s for MFU")
    ap.add_argument("--global-size", type=int, default=224)
    ap.add_argument("--local-size", type=int, default=98)
    ap.add_argument("--local-crops", type=int, default=8)
    ap.add_argument("--n-prototypes", type=int, default=65536)
    ap.add_argument("--drop-path", type=float, default=0.3, help="stochastic depth rate (the trainer default)")
    ap.add_argument("--embed-dim", type=int, default=None, help="override the arch's width (smoke runs)")
    ap.add_argument("--depth", type=int, default=None, help="override the arch's depth (smoke runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    rows = []
    for arch in args.arch:
        rows.append(run_config(args, arch, args.batch, True, device))
        if not args.no_baseline:
            rows.append(run_config(args, arch, args.baseline_batch or args.batch, False, device))
            opt, naive = rows[-2], rows[-1]
            if "error" not in opt and "error" not in naive:
                opt["speedup_vs_naive"] = opt["images_per_s"] / naive["images_per_s"]
    print(format_table(rows))
    for r in rows:
        if "speedup_vs_naive" in r:
            print(f"{r['arch']}: optimised / naive images/s = {r['speedup_vs_naive']:.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"argv": sys.argv[1:] if argv is None else list(argv), "rows": rows},
                                       indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
