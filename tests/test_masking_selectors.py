"""SPEC §1 selectors: exact counts, reproducibility, ties, noise range, sampling law, block shapes."""

import itertools
import math

import pytest
import torch

from mimscale.pretrain.masking.selectors import (
    block_mask,
    mask_from_keys,
    masked_counts,
    noisy_topk_mask,
    random_mask,
    sample_mask,
    select,
    topk_mask,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("ratio", [0.01, 0.5, 0.75, 0.9, 0.99])
@pytest.mark.parametrize("batch", [1, 4])
def test_counts_exact_for_every_selector(ratio, batch):
    n, grid = 196, (14, 14)
    counts = masked_counts(n, ratio, batch)
    assert int(counts[0]) == n - int(n * (1 - ratio))
    scores = torch.rand(batch, n, generator=gen(1))
    for name in ("topk", "sample", "noisy_topk", "random", "block"):
        m = select(name, scores / scores.sum(-1, keepdim=True), counts, gen(2), grid=grid, batch=batch)
        assert m.dtype == torch.bool and m.shape == (batch, n)
        assert m.sum(1).tolist() == counts.tolist(), name


def test_per_image_counts_differ():
    counts = torch.tensor([3, 10, 0, 16])
    for name in ("topk", "sample", "noisy_topk", "random", "block"):
        m = select(name, torch.rand(4, 16, generator=gen()), counts, gen(), grid=(4, 4), batch=4)
        assert m.sum(1).tolist() == [3, 10, 0, 16], name
    per_image = masked_counts(196, torch.tensor([0.6, 0.75, 0.9]), 3)
    assert per_image.tolist() == [196 - int(196 * 0.4), 147, 196 - 19]


def test_topk_hides_highest_and_breaks_ties_by_index():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.9, 0.2]])
    assert topk_mask(scores, 2).tolist() == [[False, True, False, True, False]]
    ties = torch.ones(1, 6)
    assert topk_mask(ties, 3).tolist() == [[True, True, True, False, False, False]]


def test_reproducible_and_seed_dependent():
    for name in ("sample", "noisy_topk", "random", "block"):
        s = torch.rand(8, 64, generator=gen(3))
        counts = masked_counts(64, 0.75, 8)
        a = select(name, s, counts, gen(11), grid=(8, 8), batch=8)
        b = select(name, s, counts, gen(11), grid=(8, 8), batch=8)
        c = select(name, s, counts, gen(12), grid=(8, 8), batch=8)
        assert torch.equal(a, b) and not torch.equal(a, c), name


def test_random_mask_is_uniform():
    m = random_mask(20000, 8, 0.75, gen(4))
    freq = m.float().mean(0)
    assert torch.allclose(freq, torch.full((8,), 0.75), atol=0.02)


def test_noisy_topk_noise_range():
    """Noise is U[0, w): a score more than w above the rest is always hidden, one more than w
    below the rest never is, and scores within w of each other trade places; w = 0 is topk."""
    w = 0.5
    scores = torch.tensor([[0.0, 0.1, 0.2, 1.0, 0.45, -1.0]]).expand(4000, -1)
    m = noisy_topk_mask(scores, 2, w, gen(6))
    assert bool(m[:, 3].all()) and not bool(m[:, 5].any())
    assert 0.5 < float(m[:, 4].float().mean()) < 0.99
    assert 0.01 < float(m[:, 2].float().mean()) < 0.5
    torch.testing.assert_close(noisy_topk_mask(scores[:1], 2, 0.0, gen()), topk_mask(scores[:1], 2))


def test_sample_inclusion_frequencies_match_sequential_sampling():
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    draws, k = 20000, 2
    m = sample_mask(p.expand(draws, -1), k, gen(7))
    freq = m.float().mean(0)
    exact = torch.zeros(5)
    for seq in itertools.permutations(range(5), k):
        prob, left = 1.0, 1.0
        for i in seq:
            prob *= float(p[i]) / left
            left -= float(p[i])
        for i in seq:
            exact[i] += prob
    sigma = (exact * (1 - exact) / draws).sqrt()
    assert torch.all((freq - exact).abs() <= 4 * sigma + 1e-3), (freq, exact)


