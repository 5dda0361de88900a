"""Objectives against direct implementations of their equations, on 1 and 2 ranks."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mimscale.pretrain.engine.backend import leave_process_group
from mimscale.pretrain.objectives import (
    MAMHead,
    MLPHead,
    ccmim_align,
    ccmim_code,
    ccmim_nce,
    gather_with_grad,
    infonce,
    mam_loss,
    zscore,
)


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def direct_infonce(q, k, tau):
    q, k = _unit(q), _unit(k)
    total = 0.0
    for i in range(q.shape[0]):
        logits = [float(q[i] @ k[j]) / tau for j in range(k.shape[0])]
        total += -(logits[i] - math.log(sum(math.exp(v) for v in logits)))
    return 2 * tau * total / q.shape[0]


def direct_ccmim_nce(hv, hm, tau):
    v, m = _unit(hv), _unit(hm)
    total = 0.0
    for i in range(v.shape[0]):
        pos = math.exp(float(m[i] @ v[i]) / tau)
        den = sum(math.exp(float(v[i] @ v[j]) / tau) for j in range(v.shape[0]) if j != i)
        den += sum(math.exp(float(m[i] @ v[j]) / tau) for j in range(v.shape[0]))
        total += -math.log(pos / den)
    return total / v.shape[0]


def test_infonce_matches_direct():
    q, k = _rand(6, 8, seed=1), _rand(6, 8, seed=2)
    assert float(infonce(q, k, 0.2)) == pytest.approx(direct_infonce(q, k, 0.2), rel=1e-5)


def test_ccmim_nce_matches_eq7_and_stops_gradient_of_masked_branch():
    hv = _rand(5, 8, seed=3).requires_grad_()
    hm = _rand(5, 8, seed=4).requires_grad_()
    loss = ccmim_nce(hv, hm, 0.5)
    assert float(loss.detach()) == pytest.approx(direct_ccmim_nce(hv.detach(), hm.detach(), 0.5), rel=1e-5)
    loss.backward()
    assert hv.grad is not None and hv.grad.abs().sum() > 0 and hm.grad is None


def test_ccmim_code_and_align_match_direct():
    hv, hm = _rand(4, 6, seed=5), _rand(4, 6, seed=6)
    assert float(ccmim_code(hv, hm, 0.5)) == pytest.approx(direct_infonce(hv, hm, 0.5), rel=1e-5)
    cos = [float(_unit(hv)[i] @ _unit(hm)[i]) for i in range(4)]
    assert float(ccmim_align(hv, hm)) == pytest.approx(sum(1 - c for c in cos) / 4, rel=1e-5)


def test_mam_loss_and_zscore():
    g = _rand(3, 10, seed=7) * 5 + 2
    z = zscore(g)
    for b in range(3):
        row = g[b].tolist()
        mu = sum(row) / 10
        sd = math.sqrt(sum((x - mu) ** 2 for x in row) / 10)
        torch.testing.assert_close(z[b], torch.tensor([(x - mu) / (sd + 1e-6) for x in row]), rtol=1e-4, atol=1e-5)
    pred = _rand(3, 10, seed=8)
    mask = torch.rand(3, 10, generator=torch.Generator().manual_seed(9)) > 0.5
    err = (pred - z) ** 2
    assert float(mam_loss(pred, g, mask)) == pytest.approx(float(err[mask].mean()), rel=1e-5)
    assert float(mam_loss(pred, g)) == pytest.approx(float(err.mean()), rel=1e-5)
    assert MAMHead(16)(torch.randn(2, 10, 16)).shape == (2, 10)


def test_heads_layout():
    proj = MLPHead(32, 64, 16, 3, out_bn=True)
    linears = [m for m in proj.modules() if isinstance(m, torch.nn.Linear)]
    bns = [m for m in proj.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert [lin.out_features for lin in linears] == [64, 64, 16] and all(lin.bias is None for lin in linears)
    assert len(bns) == 3 and bns[-1].affine is False and bns[0].affine is True
    pred = MLPHead(16, 64, 16, 2, out_bn=False)
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in pred.modules()) == 1
    assert proj(torch.randn(4, 32)).shape == (4, 16)


# ----------------------------------------------------------------------------- 2 ranks


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_worker(rank, port, q, k, hv, hm, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=__import__("datetime").timedelta(seconds=60))
    try:
        sl = slice(rank * 3, rank * 3 + 3)
        local_v = hv[sl].clone().requires_grad_()
        out = {
            "infonce": float(infonce(q[sl], k[sl], 0.2)),
            "code": float(ccmim_code(hv[sl], hm[sl], 0.5)),
        }
        nce = ccmim_nce(local_v, hm[sl], 0.5)
        nce.backward()
        out["nce"] = float(nce)
        out["grad"] = local_v.grad.clone()
        gathered = gather_with_grad(local_v)
        out["gather_shape"] = tuple(gathered.shape)
        out["gather_local_grad"] = gathered.requires_grad
        results[rank] = out
    finally:
        leave_process_group(together=False)


def test_negatives_from_the_global_batch_on_two_ranks():
    """Two ranks with 3 samples each give the same losses, averaged, as one process with all 6,
    and each rank's gradient is the one the full-batch loss gives its own samples."""
    q, k, hv, hm = (_rand(6, 8, seed=s) for s in (10, 11, 12, 13))
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_two_rank_worker, args=(_free_port(), q, k, hv, hm, results), nprocs=2, join=True)
        results = dict(results)
    for key, fn in (("infonce", lambda: infonce(q, k, 0.2)), ("code", lambda: ccmim_code(hv, hm, 0.5))):
        mean = (results[0][key] + results[1][key]) / 2
        assert mean == pytest.approx(float(fn()), rel=1e-5), key
    full_v = hv.clone().requires_grad_()
    full = ccmim_nce(full_v, hm, 0.5)
    assert (results[0]["nce"] + results[1]["nce"]) / 2 == pytest.approx(float(full), rel=1e-5)
    # DDP averages gradients over ranks; the full-batch gradient of sample i comes from rank(i)'s
    # own term plus the other rank's terms through the gathered copy, which the gather does not
    # carry back: so rank-local grads are a part of the full gradient, in the same direction here.
    full.backward()
    local = torch.cat([results[0]["grad"], results[1]["grad"]]) / 2
    cos = torch.nn.functional.cosine_similarity(local.flatten(), full_v.grad.flatten(), dim=0)
    assert float(cos) > 0.5
    assert results[0]["gather_shape"] == (6, 8) and results[0]["gather_local_grad"]


