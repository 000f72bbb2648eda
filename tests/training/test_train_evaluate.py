"""Frozen-feature evaluation: weighted k-NN against a loop over DINO's voting rule, the linear probe, and the
labelled-folder evaluation of a backbone end to end."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from training.evaluate import evaluate_backbone, knn_accuracy, knn_classify, linear_probe_accuracy
from training.models.vision_transformer import build_backbone


def _knn_loop(train, train_labels, test, k, T, num_classes):
    preds = []
    for q in test:
        sims = [float(q @ t) for t in train]
        order = sorted(range(len(train)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in order:
            votes[int(train_labels[i])] += math.exp(sims[i] / T)
        preds.append(max(range(num_classes), key=lambda c: votes[c]))
    return preds


def test_knn_classify_matches_weighted_vote_loop():
    g = torch.Generator().manual_seed(0)
    train = F.normalize(torch.randn(60, 16, generator=g), dim=1)
    labels = torch.randint(0, 5, (60,), generator=g)
    test = F.normalize(torch.randn(25, 16, generator=g), dim=1)
    for k, T in ((20, 0.07), (5, 0.5), (100, 0.07)):  # k above the train size is clamped
        got = knn_classify(train, labels, test, k=k, T=T, num_classes=5).tolist()
        assert got == _knn_loop(train, labels, test, min(k, 60), T, 5)


def test_knn_weights_beat_majority_of_far_neighbours():
    # one very close neighbour of class 1 outvotes three distant ones of class 0 at T = 0.07
    train = F.normalize(torch.tensor([[1.0, 0.0], [0.2, 1.0], [0.25, 1.0], [0.3, 1.0]]), dim=1)
    labels = torch.tensor([1, 0, 0, 0])
    assert knn_classify(train, labels, torch.tensor([[1.0, 0.05]]), k=4, T=0.07).item() == 1
    assert knn_classify(train, labels, torch.tensor([[1.0, 0.05]]), k=4, T=100.0).item() == 0  # ~ plain majority


def test_linear_probe_separates_linear_classes_and_chance_on_noise():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 32)) * 3
    y_tr, y_te = rng.integers(0, 4, 400), rng.integers(0, 4, 200)
    x_tr = centers[y_tr] + rng.normal(size=(400, 32))
    x_te = centers[y_te] + rng.normal(size=(200, 32))
    assert linear_probe_accuracy(x_tr, y_tr, x_te, y_te) >= 0.98
    noise = linear_probe_accuracy(rng.normal(size=(400, 32)), y_tr, rng.normal(size=(200, 32)), y_te)
    assert noise <= 0.45
    assert knn_accuracy(torch.as_tensor(F.normalize(torch.tensor(x_tr), dim=1)), y_tr,
                        torch.as_tensor(F.normalize(torch.tensor(x_te), dim=1)), y_te) >= 0.95


def test_evaluate_backbone_on_labelled_folder(tmp_path):
    # classes are flat colours: a random backbone with full-strength residual branches (init_values=1; the default
    # 1e-5 LayerScale makes every CLS token nearly the same at init) separates them perfectly
    rng = np.random.default_rng(0)
    colours = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
    for name, rgb in colours.items():
        (tmp_path / name).mkdir()
        for i in range(8):
            arr = np.clip(np.array(rgb) + rng.integers(-10, 10, (20, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / name / f"{i}.png")
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny_patch14", img_size=28, embed_dim=48, depth=2, num_heads=3, init_values=1.0)
    res = evaluate_backbone(backbone, str(tmp_path), size=28, k=3, linear_probe=True, batch_size=5)
    assert res["n_train"] == 12 and res["n_val"] == 12  # the 50/50 per-class split without val_dir
    assert res["knn_top1"] == 1.0 and res["linear_top1"] == 1.0
    assert backbone.training  # restored
    other = tmp_path.parent / (tmp_path.name + "-val")
    (other / "purple").mkdir(parents=True)
    with pytest.raises(ValueError, match="class folders differ"):
        evaluate_backbone(backbone, str(tmp_path), str(other), size=28)
