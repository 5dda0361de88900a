"""Pretraining loader: shapes, determinism, exact mid-epoch resume, sharding, corrupt files."""

import itertools

import pytest
import torch

from mimscale.data_pipeline.loader import EpochSampler, PretrainLoader, build_pretrain_loader
from mimscale.data_pipeline.sources.imagefolder import ImageFolderSource
from mimscale.data_pipeline.synthetic import write_imagefolder
from mimscale.data_pipeline.transforms import denormalize, eval_transform, mae_train_transform

N, SIZE, IMG = 30, 32, 24


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("syn"), N, size=SIZE, seed=0)


def _take(loader, k):
    return list(itertools.islice(iter(loader), k))


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["epoch"] == y["epoch"]
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["labels"], y["labels"])
        assert torch.equal(x["images"], y["images"])


def test_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFolderSource(tmp_path / "nope")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="empty"):
        ImageFolderSource(tmp_path / "empty")


def test_batches_and_transforms(root):
    loader = build_pretrain_loader(root, IMG, batch_size=4, seed=0, num_workers=0)
    assert loader.steps_per_epoch == N // 4
    b = next(iter(loader))
    assert b["images"].shape == (4, 3, IMG, IMG) and b["images"].dtype == torch.float32
    assert b["labels"].dtype == torch.long and b["index"].dtype == torch.long
    assert b["epoch"] == 0 and loader.state_dict() == {"epoch": 0, "batch_in_epoch": 1, "seed": 0}
    img, _ = ImageFolderSource(root)[0]
    x = eval_transform(IMG)(img)
    assert x.shape == (3, IMG, IMG)
    y = denormalize(x)
    assert y.min() >= 0 and y.max() <= 1


def test_global_rng_untouched(root):
    loader = build_pretrain_loader(root, IMG, batch_size=4, seed=0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _take(loader, 2)
    assert torch.equal(torch.rand(3), expected)


def test_same_seed_same_batches_and_workers_agree(root):
    a = _take(build_pretrain_loader(root, IMG, 4, seed=5, num_workers=0), 4)
    b = _take(build_pretrain_loader(root, IMG, 4, seed=5, num_workers=2), 4)
    _assert_same(a, b)
    c = _take(build_pretrain_loader(root, IMG, 4, seed=6), 1)
    assert not torch.equal(a[0]["index"], c[0]["index"])


@pytest.mark.parametrize("workers,k", [(0, 3), (0, 9), (2, 5)])
def test_resume_exact(root, workers, k):
    """k=9 with 7 steps/epoch crosses an epoch boundary before the checkpoint; k=5 after it."""
    a = build_pretrain_loader(root, IMG, 4, seed=1, num_workers=workers)
    it = iter(a)
    for _ in range(k):
        next(it)
    sd = a.state_dict()
    assert sd == {"epoch": k // 7, "batch_in_epoch": k % 7, "seed": 1}
    expected = [next(it) for _ in range(5)]
    b = build_pretrain_loader(root, IMG, 4, seed=1, num_workers=workers)
    b.load_state_dict(sd)
    _assert_same(_take(b, 5), expected)


def test_load_state_restarts_live_iterator(root):
    a = build_pretrain_loader(root, IMG, 4, seed=2)
    first = _take(a, 2)
    it = iter(a)
    next(it)
    a.load_state_dict({"epoch": 0, "batch_in_epoch": 0, "seed": 2})
    _assert_same([next(it), next(it)], first)


def test_epoch_coverage_and_sharding():
    s = EpochSampler(10, seed=0)
    for e in range(3):
        assert sorted(s.indices(e).tolist()) == list(range(10))
    assert not torch.equal(s.indices(0), s.indices(1))
    s.set_epoch(1, start=4)
    assert list(s) == s.indices(1)[4:].tolist() and len(s) == 6
    for e in range(3):
        r0, r1 = (set(EpochSampler(11, 0, r, 2).indices(e).tolist()) for r in (0, 1))
        assert len(r0) == len(r1) == 5 and not r0 & r1


def test_loader_epoch_covers_every_index(root):
    loader = build_pretrain_loader(root, IMG, batch_size=5, seed=3)  # 30 = 6 full batches
    batches = _take(loader, 12)
    for e in range(2):
        idx = torch.cat([b["index"] for b in batches if b["epoch"] == e]).tolist()
        assert sorted(idx) == list(range(N))
    ranks = [_take(build_pretrain_loader(root, IMG, 5, seed=3, rank=r, world_size=2), 3)
             for r in (0, 1)]
    sets = [set(torch.cat([b["index"] for b in bs]).tolist()) for bs in ranks]
    assert len(sets[0]) == len(sets[1]) == 15 and not sets[0] & sets[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_skipped(tmp_path, workers):
    root = write_imagefolder(tmp_path, 12, size=SIZE, seed=0)
    src = ImageFolderSource(root)
    bad = 3
    with open(src.path(bad), "wb") as f:
        f.write(b"definitely not a png" * 10)
    loader = PretrainLoader(src, mae_train_transform(IMG), batch_size=12, seed=0,
                            num_workers=workers)
    if workers:  # the warning is raised inside a worker process
        batch = next(iter(loader))
    else:
        with pytest.warns(UserWarning, match=src.path(bad).split("/")[-1]):
            batch = next(iter(loader))
    assert loader.stats["bad_samples"] == 1
    idx = batch["index"].tolist()
    assert bad not in idx and idx.count((bad + 1) % 12) == 2  # replaced by the next index
