"""The fine-tuning loop under a real 2-process gloo group: data split without overlap, gradients
synchronised (identical weights on both ranks), evaluation gathered from both."""

import dense_support
import torch

from mimscale.downstream.dense.runner import EpochShardSampler

synthetic_ade = dense_support.synthetic_ade


def test_epoch_shard_sampler_splits_pads_and_resumes():
    a = EpochShardSampler(10, batch=2, rank=0, world=2, seed=3)
    b = EpochShardSampler(10, batch=2, rank=1, world=2, seed=3)
    assert a.iters_per_epoch == 3
    ia, ib = list(a), list(b)
    assert len(ia) == len(ib) == 6 and set(ia + ib) == set(range(10))  # 12 slots: 2 repeats
    assert len(set(ia) & set(ib)) <= 2
    a.set_position(epoch=0, start_batch=2)
    assert list(a) == ia[4:]  # resume inside an epoch: exactly the remaining batches
    a.set_position(epoch=1, start_batch=0)
    assert list(a) != ia  # a new permutation each epoch


def _rank(rank, world, root, out):
    import torch.distributed as dist

    from mimscale.downstream.segment import load_segment_config, run_segment

    cfg = load_segment_config([
        "backbone.name=mae_vit_tiny_patch16", "backbone.patch_size=8", "backbone.pretrain_img_size=32",
        "backbone.drop_path=0.1", "model.channels=16", "model.aux_channels=8", "model.pool_scales=[1,2]",
        f"data.root={root}", "data.num_classes=7", "data.crop_size=32", "data.scale=[64,32]",
        "data.test_stride=32", "data.batch_size=2", "data.val_limit=6", "schedule.iters=3",
        "schedule.warmup_iters=1", "engine.device=cpu", "engine.precision=fp32", "engine.num_workers=0",
        "output.log_every=1", "output.progress=off", f"output.dir={out}"])
    summary = run_segment(cfg)
    digest = torch.cat([p.detach().flatten() for p in summary.model.parameters()]).double().sum().item()
    digests = [None] * world
    dist.all_gather_object(digests, digest)
    assert digests[0] == digests[1], digests
    if rank == 0:
        assert summary.metrics["pixels"] == 6 * 64 * 64  # both ranks' images are in the confusion matrix
    else:
        assert summary.metrics is None


def test_segment_under_two_ranks_keeps_replicas_identical(synthetic_ade, tmp_path):
    from distributed_utils import spawn

    spawn(_rank, 2, str(synthetic_ade), str(tmp_path / "run"), timeout=240)
    assert (tmp_path / "run" / "eval.json").is_file()
    assert (tmp_path / "run" / "checkpoints" / "step_00000003" / "COMPLETE").is_file()
