"""Frozen-feature evaluation: weighted k-NN (DINO: k=20, T=0.07) and a linear probe.

Data: labelled image folders with one subfolder per class (``train_dir`` and ``val_dir``; without ``val_dir``
the images of ``train_dir`` are split 50/50 per class, deterministically). Features: the backbone's normalised
CLS token (``forward``), L2-normalised; images resized (short side ``size / center_crop_ratio``) then centre
cropped to ``size``, ImageNet normalisation.

k-NN as DINO's ``knn_classifier``: cosine similarities, top-k neighbours, weights ``exp(sim / T)``, summed per
class; top-1 accuracy. Linear probe: scikit-learn multinomial logistic regression on the standardised features.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .augment import IMAGENET_MEAN, IMAGENET_STD
from .data import IMAGE_EXTS

__all__ = ["list_labelled_folder", "check_eval_folders", "extract_features", "knn_classify", "knn_accuracy",
           "linear_probe_accuracy", "evaluate_backbone"]


def list_labelled_folder(root: str | Path) -> tuple[list[str], list[int], list[str]]:
    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root} has no class subfolders")
    paths, labels = [], []
    for ci, c in enumerate(classes):
        for p in sorted((root / c).rglob("*")):
            if p.suffix.lower().lstrip(".") in IMAGE_EXTS:
                paths.append(str(p))
                labels.append(ci)
    return paths, labels, classes


def check_eval_folders(train_dir: str | Path, val_dir: str | Path | None = None) -> None:
    """Fail before training (``ValueError``, one line) when the evaluation could not run at the end: a missing
    folder, fewer than two classes with images, or (without ``val_dir``) a class too small to split 50/50."""
    for name, root in (("eval.train_dir", train_dir), ("eval.val_dir", val_dir)):
        if root is None:
            continue
        if not Path(root).is_dir():
            raise ValueError(f"{name} {root}: not a directory")
        paths, labels, classes = list_labelled_folder(root)
        counts = {c: labels.count(i) for i, c in enumerate(classes)}
        usable = [c for c, n in counts.items() if n > 0]
        if len(usable) < 2:
            raise ValueError(f"{name} {root}: k-NN / linear evaluation needs at least 2 classes with images "
                             f"(class subfolders), found {len(usable)} ({', '.join(usable) or 'none'})")
        if name == "eval.train_dir" and val_dir is None:
            small = [c for c in usable if counts[c] < 2]
            if small:
                raise ValueError(f"{name} {root}: without eval.val_dir each class is split 50/50 and needs at "
                                 f"least 2 images; {', '.join(small[:5])} has 1")
    if val_dir is not None and list_labelled_folder(train_dir)[2] != list_labelled_folder(val_dir)[2]:
        raise ValueError(f"class folders differ between eval.train_dir {train_dir} and eval.val_dir {val_dir}")


def _load(path: str, size: int, crop_ratio: float) -> torch.Tensor:
    img = Image.open(path).convert("RGB")
    resize = int(round(size / crop_ratio))
    img = TF.resize(img, resize, interpolation=InterpolationMode.BICUBIC, antialias=True)
    img = TF.center_crop(img, [size, size])
    return TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, paths: list[str], size: int, batch_size: int = 128,
                     crop_ratio: float = 0.875, device: str | torch.device = "cpu") -> torch.Tensor:
    was_training = backbone.training
    backbone.eval()
    feats = []
    for i in range(0, len(paths), batch_size):
        x = torch.stack([_load(p, size, crop_ratio) for p in paths[i : i + batch_size]]).to(device)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda"):
            f = backbone(x)
        feats.append(F.normalize(f.float(), dim=-1).cpu())
    backbone.train(was_training)
    return torch.cat(feats)


def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, k: int = 20,
                 T: float = 0.07, num_classes: int | None = None) -> torch.Tensor:
    """Predicted labels by DINO's weighted k-NN vote (features must be L2-normalised)."""
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, train_feats.shape[0])
    sim = test_feats @ train_feats.t()
    top_sim, top_idx = sim.topk(k, dim=1)
    neighbours = train_labels[top_idx]  # [Q, k]
    weights = (top_sim / T).exp()
    votes = torch.zeros(test_feats.shape[0], num_classes, dtype=weights.dtype)
    votes.scatter_add_(1, neighbours, weights)
    return votes.argmax(dim=1)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k: int = 20, T: float = 0.07) -> float:
    train_labels = torch.as_tensor(train_labels)
    test_labels = torch.as_tensor(test_labels)
    pred = knn_classify(train_feats, train_labels, test_feats, k, T, int(max(train_labels.max(), test_labels.max())) + 1)
    return float((pred == test_labels).float().mean())


def linear_probe_accuracy(train_feats, train_labels, test_feats, test_labels, C: float = 1.0) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(np.asarray(train_feats))
    clf = LogisticRegression(C=C, max_iter=1000)
    clf.fit(scaler.transform(np.asarray(train_feats)), np.asarray(train_labels))
    return float(clf.score(scaler.transform(np.asarray(test_feats)), np.asarray(test_labels)))


def _split(paths: list[str], labels: list[int]) -> tuple[list[str], list[int], list[str], list[int]]:
    tr_p, tr_l, te_p, te_l = [], [], [], []
    seen: dict[int, int] = {}
    for p, l in zip(paths, labels):
        n = seen.get(l, 0)
        seen[l] = n + 1
        (tr_p if n % 2 == 0 else te_p).append(p)
        (tr_l if n % 2 == 0 else te_l).append(l)
    return tr_p, tr_l, te_p, te_l


def evaluate_backbone(backbone: torch.nn.Module, train_dir: str, val_dir: str | None = None, size: int = 224,
                      k: int = 20, T: float = 0.07, linear_probe: bool = True, batch_size: int = 128,
                      crop_ratio: float = 0.875, device: str | torch.device = "cpu") -> dict[str, Any]:
    paths, labels, classes = list_labelled_folder(train_dir)
    if val_dir:
        vp, vl, vclasses = list_labelled_folder(val_dir)
        if vclasses != classes:
            raise ValueError(f"class folders differ between {train_dir} and {val_dir}")
        tr_p, tr_l, te_p, te_l = paths, labels, vp, vl
    else:
        tr_p, tr_l, te_p, te_l = _split(paths, labels)
    ftr = extract_features(backbone, tr_p, size, batch_size, crop_ratio, device)
    fte = extract_features(backbone, te_p, size, batch_size, crop_ratio, device)
    out: dict[str, Any] = {"knn_top1": knn_accuracy(ftr, tr_l, fte, te_l, k, T), "knn_k": k,
                           "n_train": len(tr_p), "n_val": len(te_p)}
    if linear_probe:
        out["linear_top1"] = linear_probe_accuracy(ftr.numpy(), tr_l, fte.numpy(), te_l)
    return out
