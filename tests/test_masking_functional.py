"""SPEC §8: every function against a direct (loop-by-loop) implementation of its equation."""

import itertools
import math

import pytest
import torch

from mimscale.pretrain.masking import functional as F

DTYPES = [torch.float32, torch.bfloat16]


def _qk(b, h, n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, 1 + n, d, generator=g).to(dtype)
    k = torch.randn(b, h, 1 + n, d, generator=g).to(dtype)
    return q, k


def _dot(a, b):
    return sum(float(x) * float(y) for x, y in zip(a, b))


def _softmax(values):
    m = max(values)
    e = [math.exp(v - m) for v in values]
    return [x / sum(e) for x in e]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("include_cls_key", [False, True])
def test_cls_patch_attention(dtype, b, include_cls_key):
    h, n, d = 2, 5, 4
    q, k = _qk(b, h, n, d, dtype)
    got = F.cls_patch_attention(q, k, include_cls_key)
    assert got.shape == (b, h, n) and got.dtype == torch.float32
    for bi, hi in itertools.product(range(b), range(h)):
        keys = range(0, 1 + n) if include_cls_key else range(1, 1 + n)
        logits = [_dot(q[bi, hi, 0], k[bi, hi, i]) / math.sqrt(d) for i in keys]
        want = _softmax(logits)[1:] if include_cls_key else _softmax(logits)
        torch.testing.assert_close(got[bi, hi], torch.tensor(want), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b", [1, 3])
def test_cls_importance(dtype, b):
    h, n, d = 3, 6, 4
    q, k = _qk(b, h, n, d, dtype, seed=1)
    got = F.cls_importance(q, k)
    for bi in range(b):
        logits = [sum(_dot(q[bi, hi, 0], k[bi, hi, i]) for hi in range(h)) / h / math.sqrt(d) for i in range(1, 1 + n)]
        torch.testing.assert_close(got[bi], torch.tensor(_softmax(logits)), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("queries", ["patches", "all"])
def test_global_patch_attention(dtype, queries):
    b, h, n, d = 2, 2, 5, 3
    q, k = _qk(b, h, n, d, dtype, seed=2)
    got = F.global_patch_attention(q, k, queries)
    assert got.shape == (b, h, n)
    for bi, hi, m in itertools.product(range(b), range(h), range(n)):
        km = k[bi, hi, 1 + m]
        if queries == "patches":
            total = sum(_dot(q[bi, hi, 1 + i], km) for i in range(n) if i != m)
        else:
            total = sum(_dot(q[bi, hi, i], km) for i in range(1 + n))
        assert float(got[bi, hi, m]) == pytest.approx(total / math.sqrt(d), rel=1e-4, abs=1e-4)
    with pytest.raises(ValueError):
        F.global_patch_attention(q, k, "cls")


def test_global_patch_attention_needs_no_n_by_n_matrix():
    """O(N·d): 4096 tokens of width 8 would need a 4096² matrix per head otherwise."""
    q, k = _qk(1, 1, 4096, 8, torch.float32)
    direct_last = float((q[0, 0, 1:-1] @ k[0, 0, -1]).sum()) / math.sqrt(8)
    assert float(F.global_patch_attention(q, k)[0, 0, -1]) == pytest.approx(direct_last, rel=1e-3, abs=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [None, 0.25])
def test_token_salience(dtype, scale):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 6, 4, generator=g) * 0.7).to(dtype)
    got = F.token_salience(x, scale)
    for bi in range(2):
        rows = []
        for i in range(6):
            a = [_dot(x[bi, i], x[bi, j]) * (scale or 1.0) for j in range(6)]
            rows.append(_softmax(a))
        s = [sum(rows[j][i] for j in range(6)) for i in range(6)]
        lo, hi = min(s), max(s)
        want = torch.tensor([(v - lo) / (hi - lo) for v in s])
        torch.testing.assert_close(got[bi], want, rtol=1e-4, atol=1e-5)
    assert got.min() >= 0 and got.max() <= 1


