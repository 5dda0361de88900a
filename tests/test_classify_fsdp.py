"""``engine.backend=fsdp`` for fine-tuning and the linear probe, on 2 real gloo ranks, against the
same runs under ddp.

Both backends see the same data, augmentation and drop-path draws, so in fp32 they differ only in
the order of floating-point sums (a reduce-scatter of two partial gradients vs DDP's all-reduce):
per-step losses agree to 1e-5 and the evaluations (every sample once; here the ranks' evaluation
shares differ in length, so the sharded forwards need the padding) give the same counts. Attention
key biases are left out of the weight comparison: their true gradient is zero, so Adam turns
rounding noise into lr-sized steps (see test_distributed_backends.py).
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed_utils import one_thread, spawn  # noqa: F401  (one_thread: autouse fixture)

from mimscale.cli import main
from mimscale.downstream.classify import read_weights
from mimscale.downstream.classify.config import FinetuneConfig, LinprobeConfig, load_classify_config
from mimscale.downstream.classify.finetune import run_finetune
from mimscale.pretrain.engine.backend import leave_process_group
from mimscale.pretrain.engine.checkpoint import read_state
from mimscale.pretrain.models import build_mae, to_timm_state_dict

pytestmark = pytest.mark.slow
TOL = 1e-5
DATA = ["data.dataset=synthetic", "data.synthetic_images=16", "data.synthetic_val_images=9",
        "data.num_workers=0", "engine.device=cpu", "engine.precision=fp32", "output.progress=off",
        "output.tensorboard=false", "output.log_every=1", "output.keep_last=null"]
# 8 images per rank, 2 per micro-step, 2 micro-steps per step: 2 steps per epoch, a checkpoint
# per epoch; 9 evaluation images: 5 on rank 0 (3 batches), 4 on rank 1 (2 batches + 1 padded)
FINETUNE = ["data.batch_size=2", "optim.accum_steps=2", "schedule.epochs=2", "schedule.warmup_epochs=0.5",
            "optim.lr=1e-3", "optim.clip_grad=1.0", "eval.robustness=true"]
LINPROBE = ["data.batch_size=4", "schedule.epochs=2", "schedule.warmup_epochs=0.5", "optim.lr=0.1"]


def _job(rank, world, checkpoint, root):
    from mimscale.downstream.classify.linprobe import run_linprobe

    root = Path(root)
    os.environ["MIMSCALE_CACHE"] = str(root / "cache")
    ft = [f"checkpoint={checkpoint}", *DATA, *FINETUNE]
    for backend in ("ddp", "fsdp"):
        run_finetune(load_classify_config(FinetuneConfig, [*ft, f"engine.backend={backend}",
                                                           f"output.dir={root / backend}"]))
    # stopped after epoch 1: a fresh folder with only that checkpoint, continued with resume=auto
    if rank == 0:
        step = "checkpoints/step_00000002"
        shutil.copytree(root / "fsdp" / step, root / "resumed" / step)
    dist.barrier()
    run_finetune(load_classify_config(FinetuneConfig, [*ft, "engine.backend=fsdp", "resume=auto",
                                                       f"output.dir={root / 'resumed'}"]))
    for backend in ("ddp", "fsdp"):
        run_linprobe(load_classify_config(LinprobeConfig, [
            f"checkpoint={checkpoint}", *DATA, *LINPROBE, f"engine.backend={backend}",
            f"output.dir={root / f'lp_{backend}'}"]))


def _losses(run: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x["loss"] for x in lines if "loss" in x}


def _results(run: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text())["metrics"] for p in sorted((run / "results").glob("*.json"))}


def assert_final_weights_close(reference: Path, run: Path) -> None:
    """The final weights of ``run`` equal ``reference``'s within TOL (attention key biases left
    out: see tests/test_distributed_backends.py)."""
    a, b = _final(reference)["model"], _final(run)["model"]
    assert a.keys() == b.keys()
    for key in a:
        if not key.endswith("attn.qkv.bias"):
            torch.testing.assert_close(b[key], a[key], atol=TOL, rtol=0, msg=key)


def assert_resumed_as_if_never_stopped(full_run: Path, resumed_run: Path) -> None:
    """Steps 3-4 continued from the step-2 checkpoint equal the uninterrupted run, bit for bit."""
    full, resumed = _losses(full_run), _losses(resumed_run)
    assert sorted(resumed) == [3, 4]
    assert all(resumed[s] == full[s] for s in resumed)  # the same sums in the same order
    a, b = _final(full_run), _final(resumed_run)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [h["eval_top1"] for h in b["history"]] == [h["eval_top1"] for h in a["history"]]
    assert _results(resumed_run) == _results(full_run)


def assert_losses_match(reference: Path, run: Path) -> None:
    """The same four logged steps, each loss equal to the reference run's within ``TOL``."""
    want, got = _losses(reference), _losses(run)
    assert sorted(want) == sorted(got) == [1, 2, 3, 4]
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=TOL), step


