"""Backends: how a model is wrapped, stepped and saved. The train loop only calls this interface.

``DDPBackend`` covers the single process and ``DistributedDataParallel``; ``FSDPBackend``
(``fsdp.py``, FSDP2) and ``DeepSpeedBackend`` (``zero.py``, ZeRO 1/2/3) implement the same methods,
so the loop never asks which one it has:

    wrap(model) -> build_optimizer(groups, lr, betas) -> per step: set_lr, then per micro-step
    ``with accumulate(sync): with autocast(): loss = model(...); backward(loss, scale)``, then
    ``step(clip)`` -> gradient norm, a device tensor (non-finite = the step was skipped); ``local_shards()`` around
    updates that follow the student (EMA teacher); ``save(folder)`` / ``load(folder, state)``.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from mimscale.config import ConfigError

from .blocks import prepare_blocks
from .memory import gradient_bytes, nested_bytes, parameter_bytes


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistEnv:
    """Join the process group described by the environment, if any: torchrun's variables (also
    what a submitit job exports), else a plain ``srun`` task's SLURM variables."""
    if "WORLD_SIZE" not in os.environ:
        from mimscale.slurm.env import torch_env_from_slurm

        os.environ.update(torch_env_from_slurm(os.environ))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def leave_process_group(together: bool) -> None:
    """Destroy the default process group, if any; ``together``: after a barrier. Why: without a
    launcher's store (srun, submitit) rank 0 hosts it, and a rank still tearing down when rank 0
    has exited can abort ("terminate called without an active exception"), so a finished job would
    end with a failed task. After an error the other ranks may never arrive: no barrier then."""
    if dist.is_available() and dist.is_initialized():
        if together:
            dist.barrier()
        comm = sys.modules.get("deepspeed.comm.comm")
        if comm is not None and getattr(comm, "cdb", None) is not None:
            # through DeepSpeed, which then drops the groups it cached (a clone of the world group):
            # left to torch, a second DeepSpeed run in this process would use the destroyed group
            comm.destroy_process_group()
        else:
            dist.destroy_process_group()


def resolve_device(name: str, env: DistEnv) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("engine.device=cuda but no CUDA device is visible; use engine.device=cpu")
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def device_of(name: str) -> torch.device:
    """The device type ``engine.device`` names, without selecting a GPU (``resolve_device`` does)."""
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def resolve_compile(compile: bool | str, device: torch.device, backend: str = "ddp") -> bool:
    """``engine.compile``: ``auto`` compiles on CUDA under ddp and fsdp, where it was measured to pay
    (docs/performance.md; FSDP2 shards the compiled blocks, torchtitan's order), and not on a CPU,
    where compiling costs minutes and gains little, nor under DeepSpeed, whose ZeRO-3 hooks on every
    module have not run compiled here."""
    if compile == "auto":
        return device.type == "cuda" and backend != "deepspeed"
    return bool(compile)


_ATTENTION_KERNELS = {"flash": "flash", "cudnn": "cudnn", "efficient": "mem_efficient", "math": "math"}


def use_attention_kernel(name: str, device: torch.device) -> None:
    """``engine.attention``: leave torch's choice of SDPA kernel (``auto``) or allow only the named
    one, process-wide (torch's ``enable_*_sdp`` switches; a shape the kernel cannot run then fails
    loudly instead of falling back)."""
    if name == "auto":
        return
    if name not in _ATTENTION_KERNELS:
        raise ConfigError(f"engine.attention={name!r} is not valid; valid: auto, {', '.join(_ATTENTION_KERNELS)}")
    if device.type != "cuda" and name != "math":
        raise ConfigError(f"engine.attention={name} is a CUDA kernel; on engine.device={device.type} "
                          "use auto or math")
    for kernel, switch in _ATTENTION_KERNELS.items():
        getattr(torch.backends.cuda, f"enable_{switch}_sdp")(kernel == name)


