"""``mimscale convert``: sharded checkpoints to one plain checkpoint, and encoders to timm, mmdet or mmseg.

    mimscale convert runs/x/checkpoints/step_00010000 --out plain/step_00010000          # fsdp / deepspeed -> full
    mimscale convert runs/x/checkpoints/step_00010000 --to timm --out vit_l.safetensors  # + vit_l.teacher.safetensors
    mimscale convert runs/x/checkpoints/step_00010000 --to mmseg --out checkpoints/mimscale_vit-l_mmseg.pth

A plain (``full``) checkpoint holds the model, optimizer (fsdp; DeepSpeed's optimizer state stays in
its own files) and run state in one ``state.pt``: ``load_checkpoint`` reads it without
torch.distributed or DeepSpeed, and any backend can resume from it (deepspeed-written ones without
optimizer state excepted). The timm export is the student encoder under timm ``VisionTransformer``
keys; a teacher, when the run had one, is written next to it. The mmdet / mmseg export is the
encoder as the backbone file the shipped OpenMMLab configs load (docs/dense.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mimscale.errors import UserError

if TYPE_CHECKING:
    import torch

SOURCES = {"auto": None, "full": "full", "ddp": "full", "fsdp": "dcp", "deepspeed": "deepspeed"}


def _read(checkpoint: str, source: str) -> dict:
    from mimscale.pretrain.engine.checkpoint import (
        checkpoint_folder,
        checkpoint_format,
        load_checkpoint,
        read_state,
    )

    folder = checkpoint_folder(checkpoint)  # a run folder: its newest complete checkpoint
    fmt = checkpoint_format(read_state(folder))
    expected = SOURCES[source]
    if expected is not None and expected != fmt:
        written = {"full": "ddp (a full checkpoint)", "dcp": "fsdp", "deepspeed": "deepspeed"}[fmt]
        raise UserError(f"--from {source}: {checkpoint} was written by {written}; use --from "
                         f"{'ddp' if fmt == 'full' else written} or --from auto")
    return load_checkpoint(folder)


def to_plain_checkpoint(state: dict, out: Path) -> list[Path]:
    from mimscale.config import from_dict, to_yaml
    from mimscale.pretrain.engine.checkpoint import write_checkpoint

    plain = {k: v for k, v in state.items() if k != "format"}
    plain["format"] = "full"
    written = write_checkpoint(out, plain, to_yaml(from_dict(state["config"])))
    return [written]


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, fmt: str) -> Path:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    return path


def encoder_state_dicts(state: dict) -> tuple[dict, dict | None]:
    """(student encoder, teacher encoder or None), both under timm ``VisionTransformer`` keys."""
    from mimscale.config import from_dict
    from mimscale.pretrain.method import build_model
    from mimscale.pretrain.models import to_timm_state_dict

    student = build_model(from_dict(state["config"]))
    student.load_state_dict(state["model"], strict=True)  # the official MAE layout, checked
    prefix = "teacher."
    teacher = {k[len(prefix):]: v for k, v in state.get("method", {}).items() if k.startswith(prefix)}
    return to_timm_state_dict(student), teacher or None


def to_timm(state: dict, out: Path, fmt: str) -> list[Path]:
    student, teacher = encoder_state_dicts(state)
    written = [_save_tensors(student, out, fmt)]
    if teacher is not None:
        missing = sorted(set(student) - set(teacher))
        written.append(_save_tensors(teacher, out.with_name(f"{out.stem}.teacher{out.suffix}"), fmt))
        if missing:
            print(f"teacher: {_describe_missing(student, teacher)}; load it into timm with strict=False")
    return written


def _describe_missing(student: dict, teacher: dict) -> str:
    """e.g. ``9 of 12 blocks, no norm``: what a truncated scorer lacks against a full encoder."""
    def depth(sd):
        return len({k.split(".")[1] for k in sd if k.startswith("blocks.")})

    lacks = sorted({k.split(".")[0] for k in set(student) - set(teacher) if not k.startswith("blocks.")})
    return f"{depth(teacher)} of {depth(student)} blocks" + (f", no {', '.join(lacks)}" if lacks else "")


TARGETS = {"checkpoint": "one plain checkpoint folder (state.pt) loadable without torch.distributed",
           "timm": "the student encoder (and teacher) as a timm VisionTransformer state dict",
           "mmdet": "the encoder for the shipped mmdet configs (position table at 1024 px)",
           "mmseg": "the encoder for the shipped mmseg configs (position table at 512 px)"}


def _format_of(out: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return "safetensors" if out.suffix == ".safetensors" else "pth"


def run(args) -> int:
    out = Path(args.out)
    state = _read(args.checkpoint, args.source)
    if args.to == "checkpoint":
        written = to_plain_checkpoint(state, out)
    elif args.to in ("mmdet", "mmseg"):
        from mimscale.downstream.openmmlab.convert import convert_to_openmmlab

        written = [convert_to_openmmlab(state, args.to, out)]
    else:
        if out.suffix not in (".safetensors", ".pth", ".pt"):
            raise UserError(f"--out {out}: name the file .safetensors, .pth or .pt for --to timm")
        written = to_timm(state, out, _format_of(out, args.format))
    for path in written:
        print(f"wrote {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("convert", help="consolidate sharded checkpoints; export encoders to timm, mmdet or mmseg",
                       description="Consolidate an fsdp (DCP) or deepspeed checkpoint into one plain "
                                   "checkpoint, export the student encoder (and teacher) to timm, or write "
                                   "the encoder as the backbone file of the shipped mmdet (Mask R-CNN) or "
                                   "mmseg (UperNet) configs, its position table resized to their input size.")
    p.add_argument("checkpoint", help="a checkpoint folder (runs/<name>/checkpoints/step_XXXXXXXX) or a "
                                      "run folder (its newest complete checkpoint)")
    p.add_argument("--out", required=True, help="output folder (--to checkpoint) or file (--to timm: "
                                                ".safetensors, .pth or .pt; --to mmdet / mmseg: the .pth "
                                                "that the config's init_cfg names)")
    p.add_argument("--from", dest="source", choices=list(SOURCES), default="auto",
                   help="the backend that wrote the checkpoint; auto reads it from the checkpoint")
    p.add_argument("--to", choices=list(TARGETS), default="checkpoint",
                   help="; ".join(f"{k}: {v}" for k, v in TARGETS.items()))
    p.add_argument("--format", choices=("auto", "safetensors", "pth"), default="auto",
                   help="tensor file format for --to timm; auto follows the --out suffix")
    p.set_defaults(func=run)
