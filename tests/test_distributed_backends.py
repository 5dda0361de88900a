"""Every backend on 2 real gloo ranks against one obviously-correct single-process reference.

The comparison is made exact by construction: the reference is one process that computes what two
data-parallel ranks compute — rank r's batches (the loader built for rank r of 2) and rank r's
masks (``step_generator(seed, step, r)``), gradients averaged over the two ranks (each micro-loss
scaled by 1/(ranks × accumulation) before backward), ``clip_grad_norm_``, the same AdamW and the
method's EMA. Runs are fp32 with GPA masking scored by an EMA teacher (so the teacher's truncated
pass, the sharded EMA and gradient accumulation all take part), clipping on.

Tolerance: 1e-5 on losses (~1.3) and on weights. Only the order of floating-point sums differs
(an all-reduce or reduce-scatter of two partial gradients vs autograd accumulating them in one
process, ZeRO's flattened buffers); measured deviations: losses < 1e-7, weights < 2e-6. One
exception, left out of the weight comparison: attention key biases. Their true gradient is exactly
zero (softmax is invariant to a shift of all keys), so what they receive is rounding noise, which
Adam normalises into lr-sized steps whose sign depends on the order of sums (measured up to 3e-5).
A resumed run repeats the same sums, so resume comparisons include them, bit for bit.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
from distributed_utils import (
    one_thread,  # noqa: F401  (autouse fixture)
    spawn,
    tiny_overrides,
)
from extras import need

from mimscale.cli import main
from mimscale.config import load_config
from mimscale.pretrain.engine.backend import leave_process_group
from mimscale.pretrain.engine.checkpoint import load_checkpoint, read_state
from mimscale.pretrain.engine.optim import param_groups
from mimscale.pretrain.engine.rng import seed_everything, step_generator
from mimscale.pretrain.engine.schedule import cosine_lr
from mimscale.pretrain.method import MIMMethod, build_model
from mimscale.pretrain.models import to_timm_state_dict
from mimscale.pretrain.teacher import ema_update_

STEPS, RESUME_AT, TOL = 4, 2, 1e-5
RUN = ["data.batch_size=2", "optim.accum_steps=2", "optim.lr=3e-3", "optim.clip_grad=0.3",
       "schedule.warmup_steps=1", f"schedule.max_steps={STEPS}", f"output.checkpoint_every={RESUME_AT}",
       "output.keep_last=null", "masking.strategy=gpa", "masking.gpa.block=1", "masking.gpa.head=mean",
       "teacher.type=ema", "teacher.momentum=0.6", "teacher.momentum_final=0.6"]
CASES = {  # name: (overrides, NaN loss on rank 1 at this 0-based step or None)
    "ddp": (["engine.backend=ddp", "engine.activation_checkpointing=true"], None),
    "fsdp": (["engine.backend=fsdp", "engine.activation_checkpointing=true"], None),
    "fsdp_nan": (["engine.backend=fsdp"], 1),
    "fsdp_bf16": (["engine.backend=fsdp", "engine.precision=bf16"], None),
    "zero1": (["engine.backend=deepspeed", "engine.zero_stage=1"], None),
    "zero2": (["engine.backend=deepspeed", "engine.zero_stage=2"], None),
    "zero3": (["engine.backend=deepspeed", "engine.zero_stage=3"], None),
}
SHARDED = ("fsdp", "zero3")
RESUMED = ("ddp", "fsdp", "zero1", "zero2", "zero3")


# ----------------------------------------------------------------------------- the 2-rank job

def _full_tensors(backend, params) -> list[torch.Tensor]:
    """Whole tensors of (possibly sharded) parameters, on every rank."""
    if backend.name == "deepspeed" and backend.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return [p.data.detach().clone() for p in params]
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in params]


def _sharded_ema_error(trainer, momentum: float = 0.7) -> float:
    """Largest deviation of the shard-by-shard EMA from ``m·t + (1−m)·s`` on whole tensors."""
    teacher, student = trainer.method.teacher.ema_pairs(trainer.method.student)
    t0, s0 = _full_tensors(trainer.backend, teacher), _full_tensors(trainer.backend, student)
    with trainer.backend.local_shards():
        ema_update_(teacher, student, momentum)
    t1 = _full_tensors(trainer.backend, teacher)
    return max(float((a - (momentum * t + (1 - momentum) * s)).abs().max()) for a, t, s in zip(t1, t0, s0))


def _nan_on_rank1_at(step: int):
    forward = MIMMethod.forward

    def poisoned(self, images, generator, *views):
        out = forward(self, images, generator, *views)
        if self.step == step and dist.get_rank() == 1:
            out = out._replace(loss=out.loss * float("nan"))
        return out

    MIMMethod.forward = poisoned
    return lambda: setattr(MIMMethod, "forward", forward)


def _job(rank, world, base, root, cases):
    from mimscale.pretrain.engine.trainer import Trainer

    root = Path(root)
    for name, (extra, nan_step) in cases.items():
        undo = _nan_on_rank1_at(nan_step) if nan_step is not None else (lambda: None)
        full = Trainer(load_config(base + extra + [f"output.dir={root / name / 'full'}"]))
        summary = full.fit()
        result = {"losses": summary.losses, "skipped": summary.skipped_steps,
                  "memory": [asdict(m) | {"states": m.states} for m in summary.memory]}
        if name in SHARDED:
            result["ema_error"] = _sharded_ema_error(full)
        del full
        undo()
        if name in RESUMED:  # resume from the middle, in a fresh run folder
            resumed_dir = root / name / "resumed"
            if rank == 0:
                step_dir = f"checkpoints/step_{RESUME_AT:08d}"
                shutil.copytree(root / name / "full" / step_dir, resumed_dir / step_dir)
            dist.barrier()
            resumed = Trainer(load_config(base + extra + [f"output.dir={resumed_dir}", "resume=auto"]))
            result["resumed_from"] = resumed.step
            result["resumed_losses"] = resumed.fit().losses
            del resumed
        if rank == 0:
            (root / name / "result.json").write_text(json.dumps(result))


class Runs:
    """The 2-rank jobs, each run on first use: the PyTorch backends, and DeepSpeed's stages."""

    GROUPS = (("ddp", "fsdp", "fsdp_nan", "fsdp_bf16"), ("zero1", "zero2", "zero3"))

    def __init__(self, root: Path):
        self.root = root
        self.base = tiny_overrides(root / "unused", root / "data") + RUN
        self.results: dict[str, dict] = {}

    def __getitem__(self, name: str) -> dict:
        if name not in self.results:
            group = next(g for g in self.GROUPS if name in g)
            if name.startswith("zero"):
                need("deepspeed")
            spawn(_job, 2, self.base, str(self.root), {n: CASES[n] for n in group}, timeout=400)
            self.results.update({n: json.loads((self.root / n / "result.json").read_text()) for n in group})
        return self.results[name]

    def checkpoint(self, name: str, step: int = STEPS, run: str = "full") -> Path:
        self[name]
        return self.root / name / run / "checkpoints" / f"step_{step:08d}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("backends"))


