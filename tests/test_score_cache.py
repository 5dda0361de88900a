"""The score cache (``masking.score_cache.every_epochs``): geometry of the warp, agreement with
scoring the view itself, atomic rank-sharded files, resume, FLOPs and config errors."""

import json
import random
import shutil

import numpy as np
import pytest
import torch
from distributed_utils import spawn, tiny_overrides

from mimscale.config import ConfigError, load_config
from mimscale.data_pipeline.build import build_source
from mimscale.data_pipeline.synthetic import sample_at
from mimscale.data_pipeline.views import ViewSpec, decode_views, normalize_uint8
from mimscale.pretrain.engine.flops import step_flops
from mimscale.pretrain.engine.rng import seed_everything
from mimscale.pretrain.engine.trainer import Trainer
from mimscale.pretrain.masking.score_cache import ScoreCache, full_view_reader, warp
from mimscale.pretrain.method import MIMMethod

CACHE = "masking.score_cache.every_epochs"


# ---------------------------------------------------------------------- config


@pytest.mark.parametrize("strategy", ["random", "block", "sbam", "sbam_amr"])
def test_strategies_without_a_whole_image_score_are_refused(strategy):
    with pytest.raises(ConfigError, match="supports gpa, idm, ccmim") as e:
        load_config([f"masking.strategy={strategy}", f"{CACHE}=5"])
    assert "\n" not in str(e.value)


def test_a_cacheable_strategy_scored_from_the_input_is_refused():
    with pytest.raises(ConfigError, match="score cache"):
        load_config(["masking.strategy=ccmim", "masking.score_source=input", f"{CACHE}=5"])


# ---------------------------------------------------------------------- warp geometry


def test_warp_of_the_whole_image_is_the_identity_and_a_flip_mirrors():
    maps = torch.randn(2, 3, 4, 6).half()
    boxes = torch.tensor([[0.0, 0.0, 60.0, 40.0]] * 2)
    sizes = torch.tensor([[40, 60]] * 2)
    out = warp(maps, boxes, sizes, torch.tensor([False, True]), (4, 6))
    assert torch.equal(out[0], maps[0].float().flatten(1))
    assert torch.equal(out[1], maps[1].float().flip(-1).flatten(1))


def test_warp_samples_a_crop_at_its_patch_centres():
    """A map linear in the cell coordinates is reproduced exactly by RoIAlign's bilinear
    sampling: each view patch gets the map's value at that patch's centre in the original."""
    gh, gw, h, w = 8, 8, 64, 96
    ys, xs = torch.meshgrid(torch.arange(gh) + 0.5, torch.arange(gw) + 0.5, indexing="ij")
    maps = (2 * xs + 3 * ys)[None, None]  # cell centres at i + 0.5
    box = torch.tensor([[24.0, 16.0, 72.0, 48.0]])  # inside the outer cell centres
    out = warp(maps, box, torch.tensor([[h, w]]), torch.tensor([False]), (4, 4)).view(4, 4)
    x0, y0, x1, y1 = box[0].tolist()
    cx = (x0 + (torch.arange(4) + 0.5) * (x1 - x0) / 4) * gw / w
    cy = (y0 + (torch.arange(4) + 0.5) * (y1 - y0) / 4) * gh / h
    torch.testing.assert_close(out, 2 * cx[None, :] + 3 * cy[:, None])


def _views(n: int, size: int):
    """Synthetic images as (random MAE crop, its geometry, the whole image resized)."""
    rng, crops, fulls, boxes, flips, sizes = random.Random(0), [], [], [], [], []
    for i in range(n):
        image = sample_at(0, i, 64).image
        data, shape = image.tobytes(), image.shape[:2]
        view = decode_views(data, (ViewSpec(size),), rng, shape)
        fulls.append(decode_views(data, (ViewSpec(size, crop="full", flip_p=0.0),), rng, shape).images[0])
        crops.append(view.images[0])
        boxes.append(view.boxes[0])
        flips.append(view.flips[0])
        sizes.append(view.original_size)
    return (normalize_uint8(crops), torch.tensor(boxes), torch.tensor(flips), torch.tensor(sizes),
            normalize_uint8(fulls))


def _overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """Mean fraction of shared indices between the top-``k`` of ``a`` and of ``b`` (rows)."""
    ta, tb = a.topk(k, -1).indices, b.topk(k, -1).indices
    return float((ta[..., :, None] == tb[..., None, :]).any(-1).float().mean())


