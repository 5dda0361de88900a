"""``engine.backend=deepspeed`` (ZeRO 1/2/3) for fine-tuning and the linear probe, on 2 real gloo
ranks, against the same runs under ddp (see test_classify_fsdp.py for why fp32 losses agree to
1e-5 and why attention key biases are left out of the weight comparison).

The linear probe's LARS steps flat slices of its groups under ZeRO; its per-weight norms are summed
over the ranks, which only the equality with ddp's losses shows.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed_utils import one_thread, spawn  # noqa: F401  (one_thread: autouse fixture)
from extras import need
from test_classify_fsdp import (
    DATA,
    FINETUNE,
    LINPROBE,
    _final,
    _results,
    assert_final_weights_close,
    assert_losses_match,
    assert_resumed_as_if_never_stopped,
    run_on_tiny_vit,
)

from mimscale.cli import main
from mimscale.downstream.classify import read_weights
from mimscale.downstream.classify.config import FinetuneConfig, LinprobeConfig, load_classify_config
from mimscale.downstream.classify.finetune import run_finetune

pytestmark = pytest.mark.slow
FT_RUNS = {"ddp": ["engine.backend=ddp"],
           "zero2": ["engine.backend=deepspeed", "engine.zero_stage=2"],
           "zero3": ["engine.backend=deepspeed", "engine.zero_stage=3"]}
LP_RUNS = {"lp_ddp": ["engine.backend=ddp"],
           "lp_zero1": ["engine.backend=deepspeed", "engine.zero_stage=1"],
           "lp_zero3": ["engine.backend=deepspeed", "engine.zero_stage=3"]}


def _lr_scales(root: Path) -> None:
    """Each layer-decay group's lr after ``set_lr``, as DeepSpeed's optimizer holds it."""
    from mimscale.downstream.classify.finetune import _adamw
    from mimscale.downstream.classify.model import build_vit
    from mimscale.pretrain.engine.backend import init_distributed
    from mimscale.pretrain.engine.zero import DeepSpeedBackend

    cfg = load_classify_config(FinetuneConfig, ["model.name=mae_vit_tiny_patch16", *DATA, *FINETUNE])
    backend = DeepSpeedBackend(torch.device("cpu"), init_distributed("cpu"), "fp32",
                               zero_stage=3, micro_batch=2)
    backend.wrap(build_vit("mae_vit_tiny_patch16", 8, 32, 6))
    _adamw(cfg.optim)(backend, 1.0)
    backend.set_lr(0.5)
    if dist.get_rank() == 0:
        groups = [{"lr": g["lr"], "lr_scale": g["lr_scale"]} for g in backend.optimizer.param_groups]
        (root / "lr_scales.json").write_text(json.dumps(groups))


def _job(rank, world, checkpoint, root):
    from mimscale.downstream.classify.linprobe import run_linprobe

    root = Path(root)
    os.environ["MIMSCALE_CACHE"] = str(root / "cache")
    _lr_scales(root)
    _lars_slices(rank, world, root / "lars.pt")
    ft = [f"checkpoint={checkpoint}", *DATA, *FINETUNE]
    for name, backend in FT_RUNS.items():
        run_finetune(load_classify_config(FinetuneConfig, [*ft, *backend, f"output.dir={root / name}"]))
    # stopped after epoch 1: a fresh folder with only that checkpoint, continued with resume=auto
    if rank == 0:
        step = "checkpoints/step_00000002"
        shutil.copytree(root / "zero3" / step, root / "resumed" / step)
    dist.barrier()
    run_finetune(load_classify_config(FinetuneConfig, [*ft, *FT_RUNS["zero3"], "resume=auto",
                                                       f"output.dir={root / 'resumed'}"]))
    for name, backend in LP_RUNS.items():
        run_linprobe(load_classify_config(LinprobeConfig, [
            f"checkpoint={checkpoint}", *DATA, *LINPROBE, *backend, f"output.dir={root / name}"]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    need("deepspeed")
    return run_on_tiny_vit(tmp_path_factory.mktemp("zero"), _job)


def test_layer_decay_scales_survive_deepspeeds_optimizer(runs):
    groups = json.loads((runs / "lr_scales.json").read_text())
    assert len({g["lr_scale"] for g in groups}) == 14  # tiny: 12 blocks + embedding + head depths
    for g in groups:
        assert g["lr"] == pytest.approx(0.5 * g["lr_scale"], rel=1e-12)


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_zero_finetuning_matches_ddp_step_by_step(runs, name):
    assert_losses_match(runs / "ddp", runs / name)
    # final evaluation, occlusion and shuffling: same samples, each counted once
    ddp_results, zero_results = _results(runs / "ddp"), _results(runs / name)
    assert set(zero_results) == {"synthetic_finetune", "synthetic_finetune+occlude50", "synthetic_finetune+shuffle"}
    assert zero_results == ddp_results and zero_results["synthetic_finetune"]["n"] == 9
    assert_final_weights_close(runs / "ddp", runs / name)


def test_zero_checkpoints_resume_as_if_never_stopped(runs):
    folder = runs / "zero3" / "checkpoints" / "step_00000002"
    assert _final(runs / "zero3", 2)["train_state"] == "deepspeed"
    assert list((folder / "deepspeed").glob("*optim_states.pt"))  # one per rank
    assert_resumed_as_if_never_stopped(runs / "zero3", runs / "resumed")


def test_zero3_export_loads_in_one_process_and_evaluates_alike(runs, tmp_path, monkeypatch):
    final = runs / "zero3" / "checkpoints" / "step_00000004"
    weights = read_weights(runs / "zero3")
    assert weights.kind == "classifier" and weights.has_head and weights.meta["num_classes"] == 6
    torch.testing.assert_close(weights.state, _final(runs / "zero3")["model"], atol=0, rtol=0)
    assert weights.state["head.weight"].shape == (6, 192)  # gathered, not a rank's partition
    monkeypatch.setenv("MIMSCALE_CACHE", str(runs / "cache"))
    assert main(["finetune", f"checkpoint={final}", "eval_only=true", *DATA, "data.batch_size=2",
                 f"output.dir={tmp_path}"]) == 0
    assert _results(tmp_path)["synthetic_finetune"] == _results(runs / "zero3")["synthetic_finetune"]


@pytest.mark.parametrize("name", ["lp_zero1", "lp_zero3"])
def test_zero_linear_probe_matches_ddp(runs, name):
    assert_losses_match(runs / "lp_ddp", runs / name)
    assert _results(runs / name) == _results(runs / "lp_ddp")


def test_a_deepspeed_checkpoint_is_not_resumed_by_ddp(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("MIMSCALE_CACHE", str(runs / "cache"))
    with pytest.raises(ValueError, match="resume it with engine.backend=deepspeed"):
        main(["finetune", f"checkpoint={runs / 'vit.pth'}", *DATA, *FINETUNE, "eval.robustness=false",
              f"resume={runs / 'zero3' / 'checkpoints' / 'step_00000002'}", f"output.dir={tmp_path}"])


def _lars_slices(rank, world, out):
    """LARS on each rank's padded slice of a 5x3 weight (15 of 16 elements real; the padding holds
    garbage that must not count) next to LARS on the whole weight."""
    from mimscale.downstream.classify.optim import LARS

    gen = torch.Generator().manual_seed(0)
    weight, grads = torch.randn(5, 3, generator=gen), [torch.randn(5, 3, generator=gen) for _ in range(3)]
    whole = weight.clone().requires_grad_()
    part = weight.reshape(-1).tolist() + [1e3]  # 16 = 2 slices of 8
    mine = torch.tensor(part[8 * rank:8 * rank + 8], requires_grad=True)
    options = dict(lr=0.1, weight_decay=0.05, momentum=0.9, trust_coefficient=0.01)
    reference = LARS([whole], **options)
    sliced = LARS([{"params": [mine], "adapt": True, "numel": 15}], **options)
    for g in grads:
        whole.grad = g.clone()
        mine.grad = torch.tensor((g.reshape(-1).tolist() + [5e2])[8 * rank:8 * rank + 8])
        reference.step()
        sliced.step()
    got = [torch.zeros(8) for _ in range(world)]
    dist.all_gather(got, mine.detach())
    if rank == 0:
        torch.save({"whole": whole.detach(), "sliced": torch.cat(got)[:15].reshape(5, 3)}, out)


def test_lars_on_zero_slices_matches_lars_on_the_whole_weight(runs):
    result = torch.load(runs / "lars.pt", weights_only=True)
    torch.testing.assert_close(result["sliced"], result["whole"], atol=1e-6, rtol=1e-6)
    assert not torch.equal(result["whole"], torch.zeros(5, 3))
