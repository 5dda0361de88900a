"""FSDP2 backend: parameters, gradients and optimizer state sharded over the ranks.

Every transformer block (student encoder and decoder, teacher, heads) is its own ``fully_shard``
unit and the method is the root unit, so the teacher is sharded exactly like the student and its
EMA update is a pointwise op on local shards (DTensors), with no gather. With ``precision=bf16`` a
``MixedPrecisionPolicy`` gathers bf16 parameters and reduces gradients in fp32, while the sharded
master parameters stay fp32. Checkpoints are ``torch.distributed.checkpoint`` (DCP) shards keyed by
parameter name: a checkpoint written on W ranks loads on any W', or in one process with no process
group at all (``read_dcp``).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)

from .backend import Backend
from .checkpoint import checkpoint_format, full_model_state
from .safe_load import vet_dcp

DCP_DIR = "dcp"


def init_single_process_group(device: torch.device) -> None:
    """A one-rank process group, so sharded backends also run (and reshard) in a plain process."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


class _DirectAccess:
    """Lets code use a sharded block's parts without calling the block.

    Scorers read q, k as ``blk.attn.qk(blk.norm1(x))`` and multi-shot plans do the same before a
    block runs; FSDP only gathers a block's parameters when the block itself is called. So when a
    part with parameters runs outside its block's forward, the block is gathered, and it is
    resharded when the root forward ends.
    """

    def __init__(self, root: nn.Module, blocks: list[nn.Module]):
        self.inside: set[int] = set()
        self.gathered: list[nn.Module] = []
        for blk in blocks:
            blk.register_forward_pre_hook(lambda m, _args: self.inside.add(id(m)))
            blk.register_forward_hook(lambda m, _args, _out: self.inside.discard(id(m)))
            for part in blk.modules():
                if part is not blk and any(True for _ in part.parameters(recurse=False)):
                    part.register_forward_pre_hook(self._gather_hook(blk))
        root.register_forward_hook(lambda *_: self.reshard())

    def _gather_hook(self, blk: nn.Module):
        def hook(_part, _args):
            if id(blk) not in self.inside:
                blk.unshard()  # a no-op when already gathered (e.g. during backward recompute)
                self.gathered.append(blk)
        return hook

    def reshard(self) -> None:
        for blk in self.gathered:
            blk.reshard()
        self.gathered.clear()


class FSDPBackend(Backend):
    name = "fsdp"
    checkpoint_format = "dcp"

    def __init__(self, device: torch.device, env, precision: str = "bf16", *, cpu_offload: bool = False,
                 **options):
        super().__init__(device, env, precision, **options)
        self._check_offload(cpu_offload, device)
        self.cpu_offload = cpu_offload
        self._direct: _DirectAccess | None = None

    def wrap(self, model: nn.Module, units: list[nn.Module] | None = None) -> nn.Module:
        """Shard ``model``: each of ``units`` (default: its mimscale transformer blocks; other
        models, such as timm's ViT, name their own blocks) is one unit, the rest the root unit."""
        init_single_process_group(self.device)
        blocks = self._prepare(model)
        if units is not None:
            blocks = list(units)
        mesh = init_device_mesh(self.device.type, (dist.get_world_size(),))
        # Autocast picks each op's compute dtype (as with DDP); inputs and the residual stream stay
        # fp32, so loss targets are computed from the exact images.
        mp = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32 if self.dtype else None,
                                  cast_forward_inputs=False)
        offload = CPUOffloadPolicy() if self.cpu_offload else OffloadPolicy()
        for blk in blocks:
            fully_shard(blk, mesh=mesh, mp_policy=mp, offload_policy=offload)
        fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload)
        self._direct = _DirectAccess(model, blocks)
        # the method returns views (reconstructions for figures) that nothing modifies in place
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP\w+\) returned a view")
        self.model = model
        return model

    def build_optimizer(self, groups: list[dict], lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
        fused = not self.cpu_offload  # fused: skips a non-finite step on the device (backend.py)
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)
        return self.optimizer

    def accumulate(self, sync: bool):
        """Non-final micro-steps keep unsharded gradients locally instead of reduce-scattering."""
        self.model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Full (gathered) model and optimizer state, on rank 0 (in CPU memory; empty on the other
        ranks): for tools; checkpoints use the sharded ``save``."""
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model, optimizer = get_state_dict(self.module, self.optimizer, options=opts)
        return {"model": model, "optimizer": optimizer}

    def load_state_dict(self, state: dict) -> None:
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True))

    def save(self, folder: Path) -> dict:
        model, optimizer = get_state_dict(self.module, self.optimizer)
        dcp.save({"model": model, "optimizer": optimizer}, checkpoint_id=Path(folder) / DCP_DIR)
        return {}

    def load(self, folder: Path, state: dict) -> None:
        if checkpoint_format(state) != "dcp":  # a full checkpoint (e.g. from ddp): shard it here
            model, optimizer = full_model_state(folder, state)
            if optimizer is None:
                raise ValueError(f"checkpoint {folder} holds no optimizer state; resume it with the "
                                 "backend that wrote it")
            self.load_state_dict({"model": model, "optimizer": optimizer})
            return
        vet_dcp(Path(folder) / DCP_DIR)  # torch's reader unpickles the metadata in full
        model, optimizer = get_state_dict(self.module, self.optimizer)
        target = {"model": model, "optimizer": optimizer}
        dcp.load(target, checkpoint_id=Path(folder) / DCP_DIR)  # reads this rank's shards, any W
        set_state_dict(self.module, self.optimizer, model_state_dict=target["model"],
                       optim_state_dict=target["optimizer"])


def read_dcp(folder: Path) -> tuple[dict, dict]:
    """(full method state dict, full optimizer state) of a DCP checkpoint, in this process only."""
    # what torch's own dcp_to_torch_save does: plan the load from the metadata alone, no collectives
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = Path(folder) / DCP_DIR
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"checkpoint {folder} says it is sharded (dcp) but {path} has no "
                                ".metadata: it is damaged")
    vet_dcp(path)
    state: dict = {}
    _load_state_dict(state, storage_reader=dcp.FileSystemReader(str(path)),
                     planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return state["model"], state.get("optimizer")