def run_on_tiny_vit(root: Path, job) -> Path:
    """``job`` on two ranks, given a tiny timm ViT checkpoint written into ``root``."""
    torch.manual_seed(0)
    checkpoint = root / "vit.pth"
    torch.save(to_timm_state_dict(build_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8,
                                            decoder_depth=1)), checkpoint)
    spawn(job, 2, str(checkpoint), str(root), timeout=400)
    return root


def _final(run: Path, step: int = 4) -> dict:
    return read_state(run / "checkpoints" / f"step_{step:08d}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_on_tiny_vit(tmp_path_factory.mktemp("fsdp"), _job)


def test_fsdp_finetuning_matches_ddp_step_by_step(runs):
    assert_losses_match(runs / "ddp", runs / "fsdp")
    # final evaluation, occlusion and shuffling: same samples, each counted once
    ddp_results, fsdp_results = _results(runs / "ddp"), _results(runs / "fsdp")
    assert set(fsdp_results) == {"synthetic_finetune", "synthetic_finetune+occlude50", "synthetic_finetune+shuffle"}
    assert fsdp_results == ddp_results and fsdp_results["synthetic_finetune"]["n"] == 9
    assert_final_weights_close(runs / "ddp", runs / "fsdp")


def test_fsdp_checkpoints_are_sharded_and_resume_as_if_never_stopped(runs):
    folder = runs / "fsdp" / "checkpoints" / "step_00000002"
    assert (folder / "dcp" / ".metadata").is_file() and _final(runs / "fsdp", 2)["train_state"] == "dcp"
    assert_resumed_as_if_never_stopped(runs / "fsdp", runs / "resumed")


def test_fsdp_export_loads_in_one_process_and_evaluates_alike(runs, tmp_path, monkeypatch):
    final = runs / "fsdp" / "checkpoints" / "step_00000004"
    weights = read_weights(runs / "fsdp")  # the run folder: its newest checkpoint, as full weights
    assert weights.kind == "classifier" and weights.has_head and weights.meta["num_classes"] == 6
    torch.testing.assert_close(weights.state, _final(runs / "fsdp")["model"], atol=0, rtol=0)
    monkeypatch.setenv("MIMSCALE_CACHE", str(runs / "cache"))
    assert main(["finetune", f"checkpoint={final}", "eval_only=true", *DATA, "data.batch_size=2",
                 f"output.dir={tmp_path}"]) == 0
    # the same top-1 / top-5 (the perturbed results draw per rank, so one process draws otherwise)
    assert _results(tmp_path)["synthetic_finetune"] == _results(runs / "fsdp")["synthetic_finetune"]


def test_fsdp_linear_probe_matches_ddp(runs):
    assert_losses_match(runs / "lp_ddp", runs / "lp_fsdp")
    assert _results(runs / "lp_fsdp") == _results(runs / "lp_ddp")


def test_checkpoints_cross_backends_where_they_can(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("MIMSCALE_CACHE", str(runs / "cache"))
    base = [f"checkpoint={runs / 'vit.pth'}", *DATA, *FINETUNE, "eval.robustness=false"]
    # one ddp process continues the 2-rank fsdp run from its shards (at an epoch boundary: 4 steps
    # are 1 epoch here); at its last step it only evaluates what it read back
    sharded = runs / "fsdp" / "checkpoints" / "step_00000004"
    summary = run_finetune(load_classify_config(FinetuneConfig, [
        *base, "schedule.max_steps=4", f"resume={sharded}", f"output.dir={tmp_path / 'a'}"]))
    assert summary.fit.steps == 4
    torch.testing.assert_close(summary.model.state_dict(), _final(runs / "fsdp")["model"], atol=0, rtol=0)
    assert summary.metrics == _results(runs / "fsdp")["synthetic_finetune"]
    # fsdp cannot take over ddp's optimizer state (torch's own, keyed by position)
    was = dist.is_initialized()
    try:
        with pytest.raises(ValueError, match="written by engine.backend=ddp; resume it with ddp"):
            main(["finetune", *base, "engine.backend=fsdp", f"resume={runs / 'ddp' / 'checkpoints' / 'step_00000004'}",
                  f"output.dir={tmp_path / 'b'}"])
    finally:
        if dist.is_initialized() and not was:  # fsdp made a one-process group here
            leave_process_group(together=False)
