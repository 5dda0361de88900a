"""Shared by the dense-prediction tests: a briefly pretrained tiny checkpoint, generated COCO and
ADE20K folders."""

from __future__ import annotations

import pytest
from extras import need

TINY_PRETRAIN = [
    "model.name=mae_vit_tiny_patch16", "model.img_size=32", "model.patch_size=8",
    "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2",
    "data.source=synthetic", "data.synthetic_images=48", "data.synthetic_size=40",
    "data.batch_size=8", "data.num_workers=0", "optim.blr=1e-3", "schedule.warmup_steps=2",
    "schedule.max_steps=10", "engine.precision=fp32", "engine.threads=1", "logging.log_every=5",
    "logging.image_every=0", "logging.progress=off", "logging.tensorboard=false",
]


@pytest.fixture(scope="session")
def tiny_mae_checkpoint(tmp_path_factory):
    """A mimscale checkpoint folder of a tiny MAE (ViT-Ti, patch 8, 32 px) pretrained 10 steps."""
    from mimscale.cli import main

    root = tmp_path_factory.mktemp("dense_pretrain")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIMSCALE_CACHE", str(root / "cache"))
        assert main(["pretrain", *TINY_PRETRAIN, f"output.dir={root / 'run'}"]) == 0
    return root / "run" / "checkpoints" / "step_00000010"


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory):
    """A generated COCO folder: 128 training images (polygons), 32 held-out (compressed RLE), 64 px."""
    need("pycocotools")  # the held-out split's compressed RLE is encoded with it
    from mimscale.data_pipeline.writers import write_coco

    root = tmp_path_factory.mktemp("coco")
    write_coco(root, "train2017", num_images=128, size=64, seed=1)
    write_coco(root, "val2017", num_images=32, size=64, seed=2, mask_format="compressed_rle")
    return root


@pytest.fixture(scope="session")
def synthetic_ade(tmp_path_factory):
    """A generated ADE20K folder: 96 training and 24 held-out images, 64 px, 7 classes."""
    from mimscale.data_pipeline.writers import write_ade20k

    root = tmp_path_factory.mktemp("ade")
    write_ade20k(root, "training", num_images=96, size=64, seed=3)
    write_ade20k(root, "validation", num_images=24, size=64, seed=4)
    return root
