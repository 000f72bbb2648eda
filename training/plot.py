"""``lvd plot OUT``: training curves from ``OUT/metrics.jsonl`` as one PNG (matplotlib, Agg backend).

Four panels over iterations: the loss terms (total, DINO, iBOT, KoLeo; log scale when all are positive), the
teacher's collapse monitors (the mean per-image entropy of its DINO targets and the entropy of their batch mean,
training/objective.py: both at ln K is a collapse to the uniform target, both near 0 a collapse to one prototype),
the learning rate (and weight decay on a second axis), and the k-NN / linear-probe top-1 accuracy of the ``eval``
rows. A PNG was chosen over a TensorBoard writer: no extra dependency or server, viewable anywhere (also over
``ray job logs`` copies), and ``metrics.jsonl`` stays the one record of a run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["read_metrics_rows", "plot_metrics", "main"]

LOSSES = ("loss", "dino_loss", "ibot_loss", "koleo_loss")
ACCURACIES = ("knn_top1", "linear_top1")
ENTROPIES = ("teacher_entropy", "teacher_marginal_entropy")


def read_metrics_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl (a half-written last line of a killed run is skipped)."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _series(rows: list[dict[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    pts = [(r["iteration"], r[key]) for r in rows if r.get("type") == kind and r.get(key) is not None]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def plot_metrics(metrics: Path, out: Path) -> dict[str, int]:
    """Draw ``metrics`` to ``out``; returns the number of points per curve drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics_rows(metrics)
    if not any(r.get("type") == "train" for r in rows):
        raise ValueError(f"{metrics}: no training iteration recorded yet")
    drawn: dict[str, int] = {}
    fig, (ax_loss, ax_ent, ax_lr, ax_acc) = plt.subplots(4, 1, figsize=(8, 13), sharex=True)
    for key in LOSSES:
        x, y = _series(rows, "train", key)
        if x:
            ax_loss.plot(x, y, label=key, linewidth=1.5 if key == "loss" else 1.0)
            drawn[key] = len(x)
    if all(v > 0 for key in LOSSES for v in _series(rows, "train", key)[1]):
        ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(loc="upper right")
    for key, label in zip(ENTROPIES, ("per image", "of the batch mean")):
        x, y = _series(rows, "train", key)
        if x:
            ax_ent.plot(x, y, label=label)
            drawn[key] = len(x)
    if any(k in drawn for k in ENTROPIES):
        ax_ent.legend(loc="best")
    ax_ent.set_ylabel("teacher entropy (nats)")
    x, y = _series(rows, "train", "lr")
    ax_lr.plot(x, y, color="tab:blue", label="lr")
    drawn["lr"] = len(x)
    ax_lr.set_ylabel("learning rate", color="tab:blue")
    x, y = _series(rows, "train", "wd")
    if x:
        ax_wd = ax_lr.twinx()
        ax_wd.plot(x, y, color="tab:gray", linestyle="--", label="weight decay")
        ax_wd.set_ylabel("weight decay", color="tab:gray")
        drawn["wd"] = len(x)
    for key in ACCURACIES:
        x, y = _series(rows, "eval", key)
        if x:
            ax_acc.plot(x, y, marker="o", label=key)
            drawn[key] = len(x)
    if any(k in drawn for k in ACCURACIES):
        ax_acc.set_ylim(0, 1)
        ax_acc.legend(loc="lower right")
    else:
        ax_acc.text(0.5, 0.5, "no evaluation rows (set eval.train_dir / --eval-train-dir)", ha="center",
                    va="center", transform=ax_acc.transAxes)
    ax_acc.set_ylabel("top-1 accuracy")
    ax_acc.set_xlabel("iteration")
    fig.suptitle(str(metrics.parent))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return drawn


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lvd plot", description="draw the training curves of a run (losses, lr, "
                                "k-NN / linear accuracy) from OUT/metrics.jsonl to a PNG")
    p.add_argument("output_dir", type=Path, help="a training output dir (or its metrics.jsonl)")
    p.add_argument("-o", "--out", type=Path, default=None, help="PNG path (default: OUT/curves.png)")
    args = p.parse_args(argv)
    metrics = args.output_dir if args.output_dir.is_file() else args.output_dir / "metrics.jsonl"
    if not metrics.is_file():
        print(f"error: {metrics}: no such file (is {args.output_dir} a training output dir?)", file=sys.stderr)
        return 2
    out = args.out or metrics.parent / "curves.png"
    try:
        drawn = plot_metrics(metrics, out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({', '.join(f'{k}: {n} points' for k, n in drawn.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