# ----------------------------------------------------------------------------- the reference

@pytest.fixture(scope="module")
def one_rank_group():
    """A one-process group, so code that synchronises ranks (data generation) runs in this process."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    leave_process_group(together=False)


def data_parallel_reference(cfg, world: int, steps: int, skip: frozenset = frozenset()):
    """One process doing ``world`` ranks' work: (mean loss per step, final state dict)."""
    from mimscale.data_pipeline.build import build_pretrain_data

    seed = cfg.engine.seed
    seed_everything(seed)
    method = MIMMethod(cfg)
    loaders = [build_pretrain_data(cfg.data, cfg.model.img_size, seed, r, world) for r in range(world)]
    accum = cfg.optim.accum_steps
    per_epoch = loaders[0].steps_per_epoch // accum
    streams = [iter(loader) for loader in loaders]
    opt = torch.optim.AdamW(param_groups(method, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=cfg.optim.betas)
    losses = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, cfg.optim.lr, steps, cfg.schedule.warmup_steps, cfg.optim.min_lr)
        method.set_progress(step, steps, per_epoch)
        generators = [step_generator(seed, step, r) for r in range(world)]
        total = 0.0
        for _ in range(accum):
            for r in range(world):
                out = method(next(streams[r])["images"], generators[r])
                (out.loss / (accum * world)).backward()
                total += float(out.loss.detach()) / (accum * world)
        if step not in skip:
            torch.nn.utils.clip_grad_norm_([p for p in method.parameters() if p.grad is not None],
                                           cfg.optim.clip_grad)
            opt.step()
            method.after_optimizer_step(step, steps)
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses, method.state_dict()


