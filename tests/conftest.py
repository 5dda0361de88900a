"""Shared fixtures: a tiny, CPU-sized pretraining config on generated images."""

import os

import pytest
import torch

from mimscale.config import load_config

torch.set_num_threads(2)
# every process a test starts (spawned ranks, torchrun, the CLI) prints its Python threads' stacks
# if it dies of a signal (SIGABRT, SIGSEGV): pytest's own faulthandler covers only this process
os.environ.setdefault("PYTHONFAULTHANDLER", "1")


@pytest.fixture
def tiny_overrides(tmp_path, monkeypatch):
    """Overrides for a pretraining run of a few seconds; data is generated into a per-test cache."""
    monkeypatch.setenv("MIMSCALE_CACHE", str(tmp_path / "cache"))
    return [
        "model.name=mae_vit_tiny_patch16", "model.img_size=32", "model.patch_size=8",
        "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2",
        "data.source=synthetic", "data.synthetic_images=48", "data.synthetic_size=40",
        "data.batch_size=8", "data.num_workers=0", "optim.blr=1e-3", "schedule.warmup_steps=2",
        "engine.precision=fp32", "logging.log_every=1", "logging.image_every=0", "logging.progress=off",
        f"output.dir={tmp_path / 'run'}",
    ]


@pytest.fixture
def tiny_config(tiny_overrides):
    def make(*extra):
        return load_config(tiny_overrides + list(extra))
    return make
