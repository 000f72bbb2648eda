"""Losses vs plain, loop-based float64 reimplementations."""
import math

import numpy as np
import pytest
import torch

from training.losses import (DINOLoss, dino_multicrop_loss, ibot_masked_loss, koleo_loss, sinkhorn_knopp,
                             softmax_center, update_center)


def _lsm(v):
    m = max(v)
    lse = m + math.log(sum(math.exp(x - m) for x in v))
    return [x - lse for x in v]


def ref_ce(s_row, t_row, temp):
    l = _lsm([x / temp for x in s_row])
    return -sum(p * q for p, q in zip(t_row, l))


def ref_dino(sg, sl, tg, temp, B, L):
    sg, sl, tg = sg.tolist(), sl.tolist(), tg.tolist()
    s_views = [sg[i * B:(i + 1) * B] for i in range(2)] + [sl[i * B:(i + 1) * B] for i in range(L)]
    t_views = [tg[:B], tg[B:]]
    terms = []
    for si, s in enumerate(s_views):
        for ti, t in enumerate(t_views):
            if si == ti:  # a global view against itself
                continue
            terms.append(sum(ref_ce(s[b], t[b], temp) for b in range(B)) / B)
    return sum(terms) / len(terms), len(terms)


def test_dino_multicrop_loss_matches_pairwise_loops():
    g = torch.Generator().manual_seed(0)
    B, K, L = 3, 17, 8
    sg = torch.randn(2 * B, K, generator=g)
    sl = torch.randn(L * B, K, generator=g)
    tg = torch.softmax(torch.randn(2 * B, K, generator=g) / 0.5, dim=-1)
    ref, n = ref_dino(sg.double(), sl.double(), tg.double(), 0.1, B, L)
    assert n == 18
    got = dino_multicrop_loss(sg, sl, tg, student_temp=0.1)
    assert abs(float(got) - ref) < 1e-5 * max(1, abs(ref))


def test_dino_loss_global_only_swaps_teacher_views():
    g = torch.Generator().manual_seed(1)
    B, K = 2, 5
    sg = torch.randn(2 * B, K, generator=g)
    tg = torch.softmax(torch.randn(2 * B, K, generator=g), dim=-1)
    ref, n = ref_dino(sg.double(), torch.zeros(0, K).double(), tg.double(), 0.1, B, 0)
    assert n == 2
    assert abs(float(dino_multicrop_loss(sg, None, tg)) - ref) < 1e-5


def test_ibot_masked_loss_matches_per_image_loops():
    g = torch.Generator().manual_seed(2)
    twoB, N, K = 6, 9, 11
    masks = torch.rand(twoB, N, generator=g) < 0.4
    masks[1] = False  # an unmasked crop still counts in the denominator
    masks[0, 0] = True
    M = int(masks.sum())
    s = torch.randn(M, K, generator=g)
    t = torch.softmax(torch.randn(M, K, generator=g), dim=-1)
    rows = masks.nonzero().tolist()  # (image, patch) in row order
    total = 0.0
    for img in range(twoB):
        idx = [r for r, (i, _) in enumerate(rows) if i == img]
        if idx:
            total += sum(ref_ce(s[r].double().tolist(), t[r].double().tolist(), 0.1) for r in idx) / len(idx)
    ref = total / twoB
    got = ibot_masked_loss(s, t, masks, student_temp=0.1)
    assert abs(float(got) - ref) < 1e-5 * max(1, abs(ref))


def ref_koleo(x):
    x = [np.asarray(r, dtype=np.float64) for r in x.tolist()]
    x = [r / max(np.sqrt((r * r).sum()), 1e-8) for r in x]
    out = 0.0
    for i, a in enumerate(x):
        best, bj = -2.0, None
        for j, b in enumerate(x):
            if j != i and float(a @ b) > best:
                best, bj = float(a @ b), j
        d = math.sqrt(sum((p - q + 1e-8) ** 2 for p, q in zip(a, x[bj])))
        out += -math.log(d + 1e-8)
    return out / len(x)


def test_koleo_matches_loops_and_is_fp32():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 7, generator=g)
    assert abs(float(koleo_loss(x)) - ref_koleo(x)) < 1e-5
    xb = x.to(torch.bfloat16)
    out = koleo_loss(xb)
    assert out.dtype == torch.float32
    assert abs(float(out) - ref_koleo(xb.float())) < 1e-5


def test_koleo_duplicate_rows_stay_finite_in_half_precision():
    x = torch.randn(4, 8).half()
    x[1] = x[0]
    assert torch.isfinite(koleo_loss(x))


def test_softmax_center_and_update_center():
    g = torch.Generator().manual_seed(4)
    t = torch.randn(5, 6, generator=g)
    c = torch.randn(1, 6, generator=g)
    got = softmax_center(t, c, 0.05)
    for i in range(5):
        e = [math.exp((float(t[i, k]) - float(c[0, k])) / 0.05 - 50) for k in range(6)]
        ref = [v / sum(e) for v in e]
        assert np.allclose(got[i].double().numpy(), ref, atol=1e-5)
    new = update_center(c, t, 0.9)
    mean = [sum(float(t[i, k]) for i in range(5)) / 5 for k in range(6)]
    ref = [0.9 * float(c[0, k]) + 0.1 * mean[k] for k in range(6)]
    assert np.allclose(new[0].numpy(), ref, atol=1e-6)
    mod = DINOLoss(6)
    mod.update_center(t)
    assert np.allclose(mod.center[0].numpy(), [0.1 * m for m in mean], atol=1e-6)


def test_sinkhorn_knopp_matches_reference_iterations():
    g = torch.Generator().manual_seed(5)
    B, K, temp = 8, 12, 0.1
    t = torch.randn(B, K, generator=g)
    q = np.exp(t.double().numpy() / temp).T  # K x B
    q /= q.sum()
    for _ in range(3):
        q /= q.sum(axis=1, keepdims=True)
        q /= K
        q /= q.sum(axis=0, keepdims=True)
        q /= B
    ref = (q * B).T
    got = sinkhorn_knopp(t, temp, n_iterations=3)
    assert got.shape == (B, K)
    assert np.allclose(got.double().numpy(), ref, atol=1e-5)
    assert torch.allclose(got.sum(-1), torch.ones(B), atol=1e-5)


@pytest.mark.parametrize("n_local", [0, 2])
def test_dino_loss_gradient_flows(n_local):
    sg = torch.randn(4, 8, requires_grad=True)
    sl = torch.randn(2 * n_local, 8, requires_grad=True)
    tg = torch.softmax(torch.randn(4, 8), -1)
    dino_multicrop_loss(sg, sl, tg).backward()
    assert sg.grad is not None and torch.isfinite(sg.grad).all()