class Backend:
    """What every backend shares: device, autocast, lr, collectives, the skip rule, memory."""

    name = "base"
    checkpoint_format = "full"  # see checkpoint.py: full | dcp | deepspeed

    def __init__(self, device: torch.device, env: DistEnv, precision: str = "bf16", *,
                 activation_checkpointing: bool = False, compile: bool = False, compile_mode: str = "default",
                 compile_scope: str = "blocks"):
        if precision not in ("bf16", "fp32"):
            raise ValueError(f"precision {precision!r} is not valid; valid: bf16, fp32")
        self.device = device
        self.env = env
        self.precision = precision
        self.dtype = {"bf16": torch.bfloat16, "fp32": None}[precision]
        self.activation_checkpointing = activation_checkpointing
        self.compile, self.compile_mode, self.compile_scope = compile, compile_mode, compile_scope
        self.model: nn.Module | None = None   # what the loop calls (a DDP / DeepSpeed wrapper or the module)
        self.module: nn.Module | None = None  # the method itself (parameters may be shards)
        self.optimizer: torch.optim.Optimizer | None = None
        self._grad_bytes = 0
        self._params: list[nn.Parameter] | None = None  # the module's parameters, listed once
        self._control = None  # a CPU (gloo) group for host-side flags; built on first use

    @staticmethod
    def _check_offload(cpu_offload: bool, device: torch.device) -> None:
        if cpu_offload and device.type != "cuda":
            raise ConfigError("engine.cpu_offload moves sharded state from GPU memory to the host; on "
                             f"engine.device={device.type} there is nothing to offload: drop it")

    # ----------------------------------------------------------------- model
    def _prepare(self, model: nn.Module) -> list[nn.Module]:
        """Move to the device, then per-block activation checkpointing and compile."""
        self.module = model.to(self.device)
        return prepare_blocks(model, self.activation_checkpointing, self.compile, self.compile_mode,
                              self.compile_scope)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def accumulate(self, sync: bool):
        """Context for one micro-step's forward+backward; ``sync=False`` (non-final micro-steps of
        an accumulation) skips the gradient reduction where the backend can."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, scale: float = 1.0) -> None:
        """Backpropagate ``loss × scale`` (``scale`` = 1/accumulation steps)."""
        (loss * scale).backward()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def local_shards(self):
        """Context inside which each parameter holds what this rank owns, for updates that need no
        gather (the EMA teacher): DDP and FSDP parameters already are (FSDP2's are DTensors whose
        pointwise ops stay local); ZeRO-3 swaps its partitions in."""
        return contextlib.nullcontext()

    # ----------------------------------------------------------------- step
    def _clip_and_step(self, clip_grad: float | None) -> torch.Tensor:
        """Global gradient norm; clip; step unless the norm is non-finite; zero the gradients.

        The norm is the same number on every rank (reduced gradients), so the skip decision is
        too. It is made on the device: torch's fused AdamW skips its whole update (parameters,
        moments and step count) where ``found_inf`` is 1, the mechanism ``GradScaler`` uses, so
        nothing is read on the host. Another optimizer (the linear probe's LARS) has no such input:
        the norm is read on the host for it, one sync per step."""
        if not self._grad_bytes:
            self._grad_bytes = gradient_bytes(self.module)
        if self._params is None:  # at the first step the parameters are final (wrapped, sharded)
            self._params = list(self.module.parameters())  # walking the module tree: ~1 ms a step
        params = [p for p in self._params if p.grad is not None]
        grads = [p.grad for p in params]
        norm = (torch.nn.utils.get_total_norm(grads, foreach=True) if grads
                else torch.zeros((), device=self.device))
        if clip_grad is not None:  # a non-finite norm makes the gradients NaN: they are not applied
            torch.nn.utils.clip_grads_with_norm_(params, clip_grad, norm, foreach=True)
        # FSDP2: a replicated DTensor (it stays one for clipping the DTensor gradients)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        if _skips_on_device(self.optimizer):
            self.optimizer.found_inf = (~torch.isfinite(norm)).float()
            self.optimizer.step()
            self.optimizer.found_inf = None
        elif math.isfinite(float(norm)):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def step(self, clip_grad: float | None) -> torch.Tensor:
        """Clip (if asked), step, zero grads; returns the pre-clip gradient norm, a tensor on the
        device (reading it is the caller's host sync). A non-finite norm means the step was skipped
        (nothing was applied)."""
        return self._clip_and_step(clip_grad)

    # ----------------------------------------------------------------- state
    def prepare_resume(self, folder: Path, run_dir: Path) -> None:
        """Told, before the model is wrapped, which checkpoint the run resumes from (DeepSpeed
        builds its engine differently for one of another rank count)."""

    def save(self, folder: Path) -> dict:
        """Write this backend's part of a checkpoint. Collective. Sharded backends write files into
        ``folder``; the returned entries go into ``state.pt`` (written by the main rank)."""
        return self.state_dict() if self.env.is_main else {}

    def load(self, folder: Path, state: dict) -> None:
        """Restore model and optimizer from a checkpoint of any format (``state`` = its state.pt)."""
        from .checkpoint import full_model_state

        model, optimizer = full_model_state(folder, state)
        if optimizer is None:
            raise ValueError(f"checkpoint {folder} holds no optimizer state (a consolidated DeepSpeed "
                             "checkpoint); resume it with engine.backend=deepspeed from the original")
        self.load_state_dict({"model": model, "optimizer": optimizer})

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def memory_bytes(self) -> dict[str, int]:
        """What this rank holds: parameters (without teacher), gradients at the step, optimizer
        state, teacher."""
        params, teacher = parameter_bytes(self.module)
        return {"params": params, "grads": self._grad_bytes,
                "optimizer": nested_bytes(self.optimizer.state_dict()["state"]), "teacher": teacher}

    # ----------------------------------------------------------------- collectives
    def all_gather_object(self, obj):
        if self.env.world_size == 1:
            return [obj]
        out = [None] * self.env.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.env.world_size > 1:
            dist.barrier()

    def _control_group(self):
        """A CPU (gloo) group over every rank: the default one under gloo, else one made once."""
        if self._control is None:
            self._control = (dist.group.WORLD if dist.get_backend() == "gloo"
                             else dist.new_group(backend="gloo"))
        return self._control

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any; a CPU collective (gloo), so asking it
        every step costs no device sync."""
        if self.env.world_size == 1:
            return flag
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._control_group())
        return bool(t.item())

    def all_gather_host(self, obj) -> list:
        """Every rank's ``obj`` (host values: counts, records), over the CPU group: no device sync."""
        if self.env.world_size == 1:
            return [obj]
        out = [None] * self.env.world_size
        dist.all_gather_object(out, obj, group=self._control_group())
        return out


class DDPBackend(Backend):
    """Single process, or data parallel with DDP when the process group has more than one rank."""

    name = "ddp"

    def wrap(self, model: nn.Module) -> nn.Module:
        self._prepare(model)
        self.model = self.module
        if self.env.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # bucket views: gradients live in DDP's reduction buckets, not in a second copy
            self.model = nn.parallel.DistributedDataParallel(self.module, device_ids=ids,
                                                             gradient_as_bucket_view=True)
        return self.model

    def build_optimizer(self, groups: list[dict], lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)  # see _clip_and_step
        return self.optimizer

    def accumulate(self, sync: bool):
        if sync or not isinstance(self.model, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def state_dict(self) -> dict:
        """Full state: the method's weights and the optimizer keyed by parameter name (so any
        backend, on any number of ranks, can load it)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return {"model": self.module.state_dict(),
                "optimizer": get_optimizer_state_dict(self.module, self.optimizer)}

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        self.module.load_state_dict(state["model"])
        optimizer = state["optimizer"]
        if all(isinstance(k, int) for k in optimizer.get("state", {})) and optimizer.get("state"):
            self.optimizer.load_state_dict(optimizer)  # written by torch's own optimizer.state_dict()
        else:
            set_optimizer_state_dict(self.module, self.optimizer, optimizer)


def _skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` takes ``found_inf`` (torch's fused Adam/AdamW/SGD)."""
    return bool(optimizer.defaults.get("fused")) and getattr(optimizer, "_step_supports_amp_scaling", False)


def build_backend(cfg_engine, env: DistEnv, cfg_optim=None, micro_batch: int | None = None) -> Backend:
    """The backend ``engine.backend`` names. ``cfg_optim`` / ``micro_batch`` (clip, accumulation,
    batch per rank) are needed by DeepSpeed, which owns those inside its engine."""
    device = resolve_device(cfg_engine.device, env)
    use_attention_kernel(getattr(cfg_engine, "attention", "auto"), device)
    options = dict(activation_checkpointing=getattr(cfg_engine, "activation_checkpointing", False),
                   compile=resolve_compile(getattr(cfg_engine, "compile", False), device, cfg_engine.backend),
                   compile_mode=getattr(cfg_engine, "compile_mode", "default"),
                   compile_scope=getattr(cfg_engine, "compile_scope", "blocks"))
    if cfg_engine.backend == "ddp":
        return DDPBackend(device, env, cfg_engine.precision, **options)
    if cfg_engine.backend == "fsdp":
        from .fsdp import FSDPBackend

        return FSDPBackend(device, env, cfg_engine.precision, cpu_offload=cfg_engine.cpu_offload, **options)
    if cfg_engine.backend == "deepspeed":
        from .zero import DeepSpeedBackend

        if cfg_optim is None or micro_batch is None:
            raise ValueError("engine.backend=deepspeed needs the optim config and the batch per rank")
        return DeepSpeedBackend(device, env, cfg_engine.precision, zero_stage=cfg_engine.zero_stage,
                                clip_grad=cfg_optim.clip_grad, accum_steps=cfg_optim.accum_steps,
                                micro_batch=micro_batch, cpu_offload=cfg_engine.cpu_offload,
                                extra_config=cfg_engine.deepspeed_config, **options)
    raise ValueError(f"unknown backend {cfg_engine.backend!r}; valid: ddp, fsdp, deepspeed")