@pytest.mark.parametrize("overrides", [
    ["masking.strategy=gpa", "teacher.type=ema", "masking.gpa.head=mean"],
    ["masking.strategy=idm"],
    ["masking.strategy=ccmim"],
])
def test_warped_cache_selects_nearly_the_patches_the_view_itself_scores(overrides):
    """Scores of the crop (what online scoring computes) vs the whole image's maps (fp16) warped
    into the crop, on 48 synthetic images with MAE's crops (area 0.2–1), a tiny ViT at 64 px (8×8
    patches, random weights). The positional table is zeroed: a random network's maps follow the
    patch grid, not the content (the very thing a crop changes), while the cache assumes a score
    that follows the content, as a trained teacher's does. Measured: top-25 % overlap 0.44–0.50
    (chance 0.25; the maps resized without the crop's geometry: 0.31–0.34), masked-set (75 %)
    overlap 0.81–0.83 (chance 0.75)."""
    torch.manual_seed(0)
    cfg = load_config(["model.name=mae_vit_tiny_patch16", "model.img_size=64", "model.patch_size=8",
                       "model.decoder_depth=1", "data.source=synthetic", *overrides])
    method = MIMMethod(cfg).eval()
    for net in (method.student, method.teacher):
        if net is not None:
            net.pos_embed.data.zero_()
    crops, boxes, flips, sizes, fulls = _views(48, 64)
    online = method.score_maps(crops).flatten(2)
    maps = method.score_maps(fulls).half()
    warped = warp(maps, boxes, sizes, flips, (8, 8))
    naive = maps.float().flatten(2)  # the whole image's maps as if the crop were the image
    top, masked = _overlap(online, warped, 16), _overlap(online, warped, 48)
    assert top >= 0.42 and masked >= 0.79, (top, masked)
    assert top > _overlap(online, naive, 16) + 0.08


# ---------------------------------------------------------------------- files


def _cache(folder, every=2, frozen=False, n=10):
    return ScoreCache(folder, every, frozen, {"kind": "test"}, n, (2, 3, 3))


def _reader(n_batches_ok=None):
    """``read_fn``: batches of 4 ids whose "images" are the ids; fails after ``n_batches_ok``."""
    def read(ids):
        for i, start in enumerate(range(0, len(ids), 4)):
            if n_batches_ok is not None and i >= n_batches_ok:
                raise RuntimeError("killed mid-refresh")
            chunk = torch.from_numpy(ids[start:start + 4])
            yield chunk, chunk.float()
    return read


def _score(offset):
    return lambda ids: (ids[:, None, None, None] + offset).expand(-1, 2, 3, 3)


def test_refresh_is_atomic_and_due_every_k_epochs(tmp_path):
    cache = _cache(tmp_path)
    assert cache.ensure(1, _score(0), _reader(), lambda: None)   # epoch 1 reads generation 0
    assert not cache.ensure(1, _score(0), _reader(), lambda: None)
    assert torch.equal(cache.lookup(torch.tensor([7, 2]))[:, 0, 0, 0], torch.tensor([7.0, 2.0]).half())
    # a run killed in the middle of the next refresh leaves the committed cache as it was
    with pytest.raises(RuntimeError, match="killed"):
        _cache(tmp_path).ensure(2, _score(100), _reader(1), lambda: None)
    meta = json.loads((tmp_path / "cache.json").read_text())
    assert [g["epoch"] for g in meta["generations"]] == [0]
    assert not (tmp_path / "e000002-r00000.npy").exists()
    resumed = _cache(tmp_path)
    assert not resumed.ensure(0, _score(0), _reader(), lambda: None)  # reused, not recomputed
    assert resumed.ensure(3, _score(100), _reader(), lambda: None)    # due: generation 2
    assert resumed.lookup(torch.tensor([9]))[0, 1, 2, 2] == 109
    assert not list(tmp_path.glob(".tmp-*"))
    assert resumed.ensure(5, _score(200), _reader(), lambda: None)    # generation 4; 0 is dropped
    assert sorted(p.name for p in tmp_path.glob("e*.npy")) == ["e000002-r00000.npy", "e000004-r00000.npy"]


def test_a_frozen_source_is_scored_once_and_a_changed_cache_is_not_reused(tmp_path):
    cache = _cache(tmp_path, frozen=True)
    assert cache.ensure(0, _score(0), _reader(), lambda: None)
    assert not cache.ensure(40, _score(0), _reader(), lambda: None)
    other = ScoreCache(tmp_path, 2, True, {"kind": "other"}, 10, (2, 3, 3))
    assert other.ensure(0, _score(5), _reader(), lambda: None)


