"""Backends: how a model is wrapped, stepped and saved. The train loop only calls this interface.

``DDPBackend`` covers the single process and ``DistributedDataParallel``; sharded backends
(FSDP2, DeepSpeed ZeRO) implement the same methods, so the loop never asks which one it has.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistEnv:
    """Join the process group described by the environment (torchrun / srun set it), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, env: DistEnv) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("engine.device=cuda but no CUDA device is visible; use engine.device=cpu")
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


class DDPBackend:
    """Single process, or data parallel with DDP when the process group has more than one rank."""

    def __init__(self, device: torch.device, env: DistEnv, precision: str = "bf16"):
        self.device = device
        self.env = env
        self.dtype = {"bf16": torch.bfloat16, "fp32": None}[precision]
        self.model: nn.Module | None = None
        self.module: nn.Module | None = None  # the unwrapped model
        self.optimizer: torch.optim.Optimizer | None = None

    def wrap(self, model: nn.Module) -> nn.Module:
        self.module = model.to(self.device)
        self.model = self.module
        if self.env.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.module, device_ids=ids)
        return self.model

    def build_optimizer(self, groups: list[dict], lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)
        return self.optimizer

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def accumulate(self, sync: bool):
        """Context for one micro-step's forward+backward; ``sync=False`` skips the gradient
        all-reduce on non-final micro-steps of an accumulation."""
        if sync or not isinstance(self.model, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self, clip_grad: float | None) -> torch.Tensor:
        """Clip (if asked), step, zero grads; returns the pre-clip gradient norm (a tensor: no sync)."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        max_norm = clip_grad if clip_grad is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def all_gather_object(self, obj):
        if self.env.world_size == 1:
            return [obj]
        out = [None] * self.env.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.env.world_size > 1:
            dist.barrier()


def build_backend(cfg_engine, env: DistEnv) -> DDPBackend:
    device = resolve_device(cfg_engine.device, env)
    if cfg_engine.backend == "ddp":
        return DDPBackend(device, env, cfg_engine.precision)
    raise ValueError(f"unknown backend {cfg_engine.backend!r}")
