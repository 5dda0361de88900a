"""Resuming a DeepSpeed checkpoint on another number of ranks, through DeepSpeed's universal
checkpoint.

Why a conversion: ZeRO's files are each rank's partition of flat buffers, cut for the rank count
that wrote them. DeepSpeed's ``ds_to_universal`` rewrites them as one file per parameter (fp32
weights and Adam moments), which an engine built with ``checkpoint.load_universal`` loads on any
number of ranks. It restores only what the optimizer holds, so frozen parameters (an EMA
teacher) are put back here from the consolidated checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from mimscale.errors import CheckpointError

from .checkpoint import read_state

TAG = "deepspeed"  # DeepSpeed's checkpoint tag = the sub-folder of the checkpoint folder


def written_on(folder: Path) -> int | None:
    """How many ranks wrote the DeepSpeed checkpoint ``folder``; None for another format."""
    if not (Path(folder) / TAG).is_dir():
        return None
    state = read_state(folder)
    return int(state["world_size"]) if state.get("format") == "deepspeed" else None


def convert(folder: Path, out: Path) -> None:
    """Write the universal form of ``folder``'s DeepSpeed files to ``out/TAG`` (main rank only);
    every rank learns whether it worked, so none waits for a conversion that failed."""
    error = None
    if dist.get_rank() == 0:
        try:
            from deepspeed.checkpoint import ds_to_universal

            shutil.rmtree(out, ignore_errors=True)
            args = argparse.Namespace(input_folder=str(Path(folder) / TAG), output_folder=str(out / TAG),
                                      num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                      strict=True, inject_missing_state=True)
            with contextlib.redirect_stdout(io.StringIO()):  # its progress report, not ours
                ds_to_universal.main(args)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            error = f"{type(e).__name__}: {e}"
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise CheckpointError(f"checkpoint {folder} could not be converted to DeepSpeed's universal "
                              f"form to load on {dist.get_world_size()} ranks ({box[0]}); resume on "
                              "the rank count that wrote it")


def restore_frozen(module: torch.nn.Module, full: dict, zero_stage: int) -> None:
    """Copy the frozen parameters (not in the optimizer, so not in a universal checkpoint) from
    ``full``, the consolidated state dict; under ZeRO-3 through a gather, rank 0 writing."""
    frozen = [(name, p) for name, p in module.named_parameters() if not p.requires_grad and name in full]
    if not frozen:
        return
    if zero_stage < 3:
        with torch.no_grad():
            for name, p in frozen:
                p.copy_(full[name].to(p.dtype))
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([p for _, p in frozen], modifier_rank=0), torch.no_grad():
        if dist.get_rank() == 0:
            for name, p in frozen:
                p.copy_(full[name].to(p.dtype))