def _neighbours(mask2d):
    """Mean number of hidden 4-neighbours of a hidden patch (clustering statistic)."""
    m = mask2d.float()
    nb = torch.zeros_like(m)
    nb[:, 1:] += m[:, :-1]
    nb[:, :-1] += m[:, 1:]
    nb[1:, :] += m[:-1, :]
    nb[:-1, :] += m[1:, :]
    return float((nb * m).sum() / m.sum())


def test_block_masks_are_blocky():
    """BEiT blocks: hidden patches cluster in rectangles far more than random ones do."""
    counts = masked_counts(196, 0.4, 64)
    blocks = block_mask(64, (14, 14), counts, gen(8)).view(64, 14, 14)
    rand = random_mask(64, 196, 0.4, gen(9)).view(64, 14, 14)
    b = sum(_neighbours(x) for x in blocks) / 64
    r = sum(_neighbours(x) for x in rand) / 64
    assert b > 2.5 and r < 2.0, (b, r)
    # a request of 16 patches is about one rectangle (a 4x4 block has 3 hidden neighbours per patch)
    one = block_mask(32, (14, 14), torch.full((32,), 16), gen(10)).view(32, 14, 14)
    assert sum(_neighbours(x) for x in one) / 32 > 2.3


def _block_reference(counts, grid, seed, min_patches=16, min_aspect=0.3, attempts=64):
    """BEiT's rule written out image by image, attempt by attempt, with the same random draws."""
    g = gen(seed)
    batch, (gh, gw) = len(counts), grid
    draws = torch.rand(attempts, 4, batch, generator=g).double()
    tail = torch.rand(batch, gh * gw, generator=g)
    lo, hi = math.log(min_aspect), math.log(1 / min_aspect)
    out = []
    for b in range(batch):
        hidden = set()
        for a in range(attempts):
            u0, u1, u2, u3 = (float(draws[a, j, b]) for j in range(4))
            left_to_hide = counts[b] - len(hidden)
            if left_to_hide <= 0:
                continue
            low = min(left_to_hide, min_patches)
            area = low + u0 * (left_to_hide - low)
            aspect = math.exp(lo + u1 * (hi - lo))
            h = min(max(round(math.sqrt(area * aspect)), 1), gh)
            w = min(max(round(math.sqrt(area / aspect)), 1), gw)
            top, left = int(u2 * (gh - h + 1)), int(u3 * (gw - w + 1))
            rect = {r * gw + c for r in range(top, top + h) for c in range(left, left + w)}
            if 0 < len(rect - hidden) <= left_to_hide:
                hidden |= rect
        # trimmed or topped up at random: the block patches first, then by a random key, ties by index
        key = (torch.tensor([float(i in hidden) for i in range(gh * gw)]) * 2 + tail[b]).tolist()  # float32
        keys = [(key[i], -i) for i in range(gh * gw)]
        chosen = {-j for _, j in sorted(keys, reverse=True)[:counts[b]]}
        out.append([i in chosen for i in range(gh * gw)])
    return torch.tensor(out)


@pytest.mark.parametrize("batch, grid", [(1, (14, 14)), (7, (14, 14)), (5, (8, 12))])
def test_block_mask_matches_a_per_image_reference(batch, grid):
    n = grid[0] * grid[1]
    for seed, counts in enumerate([[int(0.75 * n)] * batch, [0] * batch, [n - 1] * batch, [1] * batch,
                                   [(17 * i + 5) % n for i in range(batch)]]):
        got = block_mask(batch, grid, torch.tensor(counts), gen(seed))
        assert got.sum(1).tolist() == counts
        assert torch.equal(got, _block_reference(counts, grid, seed)), (seed, counts)


def test_mask_from_keys_with_infinities():
    keys = torch.tensor([[float("-inf"), 1.0, float("-inf"), 2.0]])
    assert mask_from_keys(keys, torch.tensor([2])).tolist() == [[False, True, False, True]]
