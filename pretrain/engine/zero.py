"""DeepSpeed backend: ZeRO stage 1 (optimizer state sharded), 2 (+ gradients), 3 (+ parameters).

Parameters stay fp32 inside DeepSpeed and compute runs under the same autocast as the other
backends: the EMA teacher then keeps exact fp32 weights (a bf16 teacher would round away most of
each ``1 − m`` update), at the cost of DeepSpeed's separate fp32 master partition. Accumulation,
clipping and the step belong to the DeepSpeed engine; this class maps the loop's interface onto it.
Checkpoints are DeepSpeed's own files (``deepspeed/`` in the checkpoint folder); ``read_deepspeed``
consolidates them into one fp32 state dict without DeepSpeed's engine or a process group. On
another number of ranks they load through DeepSpeed's universal form (``zero_universal.py``).

Install with ``pip install 'mimscale[deepspeed]'``; on CPUs DeepSpeed runs with
``DS_ACCELERATOR=cpu`` and gloo (set automatically when ``engine.device`` resolves to cpu). There,
the first start on a machine compiles DeepSpeed's shared-memory communication op (minutes, before
step 1, silently): ``shm_build_pending`` sees it coming, so the run says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from mimscale.errors import CheckpointError

from .backend import Backend
from .checkpoint import checkpoint_format
from .fsdp import init_single_process_group
from .memory import nested_bytes, parameter_bytes
from .safe_load import load_file
from .zero_universal import TAG, convert, restore_frozen, written_on

SHM_BUILDER = "ShareMemCommBuilder"  # DeepSpeed's CPU op for intra-machine collectives


def import_deepspeed(device_type: str = "cpu"):
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError:
        raise ImportError("engine.backend=deepspeed needs DeepSpeed: pip install 'mimscale[deepspeed]' "
                          "(or use engine.backend=fsdp, which needs nothing extra)") from None
    return deepspeed


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class DeepSpeedBackend(Backend):
    name = "deepspeed"
    checkpoint_format = "deepspeed"

    def __init__(self, device: torch.device, env, precision: str = "bf16", *, zero_stage: int = 2,
                 clip_grad: float | None = None, accum_steps: int = 1, micro_batch: int = 1,
                 cpu_offload: bool = False, extra_config: str | None = None, **options):
        super().__init__(device, env, precision, **options)
        self._check_offload(cpu_offload, device)
        if zero_stage not in (1, 2, 3):
            raise ValueError(f"zero_stage {zero_stage} is not valid; valid: 1, 2, 3")
        self.zero_stage, self.clip_grad, self.accum_steps = zero_stage, clip_grad, accum_steps
        self.micro_batch, self.cpu_offload, self.extra_config = micro_batch, cpu_offload, extra_config
        self.engine = None
        self.universal: Path | None = None  # where a checkpoint of another rank count is converted

    def ds_config(self) -> dict:
        """The DeepSpeed config this run uses: generated from the mimscale config, then the
        ``engine.deepspeed_config`` JSON merged over it."""
        zero = {"stage": self.zero_stage,
                # every parameter partitioned, none kept gathered: the EMA update then only ever
                # touches local partitions (see local_shards)
                "stage3_param_persistence_threshold": 0}
        if self.cpu_offload:
            zero["offload_optimizer"] = {"device": "cpu"}
        config = {"train_micro_batch_size_per_gpu": self.micro_batch,
                  "gradient_accumulation_steps": self.accum_steps,
                  "gradient_clipping": self.clip_grad or 0.0,
                  "zero_optimization": zero,
                  "zero_allow_untested_optimizer": True,
                  "zero_force_ds_cpu_optimizer": False,
                  "steps_per_print": 2**31 - 1,
                  "wall_clock_breakdown": False}
        if self.universal is not None:
            config["checkpoint"] = {"load_universal": True}
        if self.extra_config:
            config = _merge(config, json.loads(Path(self.extra_config).read_text()))
        return config

    # ----------------------------------------------------------------- model
    def wrap(self, model: nn.Module) -> nn.Module:
        import_deepspeed(self.device.type)
        init_single_process_group(self.device)
        # DeepSpeed reads the launcher's variables, which a plain single process does not have
        for key, value in (("LOCAL_RANK", self.env.local_rank), ("RANK", self.env.rank),
                           ("WORLD_SIZE", self.env.world_size)):
            os.environ.setdefault(key, str(value))
        self._prepare(model)
        self.model = model  # replaced by the DeepSpeed engine once the optimizer exists
        return model

    def build_optimizer(self, groups: list[dict], lr: float, betas: tuple[float, float]):
        return self.initialize(torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True))  # as DDP's

    def initialize(self, base: torch.optim.Optimizer):
        """Build DeepSpeed's engine around the wrapped module and ``base``, an optimizer over its
        parameters (AdamW from ``build_optimizer``, or another, e.g. the linear probe's LARS). ZeRO
        hands ``base`` flat partitions of each param group, keeping the groups' other keys."""
        deepspeed = import_deepspeed(self.device.type)
        config = self.ds_config()
        folder = shm_build_pending(deepspeed)
        if folder is not None and self.env.local_rank == 0:
            print(f"deepspeed: compiling its shared-memory communication op for CPUs before step 1: "
                  f"minutes, once per machine (cached in {folder} for later starts)", flush=True)
        zero = config["zero_optimization"]
        if (self.zero_stage == 3 and getattr(self.module, "teacher", None) is not None
                and zero.get("stage3_param_persistence_threshold", 0) > 0):
            raise ValueError("zero_optimization.stage3_param_persistence_threshold must stay 0 with a "
                             "teacher: its EMA update works on parameter partitions only")
        if zero.get("compute_grad_norm", True) is False:
            raise ValueError("zero_optimization.compute_grad_norm must stay true: skipping non-finite "
                             "steps needs DeepSpeed's gradient norm")
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.module, optimizer=base, config=config, dist_init_required=False)
        self.model = self.engine
        if self.zero_stage == 3:
            _register_container_params(deepspeed, self.module)
        return self.optimizer

    def accumulate(self, sync: bool):
        """Tells DeepSpeed where the accumulation boundary is. Stage 1 reduces gradients only
        there; stages 2 and 3 reduce-scatter every micro-step, which is how they keep gradients
        partitioned."""
        self.engine.set_gradient_accumulation_boundary(sync)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, scale: float = 1.0) -> None:
        """DeepSpeed divides by its ``gradient_accumulation_steps`` (= 1/``scale``) itself."""
        self.engine.backward(loss)

    def step(self, clip_grad: float | None = None) -> torch.Tensor:
        """DeepSpeed's step (clipping as configured at build); it skips a step whose gradient norm
        is not finite, which the returned norm shows. DeepSpeed's overflow check reads the norm on
        the host inside its step: this backend syncs once per step (ddp and fsdp do not); nothing
        here adds a read (the norm stays a device tensor when DeepSpeed keeps one)."""
        if not self._grad_bytes:
            self._grad_bytes = nested_bytes(getattr(self.optimizer, "averaged_gradients", {}))
        self.engine.step()
        norm = self.engine.get_global_grad_norm()  # a tensor, or a float DeepSpeed already read
        if torch.is_tensor(norm):
            return norm.detach().reshape(()).to(self.device, torch.float32, copy=True)
        return torch.tensor(float(norm), device=self.device)

    @contextlib.contextmanager
    def local_shards(self):
        """Under ZeRO-3 a parameter's ``data`` is an empty placeholder between uses; inside this
        context it is the rank's partition (same layout for same-shaped tensors, so a teacher and
        the student it follows line up element by element)."""
        if self.zero_stage < 3:
            yield
            return
        swapped = []
        for p in self.module.parameters():
            if getattr(p, "ds_tensor", None) is not None and p.data.numel() == 0:
                swapped.append((p, p.data))
                p.data = p.ds_tensor.data
        try:
            yield
        finally:
            for p, placeholder in swapped:
                p.data = placeholder

    # ----------------------------------------------------------------- state
    def save(self, folder: Path) -> dict:
        self.engine.save_checkpoint(str(folder), tag=TAG, client_state={}, save_latest=False)
        return {}

    def load(self, folder: Path, state: dict) -> None:
        fmt = checkpoint_format(state)
        if fmt != "deepspeed":
            raise ValueError(f"checkpoint {folder} was written by another backend ({fmt}); a deepspeed "
                             "run resumes from deepspeed checkpoints only. Resume it with the backend "
                             "that wrote it, or start a new run from its weights")
        vet_deepspeed_files(folder)
        if self.universal is None:
            path, _ = self.engine.load_checkpoint(str(folder), tag=TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
        else:  # written on another rank count (prepare_resume): through the universal form
            convert(folder, self.universal)
            path, _ = self.engine.load_checkpoint(str(self.universal), tag=TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
            restore_frozen(self.module, read_deepspeed(folder), self.zero_stage)
            self.barrier()
            if self.env.is_main:
                shutil.rmtree(self.universal, ignore_errors=True)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {Path(folder) / TAG}")

    def prepare_resume(self, folder: Path, run_dir: Path) -> None:
        """A checkpoint of another rank count is loaded through DeepSpeed's universal form, which
        the engine must be built for (``zero_universal.py``); it is converted into the run folder."""
        ranks = written_on(folder)
        if ranks is not None and ranks != self.env.world_size:
            self.universal = Path(run_dir) / f".universal-{Path(folder).name}"

    def state_dict(self) -> dict:
        raise NotImplementedError("deepspeed keeps model and optimizer in its own files: use save()")

    def memory_bytes(self) -> dict[str, int]:
        params, teacher = parameter_bytes(self.module)
        opt = self.optimizer
        masters = (getattr(opt, "single_partition_of_fp32_groups", None)  # stages 1, 2
                   or getattr(opt, "fp32_partitioned_groups_flat", None) or [])  # stage 3
        optimizer = nested_bytes(opt.optimizer.state) + nested_bytes(list(masters))
        return {"params": params, "grads": self._grad_bytes, "optimizer": optimizer, "teacher": teacher}


def shm_build_pending(deepspeed) -> Path | None:
    """The folder DeepSpeed will compile its CPU shared-memory op into when its communication
    starts in this process; None when nothing will be compiled: another accelerator, the op built
    at install or already loaded, DeepSpeed's communication already up, or a library built before
    in torch's extension cache."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm import comm
    from deepspeed.git_version_info import installed_ops
    from deepspeed.ops.op_builder.builder import OpBuilder

    builder = get_accelerator().create_op_builder(SHM_BUILDER)
    if (builder is None or getattr(comm, "cdb", None) is not None or installed_ops.get(builder.NAME)
            or builder.NAME in OpBuilder._loaded_ops
            or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False)):
        return None
    from torch.utils import cpp_extension

    where = getattr(cpp_extension, "_get_build_directory", None)  # torch's own rule for the folder
    if where is None:
        return Path(cpp_extension.get_default_build_root())
    folder = Path(where(builder.NAME, False))
    return None if (folder / f"{builder.NAME}.so").is_file() else folder


def _register_container_params(deepspeed, root: nn.Module) -> None:
    """ZeRO-3 gathers a module's own parameters when that module runs. Tokens and position tables
    belong to container modules (the MAE, a teacher) that scorers read without calling them, so
    they are gathered for the whole forward of the root instead."""
    for module in root.modules():
        if module is root or not any(True for _ in module.children()):
            continue
        for p in module.parameters(recurse=False):
            deepspeed.zero.register_external_parameter(root, p)


def vet_deepspeed_files(folder: Path) -> None:
    """Check that every file DeepSpeed will read from ``folder`` holds only tensors, containers and
    DeepSpeed's few allowed classes: DeepSpeed unpickles them fully (it can run a file's code),
    so a file that names anything else is refused before DeepSpeed opens it."""
    for path in sorted((Path(folder) / TAG).glob("*.pt")):
        load_file(path, deepspeed=True, mmap=True)


def read_deepspeed(folder: Path) -> dict:
    """The fp32 model state dict (parameters, buffers and the teacher) of a DeepSpeed checkpoint
    folder, consolidated in this process.

    DeepSpeed's module file holds what is not partitioned (everything under stages 1-2, where it
    is also the only copy of frozen parameters); its ``zero_to_fp32`` rebuilds the partitioned
    fp32 parameters, which take precedence."""
    import_deepspeed("cuda" if torch.cuda.is_available() else "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    files = sorted((Path(folder) / TAG).glob("*model_states.pt"))
    if not files:
        raise CheckpointError(f"checkpoint {folder} says it is a deepspeed checkpoint but has no "
                              f"{TAG}/*model_states.pt: it is damaged; use an earlier checkpoint")
    vet_deepspeed_files(folder)
    module = load_file(files[0], deepspeed=True)["module"]
    state = {k: v for k, v in module.items() if not isinstance(v, torch.Tensor) or v.numel() > 0}
    fp32 = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=TAG)
    state.update({k: v.contiguous() for k, v in fp32.items()})
    return state
