"""The one way mimscale reads a tensor file: never by running the pickle's code.

``torch.load`` with ``weights_only=True`` rebuilds tensors and plain containers only; a file that
names any other Python object is refused, since unpickling it could run arbitrary code. The few
classes real checkpoints pickle are allowed by name: official MAE and timm training scripts save
their ``argparse.Namespace``, and DeepSpeed's checkpoint files hold a handful of its own enums and
records (allowed only when DeepSpeed is installed). Every failure is a ``CheckpointError`` naming
the file.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from mimscale.errors import CheckpointError

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_REASON = re.compile(r"(Unsupported [^\n.]*)")


def _deepspeed_globals() -> list:
    """What DeepSpeed pickles into its ``*_optim_states.pt`` files (its model files need none);
    imported only when reading DeepSpeed's files, so DeepSpeed stays optional."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def allowed_globals(deepspeed: bool = False) -> list:
    """The classes a checkpoint may name besides tensors and plain containers."""
    return [argparse.Namespace, *(_deepspeed_globals() if deepspeed else [])]


def _unsafe(path: Path, name: str) -> CheckpointError:
    return CheckpointError(
        f"{path} holds Python objects that are not allowed to be loaded ({name}): refusing to unpickle "
        "it, since loading it could run code; if you trust the file, re-save only its tensors: in "
        "Python, torch.load it with weights_only turned off and torch.save a plain dict of its tensors "
        "(torch.save({'model': state_dict}, 'clean.pth')), or save them as .safetensors")


def _unreadable(path: Path, error: Exception) -> CheckpointError:
    text = str(error)
    found = _REASON.search(text)
    reason = found.group(1) if found else f"{type(error).__name__}: {text.splitlines()[0] if text else 'no data'}"
    return CheckpointError(
        f"{path} is not a readable checkpoint ({reason[:160]}): it is damaged, truncated or not a "
        "tensor file; give a file written by torch.save (.pth, .pt, .bin) or a .safetensors file")


def load_file(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
              deepspeed: bool = False, mmap: bool = False) -> Any:
    """The contents of a ``torch.save`` file (or a ``.safetensors`` file, as a dict), loaded
    without executing code; raises ``CheckpointError`` for a missing, damaged or unsafe file.
    ``deepspeed`` also allows DeepSpeed's classes; ``mmap`` leaves tensor data on disk (a cheap
    check that a file is safe before handing it to a library that unpickles it fully)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors

        try:
            return load_safetensors(str(path), device=str(map_location))
        except Exception as e:  # safetensors' own error type: a damaged header or truncated data
            raise _unreadable(path, e) from e
    return _torch_load(path, path, map_location, deepspeed=deepspeed, mmap=mmap)


def _torch_load(source, path: Path, map_location, deepspeed: bool = False, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` of a file or buffer, failures as ``CheckpointError``s naming ``path``."""
    try:
        with torch.serialization.safe_globals(allowed_globals(deepspeed)):
            return torch.load(source, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # damaged files fail in many ways (EOFError, KeyError, RuntimeError, ...)
        named = _GLOBAL.search(str(e))
        if named:
            raise _unsafe(path, named.group(1)) from e
        raise _unreadable(path, e) from e


# What a DCP checkpoint's ``.metadata`` pickle may name: torch's own records of where each shard is.
_DCP_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "ChunkStorageMetadata",
                                              "TensorProperties", "BytesStorageMetadata", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _DcpMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if dtype or name in _DCP_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")


def vet_dcp(folder: str | os.PathLike) -> None:
    """Check a ``torch.distributed.checkpoint`` folder before torch reads it: torch unpickles its
    ``.metadata`` with plain ``pickle`` and the non-tensor items (step, lr, ...) with a full
    unpickling ``torch.load``, either of which could run a file's code. The metadata is
    read here with an unpickler that knows only DCP's records, then every non-tensor item with the
    safe loader; anything else is a ``CheckpointError``."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    folder = Path(folder)
    meta_path = folder / ".metadata"
    try:
        with open(meta_path, "rb") as f:
            meta = _DcpMetadataUnpickler(f).load()
    except OSError as e:
        raise CheckpointError(f"{meta_path} cannot be read ({e.strerror}): the sharded checkpoint is damaged") from e
    except Exception as e:
        named = _GLOBAL.search(str(e))
        raise (_unsafe(meta_path, named.group(1)) if named else _unreadable(meta_path, e)) from e
    for index, info in (meta.storage_data or {}).items():
        if not isinstance(meta.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{folder / info.relative_path}: item {index.fqn} is stored transformed "
                                  f"({info.transform_descriptors}), which mimscale cannot check before loading")
        with open(folder / info.relative_path, "rb") as f:
            f.seek(info.offset)
            _torch_load(io.BytesIO(f.read(info.length)), folder / info.relative_path, "cpu")
