"""The low-resolution phase (``schedule.resolution``): the model at other sizes than it was built
for (position tables resampled), the loader's views following the epoch's size, a training run that
switches at an epoch boundary, and resume across the switch."""

import itertools
import shutil

import pytest
import torch

from mimscale.config import ConfigError, load_config
from mimscale.data_pipeline.views import mae_views, size_at, views_at
from mimscale.pretrain.engine.checkpoint import load_checkpoint, read_state
from mimscale.pretrain.engine.flops import step_flops
from mimscale.pretrain.engine.logger import read_metrics
from mimscale.pretrain.engine.trainer import Trainer
from mimscale.pretrain.models import build_mae
from mimscale.pretrain.models.vit import get_2d_sincos_pos_embed, resample_positions


def test_model_runs_at_two_resolutions():
    """Built for 32 px (4x4 patches of 8), run at 16 (2x2) and 48 (6x6): every shape follows the
    input's grid, and at the built size the position table is used as it is."""
    model = build_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=2, decoder_embed_dim=32,
                      decoder_depth=1, decoder_num_heads=2).eval()
    g = torch.Generator().manual_seed(0)
    for size, grid in [(32, 4), (16, 2), (48, 6)]:
        images = torch.randn(3, 3, size, size, generator=g)
        n = grid * grid
        mask = torch.rand(3, n, generator=g).argsort(1) < n // 2  # half hidden
        out = model(images, mask, visible=n - n // 2)
        assert out.pred.shape == (3, n, 8 * 8 * 3) and out.latent.shape == (3, 1 + n - n // 2, 192)
        assert torch.isfinite(out.loss) and model.token_grid(n) == (grid, grid)
        assert model.unpatchify(model.patchify(images)).equal(images)
    rows = model.pos_embed[:, 1:]
    assert resample_positions(rows, (4, 4), (4, 4)) is rows
    # packed ragged batches (engine.varlen) at the smaller grid: the same latent as padded slots
    images, uneven = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([[True, False, False, False],
                                                                            [True, True, True, False]])
    padded = model.encode(images, uneven).latent
    model.varlen = "nested"
    packed = model.encode(images, uneven).latent
    model.varlen = "padded"
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[1, :2], padded[1, :2], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        model(torch.randn(1, 3, 20, 20), torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be a bool tensor \\[B, 4\\] for images of \\(16, 16\\)"):
        model(torch.randn(1, 3, 16, 16), torch.zeros(1, 16, dtype=torch.bool))


def test_resampled_positions_are_the_table_at_the_new_grid_up_to_interpolation():
    """A sin-cos table shrunk from 14x14 to 10x10 keeps each row's relative place: it is close to the
    table's own values at those fractional positions, and far from a table of other positions."""
    dim = 64
    table = torch.from_numpy(get_2d_sincos_pos_embed(dim, 14)).float()[None]
    small = resample_positions(table, (14, 14), (10, 10))
    assert small.shape == (1, 100, dim)
    corner = small[0, 0]  # the top-left patch of the small grid covers the top-left of the large one
    nearest = (table[0] - corner).norm(dim=1).argmin()
    assert int(nearest) in (0, 1, 14, 15)


def test_views_follow_the_epoch_size():
    phases = [(0, 16), (2, 32)]
    assert [size_at(phases, e, 64) for e in range(4)] == [16, 16, 32, 32]
    assert size_at([], 5, 64) == 64
    specs = mae_views(64)
    assert views_at(specs, phases, 1)[0].size == 16 and views_at(specs, phases, 3)[0].size == 32
    assert views_at(specs, [], 3) is specs or views_at(specs, [], 3) == tuple(specs)


@pytest.mark.parametrize("value, error", [
    ("[[1, 16], [2, 32]]", "the first phase must start at epoch 0"),
    ("[[0, 16], [3, 24], [3, 32]]", "epochs must be strictly ascending"),
    ("[[0, 20]]", "size 20 \\(from epoch 0\\) must be a positive multiple of the patch size 8"),
])
def test_resolution_schedule_is_validated(tiny_overrides, value, error):
    with pytest.raises(ConfigError, match=error):
        load_config([*tiny_overrides, f"schedule.resolution={value}"])


def test_flops_follow_the_size(tiny_config):
    """At a phase's size the count is that of a model built for that size (a 32 px model at 16 px)."""
    low, full = step_flops(tiny_config(), img_size=16), step_flops(tiny_config())
    assert low.per_image == step_flops(tiny_config("model.img_size=16")).per_image < full.per_image / 2


# --------------------------------------------------------------------------- training

SWITCH = ["schedule.resolution=[[0, 16], [1, 32]]", "schedule.max_steps=8", "output.checkpoint_every=4",
          "output.keep_last=null", "optim.clip_grad=1.0"]


def _record_sizes(monkeypatch) -> list:
    """Spy: (epoch, image shape) of every batch the trainer trains on (cleared on each use)."""
    seen, real = [], Trainer._micro_step

    def spy(self, batch, generator, sync):
        seen.append((batch["epoch"], tuple(batch["images"].shape)))
        return real(self, batch, generator, sync)

    monkeypatch.setattr(Trainer, "_micro_step", spy)
    return seen


def test_size_switches_at_the_epoch_boundary_and_resumes_across_it(tiny_config, tmp_path, monkeypatch):
    """48 images at batch 8: 6 steps per epoch at 16 px, then 32 px; the log, the FLOPs and the
    checkpoints follow. From the step-4 checkpoint (epoch 0, 16 px) a resumed run trains epoch 0's
    last batches at 16 px and epoch 1 at 32 px, with the losses and weights of the run that never
    stopped."""
    seen = _record_sizes(monkeypatch)
    full = Trainer(tiny_config(*SWITCH)).fit()
    assert seen == [(0, (8, 3, 16, 16))] * 6 + [(1, (8, 3, 32, 32))] * 2
    rows = read_metrics(full.metrics)
    assert [r["img_size"] for r in rows] == [16] * 6 + [32] * 2
    for r in rows:
        per_image = step_flops(tiny_config(*SWITCH), img_size=r["img_size"]).per_image
        assert r["tflops_per_s"] == pytest.approx(per_image * r["images_per_s"] / 1e12, rel=1e-9)
    assert read_state(full.checkpoint)["img_size"] == 32
    assert read_state(full.run_dir / "checkpoints" / "step_00000004")["img_size"] == 16

    losses, final = dict(full.losses), load_checkpoint(full.checkpoint)["model"]
    resumed = tmp_path / "resumed"
    shutil.copytree(full.run_dir / "checkpoints" / "step_00000004", resumed / "checkpoints" / "step_00000004")
    seen.clear()
    trainer = Trainer(tiny_config(*SWITCH, f"output.dir={resumed}", "resume=auto"))
    assert trainer.step == 4
    second = trainer.fit()
    assert seen == [(0, (8, 3, 16, 16))] * 2 + [(1, (8, 3, 32, 32))] * 2
    assert [s for s, _ in second.losses] == [5, 6, 7, 8]
    for step, loss in second.losses:
        assert loss == pytest.approx(losses[step], rel=0, abs=1e-6)
    for k, v in load_checkpoint(second.checkpoint)["model"].items():
        torch.testing.assert_close(v, final[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_loader_views_follow_the_phase_in_workers_and_on_the_device(tmp_path, decode):
    """JPEG and PNG samples (the device path and the worker's), two workers: epoch 0 at 16 px,
    epoch 1 at 32."""
    from test_data_sources import write_tar
    from test_gpu_decode import _encode

    from mimscale.data_pipeline.loader import PretrainLoader
    from mimscale.data_pipeline.sources.wds import TarShardSource
    from mimscale.data_pipeline.synthetic import sample_at

    members = []
    for i in range(8):
        image = sample_at(0, i, size=48).image
        data = _encode(image, "PNG") if i % 3 == 0 else _encode(image, quality=90)
        members.append((f"s{i}", {"png" if i % 3 == 0 else "jpg": data}))
    loader = PretrainLoader(TarShardSource(write_tar(tmp_path / "mixed.tar", members)), mae_views(32), batch_size=4,
                            num_workers=2, decode=decode, resolution=[(0, 16), (1, 32)])
    shapes = [(b["epoch"], tuple(b["images"].shape)) for b in itertools.islice(iter(loader), 4)]
    assert shapes == [(0, (4, 3, 16, 16))] * 2 + [(1, (4, 3, 32, 32))] * 2