@pytest.fixture(scope="module")
def reference(runs, one_rank_group):
    runs["ddp"]  # the reference reads the images the job generated
    cfg = load_config(runs.base + [f"output.dir={runs.root / 'reference'}"])
    plain = data_parallel_reference(cfg, 2, STEPS)
    nan_skipped = data_parallel_reference(cfg, 2, STEPS, skip=frozenset({1}))
    return plain, nan_skipped


def _without_key_bias(name: str, t: torch.Tensor) -> torch.Tensor:
    if name.endswith("attn.qkv.bias"):  # [q | k | v]: drop k (see the module docstring)
        d = t.shape[0] // 3
        return torch.cat([t[:d], t[2 * d:]])
    return t


def _assert_weights(state: dict, expected: dict) -> None:
    model = MIMMethod.join_state_dict(state["model"], state["method"])
    assert set(model) == set(expected)
    for k, v in expected.items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(_without_key_bias(k, model[k]), _without_key_bias(k, v), rtol=0,
                                       atol=TOL, msg=lambda m, k=k: f"{k}: {m}")


# ----------------------------------------------------------------------------- tests

@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp", "fsdp", "zero1", "zero2", "zero3"])
def test_backend_matches_single_process_data_parallel(name, runs, reference):
    (ref_losses, ref_state), _ = reference
    losses = dict(runs[name]["losses"])
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in losses.items():
        assert loss == pytest.approx(ref_losses[step - 1], abs=TOL)
    assert ref_losses[-1] != pytest.approx(ref_losses[0], abs=1e-3)  # it did train
    final = load_checkpoint(runs.checkpoint(name))
    assert final["format"] == {"ddp": "full", "fsdp": "dcp"}.get(name, "deepspeed")
    _assert_weights(final, ref_state)  # student and EMA teacher


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp", "fsdp", "zero1", "zero2", "zero3"])
def test_save_load_continue_equals_not_stopping(name, runs):
    r = runs[name]
    assert r["resumed_from"] == RESUME_AT
    full = dict(r["losses"])
    assert [s for s, _ in r["resumed_losses"]] == list(range(RESUME_AT + 1, STEPS + 1))
    for step, loss in r["resumed_losses"]:
        assert loss == pytest.approx(full[step], abs=1e-6)
    a, b = load_checkpoint(runs.checkpoint(name)), load_checkpoint(runs.checkpoint(name, run="resumed"))
    for part in ("model", "method"):
        for k, v in a[part].items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(b[part][k], v, rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", SHARDED)
def test_sharded_ema_update_equals_unsharded_formula(name, runs):
    assert runs[name]["ema_error"] < 1e-6


@pytest.mark.slow
def test_nonfinite_loss_on_one_rank_skips_the_step_on_all(runs, reference):
    _, (ref_losses, ref_state) = reference
    r = runs["fsdp_nan"]
    assert r["skipped"] == 1
    assert [s for s, _ in r["losses"]] == [1, 3, 4]  # step 2 was skipped, so it logs no loss
    metrics = runs.root / "fsdp_nan" / "full" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert records[1]["step"] == 2 and records[1]["grad_norm"] is None and records[1]["skipped_steps"] == 1
    for step, loss in r["losses"]:
        assert loss == pytest.approx(ref_losses[step - 1], abs=TOL)
    _assert_weights(load_checkpoint(runs.checkpoint("fsdp_nan")), ref_state)


@pytest.mark.slow
def test_fsdp_bf16_mixed_precision_tracks_the_fp32_reference(runs, reference):
    """bf16 compute (8-bit mantissa) with fp32 master weights and reduction: the loss curve stays
    within 1% of fp32's, and the sharded master parameters are still fp32."""
    (ref_losses, _), _ = reference
    r = runs["fsdp_bf16"]
    assert r["skipped"] == 0
    for step, loss in r["losses"]:
        assert loss == pytest.approx(ref_losses[step - 1], rel=1e-2)
    assert r["memory"][0]["params"] == runs["fsdp"]["memory"][0]["params"]


@pytest.mark.slow
def test_memory_report_sharded_backends_hold_about_half(runs):
    mem = {name: runs[name]["memory"] for name in ("ddp", "fsdp", "zero1", "zero2", "zero3")}
    for name, ranks in mem.items():
        assert [r["rank"] for r in ranks] == [0, 1]
        assert all(r["params"] > 0 and r["grads"] > 0 and r["optimizer"] > 0 and r["teacher"] > 0
                   and r["peak_rss"] > 0 for r in ranks), name
    ddp = mem["ddp"][0]
    fsdp, zero3 = mem["fsdp"][0], mem["zero3"][0]
    assert fsdp["states"] / ddp["states"] == pytest.approx(0.5, abs=0.02)
    assert fsdp["teacher"] / ddp["teacher"] == pytest.approx(0.5, abs=0.02)
    # ZeRO-3 also halves params, grads and moments, plus DeepSpeed's own fp32 master partition
    assert zero3["params"] / ddp["params"] == pytest.approx(0.5, abs=0.02)
    assert zero3["grads"] / ddp["grads"] == pytest.approx(0.5, abs=0.02)
    assert 0.5 < zero3["states"] / ddp["states"] < 0.66
    assert zero3["teacher"] / ddp["teacher"] == pytest.approx(0.5, abs=0.02)
    for stage in ("zero1", "zero2"):  # parameters and teacher replicated, optimizer state sharded
        assert mem[stage][0]["params"] == pytest.approx(ddp["params"], rel=0.02)
        assert mem[stage][0]["optimizer"] < ddp["optimizer"]


@pytest.mark.slow
def test_fsdp_checkpoint_loads_in_one_process_and_exports_to_timm(runs, tmp_path):
    ckpt = runs.checkpoint("fsdp")
    assert read_state(ckpt)["world_size"] == 2 and (ckpt / "dcp").is_dir()
    state = load_checkpoint(ckpt)  # no process group: DCP shards consolidated in memory
    from mimscale.config import from_dict

    model = build_model(from_dict(state["config"]))
    model.load_state_dict(state["model"], strict=True)  # the official MAE layout
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8)
    vit.load_state_dict(to_timm_state_dict(model), strict=True)
    assert main(["convert", str(ckpt), "--to", "timm", "--out", str(tmp_path / "vit.safetensors")]) == 0
    from safetensors.torch import load_file

    vit.load_state_dict(load_file(tmp_path / "vit.safetensors"), strict=True)
    teacher = load_file(tmp_path / "vit.teacher.safetensors")  # GPA's teacher stops after block 1
    missing, unexpected = vit.load_state_dict(teacher, strict=False)
    assert not unexpected and {k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("blocks") else "")
                               for k in missing} == {"norm", *(f"blocks.{i}" for i in range(2, 12))}
    torch.testing.assert_close(teacher["blocks.1.attn.qkv.weight"], state["method"]["teacher.blocks.1.attn.qkv.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("name,source", [("fsdp", "fsdp"), ("zero3", "deepspeed"), ("zero1", "deepspeed")])
def test_convert_consolidates_a_sharded_checkpoint(name, source, runs, tmp_path, capsys):
    ckpt = runs.checkpoint(name)
    wrong = "deepspeed" if source == "fsdp" else "fsdp"
    assert main(["convert", str(ckpt), "--from", wrong, "--out", str(tmp_path / "x")]) == 2
    assert f"--from {source}" in capsys.readouterr().err
    assert main(["convert", str(ckpt), "--from", source, "--out", str(tmp_path / "plain")]) == 0
    plain, sharded = load_checkpoint(tmp_path / "plain"), load_checkpoint(ckpt)
    assert plain["format"] == "full" and plain["step"] == STEPS and ("optimizer" in plain) == (source == "fsdp")
    for part in ("model", "method"):
        assert set(plain[part]) == set(sharded[part])
        for k, v in sharded[part].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(plain[part][k], v), k


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_deepspeed_checkpoint_of_two_ranks_resumes_on_one(name, runs, one_rank_group, tmp_path):
    """Through DeepSpeed's universal checkpoint: every weight (the EMA teacher's too, which the
    conversion leaves out) and Adam's moments come back on one rank, and the run goes on."""
    from mimscale.pretrain.engine.trainer import Trainer
    from mimscale.pretrain.engine.zero import read_deepspeed

    run = tmp_path / "one"
    step_dir = f"checkpoints/step_{RESUME_AT:08d}"
    shutil.copytree(runs.checkpoint(name, RESUME_AT), run / step_dir)
    trainer = Trainer(load_config(runs.base + CASES[name][0] + [f"output.dir={run}", "resume=auto"]))
    assert trainer.step == RESUME_AT and trainer.env.world_size == 1
    assert not [p for p in run.iterdir() if p.name.startswith(".universal")]  # the converted copy is gone
    expected = read_deepspeed(run / step_dir)
    names, params = zip(*trainer.method.named_parameters())
    assert any(n.startswith("teacher.") and not p.requires_grad for n, p in zip(names, params))
    for n, full in zip(names, _full_tensors(trainer.backend, list(params))):
        torch.testing.assert_close(full, expected[n].to(full.dtype), rtol=0, atol=0, msg=n)
    state = trainer.optimizer.optimizer.state
    assert state and all(int(s["step"]) == RESUME_AT and s["exp_avg_sq"].abs().sum() > 0 for s in state.values())
    summary = trainer.fit()
    assert summary.steps == STEPS and all(torch.isfinite(torch.tensor(loss)) for _, loss in summary.losses)


@pytest.mark.slow
def test_fsdp_checkpoint_of_two_ranks_resumes_on_one(runs, one_rank_group, tmp_path):
    """DCP reshards: the 2-rank checkpoint continues in one process, with the same backend."""
    from mimscale.pretrain.engine.trainer import Trainer

    run = tmp_path / "one"
    step_dir = f"checkpoints/step_{RESUME_AT:08d}"
    shutil.copytree(runs.checkpoint("fsdp", RESUME_AT), run / step_dir)
    trainer = Trainer(load_config(runs.base + ["engine.backend=fsdp", f"output.dir={run}", "resume=auto"]))
    assert trainer.step == RESUME_AT and trainer.env.world_size == 1
    expected = load_checkpoint(run / step_dir)
    teacher, _ = trainer.method.teacher.ema_pairs(trainer.method.student)
    names = [n for n, p in trainer.method.named_parameters() if any(p is t for t in teacher)]
    for name, p in zip(names, teacher):
        torch.testing.assert_close(p.full_tensor(), expected["method"][name], rtol=0, atol=0)
    opt = trainer.optimizer.state_dict()["state"]
    assert opt and all(int(s["step"]) == RESUME_AT for s in opt.values())  # AdamW moments came back
    summary = trainer.fit()
    assert summary.steps == STEPS and all(torch.isfinite(torch.tensor(loss)) for _, loss in summary.losses)
