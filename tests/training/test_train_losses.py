"""Losses vs plain, loop-based float64 reimplementations."""
import math

import numpy as np
import pytest
import torch

from tests.tolerance import approx, assert_close
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
    # fp32: log-softmax over K logits of size up to max|s| / temp, then the mean over 18 pairs x B rows
    logit = float(torch.cat([sg, sl]).abs().max()) / 0.1
    assert float(got) == approx(ref, n_terms=max(K, n * B), dtype=torch.float32, depth=2, magnitude=logit)


def test_dino_loss_global_only_swaps_teacher_views():
    g = torch.Generator().manual_seed(1)
    B, K = 2, 5
    sg = torch.randn(2 * B, K, generator=g)
    tg = torch.softmax(torch.randn(2 * B, K, generator=g), dim=-1)
    ref, n = ref_dino(sg.double(), torch.zeros(0, K).double(), tg.double(), 0.1, B, 0)
    assert n == 2
    logit = float(sg.abs().max()) / 0.1
    assert float(dino_multicrop_loss(sg, None, tg)) == approx(ref, n_terms=max(K, n * B), dtype=torch.float32,
                                                              depth=2, magnitude=logit)


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
    # log-softmax over K logits, then a weighted sum over the M masked rows
    assert float(got) == approx(ref, n_terms=max(K, M), dtype=torch.float32, depth=2,
                                magnitude=float(s.abs().max()) / 0.1)


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
    # fp32: normalise (7 terms), pairwise dots (7 terms), distance (7 terms), -log, mean over 10 rows; -log d
    # turns an absolute error e of d into e / d, so the magnitude is 1 / (smallest nearest-neighbour distance)
    tol = {"n_terms": 10, "dtype": torch.float32, "depth": 4}
    assert float(koleo_loss(x)) == approx(ref_koleo(x), magnitude=1 / _nn_distance(x), **tol)
    xb = x.to(torch.bfloat16)
    out = koleo_loss(xb)
    assert out.dtype == torch.float32  # computed in fp32 from the bf16 values: the fp32 tolerance applies
    assert float(out) == approx(ref_koleo(xb.float()), magnitude=1 / _nn_distance(xb.float()), **tol)


def _nn_distance(x):
    x = torch.nn.functional.normalize(x.double(), dim=1)
    d = torch.cdist(x, x) + torch.eye(len(x)) * 9
    return float(d.min())


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
        # softmax of 6 values: (t - c) / 0.05 is rounded at its magnitude, and exp turns that absolute error
        # into a relative one of the probabilities (<= 1)
        assert_close(got[i], ref, n_terms=6, dtype=torch.float32, depth=2, magnitude=float((t - c).abs().max()) / 0.05)
    new = update_center(c, t, 0.9)
    mean = [sum(float(t[i, k]) for i in range(5)) / 5 for k in range(6)]
    ref = [0.9 * float(c[0, k]) + 0.1 * mean[k] for k in range(6)]
    tol = {"n_terms": 5, "dtype": torch.float32, "depth": 2, "magnitude": float(torch.cat([t, c]).abs().max())}
    assert_close(new[0], ref, **tol)  # a mean over 5 rows, then the momentum mix
    mod = DINOLoss(6)
    mod.update_center(t)
    assert_close(mod.center[0], [0.1 * m for m in mean], **tol)


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
    # exp(t / temp) is rounded relative to itself; 3 iterations x (row sum over B, column sum over K) of
    # normalisations, values up to 1 after the final scaling by B
    tol = {"n_terms": max(B, K), "dtype": torch.float32, "depth": 2 * 3 + 1, "magnitude": 1.0}
    assert_close(got, ref, **tol)
    assert_close(got.sum(-1), torch.ones(B), **{**tol, "depth": tol["depth"] + 1})


@pytest.mark.parametrize("n_local", [0, 2])
def test_dino_loss_gradient_flows(n_local):
    sg = torch.randn(4, 8, requires_grad=True)
    sl = torch.randn(2 * n_local, 8, requires_grad=True)
    tg = torch.softmax(torch.randn(4, 8), -1)
    dino_multicrop_loss(sg, sl, tg).backward()
    assert sg.grad is not None and torch.isfinite(sg.grad).all()


def test_teacher_entropies_name_the_two_collapses():
    """The collapse monitors logged per step (training/objective.py): a uniform target has entropy ln K per image
    and for the batch mean; one prototype for every image has 0 for both; a distinct prototype per image has 0
    per image and ln B for the batch mean; against a float64 loop on random targets."""
    from training.objective import teacher_entropies

    B, K = 8, 64
    tol = {"n_terms": K, "dtype": torch.float32}  # a sum over K prototypes of p log p (|p log p| <= 1/e)
    uniform = teacher_entropies(torch.full((B, K), 1.0 / K))
    assert float(uniform["teacher_entropy"]) == approx(math.log(K), magnitude=math.log(K), **tol)
    assert float(uniform["teacher_marginal_entropy"]) == approx(math.log(K), magnitude=math.log(K), **tol)
    same = teacher_entropies(torch.nn.functional.one_hot(torch.zeros(B, dtype=torch.long), K).float())
    assert float(same["teacher_entropy"]) == 0 and float(same["teacher_marginal_entropy"]) == approx(0, magnitude=1, **tol)
    spread = teacher_entropies(torch.nn.functional.one_hot(torch.arange(B), K).float())
    assert float(spread["teacher_entropy"]) == 0
    assert float(spread["teacher_marginal_entropy"]) == approx(math.log(B), magnitude=math.log(B), **tol)
    p = torch.softmax(torch.randn(B, K, generator=torch.Generator().manual_seed(0)) * 3, -1)
    rows = p.double().tolist()
    ref_row = sum(-sum(x * math.log(x) for x in r) for r in rows) / B
    mean = [sum(r[k] for r in rows) / B for k in range(K)]
    got = teacher_entropies(p)
    assert float(got["teacher_entropy"]) == approx(ref_row, magnitude=math.log(K), n_terms=K * B, dtype=torch.float32)
    assert float(got["teacher_marginal_entropy"]) == approx(-sum(m * math.log(m) for m in mean), magnitude=math.log(K),
                                                            n_terms=K * B, dtype=torch.float32)
