"""Engine options: activation checkpointing and compile change no number; the memory report
measures what a single process holds; bad engine settings are named before any work."""

from __future__ import annotations

import json

import pytest
import torch
from distributed_utils import one_thread  # noqa: F401  (autouse fixture)

from mimscale.config import ConfigError
from mimscale.pretrain.engine.backend import (
    DDPBackend,
    DistEnv,
    resolve_compile,
    use_attention_kernel,
)
from mimscale.pretrain.engine.blocks import compile_blocks, transformer_blocks
from mimscale.pretrain.engine.memory import read_reports
from mimscale.pretrain.engine.rng import seed_everything, step_generator
from mimscale.pretrain.engine.trainer import Trainer
from mimscale.pretrain.engine.zero import DeepSpeedBackend
from mimscale.pretrain.method import MIMMethod
from mimscale.pretrain.models.vit import Block


def _gradients(cfg, **options) -> tuple[float, dict[str, torch.Tensor]]:
    seed_everything(0)
    backend = DDPBackend(torch.device("cpu"), DistEnv(), "fp32", **options)
    model = backend.wrap(MIMMethod(cfg))
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = model(images, step_generator(0, 0, 0))
    backend.backward(out.loss)
    return float(out.loss.detach()), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_recomputes_the_same_gradients(tiny_config):
    cfg = tiny_config("teacher.type=ema", "masking.strategy=gpa", "masking.gpa.block=1", "masking.gpa.head=mean")
    loss, grads = _gradients(cfg)
    loss_ac, grads_ac = _gradients(cfg, activation_checkpointing=True)
    assert loss_ac == loss and grads_ac.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(grads_ac[name], g, rtol=0, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs", "reduce-overhead"])
def test_compiled_block_matches_eager(mode):
    torch.manual_seed(0)
    eager = Block(32, 2)
    compiled = Block(32, 2)
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(transformer_blocks(torch.nn.Sequential(compiled)), mode)
    x = torch.randn(2, 5, 32)
    for blk in (eager, compiled):
        blk(x).square().sum().backward()
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    for (n, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_memory_report_counts_what_one_process_holds(tiny_config, tmp_path):
    cfg = tiny_config("schedule.max_steps=3", "engine.memory_report_steps=2", "teacher.type=ema")
    trainer = Trainer(cfg)
    summary = trainer.fit()
    (report,) = summary.memory
    method = trainer.method
    teacher_ids = {id(p) for p in method.teacher.parameters()}
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)
    trainable = [p for p in method.parameters() if p.requires_grad]
    assert report.params == nbytes(p for p in method.parameters() if id(p) not in teacher_ids)
    assert report.teacher == nbytes(method.teacher.parameters()) > 0
    assert report.grads == nbytes(trainable)
    # AdamW: two fp32 moments per trainable parameter, plus one 4-byte step counter per tensor
    assert report.optimizer == 2 * nbytes(trainable) + 4 * len(trainable)
    assert report.peak_rss > report.states and report.peak_cuda is None
    (saved,) = read_reports(tmp_path / "run" / "memory.json")
    assert saved["backend"] == "ddp" and saved["step"] == 2 and saved["ranks"][0]["states"] == report.states


@pytest.mark.parametrize("override,message", [
    ("engine.backend=zero3", "valid: ddp, fsdp, deepspeed"),
    ("engine.zero_stage=4", "valid: 1, 2, 3"),
    ("engine.preempt_signals=[SIGKILL]", "not a signal a process can catch"),
    ("engine.preempt_signals=[SIGNOPE]", "not a signal a process can catch"),
    ("engine.cpu_offload=true", "needs engine.backend=fsdp or deepspeed"),
    ("engine.deepspeed_config=ds.json", "only used with engine.backend=deepspeed"),
    ("engine.max_nonfinite_steps=-1", "must be >= 0"),
])
def test_bad_engine_settings_are_named(tiny_config, override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(override)


def test_compile_auto_compiles_on_cuda_only(tiny_config):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_compile("auto", cuda) and resolve_compile("auto", cuda, "fsdp") and not resolve_compile("auto", cpu)
    assert not resolve_compile("auto", cuda, "deepspeed") and resolve_compile(True, cuda, "deepspeed")
    assert resolve_compile(True, cpu) and not resolve_compile(False, cuda)
    assert tiny_config().engine.compile == "auto" and tiny_config("engine.compile=true").engine.compile is True
    with pytest.raises(ConfigError, match="valid: True, False, auto"):
        tiny_config("engine.compile=yes")
    assert Trainer(tiny_config("engine.device=cpu")).backend.compile is False


def test_compile_mode_reaches_every_block(tiny_config, monkeypatch):
    """``engine.compile_mode`` is torch.compile's ``mode`` for each compiled block; bad modes are named."""
    modes = []
    real = torch.compile

    def spy(fn=None, *args, mode=None, **kwargs):
        modes.append(mode)
        return real(fn, *args, mode=mode, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    trainer = Trainer(tiny_config("engine.device=cpu", "engine.compile=true",
                                  "engine.compile_mode=max-autotune-no-cudagraphs"))
    blocks = transformer_blocks(trainer.method)
    assert trainer.backend.compile_mode == "max-autotune-no-cudagraphs"
    assert modes == ["max-autotune-no-cudagraphs"] * len(blocks) and len(blocks) > 0
    modes.clear()
    Trainer(tiny_config("engine.device=cpu", "engine.compile=true"))
    assert modes and set(modes) == {None}  # default: torch's own default mode
    with pytest.raises(ConfigError, match="valid: default, max-autotune-no-cudagraphs, reduce-overhead"):
        tiny_config("engine.compile_mode=fast")


def test_compile_scope_model_compiles_the_student_whole_and_other_blocks_alone(tiny_config):
    """``engine.compile_scope=model``: the student's forward is one compiled graph (its blocks are
    not compiled again inside it); the EMA teacher's blocks are compiled one by one."""
    cfg = tiny_config("engine.device=cpu", "engine.compile=true", "engine.compile_scope=model",
                      "teacher.type=ema", "masking.strategy=idm", "masking.score_source=teacher")
    method = Trainer(cfg).method
    assert method.student._compiled_call_impl is not None
    assert all(b._compiled_call_impl is None for b in transformer_blocks(method.student))
    teacher_blocks = transformer_blocks(method.teacher)
    assert teacher_blocks and all(b._compiled_call_impl is not None for b in teacher_blocks)
    with pytest.raises(ConfigError, match="compile_scope=model.*use engine.compile_scope=blocks"):
        tiny_config("engine.backend=fsdp", "engine.compile_scope=model")
    with pytest.raises(ConfigError, match="engine.compile=false compiles nothing"):
        tiny_config("engine.compile=false", "engine.compile_mode=reduce-overhead")


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_cuda_graph_modes_refuse_gradient_accumulation(tiny_config, mode):
    """A CUDA-graph replay's outputs are freed at the next micro-step's forward, while an accumulation
    still holds them: refused, naming the ways out; the modes without graphs accumulate as before."""
    with pytest.raises(ConfigError, match=f"compile_mode={mode} replays CUDA graphs.*optim.accum_steps=2.*"
                                          "Use optim.accum_steps=1, or engine.compile_mode=default"):
        tiny_config("engine.compile=true", f"engine.compile_mode={mode}", "optim.accum_steps=2")
    assert tiny_config("engine.compile=true", f"engine.compile_mode={mode}").engine.compile_mode == mode
    for other in ("default", "max-autotune-no-cudagraphs"):
        assert tiny_config("engine.compile=true", f"engine.compile_mode={other}", "optim.accum_steps=2").optim.accum_steps == 2


@pytest.mark.slow
def test_the_student_compiled_whole_trains_as_eager(tiny_config):
    """One step's loss and gradients with the student's forward compiled as one graph equal the
    eager step's (fp32, CPU)."""
    cfg = tiny_config("engine.compile_scope=model")
    loss, grads = _gradients(cfg)
    loss_c, grads_c = _gradients(cfg, compile=True, compile_scope="model")
    assert loss_c == pytest.approx(loss, abs=1e-6) and grads_c.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture
def sdpa_switches():
    """Restores torch's process-wide SDPA switches that ``use_attention_kernel`` sets."""
    names = ("flash", "mem_efficient", "cudnn", "math")
    saved = {n: getattr(torch.backends.cuda, f"{n}_sdp_enabled")() for n in names}
    yield
    for n, on in saved.items():
        getattr(torch.backends.cuda, f"enable_{n}_sdp")(on)


def test_attention_kernel_is_the_one_named(tiny_config, sdpa_switches):
    cuda_only = "engine.attention=flash"
    with pytest.raises(ConfigError, match="engine.attention=flash is a CUDA kernel"):
        Trainer(tiny_config(cuda_only, "engine.device=cpu"))
    with pytest.raises(ConfigError, match="valid: auto, flash, cudnn, efficient, math"):
        tiny_config("engine.attention=xformers")
    use_attention_kernel("auto", torch.device("cpu"))  # auto touches nothing
    assert torch.backends.cuda.flash_sdp_enabled()
    q = torch.randn(2, 2, 5, 8)
    fused = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    use_attention_kernel("math", torch.device("cpu"))
    assert torch.backends.cuda.math_sdp_enabled() and not any(
        getattr(torch.backends.cuda, f"{n}_sdp_enabled")() for n in ("flash", "mem_efficient", "cudnn"))
    torch.testing.assert_close(torch.nn.functional.scaled_dot_product_attention(q, q, q), fused)


def test_cpu_offload_on_a_cpu_device_is_refused(tiny_config):
    with pytest.raises(ValueError, match="nothing to offload"):
        Trainer(tiny_config("engine.backend=fsdp", "engine.cpu_offload=true", "engine.device=cpu"))


def test_deepspeed_config_is_generated_then_overridden_by_the_users_json(tmp_path):
    extra = tmp_path / "ds.json"
    extra.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}, "gradient_clipping": 2.0}))
    backend = DeepSpeedBackend(torch.device("cpu"), DistEnv(), "bf16", zero_stage=3, clip_grad=1.0,
                               accum_steps=4, micro_batch=16, extra_config=str(extra))
    config = backend.ds_config()
    assert config["train_micro_batch_size_per_gpu"] == 16 and config["gradient_accumulation_steps"] == 4
    assert config["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0,
                                           "overlap_comm": True}
    assert config["gradient_clipping"] == 2.0 and "bf16" not in config  # fp32 params, autocast compute