def test_token_salience_degenerate_rows_are_zero():
    x = torch.zeros(2, 5, 3)
    x[1] = torch.randn(5, 3)
    s = F.token_salience(x)
    assert torch.equal(s[0], torch.zeros(5))
    assert float(F.salience_range(x)[0]) < 1e-6 < float(F.salience_range(x)[1])
    assert float(s[1].max()) == pytest.approx(1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_adaptive_mask_ratio(dtype):
    g = torch.Generator().manual_seed(4)
    s = torch.rand(4, 10, generator=g).to(dtype)
    s[0] = 0.0  # nothing above δ -> r − Δr
    s[1] = 1.0  # everything above δ -> r + Δr
    got = F.adaptive_mask_ratio(s, 0.75, 0.15, 0.1)
    for bi in range(4):
        frac = sum(1 for v in s[bi] if float(v) > 0.1) / 10
        assert float(got[bi]) == pytest.approx(0.75 - 0.15 + 2 * 0.15 * frac)
    assert float(got[0]) == pytest.approx(0.60) and float(got[1]) == pytest.approx(0.90)


@pytest.mark.parametrize("progress", [0.0, 0.3, 1.0])
def test_soft_to_hard_fractions(progress):
    a_s, a_h, a_r = F.soft_to_hard_fractions(progress, (0.5, 0.0), (0.0, 0.5))
    assert a_s == pytest.approx(0.5 - 0.5 * progress)
    assert a_h == pytest.approx(0.5 * progress)
    assert a_r == pytest.approx(1 - a_s - a_h) and a_r == pytest.approx(0.5)


def test_plb_update():
    p = torch.tensor([0.25, 0.25, 0.5])
    losses = torch.tensor([1.0, 2.0, 1.5])
    got = F.plb_update(p, losses, lam=0.99, eps=0.2)
    e = [math.exp(v / 0.2) for v in losses.tolist()]
    want = [0.01 * pv + 0.99 * ev / sum(e) for pv, ev in zip(p.tolist(), e)]
    torch.testing.assert_close(got, torch.tensor(want))
    assert float(got.sum()) == pytest.approx(1.0)
    assert int(got.argmax()) == 1  # moves toward the head with the highest loss
    torch.testing.assert_close(F.plb_update(p, losses, lam=0.0), p)


def test_num_visible():
    assert F.num_visible(196, 0.75) == 49
    assert F.num_visible(196, 0.9) == 19
    assert F.num_visible(196, 0.0) == 196
    assert F.num_visible(196, 0.999) == 0
    assert F.num_visible(1, 0.5) == 0


def _exact_inclusion(p, k):
    """Inclusion probability of each item when drawing k items sequentially without replacement."""
    n = len(p)
    incl = [0.0] * n
    for seq in itertools.permutations(range(n), k):
        prob, left = 1.0, 1.0
        for i in seq:
            prob *= p[i] / left
            left -= p[i]
        for i in seq:
            incl[i] += prob
    return incl


def test_sample_without_replacement_matches_exact_probabilities():
    p = torch.tensor([[0.4, 0.25, 0.15, 0.1, 0.07, 0.03]])
    k, draws = 3, 20000
    g = torch.Generator().manual_seed(5)
    idx = F.sample_without_replacement(p.expand(draws, -1), k, g)
    assert idx.shape == (draws, k)
    assert all(len(set(row)) == k for row in idx[:500].tolist())  # no duplicates
    freq = torch.zeros(6).index_add_(0, idx.flatten(), torch.ones(draws * k)) / draws
    want = torch.tensor(_exact_inclusion(p[0].tolist(), k))
    sigma = (want * (1 - want) / draws).sqrt()
    assert torch.all((freq - want).abs() <= 4 * sigma + 1e-3), (freq, want)  # 4-sigma tolerance


def test_sample_without_replacement_skips_zero_probability_and_is_reproducible():
    p = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]])
    a = F.sample_without_replacement(p, 2, torch.Generator().manual_seed(7))
    b = F.sample_without_replacement(p, 2, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert set(a[0].tolist()) == {1, 3}
    # more draws than non-zero entries: the non-zero ones come first
    c = F.sample_without_replacement(p[:1], 3, torch.Generator().manual_seed(8))
    assert set(c[0, :2].tolist()) == {1, 3}
