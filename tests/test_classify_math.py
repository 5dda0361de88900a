"""The math of the classification protocols against direct implementations: layer-decay groups,
LARS, k-NN voting (chunked and sharded), top-k counting, occlusion / shuffle, subsets."""

import math

import numpy as np
import pytest
import torch

from mimscale.downstream.classify.engine import topk_correct
from mimscale.downstream.classify.knn import knn_scores, merge, nearest
from mimscale.downstream.classify.model import build_vit
from mimscale.downstream.classify.optim import LARS, layer_decay_groups
from mimscale.downstream.classify.robustness import perturbed_forward
from mimscale.downstream.classify.subsets import draw_per_class, read_subset_file, write_subset_file
from mimscale.pretrain.engine.backend import DDPBackend, DistEnv
from mimscale.pretrain.models import build_mae, to_timm_state_dict


def _tiny_vit(**kw):
    return build_vit("mae_vit_tiny_patch16", 8, 32, kw.pop("num_classes", 5), **kw)


# --------------------------------------------------------------------------- layer decay

def _depth(name: str, num_blocks: int) -> int:
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_blocks + 1  # norm, fc_norm, head


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_layer_decay_groups_match_the_formula(pool):
    vit, decay, wd = _tiny_vit(pool=pool), 0.65, 0.05
    L = len(vit.blocks)
    groups = layer_decay_groups(vit, wd, decay)
    seen = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in seen
            seen[id(p)] = g
    names = dict(vit.named_parameters())
    assert len(seen) == len(names)
    for name, p in names.items():
        g = seen[id(p)]
        assert g["lr_scale"] == pytest.approx(decay ** (L + 1 - _depth(name, L))), name
        no_decay = p.ndim == 1 or name in ("cls_token", "pos_embed")
        assert g["weight_decay"] == (0.0 if no_decay else wd), name
    # the head and final norms train at the full lr, the patch embedding at decay^(L+1)
    assert seen[id(vit.head.weight)]["lr_scale"] == 1.0
    assert seen[id(vit.patch_embed.proj.weight)]["lr_scale"] == pytest.approx(decay ** 13)
    # the backend's set_lr applies the scale
    backend = DDPBackend(torch.device("cpu"), DistEnv(), "fp32")
    backend.wrap(vit)
    backend.build_optimizer(groups, 1.0, (0.9, 0.999))
    backend.set_lr(2e-3)
    for g in backend.optimizer.param_groups:
        assert g["lr"] == pytest.approx(2e-3 * g["lr_scale"])


# --------------------------------------------------------------------------- LARS

def _lars_direct(weights, grads_fn, steps, lrs, wd, momentum, trust):
    """LARS written out with numpy, one parameter at a time."""
    ws = {k: v.astype(np.float64).copy() for k, v in weights.items()}
    bufs = {k: np.zeros_like(v) for k, v in ws.items()}
    for t in range(steps):
        grads = grads_fn(ws)
        for k in ws:
            g = grads[k]
            if ws[k].ndim > 1:
                g = g + wd * ws[k]
                wn, gn = np.sqrt((ws[k] ** 2).sum()), np.sqrt((g ** 2).sum())
                g = g * (trust * wn / gn if wn > 0 and gn > 0 else 1.0)
            bufs[k] = momentum * bufs[k] + g
            ws[k] = ws[k] - lrs[t] * bufs[k]
    return ws


def test_lars_matches_a_direct_implementation():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 6)), rng.normal(size=(32, 3))
    w0 = {"weight": rng.normal(size=(3, 6)), "bias": rng.normal(size=3), "zero": np.zeros((3, 6))}
    lrs, wd, momentum, trust = [0.5, 1.0, 2.0, 1.5, 0.7], 0.01, 0.9, 0.02

    def grads(ws):  # d/dW of 0.5·mean‖xWᵀ + (xZᵀ) + b − y‖²
        r = x @ ws["weight"].T + x @ ws["zero"].T + ws["bias"] - y
        gw = r.T @ x / len(x)
        return {"weight": gw, "bias": r.mean(0), "zero": gw}

    params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in w0.items()}
    opt = LARS(params.values(), lr=0.0, weight_decay=wd, momentum=momentum, trust_coefficient=trust)
    xt, yt = torch.tensor(x), torch.tensor(y)
    for lr in lrs:
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad()
        pred = xt @ params["weight"].T + xt @ params["zero"].T + params["bias"]
        (0.5 * ((pred - yt) ** 2).sum(1).mean()).backward()
        opt.step()
    want = _lars_direct(w0, grads, len(lrs), lrs, wd, momentum, trust)
    for k in w0:
        np.testing.assert_allclose(params[k].detach().numpy(), want[k], rtol=1e-10, atol=1e-12)
    # the all-zero matrix has ‖w‖ = 0: its ratio is 1 on the first step, so it moved
    assert np.abs(want["zero"]).sum() > 0
    with pytest.raises(ValueError, match="momentum"):
        LARS(params.values(), momentum=1.0)


def test_lars_trains_a_linear_probe_head():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = (x[:, 0] > 0).long()
    head = torch.nn.Sequential(torch.nn.BatchNorm1d(8, affine=False), torch.nn.Linear(8, 2))
    opt = LARS(head.parameters(), lr=6.4, momentum=0.9, trust_coefficient=0.001)  # MAE: 0.1 x 16384 / 256
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(x), y).backward()
        opt.step()
    assert (head(x).argmax(1) == y).float().mean() > 0.95


# --------------------------------------------------------------------------- k-NN

