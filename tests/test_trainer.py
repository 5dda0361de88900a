"""The train loop: schedule, parameter groups, exact resume, outputs of a run."""

import math
import shutil
import time

import pytest
import timm
import torch

from mimscale.config import from_dict
from mimscale.pretrain.engine.checkpoint import load_checkpoint
from mimscale.pretrain.engine.data_wait import DataWait
from mimscale.pretrain.engine.logger import read_metrics
from mimscale.pretrain.engine.optim import param_groups
from mimscale.pretrain.engine.schedule import cosine_lr, scaled_lr
from mimscale.pretrain.engine.trainer import Trainer
from mimscale.pretrain.method import build_model
from mimscale.pretrain.models import build_mae, to_timm_state_dict


def test_cosine_schedule_matches_formula():
    base, total, warm, floor = 1e-3, 100, 10, 1e-5
    assert cosine_lr(0, base, total, warm, floor) == 0.0
    assert cosine_lr(5, base, total, warm, floor) == pytest.approx(base * 0.5)
    assert cosine_lr(10, base, total, warm, floor) == pytest.approx(base)
    for s in (10, 37, 55, 99, 100):
        want = floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
        assert cosine_lr(s, base, total, warm, floor) == pytest.approx(want)
    assert cosine_lr(100, base, total, warm, floor) == pytest.approx(floor)
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)


def test_param_groups_follow_mae():
    model = build_mae("mae_vit_tiny_patch16", img_size=32, decoder_depth=1)
    no_decay, decay = param_groups(model, 0.05)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert {"cls_token", "mask_token", "norm.weight", "blocks.0.attn.qkv.bias"} <= nd
    assert {"blocks.0.attn.qkv.weight", "decoder_pred.weight", "patch_embed.proj.weight"} <= d
    assert all(n.endswith((".bias", "_token")) or "norm" in n for n in nd)
    assert "pos_embed" not in nd | d and "decoder_pos_embed" not in nd | d  # fixed, not optimised


def test_run_writes_everything(tiny_config, tmp_path):
    cfg = tiny_config("schedule.max_steps=4", "output.checkpoint_every=2", "logging.image_every=2",
                      "engine.precision=bf16")
    summary = Trainer(cfg).fit()
    run = tmp_path / "run"
    assert summary.steps == 4 and summary.checkpoint == run / "checkpoints" / "step_00000004"
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert math.isfinite(r["loss"]) and r["images_per_s"] > 0 and r["mask_time_ms"] >= 0
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run / "figures").iterdir()) == ["recon_step_00000002.png", "recon_step_00000004.png"]
    assert from_dict(load_checkpoint(summary.checkpoint)["config"]) == cfg
    assert (run / "config.yaml").read_text() == (summary.checkpoint / "config.yaml").read_text()

    state = load_checkpoint(summary.checkpoint)
    assert {"model", "optimizer", "step", "data", "rng", "config"} <= set(state)
    assert state["data"]["batch_in_epoch"] == 4
    # at step 2 the batch of step 3 was already fetched: the checkpoint records what was consumed
    assert load_checkpoint(run / "checkpoints" / "step_00000002")["data"]["batch_in_epoch"] == 2
    model = build_model(cfg)
    model.load_state_dict(state["model"], strict=True)  # official MAE layout
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8)
    vit.load_state_dict(to_timm_state_dict(model), strict=True)


class _SlowBatches:
    """The trainer's data with every batch delayed: a loader slower than the model."""

    def __init__(self, data, delay: float):
        self.data, self.delay = data, delay

    def __iter__(self):
        for batch in self.data:
            time.sleep(self.delay)
            yield batch

    def __getattr__(self, name):
        return getattr(self.data, name)


def test_data_wait_counts_blocked_fetches_per_step():
    wait = DataWait()
    items = list(wait.iterate(_SlowBatches([1, 2, 3], 0.05)))
    assert items == [1, 2, 3] and wait.seconds >= 0.15
    for _ in range(3):
        wait.step()
    assert 50 <= wait.flush_ms() < 50 + 200  # the mean over the window's three steps
    assert wait.flush_ms() == 0 and wait.steps == 0  # a new window