def _two_ranks(rank, world, out_dir, data_dir):
    Trainer(load_config(tiny_overrides(out_dir, data_dir) + [
        "masking.strategy=gpa", "teacher.type=ema", "masking.gpa.head=mean", f"{CACHE}=1",
        "schedule.max_steps=1", "data.batch_size=4"])).fit()


@pytest.mark.slow
def test_two_ranks_each_write_their_shard_of_the_same_maps(tmp_path):
    """Two gloo ranks: each scores its half of the ids into its own file, rank 0 commits the
    index; the files hold the maps a single process computes with the same weights."""
    out, data = tmp_path / "run", tmp_path / "data"
    spawn(_two_ranks, 2, out, data)
    folder = out / "score_cache"
    meta = json.loads((folder / "cache.json").read_text())
    assert meta["generations"][0]["shards"] == [["e000000-r00000.npy", 0, 24], ["e000000-r00001.npy", 24, 48]]
    assert not list(folder.glob(".tmp-*"))
    cfg = load_config(tiny_overrides(out, data) + [
        "masking.strategy=gpa", "teacher.type=ema", "masking.gpa.head=mean", f"{CACHE}=1"])
    seed_everything(cfg.engine.seed)
    method = MIMMethod(cfg).eval()
    ids, images = zip(*full_view_reader(build_source(cfg.data), 32, 48, 0, torch.device("cpu"))(np.arange(48)))
    expect = method.score_maps(torch.cat(images)).half()
    files = np.concatenate([np.load(folder / f"e000000-r0000{r}.npy") for r in (0, 1)])
    assert torch.equal(torch.cat(ids), torch.arange(48))
    torch.testing.assert_close(torch.from_numpy(files).float(), expect.float(), rtol=2e-3, atol=1e-3)


# ---------------------------------------------------------------------- training


@pytest.mark.slow
def test_resume_with_a_cache_equals_no_interruption(tiny_config, tmp_path):
    """EMA teacher, refreshed every epoch (6 steps): a run resumed at step 3 beside the run's cache
    reuses both generations (no pass) and loses exactly what the uninterrupted run lost."""
    extra = ["masking.strategy=gpa", "teacher.type=ema", "masking.gpa.head=mean", f"{CACHE}=1",
             "schedule.max_steps=7", "output.checkpoint_every=3", "output.keep_last=null"]
    full = Trainer(tiny_config(*extra)).fit()
    assert (full.run_dir / "score_cache" / "e000001-r00000.npy").exists()
    losses = dict(full.losses)
    resumed = tmp_path / "resumed"
    shutil.copytree(full.run_dir / "checkpoints" / "step_00000003", resumed / "checkpoints" / "step_00000003")
    shutil.copytree(full.run_dir / "score_cache", resumed / "score_cache")
    trainer = Trainer(tiny_config(*extra, f"output.dir={resumed}", "resume=auto"))
    second = trainer.fit()
    assert trainer.score_cache.refreshes == 0
    assert [s for s, _ in second.losses] == list(range(4, 8))
    for step, loss in second.losses:
        assert loss == pytest.approx(losses[step], rel=0, abs=1e-6)


def test_flops_count_one_scoring_pass_per_k_epochs(tiny_config):
    online = step_flops(tiny_config("masking.strategy=gpa", "teacher.type=ema"))
    cached = step_flops(tiny_config("masking.strategy=gpa", "teacher.type=ema", f"{CACHE}=4"))
    assert "scoring" not in cached.parts
    assert cached.parts["score_cache_refresh"].forward == pytest.approx(online.parts["scoring"].forward / 4)
    assert cached.per_image == pytest.approx(online.per_image - 0.75 * online.parts["scoring"].forward)


def test_the_refresh_reads_every_id_once_whatever_the_workers(tmp_path):
    from mimscale.data_pipeline.sources.imagefolder import ImageFolderSource
    from mimscale.data_pipeline.synthetic import ensure_imagefolder

    source = ImageFolderSource(ensure_imagefolder(tmp_path, 10, size=24))
    runs = [list(full_view_reader(source, 16, 4, w, torch.device("cpu"))(np.arange(2, 9))) for w in (0, 2)]
    (ids0, images0), (ids2, images2) = [(torch.cat([i for i, _ in r]), torch.cat([x for _, x in r])) for r in runs]
    assert ids0.tolist() == list(range(2, 9)) and sorted(ids2.tolist()) == ids0.tolist()
    assert torch.equal(images2[ids2.argsort()], images0) and images0.shape == (7, 3, 16, 16)
