"""Frozen-encoder features of a data set, computed once per rank on its share of the samples.

Rank ``r`` of ``W`` takes samples ``r, r + W, r + 2W, ...``; every sample is seen exactly once and
the shares differ by at most one. Features land in one preallocated tensor, so a bank is never
assembled from pieces (which would hold it twice).
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    return list(range(rank, n, world))


@torch.no_grad()
def extract(encoder: torch.nn.Module, dataset: Dataset, indices: list[int], batch_size: int,
            device: torch.device, autocast, num_workers: int = 0, normalize: bool = False,
            progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [len(indices), D] float32, labels [len(indices)])`` of ``encoder`` (which returns
    pooled features) on ``dataset[indices]``, in that order; optionally L2-normalised."""
    was_training = encoder.training
    encoder.eval()
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    feats = labels = None
    row = 0
    for images, targets in loader:
        with autocast():
            out = encoder(images.to(device, non_blocking=True))
        out = out.float()
        if normalize:
            out = torch.nn.functional.normalize(out, dim=1)
        if feats is None:
            feats = torch.empty(len(indices), out.shape[1], device=device)
            labels = torch.empty(len(indices), dtype=torch.long, device=device)
        feats[row:row + len(out)] = out
        labels[row:row + len(out)] = targets.to(device)
        row += len(out)
        if progress is not None:
            progress(len(out))
    encoder.train(was_training)
    if feats is None:  # an empty share (fewer samples than ranks)
        dim = getattr(encoder, "num_features", 0)
        return torch.empty(0, dim, device=device), torch.empty(0, dtype=torch.long, device=device)
    return feats, labels


def fingerprint(module: torch.nn.Module) -> str:
    """A digest of every weight and buffer of ``module``: a feature cache is valid only for the
    exact encoder that filled it, whatever the checkpoint's path or name says."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """The full ``[n, ...]`` tensor from every rank's strided share (see ``shard_indices``)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    world = dist.get_world_size()
    rows = -(-n // world)
    padded = local.new_zeros(rows, *local.shape[1:])
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    # global sample i = j * world + r sits at parts[r][j]
    return torch.stack(parts, dim=1).reshape(rows * world, *local.shape[1:])[:n]