def _plb_worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=__import__("datetime").timedelta(seconds=60))
    try:
        from mimscale.config import load_config
        from mimscale.pretrain.method import MIMMethod

        cfg = load_config(["model.name=mae_vit_tiny_patch16", "model.img_size=32", "model.patch_size=8",
                           "model.decoder_depth=1", "data.source=synthetic", "masking.strategy=idm",
                           "masking.idm.plb_scope=image", f"engine.seed={rank}"])
        idm = MIMMethod(cfg).strategy
        # each rank sees different heads and losses during the epoch
        heads = [torch.tensor([0, 1, 1]), torch.tensor([2, 2, 0])][rank]
        losses = [torch.tensor([1.0, 2.0, 4.0]), torch.tensor([3.0, 5.0, 2.0])][rank]
        idm._heads = heads
        idm.observe(losses)
        idm.end_epoch(1)
        results[rank] = idm.p.clone()
    finally:
        leave_process_group(together=False)


def test_plb_update_is_identical_on_two_ranks():
    """Eq. 4 over per-head means pooled across ranks: head 0 {1, 2}, head 1 {2, 4}, head 2 {3, 5}."""
    from mimscale.pretrain.masking.functional import plb_update

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_plb_worker, args=(_free_port(), results), nprocs=2, join=True)
        p0, p1 = results[0], results[1]
    assert torch.equal(p0, p1)
    want = plb_update(torch.full((3,), 1 / 3), torch.tensor([1.5, 3.0, 4.0]), 0.99, 0.2)
    torch.testing.assert_close(p0.float(), want)
    assert int(p0.argmax()) == 2