def test_data_wait_is_logged(tiny_config, tmp_path):
    """``data_wait_ms`` is the time a step spent fetching batches (the next step's batch is fetched
    during this one, behind its backward pass): a slow loader shows, every batch counted once."""
    fast = Trainer(tiny_config("schedule.max_steps=4", "output.dir=" + str(tmp_path / "fast")))
    fast.fit()
    slow = Trainer(tiny_config("schedule.max_steps=4", "output.dir=" + str(tmp_path / "slow")))
    slow.data = _SlowBatches(slow.data, 0.25)
    slow.fit()
    waits = {name: [r["data_wait_ms"] for r in read_metrics(tmp_path / name / "metrics.jsonl")]
             for name in ("fast", "slow")}
    assert len(waits["slow"]) == 4 and sum(waits["slow"]) >= 4 * 250, waits
    assert sum(waits["fast"]) < 4 * 250 / 2, waits


@pytest.mark.parametrize("stage", ["main", "thread"])
def test_a_batch_fetched_ahead_is_put_back(tiny_config, stage):
    """The loop's one-ahead reader: the position counts consumed batches only, and closing it makes
    the fetched-ahead batch the loader's next one (also when a staging thread prepared more)."""
    from mimscale.pretrain.engine.trainer import _OneAhead

    data = Trainer(tiny_config("schedule.max_steps=4", f"data.stage={stage}")).data
    ahead, wait = _OneAhead(data), DataWait()
    first = ahead.next(wait)
    ahead.fetch(wait)
    fetched = ahead.ahead[0]
    assert ahead.position["batch_in_epoch"] == 1 and data.state_dict()["batch_in_epoch"] == 2
    ahead.close()
    assert data.state_dict()["batch_in_epoch"] == 1
    again = next(iter(data))
    assert torch.equal(again["index"], fetched["index"]) and torch.equal(again["images"], fetched["images"])
    assert not torch.equal(again["index"], first["index"])


@pytest.mark.parametrize("stage", ["main", "thread"])
def test_resume_equals_uninterrupted(tiny_config, tmp_path, stage):
    """Stop after a checkpoint, resume=auto: the remaining losses and final weights are identical
    (with the batches put on the device in the training thread, and in a staging thread)."""
    full = Trainer(tiny_config("schedule.max_steps=8", "output.checkpoint_every=3", "output.keep_last=null",
                               "optim.clip_grad=1.0", f"data.stage={stage}")).fit()
    losses = dict(full.losses)
    final = load_checkpoint(full.checkpoint)["model"]

    # A second run whose process "died" right after its step-6 checkpoint (8 steps per epoch of 48
    # images at batch 8 = 6 steps, so the resume also crosses an epoch boundary).
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(full.run_dir / "checkpoints" / "step_00000006", resumed_dir / "checkpoints" / "step_00000006")
    cfg = tiny_config("schedule.max_steps=8", "output.checkpoint_every=3", "optim.clip_grad=1.0",
                      f"output.dir={resumed_dir}", "resume=auto", f"data.stage={stage}")
    trainer = Trainer(cfg)
    assert trainer.step == 6
    second = trainer.fit()
    assert [s for s, _ in second.losses] == [7, 8]
    for step, loss in second.losses:
        assert loss == pytest.approx(losses[step], rel=0, abs=1e-6)
    for k, v in load_checkpoint(second.checkpoint)["model"].items():
        torch.testing.assert_close(v, final[k], rtol=0, atol=1e-6)


def test_gradient_accumulation_and_effective_batch(tiny_config):
    trainer = Trainer(tiny_config("schedule.max_steps=2", "optim.accum_steps=2", "data.batch_size=4"))
    assert trainer.effective_batch == 8 and trainer.lr == pytest.approx(1e-3 * 8 / 256)
    assert trainer.steps_per_epoch == 6  # 12 micro-batches of 4 per epoch
    summary = trainer.fit()
    assert summary.steps == 2 and trainer.data.state_dict()["batch_in_epoch"] == 4