def _knn_direct(queries, bank, labels, num_classes, k, T):
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    out = np.zeros((len(q), num_classes))
    for i in range(len(q)):
        sims = [float(q[i] @ b[j]) for j in range(len(b))]
        for j in sorted(range(len(b)), key=lambda j: -sims[j])[:k]:
            out[i, labels[j]] += math.exp(sims[j] / T)
    return out


@pytest.mark.parametrize("k,chunk", [(7, 4), (20, 100), (60, 5)])
def test_knn_voting_matches_a_direct_implementation(k, chunk):
    rng = np.random.default_rng(k)
    bank, queries = rng.normal(size=(50, 16)), rng.normal(size=(13, 16))
    labels = rng.integers(0, 5, 50)
    norm = lambda a: torch.nn.functional.normalize(torch.tensor(a), dim=1)
    got = knn_scores(norm(queries), norm(bank), torch.tensor(labels), 5, k=k, temperature=0.1, chunk=chunk)
    want = _knn_direct(queries, bank, labels, 5, min(k, 50), 0.1)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    assert (got.argmax(1).numpy() == want.argmax(1)).all()


def test_knn_shards_merge_to_the_whole_bank():
    g = torch.Generator().manual_seed(1)
    bank = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    labels = torch.randint(0, 3, (40,), generator=g)
    whole = nearest(queries, bank, labels, 10)
    shards = [nearest(queries, bank[i::3], labels[i::3], 10) for i in range(3)]
    merged = merge(shards, 10)
    torch.testing.assert_close(merged[0], whole[0])
    assert torch.equal(merged[1], whole[1])
    tiny = nearest(queries, bank[:3], labels[:3], 10)  # a shard smaller than k keeps what it has
    assert tiny[0].shape == (6, 3)
    with pytest.raises(ValueError, match="temperature"):
        knn_scores(queries, bank, labels, 3, temperature=0)


def test_topk_correct_counts():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]])
    targets = torch.tensor([1, 2, 0])
    # row 0: rank 1; row 1: rank 3; row 2: rank 3 -> top-1 1, top-2 1, top-5 (capped at 3 classes) 3
    assert topk_correct(logits, targets, ks=(1, 2, 5)).tolist() == [1.0, 1.0, 3.0]


# --------------------------------------------------------------------------- robustness

def _features(vit, x):
    return vit.forward_head(vit.forward_features(x), pre_logits=True)


def test_occlusion_drops_tokens_like_the_mae_encoder():
    torch.manual_seed(0)
    mae = build_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, decoder_depth=1).eval()
    vit = _tiny_vit(num_classes=0, pool="cls", fc_norm=False).eval()
    vit.load_state_dict(to_timm_state_dict(mae))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = perturbed_forward(vit, x, "occlude", 0.5, torch.Generator().manual_seed(5))
        keep = torch.rand(3, 16, generator=torch.Generator().manual_seed(5)).argsort(1)[:, :8]
        mask = torch.ones(3, 16, dtype=torch.bool).scatter_(1, keep, False)  # True = hidden
        want = mae.encode(x, mask).latent[:, 0]  # MAE's own encoder on the 8 visible patches
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(got, _features(vit, x), atol=1e-3)
        none = perturbed_forward(vit, x, "occlude", 0.0, torch.Generator().manual_seed(5))
        torch.testing.assert_close(none, _features(vit, x), rtol=1e-4, atol=1e-5)


def test_shuffle_equals_shuffled_image_tiles():
    torch.manual_seed(0)
    vit = _tiny_vit(pool="mean").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = perturbed_forward(vit, x, "shuffle", generator=torch.Generator().manual_seed(3))
        perm = torch.rand(2, 16, generator=torch.Generator().manual_seed(3)).argsort(1)
        tiles = x.unfold(2, 8, 8).unfold(3, 8, 8).reshape(2, 3, 16, 8, 8)  # [B, C, N, p, p], row-major
        moved = torch.stack([tiles[b][:, perm[b]] for b in range(2)])
        image = moved.reshape(2, 3, 4, 4, 8, 8).permute(0, 1, 2, 4, 3, 5).reshape(2, 3, 32, 32)
        torch.testing.assert_close(got, vit(image), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="valid: occlude, shuffle"):
        perturbed_forward(vit, x, "blur")


# --------------------------------------------------------------------------- subsets

def test_per_class_draw_and_subset_files(tmp_path):
    labels = [0] * 100 + [1] * 30 + [2] * 3
    pick = draw_per_class(labels, 0.1, seed=4)
    counts = np.bincount([labels[i] for i in pick], minlength=3)
    assert counts.tolist() == [10, 3, 1] and pick == sorted(set(pick))
    assert draw_per_class(labels, 0.1, seed=4) == pick and draw_per_class(labels, 0.1, seed=5) != pick
    keys = [f"train/c{y}/img_{i}.JPEG" for i, y in enumerate(labels)]
    path = write_subset_file(tmp_path / "subset.txt", keys, pick, "10% seed 4")
    assert read_subset_file(path, keys) == pick
    (tmp_path / "names.txt").write_text("img_5.JPEG\ntrain/c1/img_100.JPEG\n\n")
    assert read_subset_file(tmp_path / "names.txt", keys) == [5, 100]
    (tmp_path / "bad.txt").write_text("img_5.JPEG\nnope.JPEG\n")
    with pytest.raises(ValueError, match="match no single sample.*nope.JPEG"):
        read_subset_file(tmp_path / "bad.txt", keys)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        draw_per_class(labels, 0.0, seed=0)
